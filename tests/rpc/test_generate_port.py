"""A Generate-port server (ML_SERVING_GENERATE_ONLY) over a real channel: Generate and
GenerateStream served, every other InferenceService method refused by name, health open."""

from __future__ import annotations

from collections.abc import Awaitable

import grpc
import pytest
from grpc_health.v1 import health_pb2

from ml_serving._proto.mlserving.v1 import inference_service_pb2 as pb
from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from ml_serving.api import generate_port, rpc
from ml_serving.api.servicer import InferenceServicer
from tests.support.requests import generate_request, generate_stream_request, score_request
from tests.support.servers import StartServer, health_stub, make_settings
from tests.support.streams import collect


async def test_the_generate_port_serves_generate_and_refuses_the_rest(
    start_server: StartServer,
) -> None:
    app = await start_server(generate_only=True)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        reply = await stub.Generate(generate_request(), timeout=10)
        assert reply.text and reply.prompt_version == "v1"
        text, end = await collect(stub.GenerateStream(generate_stream_request(), timeout=10))
        assert text and end.prompt_version == "v1"

        refused: dict[str, Awaitable[object]] = {
            "Score": stub.Score(score_request(), timeout=10),
            "ListPromptVersions": stub.ListPromptVersions(
                pb.ListPromptVersionsRequest(), timeout=10
            ),
        }
        for method, call in refused.items():
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert caught.value.details() == (
                f"{method} is not served on the Generate port (ML_SERVING_GENERATE_PORT), which "
                "serves only Generate and GenerateStream: call the main port (ML_SERVING_PORT)"
            )
            # Answered by the per-RPC layer, as any other failed call: a request id comes back.
            trailers = dict(caught.value.trailing_metadata() or ())
            assert len(str(trailers[rpc.REQUEST_ID_KEY])) == 32

        health = health_stub(channel)
        check = await health.Check(health_pb2.HealthCheckRequest(service=rpc.SERVICE))
        assert check.status == health_pb2.HealthCheckResponse.SERVING
    assert app.gate.in_flight == 0


async def test_the_refusal_still_asks_for_credentials_first(start_server: StartServer) -> None:
    app = await start_server(generate_only=True, auth_token="generate-port-token-0123")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Score(score_request(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_every_method_but_generate_is_refused_and_the_main_port_serves_all() -> None:
    served = {name for name in rpc.METHOD_TYPES if name in generate_port.GENERATE_METHODS}
    assert served == {"Generate", "GenerateStream"}
    cls = generate_port.GenerateOnlyServicer
    for name in rpc.METHOD_TYPES:
        inherited = getattr(cls, name) is getattr(InferenceServicer, name)
        assert inherited == (name in served), name
    assert generate_port.servicer_class(make_settings()) is InferenceServicer
    assert generate_port.servicer_class(make_settings(generate_only=True)) is cls
