"""SIGTERM against a server subprocess with calls queued and open: every one of them ends
UNAVAILABLE (retryable) within the grace period, and the server's access log says what each
client saw."""

from __future__ import annotations

import asyncio
import collections
import json
import signal
from pathlib import Path
from typing import Any

import grpc

from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from tests.support.fake_openai import FakeOpenAI
from tests.support.requests import generate_stream_request, score_request
from tests.support.server_process import ServerProcess
from tests.support.servers import write_llm_config


def _logged_codes(process: ServerProcess, method: str) -> collections.Counter[str]:
    """The `code` of every access-log line of `method` the server wrote."""
    codes: collections.Counter[str] = collections.Counter()
    for line in process.log(tail=1_000_000).splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        if record.get("logger") == "ml_serving.access" and record.get("method") == method:
            codes[record["code"]] += 1
    return codes


async def _score_calls(stub: Any, calls: int) -> list[asyncio.Task[str]]:
    request = score_request()

    async def one() -> str:
        try:
            await stub.Score(request, timeout=60)
        except grpc.RpcError as exc:
            return exc.code().name
        return "OK"

    return [asyncio.create_task(one()) for _ in range(calls)]


async def test_every_call_queued_at_sigterm_ends_unavailable_and_is_logged_so() -> None:
    """A drain let queued calls reach the layer for 2 s at most, then grpc's stop cancelled
    the rest unseen: 1,580 of 4,000 and 4,676 of 8,000 ended CANCELLED, with no log line."""
    process = ServerProcess(
        # Every OK call logged too: the test counts lines against what the clients saw.
        ML_SERVING_LOG_LEVEL="INFO",
        ML_SERVING_SHUTDOWN_GRACE_S="30",
        ML_SERVING_ACCESS_LOG_SAMPLE="1",
    )
    try:
        await asyncio.to_thread(process.wait_ready)
        async with grpc.aio.insecure_channel(process.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            await stub.Score(score_request(), timeout=10)
            calls = await _score_calls(stub, 10_000)
            await asyncio.sleep(0.2)  # all sent: most wait in grpc's queue
            process.popen.send_signal(signal.SIGTERM)
            statuses = collections.Counter(await asyncio.gather(*calls))
        assert await asyncio.to_thread(process.popen.wait, 60) == 0
        assert set(statuses) <= {"OK", "UNAVAILABLE"}, statuses
        assert statuses["UNAVAILABLE"] > 0, statuses  # the drain really met queued calls
        logged = _logged_codes(process, "Score")
        assert logged["UNAVAILABLE"] == statuses["UNAVAILABLE"], (logged, statuses)
        assert logged["OK"] == statuses["OK"] + 1, (logged, statuses)
        assert not logged["CANCELLED"], logged
    finally:
        process.stop()


async def test_streams_open_when_the_grace_runs_out_are_logged_as_their_clients_saw_them(
    tmp_path: Path,
) -> None:
    """With a 3 s grace and 200 open streams, clients got UNAVAILABLE "Cancelling all calls"
    while the server's log and metrics said CANCELLED."""
    upstream = await FakeOpenAI(token_delay_s=1.0, tokens=60).start()
    config = write_llm_config(tmp_path / "llm.yaml", upstream, ["ok"], timeout=120)
    process = ServerProcess(
        ML_SERVING_LLM_CONFIG=str(config),
        ML_SERVING_LOG_LEVEL="INFO",
        ML_SERVING_SHUTDOWN_GRACE_S="1",
        ML_SERVING_LLM_STREAM_COALESCE_MS="0",
    )
    try:
        await asyncio.to_thread(process.wait_ready)
        async with grpc.aio.insecure_channel(process.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)

            async def stream() -> str:
                try:
                    async for _ in stub.GenerateStream(generate_stream_request(), timeout=120):
                        pass
                except grpc.RpcError as exc:
                    return exc.code().name
                return "OK"

            streams = [asyncio.create_task(stream()) for _ in range(50)]
            async with asyncio.timeout(30):
                while upstream.in_progress < 50:
                    await asyncio.sleep(0.05)
            process.popen.send_signal(signal.SIGTERM)
            statuses = collections.Counter(await asyncio.gather(*streams))
        assert await asyncio.to_thread(process.popen.wait, 30) == 0
        assert statuses == {"UNAVAILABLE": 50}, statuses
        assert _logged_codes(process, "GenerateStream") == {"UNAVAILABLE": 50}
    finally:
        process.stop()
        await upstream.stop()
