"""Hostile upstreams against a server subprocess: what answers of 50 MB cost it, in memory and
in Score's latency beside them.

The memory case runs in `make test` (about 15 s). The latency case compares Score's p99 alone
and beside streams reading such answers, in the same run: it runs with ML_SERVING_STRESS=1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from tests.support.fake_openai import FakeOpenAI
from tests.support.requests import generate_request, generate_stream_request, score_request
from tests.support.server_process import ServerProcess
from tests.support.servers import write_llm_config

MB = 1000 * 1000
WAVE = 64
"""Concurrent calls whose upstream answers 50 MB each (the issue's wave)."""
MAX_RISE = 150 * MB
"""How much a wave may raise the server's RSS (it was 240 MB -> 1.22 GB)."""
MAX_LEFT = 30 * MB
"""How far above its start RSS may stay 10 s after a wave (it stayed at 1.22 GB)."""


@contextlib.asynccontextmanager
async def _flood_server(tmp_path: Path) -> AsyncIterator[ServerProcess]:
    """A server subprocess whose one LLM route answers 50 MB (fallback off)."""
    upstream = await FakeOpenAI().start()
    config = write_llm_config(tmp_path / "llm.yaml", upstream, ["flood"])
    process = ServerProcess(ML_SERVING_LLM_CONFIG=str(config), ML_SERVING_LLM_FALLBACK="false")
    try:
        await asyncio.to_thread(process.wait_ready)
        yield process
    finally:
        process.stop()
        await upstream.stop()


async def _wave(stub: Any, calls: int) -> Counter[str]:
    """`calls` Generate and GenerateStream calls at once (half each), all on a 50 MB answer."""

    async def one(i: int) -> str:
        try:
            if i % 2:
                await stub.Generate(generate_request(), timeout=60)
            else:
                async for _ in stub.GenerateStream(generate_stream_request(), timeout=60):
                    pass
        except grpc.RpcError as exc:
            return exc.code().name
        return "OK"

    return Counter(await asyncio.gather(*(one(i) for i in range(calls))))


async def test_waves_of_50_mb_answers_raise_rss_boundedly_and_it_comes_back(
    tmp_path: Path,
) -> None:
    """Each answer was read up to 16 MiB and nothing bounded the sum: 64 calls took the server
    from 240 MB to 1.22 GB, still there 10 s later, and two more waves to 1.48 and 1.63 GB."""
    async with _flood_server(tmp_path) as process:
        async with grpc.aio.insecure_channel(process.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            assert await _wave(stub, 2) == {"UNAVAILABLE": 2}  # every path warm
            await asyncio.sleep(0.5)
            start = process.rss_bytes()
            report = [f"start {start / MB:.0f} MB"]
            for _ in range(3):
                done = asyncio.Event()
                sampler = asyncio.create_task(_peak_rss(process, done))
                statuses = await _wave(stub, WAVE)
                done.set()
                peak = await sampler
                assert statuses == {"UNAVAILABLE": WAVE}, statuses
                settled_s, now = 0.0, process.rss_bytes()
                while now - start > MAX_LEFT and settled_s < 10:
                    await asyncio.sleep(0.25)
                    settled_s += 0.25
                    now = process.rss_bytes()
                report.append(f"peak {peak / MB:.0f} MB, {now / MB:.0f} MB after {settled_s} s")
                assert peak - start <= MAX_RISE, report
                assert now - start <= MAX_LEFT, report
            print("; ".join(report))


@pytest.mark.skipif(
    not os.environ.get("ML_SERVING_STRESS"),
    reason="a latency ratio (about 30 s): run with ML_SERVING_STRESS=1",
)
async def test_score_p99_beside_streams_reading_50_mb_answers_stays_within_2x_of_alone(
    tmp_path: Path,
) -> None:
    """One GenerateStream reading a 16 MiB answer took Score's p99 to 334 ms (p50 3.6 ms):
    the answer was read to 16 MiB, then parsed as one SSE line. Now it is refused at its
    request's bound. (A burst of 64 Generate calls at once costs Score more than 2x whatever
    their answers, on one event loop: README, Score beside Generate.)"""
    async with _flood_server(tmp_path) as process:
        async with (
            grpc.aio.insecure_channel(process.address) as score_channel,
            grpc.aio.insecure_channel(process.address) as flood_channel,
        ):
            score = pb_grpc.InferenceServiceStub(score_channel)
            flood = pb_grpc.InferenceServiceStub(flood_channel)
            request = score_request()
            await _wave(flood, 2)

            async def score_for(seconds: float) -> list[float]:
                """Score at about 200 calls/s for `seconds`: each call's latency."""
                latencies: list[float] = []
                end = time.perf_counter() + seconds
                while time.perf_counter() < end:
                    started = time.perf_counter()
                    await score.Score(request, timeout=10)
                    latencies.append(time.perf_counter() - started)
                    await asyncio.sleep(0.005)
                return latencies

            def p99(latencies: list[float]) -> float:
                return statistics.quantiles(latencies, n=100)[98]

            alone: list[float] = []
            beside: list[float] = []
            for _ in range(3):  # alternating rounds: the machine's load hits both alike
                alone += await score_for(2.0)
                flooding = asyncio.create_task(_streams_for(flood, 2.0))
                beside += await score_for(2.0)
                await flooding
            report = (
                f"Score p99 alone {p99(alone) * 1e3:.1f} ms ({len(alone)} calls), beside streams "
                f"reading 50 MB answers {p99(beside) * 1e3:.1f} ms ({len(beside)} calls)"
            )
            print(report)
            assert p99(beside) <= 2 * p99(alone), report


async def _peak_rss(process: ServerProcess, done: asyncio.Event) -> int:
    """The highest RSS seen every 20 ms until `done`."""
    peak = process.rss_bytes()
    while not done.is_set():
        peak = max(peak, process.rss_bytes())
        await asyncio.sleep(0.02)
    return peak


async def _streams_for(stub: Any, seconds: float) -> None:
    """One GenerateStream on a 50 MB answer after another, for `seconds`."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        with pytest.raises(grpc.RpcError) as caught:
            async for _ in stub.GenerateStream(generate_stream_request(), timeout=60):
                pass
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
