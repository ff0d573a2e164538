"""Generate through LiteLLM's real HTTP path against a fake OpenAI server: success and faults."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
import pytest

from ml_serving._proto.mlserving.v1 import generation_pb2
from ml_serving._proto.mlserving.v1 import inference_service_pb2 as pb
from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from tests.support.fake_openai import WORDS, FakeOpenAI
from tests.support.requests import generate_request, generate_stream_request
from tests.support.servers import FAKE_KEY, StartServer, write_llm_config
from tests.support.streams import LOCK, collect

ALIASES = ["ok", "status-500", "status-429", "status-400", "slow", "broken-stream", "malformed"]

Connect = Callable[..., Coroutine[Any, Any, "pb_grpc.InferenceServiceAsyncStub"]]


@pytest.fixture
async def connect(
    start_server: StartServer, upstream: FakeOpenAI, tmp_path: Path
) -> AsyncIterator[Connect]:
    """Start a server whose Generate uses route `alias` of the fake upstream; return its stub."""
    channels: list[grpc.aio.Channel] = []
    upstream.delay_s, upstream.ttft_s, upstream.token_delay_s = 2.0, 0.0, 0.0

    async def connect(alias: str, **overrides: Any) -> pb_grpc.InferenceServiceAsyncStub:
        config = overrides.pop("llm_config", None) or write_llm_config(
            tmp_path / "llm.yaml", upstream, ALIASES
        )
        app = await start_server(llm_config=config, llm_model=alias, **overrides)
        chan = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        channels.append(chan)
        return pb_grpc.InferenceServiceStub(chan)

    yield connect
    for chan in channels:
        await chan.close()


async def test_unary_happy_path_through_litellm(connect: Connect, upstream: FakeOpenAI) -> None:
    stub = await connect("ok")
    reply = await stub.Generate(generate_request(prompt_version="v2-mentor"), timeout=10)
    assert reply.text == " ".join(WORDS[: upstream.tokens])
    assert reply.model == "openai/ok"
    assert (reply.prompt_version, reply.prompt_hash) == ("v2-mentor", LOCK["v2-mentor"])
    assert reply.usage.completion_tokens == upstream.tokens
    assert reply.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert not reply.fallback
    assert upstream.seen_auth[-1] == f"Bearer {FAKE_KEY}"  # os.environ/NAME resolved


async def test_stream_happy_path_through_litellm(connect: Connect, upstream: FakeOpenAI) -> None:
    stub = await connect("ok")
    text, end = await collect(
        stub.GenerateStream(generate_stream_request(prompt_version="v3-few-shot"), timeout=10)
    )
    assert text == " ".join(WORDS[: upstream.tokens])
    assert (end.prompt_version, end.prompt_hash) == ("v3-few-shot", LOCK["v3-few-shot"])
    assert end.usage.completion_tokens == upstream.tokens
    assert end.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert end.model == "openai/ok"


async def test_max_tokens_reaches_the_upstream(connect: Connect) -> None:
    stub = await connect("ok")
    request = generate_request()
    request.limits.max_tokens = 5
    reply = await stub.Generate(request, timeout=10)
    assert len(reply.text.split()) == 5
    assert reply.finish_reason == generation_pb2.FINISH_REASON_LENGTH


@pytest.mark.parametrize(
    ("alias", "code"),
    [
        ("status-500", grpc.StatusCode.UNAVAILABLE),
        ("status-429", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("status-400", grpc.StatusCode.FAILED_PRECONDITION),
        ("malformed", grpc.StatusCode.UNAVAILABLE),
    ],
)
async def test_upstream_faults_map_to_statuses(
    connect: Connect, alias: str, code: grpc.StatusCode, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    stub = await connect(alias, llm_fallback=False)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(generate_request(), timeout=10)
    assert info.value.code() == code
    details = info.value.details() or ""
    assert "fake" not in details and "Traceback" not in details  # provider text stays inside
    assert FAKE_KEY not in caplog.text


async def test_connection_refused_is_unavailable(
    connect: Connect, upstream: FakeOpenAI, tmp_path: Path
) -> None:
    closed = FakeOpenAI()
    closed.port = 9  # discard port on loopback: nothing listens, the connection is refused
    config = write_llm_config(tmp_path / "refused.yaml", closed, ["ok"])
    stub = await connect("ok", llm_config=config, llm_fallback=False)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(generate_request(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_retries_then_fallback_route(
    connect: Connect, upstream: FakeOpenAI, tmp_path: Path
) -> None:
    config = write_llm_config(
        tmp_path / "fallbacks.yaml",
        upstream,
        ["status-500", "ok"],
        num_retries=1,
        fallbacks=[{"status-500": ["ok"]}],
    )
    stub = await connect("status-500", llm_config=config, llm_fallback=False)
    before = upstream.requests
    reply = await stub.Generate(generate_request(), timeout=10)
    assert reply.model == "openai/ok"
    assert upstream.requests - before >= 2  # the failing route was tried before the fallback


@pytest.mark.parametrize("alias", ["status-500", "status-429"])
async def test_degraded_mode_answers_with_a_flagged_fallback_tip(
    connect: Connect, alias: str
) -> None:
    stub = await connect(alias)
    reply = await stub.Generate(generate_request(prompt_version="v2-mentor"), timeout=10)
    assert reply.fallback
    assert reply.text
    assert (reply.prompt_version, reply.prompt_hash) == ("v2-mentor", LOCK["v2-mentor"])
    text, end = await collect(
        stub.GenerateStream(generate_stream_request(prompt_version="v2-mentor"), timeout=10)
    )
    assert end.fallback and text == reply.text
    assert (end.prompt_version, end.prompt_hash) == ("v2-mentor", LOCK["v2-mentor"])


async def test_slower_than_the_deadline_is_deadline_exceeded_and_closes_upstream(
    connect: Connect, upstream: FakeOpenAI
) -> None:
    stub = await connect("slow", llm_fallback=False)
    cancelled = upstream.cancelled
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(generate_request(), timeout=0.6)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await _eventually(lambda: upstream.cancelled > cancelled and upstream.in_progress == 0)


async def test_stream_broken_half_way_ends_with_unavailable(connect: Connect) -> None:
    stub = await connect("broken-stream", llm_fallback=True)
    deltas = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for message in stub.GenerateStream(generate_stream_request(), timeout=10):
            deltas.append(message.text_delta)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert deltas  # text already sent stays sent: a broken stream is never disguised as fallback


async def test_malformed_stream_chunk_is_unavailable(connect: Connect) -> None:
    stub = await connect("malformed", llm_fallback=False)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(stub.GenerateStream(generate_stream_request(), timeout=10))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_client_cancel_closes_the_upstream_request(
    connect: Connect, upstream: FakeOpenAI
) -> None:
    upstream.token_delay_s = 0.2
    stub = await connect("ok")
    cancelled = upstream.cancelled
    call = stub.GenerateStream(generate_stream_request(), timeout=10)
    first = await call.read()
    assert isinstance(first, pb.GenerateStreamResponse) and first.text_delta
    call.cancel()
    await _eventually(lambda: upstream.cancelled > cancelled and upstream.in_progress == 0)


async def _eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():
            await asyncio.sleep(0.02)
