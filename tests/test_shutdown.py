"""SIGTERM/SIGINT drain of the real process: in-flight finishes, new calls refused, exit 0."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from tests.conftest import health_stub, write_llm_config
from tests.fake_openai import FakeOpenAI
from tests.requests import generate_request, score_request

SERVICE = "mlserving.v1.InferenceService"
GRACE_S = 6.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def process(
    upstream: FakeOpenAI, tmp_path: Path
) -> AsyncIterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    config = write_llm_config(tmp_path / "llm.yaml", upstream, ["slow"])
    env = {
        **os.environ,
        "ML_SERVING_HOST": "127.0.0.1",
        "ML_SERVING_PORT": str(port),
        "ML_SERVING_METRICS_PORT": "0",
        "ML_SERVING_SHUTDOWN_GRACE_S": str(GRACE_S),
        "ML_SERVING_LLM_CONFIG": str(config),
        "ML_SERVING_LLM_FALLBACK": "false",
    }
    log_path = tmp_path / "server.log"
    log = log_path.open("wb")
    # Logs go to a file: a pipe nobody reads would fill up and block the server.
    proc = subprocess.Popen([sys.executable, "-m", "ml_serving"], env=env, stderr=log)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
            health = health_stub(chan)
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, log_path.read_text()
                try:
                    reply = await health.Check(
                        health_pb2.HealthCheckRequest(service=SERVICE), timeout=1
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError:
                    pass
                assert time.monotonic() < deadline, "server never became ready"
                await asyncio.sleep(0.2)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_drain_on_signal(
    process: tuple[subprocess.Popen[bytes], int], upstream: FakeOpenAI, signum: signal.Signals
) -> None:
    proc, port = process
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
