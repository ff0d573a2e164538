"""Server-side limits on a generation, whatever the upstream does: length and total time."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from prometheus_client import generate_latest

from ml_serving._proto.mlserving.v1 import generation_pb2
from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from ml_serving.generation.service import MAX_CHARS_PER_TOKEN
from tests.support.fake_openai import FakeOpenAI
from tests.support.requests import generate_request, generate_stream_request
from tests.support.servers import StartServer, write_llm_config
from tests.support.streams import collect


async def test_a_stream_that_ignores_max_tokens_is_cut_with_finish_length(
    start_server: StartServer, upstream: FakeOpenAI, tmp_path: Path
) -> None:
    """11,045 deltas in 60 s, never ended, with max_tokens 20: now cut at 20 x 16 characters."""
    config = write_llm_config(tmp_path / "llm.yaml", upstream, ["endless"])
    app = await start_server(llm_config=config, llm_stream_coalesce_ms=0)
    request = generate_stream_request()
    request.limits.max_tokens = 20
    cancelled = upstream.cancelled
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        text, end = await collect(stub.GenerateStream(request, timeout=30))
    assert len(text) == 20 * MAX_CHARS_PER_TOKEN
    assert end.finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert not end.fallback
    # The upstream stream was closed, not read to its end.
    async with asyncio.timeout(10):
        while upstream.in_progress:
            await asyncio.sleep(0.05)
    assert upstream.cancelled > cancelled or upstream.completed


async def test_a_unary_answer_past_its_request_bound_is_refused_while_it_is_read(
    start_server: StartServer, upstream: FakeOpenAI, tmp_path: Path
) -> None:
    """A JSON answer can only be used whole: one longer than max_tokens can carry (x 16
    characters, JSON-escaped, plus its envelope) was read whole and then cut; now it is an
    upstream failure while it is read (here the fallback tip), the connection closed early."""
    config = write_llm_config(tmp_path / "llm.yaml", upstream, ["flood"])
    app = await start_server(llm_config=config)
    request = generate_request()
    request.limits.max_tokens = 30
    cancelled = upstream.cancelled
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        reply = await pb_grpc.InferenceServiceStub(channel).Generate(request, timeout=30)
    assert reply.fallback and reply.text
    # Every try hung up on the upstream long before its 50 MB were sent.
    async with asyncio.timeout(10):
        while upstream.in_progress:
            await asyncio.sleep(0.05)
    assert upstream.cancelled > cancelled
    assert app.generator.gateway is not None
    assert app.generator.gateway.answer_budget.held == 0


@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
async def test_the_answer_budget_bounds_what_every_upstream_holds_at_once(
    start_server: StartServer, upstream: FakeOpenAI, tmp_path: Path, method: str
) -> None:
    """64 answers of 50 MB took the server from 240 MB to 1.22 GB (16 MiB each, no bound on
    the sum). With a 1 MiB budget, a stream of 1024 tokens (its own bound is 1.3 MB) spends
    the budget alone: the fallback tip, counted by reason, and every byte given back."""
    config = write_llm_config(tmp_path / "llm.yaml", upstream, ["flood"])
    app = await start_server(llm_config=config, llm_answer_budget_bytes=1024 * 1024)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        if method == "Generate":
            request = generate_request()
            request.limits.max_tokens = 1024
            # Its own bound (262 KB) is below the budget: refused as too large, not by budget.
            assert (await stub.Generate(request, timeout=30)).fallback
        else:
            stream_request = generate_stream_request()
            stream_request.limits.max_tokens = 1024
            text, end = await collect(stub.GenerateStream(stream_request, timeout=30))
            assert end.fallback and text
    gateway = app.generator.gateway
    assert gateway is not None
    assert gateway.answer_budget.held == 0
    assert gateway.answer_budget.peak <= 1024 * 1024
    metrics = generate_latest(app.metrics.registry).decode()
    budget_line = 'mlserving_llm_errors_total{model="openai/flood",reason="answer_budget"} 1.0'
    if method == "GenerateStream":
        assert gateway.answer_budget.refused == 1
        assert budget_line in metrics
    else:
        assert gateway.answer_budget.refused == 0
        assert 'reason="unavailable"' in metrics


@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
async def test_a_call_without_a_deadline_is_bounded_by_the_server(
    start_server: StartServer, upstream: FakeOpenAI, tmp_path: Path, method: str
) -> None:
    """A hung upstream and a caller with no deadline held the call for 3 x 10 s and more."""
    config = write_llm_config(tmp_path / "llm.yaml", upstream, ["slow"])
    app = await start_server(llm_config=config, llm_max_call_s=0.5, llm_fallback=False)
    delay, upstream.delay_s = upstream.delay_s, 30.0
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                if method == "Generate":
                    await stub.Generate(generate_request())
                else:
                    await collect(stub.GenerateStream(generate_stream_request()))
        # Unbounded, the upstream would have answered OK after its 30 s.
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        upstream.delay_s = delay


@pytest.mark.parametrize("fallback", [True, False])
async def test_a_route_that_times_out_is_an_upstream_failure(
    start_server: StartServer, upstream: FakeOpenAI, tmp_path: Path, fallback: bool
) -> None:
    """A hung upstream with no client deadline: 3 tries x 10 s, then DEADLINE_EXCEEDED "did not
    answer within the call's deadline" and no fallback tip. A route's own timeout is the
    upstream failing: the fallback tip when it is on, else UNAVAILABLE saying so."""
    config = write_llm_config(tmp_path / "llm.yaml", upstream, ["slow"], num_retries=1)
    text = config.read_text().replace("timeout: 10", "timeout: 1")
    config.write_text(text)
    app = await start_server(llm_config=config, llm_fallback=fallback)
    delay, upstream.delay_s = upstream.delay_s, 5.0
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            if fallback:
                reply = await stub.Generate(generate_request())
                assert reply.fallback and reply.text
                return
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Generate(generate_request())
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert caught.value.details() == (
            "the LLM route did not answer within its timeout; retry later"
        )
    finally:
        upstream.delay_s = delay


@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
async def test_an_oversized_upstream_answer_is_an_upstream_failure(
    start_server: StartServer, upstream: FakeOpenAI, tmp_path: Path, method: str
) -> None:
    """A 50 MB answer was read whole, then refused by gRPC's send limit (RESOURCE_EXHAUSTED
    "Sent message larger than max") while the access log and metrics said OK."""
    config = write_llm_config(tmp_path / "llm.yaml", upstream, ["huge"])
    app = await start_server(llm_config=config, llm_fallback=False)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            if method == "Generate":
                await stub.Generate(generate_request(), timeout=60)
            else:
                await collect(stub.GenerateStream(generate_stream_request(), timeout=60))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    text = generate_latest(app.metrics.registry).decode()
    assert f'grpc_method="{method}"' in text and 'grpc_code="UNAVAILABLE"' in text
