"""Every InferenceService method passes the per-RPC layer by construction (rpc.add_service)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from ml_serving._proto.mlserving.v1 import inference_service_pb2 as pb
from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from ml_serving.api import rpc, server
from ml_serving.api.servicer import InferenceServicer
from tests.support.servers import make_settings


class _Unwrapped(InferenceServicer):
    """ListPromptVersions overridden without the layer: no auth, admission, log or metrics."""

    async def ListPromptVersions(self, request: Any, context: Any) -> pb.ListPromptVersionsResponse:
        return pb.ListPromptVersionsResponse()


class _WrongCardinality(InferenceServicer):
    """Score is unary in the proto; wrapped as a stream it would answer with a stream."""

    @rpc.server_streaming
    async def Score(  # type: ignore[override]
        self, request: Any, context: Any
    ) -> AsyncIterator[pb.ScoreResponse]:
        yield pb.ScoreResponse()


def test_method_types_come_from_the_descriptor() -> None:
    assert rpc.SERVICE == "mlserving.v1.InferenceService"
    assert rpc.METHOD_TYPES == {
        "Score": "unary",
        "Generate": "unary",
        "GenerateStream": "server_stream",
        "ListPromptVersions": "unary",
    }
    assert set(rpc.METHOD_TYPES) == {m.name for m in rpc.SERVICE_DESCRIPTOR.methods}


def test_every_shipped_method_is_wrapped_as_its_proto_says() -> None:
    for name, grpc_type in rpc.METHOD_TYPES.items():
        assert getattr(InferenceServicer, name).__rpc_layer__ == grpc_type


@pytest.mark.parametrize(
    ("servicer_class", "says"),
    [
        (_Unwrapped, "ListPromptVersions is not wrapped by the per-RPC layer"),
        (_WrongCardinality, "Score is a unary RPC but is wrapped as server_stream"),
    ],
)
async def test_start_up_refuses_a_method_outside_the_layer(
    monkeypatch: pytest.MonkeyPatch, servicer_class: type[InferenceServicer], says: str
) -> None:
    monkeypatch.setattr(server, "servicer_class", lambda settings: servicer_class)
    with pytest.raises(TypeError, match=says):
        await server.start(make_settings())


async def test_registration_serves_each_method_through_the_layer(
    channel: grpc.aio.Channel, app: server.App
) -> None:
    """A call to the registered handler carries the layer's request id in its trailers."""
    call: Any = channel.unary_unary(
        f"/{rpc.SERVICE}/ListPromptVersions",
        request_serializer=pb.ListPromptVersionsRequest.SerializeToString,
        response_deserializer=pb.ListPromptVersionsResponse.FromString,
    )(pb.ListPromptVersionsRequest(), metadata=((rpc.REQUEST_ID_KEY, "registered-1"),), timeout=10)
    reply = await call
    assert reply.default_version
    trailers = dict(await call.trailing_metadata())
    assert trailers.get(rpc.REQUEST_ID_KEY) == "registered-1"


@pytest.mark.parametrize(("length", "refused"), [(128, False), (129, True), (4000, True)])
async def test_a_request_id_over_the_bound_on_ids_is_refused_naming_it(
    channel: grpc.aio.Channel, length: int, refused: bool
) -> None:
    """Ids past 128 characters were cut to 128 and echoed (a cut id can name another call's);
    user ids past it are INVALID_ARGUMENT: one bound for ids, refused the same way."""
    stub = pb_grpc.InferenceServiceStub(channel)
    call: Any = stub.ListPromptVersions(
        pb.ListPromptVersionsRequest(), metadata=((rpc.REQUEST_ID_KEY, "r" * length),), timeout=10
    )
    if not refused:
        assert (await call).default_version
        assert dict(await call.trailing_metadata())[rpc.REQUEST_ID_KEY] == "r" * length
        return
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == f"x-request-id: too long: {length} characters, at most 128"
    echoed = dict(caught.value.trailing_metadata() or ())[rpc.REQUEST_ID_KEY]
    assert len(echoed) == 32  # a generated id, not the caller's cut short


@pytest.mark.parametrize("path", [f"/{rpc.SERVICE}/NoSuchMethod", "/no.such.Service/Call"])
async def test_an_unknown_method_is_answered_with_a_request_id(
    channel: grpc.aio.Channel, path: str
) -> None:
    """grpc's own UNIMPLEMENTED carried no x-request-id, though the README promised one on
    every call: the layer answers it now (health and reflection stay grpc's)."""
    method: Any = channel.unary_unary(path)
    call = method(b"", metadata=((rpc.REQUEST_ID_KEY, "unknown-1"),))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert caught.value.details() == f"unknown method {path}"
    assert dict(caught.value.trailing_metadata() or ())[rpc.REQUEST_ID_KEY] == "unknown-1"
