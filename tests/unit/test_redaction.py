"""The log filters: credentials redacted wherever a record carries them, third-party errors
rate-limited with their tracebacks cut, and the access line's path kept cheap."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ml_serving.observability import logs
from ml_serving.scoring.registry import ModelRegistry, RegistryError
from tests.support import REPO

TOKEN = "tok-3f9a1c7e5b2d4068a1b2c3d4e5f60718"
KEY = "sk-test-fake-key-0123456789"
REDACTED = logs.REDACTED


@pytest.fixture
def redactor() -> logs.RedactingFilter:
    return logs.RedactingFilter([TOKEN, "short"])


def _record(name: str = "ml_serving.x", **attrs: Any) -> logging.LogRecord:
    return logging.makeLogRecord(
        {"name": name, "levelno": logging.INFO, "levelname": "INFO", **attrs}
    )


def _json(record: logging.LogRecord) -> dict[str, Any]:
    return json.loads(logs.JsonFormatter().format(record))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            f"Invalid encoding on b'Bearer {TOKEN}\\xe9'",
            "Invalid encoding on b'Bearer <redacted>\\xe9'",
        ),
        ("Bearer abc.DEF-123_x/y+z=", "Bearer <redacted>"),
        ("(('authorization', 'bearer abc'),)", "(('authorization', '<redacted>'),)"),
        ("[(b'Authorization', b'Basic dXNlcjpwYXNz')]", "[(b'Authorization', b'<redacted>')]"),
        ("Proxy-Authorization: whatever", "Proxy-Authorization: <redacted>"),
        ("{'api_key': 'x1', 'model': 'gpt'}", "{'api_key': '<redacted>', 'model': 'gpt'}"),
        ("x-api-key=abc; next", "x-api-key=<redacted>; next"),
        ("password=hunter2, user=bob", "password=<redacted>, user=bob"),
        (f"key {KEY} and sk-proj-AbC_dEf-1234567 end", f"key {REDACTED} and {REDACTED} end"),
        ("gemini AIzaSyA1234567890abcdefghijklmnopqrstuv", f"gemini {REDACTED}"),
        (f"raw {TOKEN} value", f"raw {REDACTED} value"),
        ("short is no secret; task-12345678 and risk-free stay", None),
        ("rpc Score OK", None),
    ],
)
def test_redact_replaces_credentials_and_nothing_else(
    redactor: logs.RedactingFilter, text: str, expected: str | None
) -> None:
    got = redactor.redact(text)
    assert got == (text if expected is None else expected)
    assert redactor.redact(got) == got  # idempotent: a second filter changes nothing


def test_every_match_contains_a_needle_so_the_cheap_check_is_safe(
    redactor: logs.RedactingFilter,
) -> None:
    samples = [
        "Bearer x",
        "AUTHORIZATION: y",
        "Api-Key: z",
        "ACCESS_TOKEN=q",
        "Client_Secret=r",
        "PASSWD=s",
        KEY,
        "AIza" + "b" * 35,
        "gsk_" + "c" * 20,
        "xai-" + "d" * 20,
        TOKEN,
    ]
    for sample in samples:
        assert redactor.suspect(sample), sample
        assert redactor.redact(sample) != sample, sample
    assert not redactor.suspect("b3596ba98a22cb460000000000000001")  # a request id we make
    hex_token = logs.RedactingFilter(["3f9a1c7e5b2d4068a1b2c3d4"])
    assert hex_token.suspect("003f9a1c7e5b2d4068a1b2c3d4ff")  # hex, but holds the hex secret


def test_arguments_are_formatted_once_and_redacted(redactor: logs.RedactingFilter) -> None:
    record = _record(msg="metadata %s for %r", args=((("authorization", f"Bearer {TOKEN}"),), "u"))
    assert redactor.filter(record)
    assert record.args is None
    assert record.getMessage() == "metadata (('authorization', '<redacted>'),) for 'u'"


def test_unformattable_arguments_do_not_escape_redaction(redactor: logs.RedactingFilter) -> None:
    record = _record(msg="%d items", args=(TOKEN,))
    redactor.filter(record)
    handler = logging.StreamHandler(io.StringIO())
    handler.handle(record)  # no "--- Logging error ---" with the raw arguments
    assert TOKEN not in record.getMessage() and REDACTED in record.getMessage()


def test_tracebacks_and_stacks_are_redacted_and_the_raw_exception_dropped(
    redactor: logs.RedactingFilter,
) -> None:
    try:
        raise ValueError(f"upstream said: Authorization: Bearer {TOKEN}")
    except ValueError:
        record = _record(msg="failed", exc_info=sys.exc_info(), stack_info=f"stack {TOKEN}")
    redactor.filter(record)
    assert record.exc_info is None
    assert record.exc_text and "ValueError" in record.exc_text and TOKEN not in record.exc_text
    assert record.stack_info == f"stack {REDACTED}"
    line = _json(record)
    assert "ValueError" in line["exc"] and TOKEN not in json.dumps(line)


class _Opaque:
    def __str__(self) -> str:
        return f"opaque {TOKEN}"


def test_extra_fields_of_any_type_are_redacted(redactor: logs.RedactingFilter) -> None:
    record = _record(
        msg="call",
        header=f"Bearer {TOKEN}",
        headers=[("authorization", f"Bearer {TOKEN}")],
        nested={"deep": {"key": TOKEN}, "n": 3},
        thing=_Opaque(),
        count=7,
    )
    redactor.filter(record)
    line = _json(record)
    assert TOKEN not in json.dumps(line)
    assert line["count"] == 7 and line["nested"]["n"] == 3
    assert line["thing"] == f"opaque {REDACTED}"


def test_a_request_id_holding_a_secret_is_redacted(redactor: logs.RedactingFilter) -> None:
    reset = logs.request_id_var.set(TOKEN)
    try:
        record = _record(msg="something")
        redactor.filter(record)
        assert _json(record)["request_id"] == REDACTED
    finally:
        logs.request_id_var.reset(reset)


def test_a_library_s_raw_bytes_are_logged_as_a_length_only(redactor: logs.RedactingFilter) -> None:
    # grpc does not say which header it could not decode: the value may be any credential.
    value = b"my-own-credential-\xe9"
    record = _record("grpc._cython.cygrpc", msg="Invalid encoding on %s", args=(value,))
    redactor.filter(record)
    assert record.getMessage() == f"Invalid encoding on <{len(value)} bytes>"
    ours = _record("ml_serving.api", msg="got %r", args=(b"abc",))
    redactor.filter(ours)
    assert ours.getMessage() == "got b'abc'"


def test_the_access_line_is_left_as_it_is(redactor: logs.RedactingFilter) -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("ml_serving.test_redaction_access")
    logger.handlers[:] = [Keep()]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    fields_logger = logs.FieldsLogger(logger)
    clean = {"request_id": "b3596ba98a22cb460000000000000001", "method": "Score", "code": "OK"}
    fields_logger.log("rpc Score OK", {**clean, "duration_ms": 0.5})
    fields_logger.log("rpc Score OK", {**clean, "request_id": f"Bearer {TOKEN}"})
    first, second = records
    before = dict(first.__dict__)
    assert redactor.filter(first) and redactor.filter(second)
    assert first.__dict__ == before
    assert second.__dict__["request_id"] == f"Bearer {REDACTED}"


def test_secret_env_values_take_key_like_names_and_skip_trivial_values() -> None:
    env = {
        "OPENAI_API_KEY": KEY,
        "ANTHROPIC_API_KEY": "sk-ant-0123456789",
        "ML_SERVING_AUTH_TOKEN": TOKEN,
        "AWS_SECRET": "aws-secret-value-1",
        "DB_PASSWORD": "correct-horse",
        "FEATURE_KEY": "1",  # too short to be a credential
        "PATH": "/usr/bin:/bin",
        "KEYBOARD": "us-international",
    }
    assert sorted(logs.secret_env_values(env)) == sorted(
        [KEY, "sk-ant-0123456789", TOKEN, "aws-secret-value-1", "correct-horse"]
    )


def test_configure_redacts_every_library_that_logs_through_root() -> None:
    # In a child process: configure() changes process-wide logging state.
    script = f"""
import logging
from ml_serving.observability import logs
from ml_serving.scoring.registry import ModelRegistry, RegistryError
logs.configure("DEBUG", True, secrets=[{TOKEN!r}, {KEY!r}])
for name in ("grpc._cython.cygrpc", "LiteLLM", "opentelemetry.context", "httpx", "aiohttp.client",
             "ml_serving.api.rpc"):
    logging.getLogger(name).debug("headers %s", {{"Authorization": "Bearer {TOKEN}"}})
    logging.getLogger(name).info("key %s in config", {KEY!r})
logging.shutdown()
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 12, done.stderr
    assert TOKEN not in done.stderr and KEY not in done.stderr
    assert all(REDACTED in json.loads(line)["msg"] for line in lines)


# --- rate limit of third-party warnings and errors --------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _error(
    name: str = "grpc._cython.cygrpc", msg: str = "Invalid encoding on %s"
) -> logging.LogRecord:
    try:
        raise UnicodeDecodeError("utf-8", b"\xe9", 0, 1, "invalid continuation byte")
    except UnicodeDecodeError:
        exc_info = sys.exc_info()
    return logging.makeLogRecord(
        {
            "name": name,
            "levelno": logging.ERROR,
            "levelname": "ERROR",
            "msg": msg,
            "args": (b"caf\xe9",),
            "exc_info": exc_info,
        }
    )


def test_one_line_per_template_per_window_then_the_count_of_the_dropped() -> None:
    clock = Clock()
    flood = logs.ThirdPartyFloodFilter(window_s=60, clock=clock)
    passed = [record for record in (_error() for _ in range(200)) if flood.filter(record)]
    assert len(passed) == 1
    first = passed[0]
    assert first.exc_info is None and first.exc_text is not None
    assert first.exc_text.startswith("UnicodeDecodeError:") and "Traceback" not in first.exc_text
    assert not hasattr(first, "suppressed")
    clock.now += 59
    assert not flood.filter(_error())
    clock.now += 1
    later = _error()
    assert flood.filter(later)
    assert later.suppressed == 200  # type: ignore[attr-defined]
    assert "[200 similar lines suppressed before this]" in later.getMessage()


def test_templates_and_loggers_are_counted_apart_and_ours_are_never_limited() -> None:
    flood = logs.ThirdPartyFloodFilter(window_s=60, clock=Clock())
    assert flood.filter(_error())
    assert flood.filter(_error(msg="another template %s"))
    assert flood.filter(_error(name="httpx"))
    for _ in range(5):
        assert flood.filter(_error(name="ml_serving.api.rpc"))
        info = _error()
        info.levelno = logging.INFO
        assert flood.filter(info)


def test_preformatted_messages_are_capped_per_logger() -> None:
    flood = logs.ThirdPartyFloodFilter(window_s=60, per_logger=5, clock=Clock())
    distinct = [_error(msg=f"bad header value {i}") for i in range(50)]
    assert sum(flood.filter(record) for record in distinct) == 5


def test_the_template_memory_is_bounded() -> None:
    clock = Clock()
    flood = logs.ThirdPartyFloodFilter(window_s=1, per_logger=10**6, clock=clock, max_templates=8)
    for i in range(100):
        clock.now += 0.01
        flood.filter(_error(msg=f"template {i}"))
    assert len(flood._passed) <= 8


def test_a_traceback_through_our_code_is_kept_in_full(tmp_path: Path) -> None:
    # asyncio reports a task's error under its own name: the stack is ours and worth keeping.
    try:
        ModelRegistry(tmp_path).promoted_version("missing")
    except RegistryError:
        exc_info = sys.exc_info()
    record = logging.makeLogRecord(
        {"name": "asyncio", "levelno": logging.ERROR, "msg": "Task exception", "exc_info": exc_info}
    )
    assert logs.ThirdPartyFloodFilter(clock=Clock()).filter(record)
    assert record.exc_info is exc_info


def test_an_access_line_field_with_a_secret_is_redacted_in_the_formatted_line() -> None:
    """The formatter's fast path for FieldsLogger records must print the redacted fields."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.RedactingFilter(["s3cret-token-value"]))
    logger = logging.getLogger("tests.redaction.access")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        access = logs.FieldsLogger(logger)
        access.log("rpc Score OK", {"method": "Score", "note": "Bearer s3cret-token-value"})
        access.log("rpc Score OK", {"method": "Score", "candidates": 20})
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert "s3cret" not in stream.getvalue()
    assert first["note"] == "Bearer <redacted>" and first["method"] == "Score"
    assert second["candidates"] == 20 and second["method"] == "Score"
