"""Generate, GenerateStream and ListPromptVersions over a real channel on the offline route."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from ml_serving import errors
from ml_serving._proto.mlserving.v1 import generation_pb2
from ml_serving._proto.mlserving.v1 import inference_service_pb2 as pb
from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from ml_serving.api import server
from tests.support.requests import generate_request, generate_stream_request
from tests.support.servers import StartServer, make_settings
from tests.support.streams import LOCK, collect


async def test_generate_on_the_offline_route(stub: pb_grpc.InferenceServiceAsyncStub) -> None:
    reply = await stub.Generate(generate_request())
    assert reply.text
    assert reply.prompt_version == "v1"
    assert reply.prompt_hash == LOCK["v1"]
    assert reply.model == "offline/tip-composer-1"
    assert reply.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert not reply.fallback


async def test_offline_route_is_deterministic_and_uses_the_context(
    stub: pb_grpc.InferenceServiceAsyncStub,
) -> None:
    first = await stub.Generate(generate_request())
    again = await stub.Generate(generate_request())
    other = await stub.Generate(generate_request(goal="run a 5k in spring", topic="fitness"))
    assert first.text == again.text
    assert other.text != first.text
    assert "5k" in other.text


@pytest.mark.parametrize("version", ["v1", "v2-mentor", "v3-few-shot"])
async def test_request_version_is_used_and_echoed(
    stub: pb_grpc.InferenceServiceAsyncStub, version: str
) -> None:
    reply = await stub.Generate(generate_request(prompt_version=version))
    assert (reply.prompt_version, reply.prompt_hash) == (version, LOCK[version])
    text, end = await collect(stub.GenerateStream(generate_stream_request(prompt_version=version)))
    assert (end.prompt_version, end.prompt_hash) == (version, LOCK[version])


async def test_server_default_applies_when_request_names_none(start_server: StartServer) -> None:
    app = await start_server(default_prompt_version="v2-mentor")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan:
        stub = pb_grpc.InferenceServiceStub(chan)
        assert (await stub.Generate(generate_request())).prompt_version == "v2-mentor"
        explicit = await stub.Generate(generate_request(prompt_version="v3-few-shot"))
        assert explicit.prompt_version == "v3-few-shot"
        listing = await stub.ListPromptVersions(pb.ListPromptVersionsRequest())
        assert listing.default_version == "v2-mentor"


async def test_unknown_request_version_lists_the_known_ones(
    stub: pb_grpc.InferenceServiceAsyncStub,
) -> None:
    for call in (
        stub.Generate(generate_request(prompt_version="v9")),
        stub.GenerateStream(generate_stream_request(prompt_version="v9")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect(call) if isinstance(call, grpc.aio.UnaryStreamCall) else await call
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = info.value.details() or ""
        assert "'v9'" in details
        for known in ("v1", "v2-mentor", "v3-few-shot"):
            assert known in details


async def test_unknown_default_version_stops_start_up() -> None:
    with pytest.raises(errors.UnknownPromptVersion, match="DEFAULT_PROMPT_VERSION"):
        await server.start(make_settings(default_prompt_version="v0-missing"))


async def test_stream_sends_deltas_then_totals(stub: pb_grpc.InferenceServiceAsyncStub) -> None:
    text, end = await collect(stub.GenerateStream(generate_stream_request()))
    unary = await stub.Generate(generate_request())
    assert text == unary.text
    assert end.model == "offline/tip-composer-1"
    assert end.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert end.usage == unary.usage
    assert not end.fallback


async def test_list_prompt_versions(stub: pb_grpc.InferenceServiceAsyncStub) -> None:
    reply = await stub.ListPromptVersions(pb.ListPromptVersionsRequest())
    assert [v.version for v in reply.versions] == ["v1", "v2-mentor", "v3-few-shot"]
    assert reply.default_version == "v1"
    for v in reply.versions:
        assert v.description
        assert v.content_hash == LOCK[v.version]


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r.limits.__setattr__("max_tokens", 100_000), "limits.max_tokens"),
        (lambda r: r.limits.__setattr__("temperature", 7.5), "limits.temperature"),
        (lambda r: r.limits.__setattr__("temperature", float("nan")), "limits.temperature"),
        (lambda r: r.context.__setattr__("experience_level", 42), "context.experience_level"),
        (lambda r: r.__setattr__("user_id", "u" * 500), "user_id"),
    ],
)
async def test_bad_generate_fields_are_invalid_argument(
    stub: pb_grpc.InferenceServiceAsyncStub,
    mutate: Any,
    field: str,
) -> None:
    request = generate_request()
    mutate(request)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith(field)


async def test_generate_before_the_gateway_is_warm_is_failed_precondition(
    app: server.App, stub: pb_grpc.InferenceServiceAsyncStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app.generator, "gateway", None)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(generate_request())
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
