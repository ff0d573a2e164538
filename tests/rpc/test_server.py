"""The foundation over a real channel: health, reflection, limits, request ids, error table."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ml_serving import errors
from ml_serving._proto.mlserving.v1 import inference_service_pb2 as pb
from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from ml_serving.api import server
from tests.support.fake_openai import FakeOpenAI
from tests.support.requests import generate_request, score_request
from tests.support.servers import StartServer, health_stub, write_llm_config


async def test_health_serving_for_overall_and_service(channel: grpc.aio.Channel) -> None:
    health = health_stub(channel)
    for name in ("", "mlserving.v1.InferenceService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name


async def test_reflection_lists_the_service_and_its_four_methods(
    channel: grpc.aio.Channel,
) -> None:
    stub: Any = reflection_pb2_grpc.ServerReflectionStub(channel)  # type: ignore[arg-type]

    async def ask(request: reflection_pb2.ServerReflectionRequest) -> Any:
        async for reply in stub.ServerReflectionInfo(iter([request])):
            return reply
        raise AssertionError("no reflection reply")

    listing = await ask(reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listing.list_services_response.service}
    assert {"mlserving.v1.InferenceService", "grpc.health.v1.Health"} <= names
    files = await ask(
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="mlserving.v1.InferenceService"
        )
    )
    from google.protobuf import descriptor_pb2

    methods: set[str] = set()
    for raw in files.file_descriptor_response.file_descriptor_proto:
        fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
        for service in fd.service:
            if service.name == "InferenceService":
                methods = {m.name for m in service.method}
    assert methods == {"Score", "Generate", "GenerateStream", "ListPromptVersions"}


async def test_request_id_is_echoed_or_generated(
    stub: pb_grpc.InferenceServiceAsyncStub, app: server.App, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every OK call logged: a generated id comes back whenever a line carries it.
    monkeypatch.setattr(app.gate, "access_sample", 1.0)
    call = stub.ListPromptVersions(
        pb.ListPromptVersionsRequest(), metadata=(("x-request-id", "req-123"),)
    )
    await call
    assert ("x-request-id", "req-123") in tuple(await call.trailing_metadata())
    call = stub.ListPromptVersions(pb.ListPromptVersionsRequest())
    await call
    generated = dict(await call.trailing_metadata())["x-request-id"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    call = stub.ListPromptVersions(pb.ListPromptVersionsRequest())
    await call
    following = dict(await call.trailing_metadata())["x-request-id"]
    assert following != generated and following[:16] == generated[:16]  # same process prefix


async def test_request_id_comes_back_on_errors_too(stub: pb_grpc.InferenceServiceAsyncStub) -> None:
    call = stub.Generate(
        generate_request(prompt_version="nope"), metadata=(("x-request-id", "err-1"),)
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert ("x-request-id", "err-1") in tuple(info.value.trailing_metadata() or ())


async def test_message_over_size_limit_is_resource_exhausted(start_server: StartServer) -> None:
    app = await start_server(max_receive_message_bytes=2048)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan:
        stub = pb_grpc.InferenceServiceStub(chan)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Score(score_request(candidates=200))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_concurrency_limit_sheds_at_once(
    start_server: StartServer, upstream: FakeOpenAI, tmp_path: Path
) -> None:
    config = write_llm_config(tmp_path / "llm.yaml", upstream, ["slow"])
    app = await start_server(max_concurrent_rpcs=1, llm_config=config, llm_fallback=False)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan:
        stub = pb_grpc.InferenceServiceStub(chan)
        upstream.delay_s = 1.0
        slow = asyncio.ensure_future(stub.Generate(generate_request(), timeout=10))
        while app.gate.in_flight == 0:
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Score(score_request())
        shed_after = loop.time() - started
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "concurrency limit" in (info.value.details() or "")
        assert shed_after < upstream.delay_s  # answered at once, not queued behind the slow call
        reply = await slow
        assert reply.text
        assert app.gate.shed == 1


class _Boom:
    """A stand-in scoring model whose failure must not leak to the client."""

    name = "boom"
    version = "0"

    def __getattr__(self, item: str) -> object:
        raise RuntimeError("secret-token sk-live-123 and a traceback")


@pytest.mark.parametrize(
    ("raised", "code"),
    [
        (errors.InvalidArgument("candidates", "must not be empty"), "INVALID_ARGUMENT"),
        (errors.NotReady("model not loaded"), "FAILED_PRECONDITION"),
        (errors.Overloaded("over limit"), "RESOURCE_EXHAUSTED"),
        (errors.UpstreamRateLimited("rate limited"), "RESOURCE_EXHAUSTED"),
        (errors.UpstreamUnavailable("down"), "UNAVAILABLE"),
        (errors.Draining("draining"), "UNAVAILABLE"),
        (errors.DeadlineExceeded("too slow"), "DEADLINE_EXCEEDED"),
        (errors.ProviderRejected("refused"), "FAILED_PRECONDITION"),
        (RuntimeError("secret-token sk-live-123"), "INTERNAL"),
    ],
)
async def test_error_table_maps_every_row_and_leaks_nothing(
    app: server.App,
    stub: pb_grpc.InferenceServiceAsyncStub,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    raised: Exception,
    code: str,
) -> None:
    def fail(*args: object, **kwargs: object) -> object:
        raise raised

    monkeypatch.setattr("ml_serving.api.servicer.align_request", fail)
    monkeypatch.setattr("ml_serving.api.servicer.align_columnar_request", fail)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Score(score_request())
    assert info.value.code().name == code
    details = info.value.details() or ""
    if code == "INTERNAL":
        assert details == "internal error"
        assert "sk-live" not in str(info.value.trailing_metadata())
        assert any("sk-live" in (r.exc_text or "") or r.exc_info for r in caplog.records)
    else:
        assert details == str(raised)


async def test_invalid_argument_carries_bad_request_details(
    stub: pb_grpc.InferenceServiceAsyncStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Score(score_request(candidates=0))
    raw = dict(info.value.trailing_metadata() or ())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(raw)
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert bad.field_violations[0].field == "candidates"
