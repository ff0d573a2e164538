"""Log formatting: JSON lines carrying the current request id; only __main__ installs it."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import threading
import time
from typing import Any, TextIO

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
"""The id of the RPC being handled in this task; '-' outside any RPC."""

# Attributes every LogRecord has; anything else was passed through `extra=` and is logged too.
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
# One encoder for every line: json.dumps(default=...) would build a new one per call.
_ENCODER = json.JSONEncoder(default=str)


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: time, level, logger, message, request id, extras."""

    _second = -1
    _stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        # Every RPC writes an access line: cache the per-second part of the timestamp.
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        payload: dict[str, Any] = {
            "ts": f"{self._stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": request_id_var.get(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and key[0] != "_":
                payload[key] = value
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return _ENCODER.encode(payload)


class FieldsLogger:
    """``logger.info(msg, extra=fields)`` for a line written on every RPC, at a fraction of the
    cost: the record is a copy of one the logger built once, with the time, message and fields
    filled in. Level, disabled flag, filters, handlers and formatters apply as for any record;
    a custom ``logging.setLogRecordFactory`` is bypassed, and the thread, process and asyncio
    task fields are the first record's (``logs.configure`` turns their collection off anyway).
    """

    def __init__(self, logger: logging.Logger, level: int = logging.INFO) -> None:
        self.logger = logger
        self.level = level
        self._template: dict[str, Any] | None = None

    def log(self, msg: str, fields: dict[str, Any]) -> None:
        """Log ``msg`` (taken as is, not %-formatted) with ``fields`` as extra attributes."""
        logger = self.logger
        if not logger.isEnabledFor(self.level):
            return
        template = self._template
        if template is None:
            # Built by the real machinery (so it has every attribute this Python's records
            # have), once: findCaller is off (logs.configure) or pointless for a fixed line.
            template = self._template = vars(
                logger.makeRecord(logger.name, self.level, "(unknown file)", 0, "", (), None)
            )
        record = logging.LogRecord.__new__(logging.LogRecord)
        attrs = record.__dict__
        attrs.update(template)
        created = time.time()
        attrs["created"] = created
        attrs["msecs"] = int((created - int(created)) * 1000) + 0.0
        attrs["relativeCreated"] = (
            template["relativeCreated"] + (created - template["created"]) * 1e3
        )
        attrs["msg"] = msg
        attrs.update(fields)
        logger.handle(record)


class BatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes quiet records in batches, not one write per record.

    Every RPC writes an access line, and a write per line is a syscall per RPC. Records at
    WARNING and above are written at once (after the batch before them, so order holds); quieter
    ones wait until `batch_lines` are pending or at most `flush_interval_s` (a daemon thread
    flushes). Each write holds whole lines, so nothing else on the stream lands mid-line.
    """

    def __init__(
        self, stream: TextIO | None = None, batch_lines: int = 64, flush_interval_s: float = 0.5
    ) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._batch_lines = batch_lines
        self._interval = flush_interval_s
        threading.Thread(target=self._flush_forever, name="log-flush", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        # Called by Handler.handle with self.lock held, like every emit.
        try:
            self._pending.append(self.format(record) + self.terminator)
            if record.levelno >= logging.WARNING or len(self._pending) >= self._batch_lines:
                self._write_pending()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write_pending()

    def _write_pending(self) -> None:
        # Called with the lock held.
        if self._pending:
            text = "".join(self._pending)
            self._pending.clear()
            self.stream.write(text)
        if self.stream and hasattr(self.stream, "flush"):
            self.stream.flush()

    def _flush_forever(self) -> None:
        while True:
            time.sleep(self._interval)
            if self._pending:
                self.flush()


def configure(level: str, json_lines: bool) -> None:
    """Install one stderr handler on the root logger (called once, by __main__)."""
    # Our formats never show the caller's file, thread or process: skip collecting them
    # (the logging HOWTO's "Optimization" section); findCaller alone walks the stack per line.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if sys.version_info >= (3, 12):
        logging.logAsyncioTasks = False
    handler = BatchingHandler()
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
