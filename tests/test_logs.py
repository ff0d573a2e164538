"""One JSON access-log line per RPC, with request id, method, status, duration, version, model."""

from __future__ import annotations

import io
import json
import logging
import time

import pytest

from ml_serving import logs
from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from tests.requests import generate_request, score_request


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    formatter = logs.JsonFormatter()
    return [
        json.loads(formatter.format(record))
        for record in caplog.records
        if record.name == "ml_serving.access"
    ]


async def test_one_json_line_per_rpc(
    stub: pb_grpc.InferenceServiceAsyncStub, caplog: pytest.LogCaptureFixture
) -> None:
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
    assert any("prompt rendered" in r.getMessage() for r in caplog.records)


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
