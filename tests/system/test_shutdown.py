"""SIGTERM/SIGINT drain of the real process: in-flight finishes, new calls refused, exit 0."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from tests.support.fake_openai import FakeOpenAI
from tests.support.requests import generate_request, score_request
from tests.support.server_process import ServerProcess
from tests.support.servers import health_stub, write_llm_config

SERVICE = "mlserving.v1.InferenceService"
GRACE_S = 6.0


@pytest.fixture
async def process(upstream: FakeOpenAI, tmp_path: Path) -> AsyncIterator[ServerProcess]:
    config = write_llm_config(tmp_path / "llm.yaml", upstream, ["slow"])
    server = ServerProcess(
        ML_SERVING_SHUTDOWN_GRACE_S=str(GRACE_S),
        ML_SERVING_LLM_CONFIG=str(config),
        ML_SERVING_LLM_FALLBACK="false",
        ML_SERVING_LOG_LEVEL="INFO",
    )
    try:
        await asyncio.to_thread(server.wait_ready, 60.0)
        yield server
    finally:
        server.stop(timeout_s=5)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_drain_on_signal(
    process: ServerProcess, upstream: FakeOpenAI, signum: signal.Signals
) -> None:
    proc, port = process.popen, process.port
    upstream.delay_s = 1.5
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
        stub = pb_grpc.InferenceServiceStub(chan)
        health = health_stub(chan)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        in_flight = asyncio.ensure_future(stub.Generate(generate_request(), timeout=15))
        async with asyncio.timeout(5):
            while upstream.in_progress == 0:
                await asyncio.sleep(0.01)
        signalled = time.monotonic()
        proc.send_signal(signum)

        update = await asyncio.wait_for(watch.read(), timeout=5)
        assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Score(score_request(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        reply = await in_flight
        assert reply.text and not reply.fallback
    code = await asyncio.to_thread(proc.wait, GRACE_S + 5)
    assert code == 0
    assert time.monotonic() - signalled < GRACE_S + 3
