"""Log formatting: JSON lines carrying the current request id; only __main__ installs it."""

from __future__ import annotations

import binascii
import contextvars
import json
import logging
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TextIO

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
"""The id of the RPC being handled in this task; '-' outside any RPC."""

access_notes_var: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "access_notes", default=None
)
"""The fields the RPC being handled adds to its access-log line (set by the RPC layer)."""


def annotate(**fields: Any) -> None:
    """Add fields (prompt_version, model, ...) to the current RPC's access-log line."""
    current = access_notes_var.get()
    if current is not None:
        current.update(fields)


TEXT_FIELDS_ATTR = "_text_fields"
"""A record whose extra fields are its content (a decision record) sets this attribute true:
the text format then appends the fields as one JSON object after the message (the JSON format
writes every record's fields at the top level of its line anyway)."""

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
        # As logging.Formatter does: a traceback already rendered (and redacted) by a filter wins.
        if record.exc_text:
            payload["exc"] = record.exc_text
        elif record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return _ENCODER.encode(payload)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message``, plus the fields as JSON for records that set
    ``TEXT_FIELDS_ATTR`` (so a text log keeps what a decision record says)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not getattr(record, TEXT_FIELDS_ATTR, False):
            return text
        fields = {
            key: value
            for key, value in record.__dict__.items()
            if key not in _STANDARD_ATTRS and key[0] != "_"
        }
        head, newline, rest = text.partition("\n")  # a traceback stays after the fields
        return f"{head} {_ENCODER.encode(fields)}{newline}{rest}"


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
        # Which attributes are fields, for RedactingFilter (formatters skip "_" names).
        attrs["_fields"] = fields
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


# --- secrets out of every line, whoever logs it -----------------------------------------------

REDACTED = "<redacted>"
"""What a secret is replaced with in a log line."""

SECRET_ENV_SUFFIXES = ("_API_KEY", "_KEY", "_TOKEN", "_SECRET", "_PASSWORD")
"""Environment variables whose values are treated as secrets (LLM keys, tokens)."""
MIN_SECRET_LEN = 8
"""Shorter values are not redacted: "1" or "true" in a *_KEY variable is no credential, and
replacing it everywhere would garble every line."""

# Credentials whatever their value: a bearer token, the value after a credential-like header or
# field name (``authorization: x``, ``('x-api-key', b'x')``, ``api_key='x'``), and the shapes of
# common provider keys. A value runs to the next space or quote, so a bytes repr (grpc logs
# b'...' with \xNN escapes) stays one value.
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?i)\b(bearer)(\s+)(?!<redacted>)[^\s'\"]+"), rf"\1\2{REDACTED}"),
    (
        re.compile(
            r"(?i)\b((?:proxy-)?authorization|x-api-key|x-goog-api-key|api[-_]?key|"
            r"api[-_]?token|access[-_]?token|auth[-_]?token|client[-_]?secret|secret[-_]?key|"
            r"password|passwd)"
            r"(['\"]?\s*[:=,]\s*\(?\s*(?:b?['\"])?)(?!<redacted>|b['\"])(?:(?:bearer|basic)\s+)?"
            r"[^\s'\",;)}]+"
        ),
        rf"\1\2{REDACTED}",
    ),
    (
        # OpenAI-style (sk-, sk-proj-, sk-ant-, sk-or-), Gemini, Groq and xAI keys.
        re.compile(
            r"\b(?:sk-[A-Za-z0-9_-]{8,}|AIza[0-9A-Za-z_-]{30,}|gsk_[A-Za-z0-9]{20,}|"
            r"xai-[A-Za-z0-9]{20,})"
        ),
        REDACTED,
    ),
)
# Lowercase substrings of which every match above contains one: a line with none of them (and
# none of the secret values) needs no regex at all. Most lines, the access line of every RPC
# among them, are settled by these few substring scans.
_NEEDLES = ("bearer", "auth", "api", "token", "secret", "passw", "sk-", "aiza", "gsk_", "xai-")
_HEX_DIGITS = "0123456789abcdefABCDEF"
_CLEAN_CACHE_SIZE = 4096
_SHORT_TEXT = 128
"""Texts up to this long (request ids are) are remembered once clean and tested for hex."""
# Attribute values that never need a look: numbers, flags, None.
_PLAIN_TYPES = (int, float, bool, type(None))


def secret_env_values(environ: Mapping[str, str]) -> list[str]:
    """The values of ``environ`` variables named like secrets (see SECRET_ENV_SUFFIXES)."""
    return [
        value
        for name, value in environ.items()
        if name.upper().endswith(SECRET_ENV_SUFFIXES) and len(value) >= MIN_SECRET_LEN
    ]


class RedactingFilter(logging.Filter):
    """Replaces credentials with ``<redacted>`` in a record's message, arguments, traceback,
    stack and extra fields, before any formatter sees it.

    Attached to the root handler by ``configure``, so it covers our loggers and every
    third-party one that propagates to root (grpc, LiteLLM, OpenTelemetry, httpx, aiohttp). It
    redacts the known secret values (the service token, keys from the environment) and, whatever
    their value, bearer credentials, credential-named fields and provider-key shapes. A record
    that needs redacting is formatted here, once: its ``args`` become empty and its exception
    becomes ``exc_text``.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        # Longest first, so that a secret containing another is replaced whole.
        values = sorted({s for s in secrets if len(s) >= MIN_SECRET_LEN}, key=len, reverse=True)
        patterns = list(_PATTERNS)
        if values:
            patterns.insert(0, (re.compile("|".join(map(re.escape, values))), REDACTED))
        self._patterns = tuple(patterns)
        self._needles = _NEEDLES + tuple(dict.fromkeys(value.lower() for value in values))
        self._hex_secrets = tuple(n for n in self._needles if not n.strip(_HEX_DIGITS))
        self._clean: set[str] = set()
        """Texts found free of secrets: what repeats line after line is scanned once."""

    def suspect(self, text: str) -> bool:
        """Whether ``text`` may hold something to redact (False means it surely does not)."""
        if len(text) % 2 == 0 and len(text) <= _SHORT_TEXT:
            # Hex only (the request ids the server makes: the one text of an access line that
            # is new each time)? Every needle has a non-hex letter, so only a secret that is
            # itself hex can be in it. unhexlify is one C pass, and the quickest test of this.
            try:
                binascii.unhexlify(text)
            except ValueError:  # binascii.Error, or a non-ASCII text
                pass
            else:
                low = text.lower()
                for secret in self._hex_secrets:
                    if secret in low:
                        return True
                return False
        low = text.lower()
        for needle in self._needles:
            if needle in low:
                return True
        return False

    def redact(self, text: str) -> str:
        """``text`` with every credential replaced (the same object when there is none)."""
        if not self.suspect(text):
            return text
        for pattern, replacement in self._patterns:
            text = pattern.sub(replacement, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        if (
            record.args
            or record.exc_info
            or record.exc_text
            or record.stack_info
            or type(msg) is not str
        ):
            self._redact_record(record)
            return True
        # The cheap path: the message and each text field, looked up among the texts already
        # found clean (an access line repeats all but its request id) or scanned once.
        attrs = record.__dict__
        fields = attrs.get("_fields")  # from FieldsLogger: no set difference to find them
        values = (
            fields.values()
            if fields is not None
            else [attrs[key] for key in attrs.keys() - _STANDARD_ATTRS]
        )
        clean = self._clean
        # Every formatter here prints the request id of the call being logged; the caller
        # chooses it (x-request-id), so it is checked like a field.
        for value in (msg, request_id_var.get(), *values):
            if type(value) is not str:
                if isinstance(value, _PLAIN_TYPES):
                    continue
                self._redact_record(record)
                return True
            if value in clean:
                continue
            if self.suspect(value):
                self._redact_record(record)
                return True
            if len(clean) >= _CLEAN_CACHE_SIZE:
                clean.clear()  # bounded: unique texts (request ids) would fill it
            if len(value) <= _SHORT_TEXT:
                clean.add(value)
        return True

    def _redact_record(self, record: logging.LogRecord) -> None:
        if isinstance(record.args, tuple) and record.args and not _is_ours(record.name):
            # Raw bytes in a library's line are wire data, such as a header value grpc could
            # not decode (it does not log the header's name, so any credential may be in it):
            # say how long, never what.
            record.args = tuple(
                f"<{len(arg)} bytes>" if isinstance(arg, bytes | bytearray) else arg
                for arg in record.args
            )
        try:
            message = record.getMessage()
        except Exception:
            # The formatter would fail on these arguments and logging would print them raw to
            # stderr (Handler.handleError): keep them, as text, through the redaction instead.
            message = f"{record.msg} {record.args!r}"
        record.msg = self.redact(message)
        record.args = None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            # Nothing downstream may render the raw exception again.
            record.exc_info = None
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        attrs = record.__dict__
        for key in attrs.keys() - _STANDARD_ATTRS:
            if key[0] != "_":
                attrs[key] = self._redact_value(attrs[key])
        request_id = request_id_var.get()
        if "request_id" not in attrs and self.suspect(request_id):
            attrs["request_id"] = self.redact(request_id)

    def _redact_value(self, value: Any, depth: int = 0) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, _PLAIN_TYPES):
            return value
        if depth < 4 and isinstance(value, list | tuple):
            return [self._redact_value(item, depth + 1) for item in value]
        if depth < 4 and isinstance(value, dict):
            return {str(key): self._redact_value(item, depth + 1) for key, item in value.items()}
        # JsonFormatter writes any other object as str(): redact that text instead.
        return self.redact(str(value))


# --- no flooding route through third-party errors ---------------------------------------------


def _is_ours(name: str) -> bool:
    return name == "ml_serving" or name.startswith("ml_serving.")


_OUR_SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
"""The ml_serving package directory: frames from files under it are our code."""


def _through_our_code(exc: BaseException) -> bool:
    """Whether the traceback of ``exc``, or of an exception chained to it, has a frame of ours."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen or len(seen) > 16:
            continue
        seen.add(id(current))
        for frame, _ in traceback.walk_tb(current.__traceback__):
            if frame.f_code.co_filename.startswith(_OUR_SOURCE):
                return True
        pending += [current.__cause__, current.__context__]
    return False


class ThirdPartyFloodFilter(logging.Filter):
    """Rate-limits WARNING and above from loggers outside ``ml_serving``, and cuts their
    tracebacks to the exception line.

    A client can make grpc log an ERROR with a traceback per call (a non-ASCII header byte):
    without this, every such call is a few KB of log. A record passes when no record with the
    same logger, level and message template passed in the last ``window_s`` seconds, and its
    logger has passed fewer than ``per_logger`` lines in the current window (messages with the
    variable part already formatted in would each look like a new template). The next line a
    logger passes says how many of its lines were dropped before it (field ``suppressed``).
    """

    def __init__(
        self,
        window_s: float = 60.0,
        per_logger: int = 20,
        clock: Callable[[], float] = time.monotonic,
        max_templates: int = 1024,
    ) -> None:
        super().__init__()
        self.window_s = window_s
        self.per_logger = per_logger
        self._clock = clock
        self._max_templates = max_templates
        self._lock = threading.Lock()  # Handler.handle calls filters outside the handler lock
        self._passed: dict[tuple[str, int, str], float] = {}
        """(logger, level, template) -> when a record of it last passed."""
        self._loggers: dict[str, list[float]] = {}
        """logger -> [window start, lines passed in the window, dropped since the last pass]."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or _is_ours(record.name):
            return True
        with self._lock:
            suppressed = self._admit((record.name, record.levelno, str(record.msg)))
        if suppressed is None:
            return False
        if suppressed:
            record.suppressed = suppressed
            if isinstance(record.msg, str):
                record.msg = f"{record.msg} [{suppressed} similar lines suppressed before this]"
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and not _through_our_code(exc):
            # The exception line says what happened; a library's own stack only floods the log.
            # (A stack through our code, such as a task's error that asyncio reports, is kept.)
            record.exc_text = "".join(traceback.format_exception_only(exc)).strip()
            record.exc_info = None
        return True

    def _admit(self, key: tuple[str, int, str]) -> int | None:
        """None to drop the record, else how many to report as dropped before it."""
        now = self._clock()
        state = self._loggers.get(key[0])
        if state is None:
            state = self._loggers[key[0]] = [now, 0, 0]
        elif now - state[0] >= self.window_s:
            state[0], state[1] = now, 0
        last = self._passed.get(key)
        if (last is not None and now - last < self.window_s) or state[1] >= self.per_logger:
            state[2] += 1
            return None
        if len(self._passed) >= self._max_templates:
            # Bounded memory: forget templates whose window has passed (all, if none has).
            stale = [k for k, t in self._passed.items() if now - t >= self.window_s]
            for k in stale or list(self._passed):
                del self._passed[k]
        self._passed[key] = now
        suppressed = int(state[2])
        state[1] += 1
        state[2] = 0
        return suppressed


def configure(level: str, json_lines: bool, secrets: Iterable[str] = ()) -> None:
    """Install one stderr handler on the root logger (called once, by __main__).

    Every record it writes passes ``ThirdPartyFloodFilter`` then ``RedactingFilter``, which
    replaces ``secrets`` (the service token, keys from the environment) and any bearer
    credential or provider-key shape, in whatever line carries them.
    """
    # Our formats never show the caller's file, thread or process: skip collecting them
    # (the logging HOWTO's "Optimization" section); findCaller alone walks the stack per line.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if sys.version_info >= (3, 12):
        logging.logAsyncioTasks = False
    handler = BatchingHandler()
    # Flood filter first: it drops records before the redaction work, and cuts tracebacks
    # that the redaction then scans.
    handler.addFilter(ThirdPartyFloodFilter())
    handler.addFilter(RedactingFilter(secrets))
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
