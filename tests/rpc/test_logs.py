"""One JSON access-log line per RPC, with request id, method, status, duration, version, model."""

from __future__ import annotations

import io
import json
import logging
import time

import grpc
import pytest

from ml_serving._proto.mlserving.v1 import inference_service_pb2 as pb
from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from ml_serving.api import rpc, server
from ml_serving.observability import logs
from tests.support.requests import generate_request, score_request


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    formatter = logs.JsonFormatter()
    return [
        json.loads(formatter.format(record))
        for record in caplog.records
        if record.name == "ml_serving.access"
    ]


async def test_one_json_line_per_rpc(
    stub: pb_grpc.InferenceServiceAsyncStub,
    app: server.App,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(app.gate, "access_sample", 1.0)  # every OK Score logged too
    caplog.set_level(logging.INFO, logger="ml_serving.access")
    await stub.Generate(
        generate_request(prompt_version="v3-few-shot"), metadata=(("x-request-id", "log-1"),)
    )
    await stub.Score(score_request(), metadata=(("x-request-id", "log-2"),))
    lines = access_lines(caplog)
    generate = next(line for line in lines if line["request_id"] == "log-1")
    assert generate["method"] == "Generate"
    assert generate["code"] == "OK"
    assert generate["prompt_version"] == "v3-few-shot"
    assert generate["model"] == "offline/tip-composer-1"
    assert isinstance(generate["duration_ms"], float)
    score = next(line for line in lines if line["request_id"] == "log-2")
    assert score["method"] == "Score" and str(score["model"]).startswith("tips-ranker:")


def _handled(app: server.App, method: str, code: str) -> float:
    labels = {"grpc_service": rpc.SERVICE, "grpc_method": method, "grpc_code": code}
    labels["grpc_type"] = rpc.METHOD_TYPES[method]
    return app.metrics.registry.get_sample_value("grpc_server_handled_total", labels) or 0.0


async def test_ok_calls_of_the_fast_methods_are_sampled_the_rest_always_logged(
    stub: pb_grpc.InferenceServiceAsyncStub,
    app: server.App,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Sampled out (share 0): an OK Score writes no line, and sends no request-id trailer unless
    the caller chose the id; the metrics count it all the same. A failed call, and every
    Generate, keeps its line and its trailer."""
    monkeypatch.setattr(app.gate, "access_sample", 0.0)
    caplog.set_level(logging.INFO, logger="ml_serving.access")
    ok_before = _handled(app, "Score", "OK")
    bad_before = _handled(app, "Score", "INVALID_ARGUMENT")
    call = stub.Score(score_request())
    await call
    assert rpc.REQUEST_ID_KEY not in dict(await call.trailing_metadata())
    call = stub.Score(score_request(), metadata=((rpc.REQUEST_ID_KEY, "sampled-out-1"),))
    await call
    assert dict(await call.trailing_metadata())[rpc.REQUEST_ID_KEY] == "sampled-out-1"
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await stub.Score(pb.ScoreRequest(user_id="u" * 200))
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    failed_id = dict(failed.value.trailing_metadata() or ())[rpc.REQUEST_ID_KEY]
    generate = stub.Generate(generate_request())
    await generate
    generate_id = dict(await generate.trailing_metadata())[rpc.REQUEST_ID_KEY]
    lines = access_lines(caplog)
    assert [(line["method"], line["code"], line["request_id"]) for line in lines] == [
        ("Score", "INVALID_ARGUMENT", failed_id),
        ("Generate", "OK", generate_id),
    ]
    assert _handled(app, "Score", "OK") == ok_before + 2
    assert _handled(app, "Score", "INVALID_ARGUMENT") == bad_before + 1


async def test_a_share_of_ok_calls_is_logged(
    stub: pb_grpc.InferenceServiceAsyncStub,
    app: server.App,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At a share of one half, about half of 400 OK calls write a line, and exactly those
    calls bring back a generated request id, the one their line holds."""
    monkeypatch.setattr(app.gate, "access_sample", 0.5)
    caplog.set_level(logging.INFO, logger="ml_serving.access")
    returned = []
    for _ in range(400):
        call = stub.ListPromptVersions(pb.ListPromptVersionsRequest())
        await call
        request_id = dict(await call.trailing_metadata()).get(rpc.REQUEST_ID_KEY)
        if request_id is not None:
            returned.append(request_id)
    logged = [line["request_id"] for line in access_lines(caplog)]
    assert logged == returned
    # Binomial(400, 0.5): outside 120..280 with a probability under 1e-18.
    assert 120 <= len(logged) <= 280


async def test_prompts_and_completions_stay_out_of_info_logs(
    stub: pb_grpc.InferenceServiceAsyncStub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    request = generate_request(goal="a very particular goal phrase 7Q")
    reply = await stub.Generate(request)
    assert "7Q" in reply.text  # the offline route echoes the goal
    assert "7Q" not in caplog.text
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="ml_serving.generation")
    await stub.Generate(request)
    # At DEBUG the prompt is logged, once per call (by the prompt registry that renders it).
    rendered = [r for r in caplog.records if "rendered prompt" in r.getMessage()]
    assert len(rendered) == 1 and "7Q" in rendered[0].getMessage()


def test_batching_handler_writes_quiet_lines_in_batches_and_warnings_at_once() -> None:
    stream = io.StringIO()
    handler = logs.BatchingHandler(stream, batch_lines=3, flush_interval_s=60)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("tests.batching")
    log.propagate = False
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        log.info("one")
        log.info("two")
        assert stream.getvalue() == ""  # waiting for a batch
        log.warning("three")  # written at once, after what came before
        assert stream.getvalue() == "one\ntwo\nthree\n"
        for word in ("four", "five", "six"):
            log.info(word)
        assert stream.getvalue().endswith("four\nfive\nsix\n")  # a full batch
        log.info("seven")
        handler.flush()  # what logging.shutdown does at exit
        assert stream.getvalue().endswith("six\nseven\n")
    finally:
        log.removeHandler(handler)


def test_batching_handler_flushes_a_quiet_line_within_its_interval() -> None:
    stream = io.StringIO()
    handler = logs.BatchingHandler(stream, batch_lines=100, flush_interval_s=0.05)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.handle(logging.makeLogRecord({"msg": "lonely", "levelno": logging.INFO}))
    deadline = time.monotonic() + 5
    while "lonely" not in stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stream.getvalue() == "lonely\n"


def test_fields_logger_writes_the_line_logger_info_would() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("ml_serving.test_fields")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    fields = {"request_id": "r-1", "method": "Score", "code": "OK", "duration_ms": 1.5}
    logger.info("rpc Score OK", extra=fields)
    logs.FieldsLogger(logger).log("rpc Score OK", fields)
    via_info, via_fields = (json.loads(line) for line in stream.getvalue().splitlines())
    assert via_info.keys() == via_fields.keys()
    assert {k: v for k, v in via_fields.items() if k != "ts"} == {
        k: v for k, v in via_info.items() if k != "ts"
    }


def test_fields_logger_stamps_each_record_with_its_own_time() -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("ml_serving.test_fields_time")
    logger.handlers[:] = [Keep()]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    fields_logger = logs.FieldsLogger(logger)
    fields_logger.log("first", {})
    time.sleep(0.01)
    fields_logger.log("second", {})
    first, second = records
    assert second.created - first.created >= 0.009
    assert second.getMessage() == "second" and first.getMessage() == "first"


def test_fields_logger_respects_level_and_disabled() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("ml_serving.test_fields_quiet")
    logger.handlers[:] = [logging.StreamHandler(stream)]
    logger.propagate = False
    logger.setLevel(logging.WARNING)
    fields_logger = logs.FieldsLogger(logger)
    fields_logger.log("below the level", {})
    logger.setLevel(logging.INFO)
    logger.disabled = True
    fields_logger.log("disabled", {})
    logger.disabled = False
    fields_logger.log("written", {"n": 1})
    assert stream.getvalue() == "written\n"
