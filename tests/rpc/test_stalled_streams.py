"""A GenerateStream whose client stops reading is ended and its slot freed (watch_stalls)."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from ml_serving.api import rpc
from tests.support.raw_h2 import StalledStream
from tests.support.requests import generate_stream_request, score_request
from tests.support.servers import StartServer


async def _wait_for(condition: object, timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.05)


async def test_streams_nobody_reads_give_their_slots_back(start_server: StartServer) -> None:
    """200 such streams held every slot until the connection aged out (330 s by default), and
    every other call got RESOURCE_EXHAUSTED meanwhile."""
    app = await start_server(max_concurrent_rpcs=3, stream_stall_timeout_s=0.5)
    address = ("127.0.0.1", app.port)
    path = f"/{rpc.SERVICE}/GenerateStream"
    payload = generate_stream_request().SerializeToString()
    streams = [StalledStream(address, path, payload) for _ in range(3)]
    try:
        await _wait_for(lambda: app.gate.in_flight == 3, 10)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Score(score_request(), timeout=5)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await _wait_for(lambda: app.gate.in_flight == 0, 10)
            assert app.gate.stalled == 3
            assert not app.gate.streams
            reply = await stub.Score(score_request(), timeout=5)
            assert len(reply.scores) == 20
    finally:
        for stream in streams:
            stream.close()


async def test_a_stream_ended_for_stalling_logs_no_error(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Ending such a stream is expected, yet grpc logged ExecuteBatchError ... GRPC_CALL_ERROR_
    TOO_MANY_OPERATIONS at ERROR for each: the handler returned, and grpc tried to send a
    status behind the write the client never took."""
    app = await start_server(stream_stall_timeout_s=0.5)
    path = f"/{rpc.SERVICE}/GenerateStream"
    payload = generate_stream_request().SerializeToString()
    stream = StalledStream(("127.0.0.1", app.port), path, payload)
    try:
        await _wait_for(lambda: app.gate.stalled == 1 and app.gate.in_flight == 0, 10)
        await asyncio.sleep(0.2)  # what grpc logs after the handler returns
    finally:
        stream.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
