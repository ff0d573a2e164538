"""Soak test: a bounded mixed load against `python -m ml_serving` in a subprocess on 127.0.0.1.

Score, Generate, GenerateStream and ListPromptVersions (plus a few deliberately invalid Score
requests) run for a set time, by default through LiteLLM's real HTTP path to a fake OpenAI
upstream started here; the server's RSS is sampled every few seconds. The run fails on any
unexpected status, on a server that does not drain cleanly, or on memory that keeps growing:
a least-squares slope over the second half of the samples above the threshold.

    python -m scripts.soak                    # 120 s (SOAK_SECONDS overrides), or:
    python -m scripts.soak --seconds 600 --rate 40 --json soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ml_serving._proto.mlserving.v1 import inference_service_pb2 as pb
from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from tests.support.fake_openai import FakeOpenAI
from tests.support.requests import generate_request, generate_stream_request, score_request
from tests.support.server_process import SERVICE_NAME, ServerProcess

MiB = 1024 * 1024
FAKE_KEY = "sk-soak-not-a-real-key-000000"

# (operation, weight, the status it must get)
MIX: tuple[tuple[str, float, str], ...] = (
    ("Score", 0.45, "OK"),
    ("Generate", 0.20, "OK"),
    ("GenerateStream", 0.25, "OK"),
    ("ListPromptVersions", 0.05, "OK"),
    ("Score:invalid", 0.05, "INVALID_ARGUMENT"),
)


@dataclass
class Tally:
    """What the load saw: statuses and latencies per operation, unexpected outcomes."""

    statuses: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    unexpected: list[str] = field(default_factory=list)

    def record(self, op: str, expected: str, status: str, seconds: float, detail: str) -> None:
        self.statuses[op][status] += 1
        self.latencies[op].append(seconds)
        if status != expected and len(self.unexpected) < 20:
            self.unexpected.append(f"{op}: {status} (expected {expected}) {detail[:200]}")

    @property
    def calls(self) -> int:
        return sum(sum(c.values()) for c in self.statuses.values())

    @property
    def bad(self) -> int:
        expected = {op: status for op, _, status in MIX}
        return sum(n for op, c in self.statuses.items() for s, n in c.items() if s != expected[op])


def slope_per_minute(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS over time, in MiB per minute."""
    xs = [t for t, _ in samples]
    ys = [rss / MiB for _, rss in samples]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return 60 * sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var


def _requests(stub: pb_grpc.InferenceServiceAsyncStub) -> dict[str, Callable[[], Awaitable[Any]]]:
    valid_score = score_request(candidates=20)
    invalid_score = score_request(candidates=5)
    invalid_score.candidates[2].values[0] = float("nan")

    async def stream() -> int:
        messages = [m async for m in stub.GenerateStream(generate_stream_request(), timeout=15)]
        if not messages or messages[-1].WhichOneof("event") != "end":
            raise AssertionError("stream without its end message")
        return len(messages)

    return {
        "Score": lambda: stub.Score(valid_score, timeout=10),
        "Generate": lambda: stub.Generate(generate_request(), timeout=15),
        "GenerateStream": stream,
        "ListPromptVersions": lambda: stub.ListPromptVersions(
            pb.ListPromptVersionsRequest(), timeout=10
        ),
        "Score:invalid": lambda: stub.Score(invalid_score, timeout=10),
    }


async def _load(
    address: str, seconds: float, concurrency: int, rate: float, tally: Tally, seed: int
) -> None:
    """`concurrency` closed-loop workers sharing one pacing clock (`rate` calls/s, 0 = none)."""
    deadline = time.monotonic() + seconds
    next_slot = time.monotonic()
    rng = random.Random(seed)
    ops = [op for op, _, _ in MIX]
    weights = [w for _, w, _ in MIX]
    expected = {op: status for op, _, status in MIX}
    channels = [grpc.aio.insecure_channel(address) for _ in range(2)]

    async def worker(index: int) -> None:
        nonlocal next_slot
        calls = _requests(pb_grpc.InferenceServiceStub(channels[index % len(channels)]))
        while time.monotonic() < deadline:
            if rate > 0:
                wait = next_slot - time.monotonic()
                next_slot = max(next_slot, time.monotonic()) + 1 / rate
                if wait > 0:
                    await asyncio.sleep(wait)
            op = rng.choices(ops, weights)[0]
            started = time.monotonic()
            try:
                await calls[op]()
                status, detail = "OK", ""
            except grpc.aio.AioRpcError as error:
                status, detail = error.code().name, error.details() or ""
            except Exception as error:  # a broken stream, a client-side failure
                status, detail = "CLIENT_ERROR", repr(error)
            tally.record(op, expected[op], status, time.monotonic() - started, detail)

    try:
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    finally:
        for chan in channels:
            await chan.close()


async def _sample(proc: ServerProcess, every_s: float, out: list[tuple[float, int]]) -> None:
    started = time.monotonic()
    while True:
        out.append((time.monotonic() - started, proc.rss_bytes()))
        await asyncio.sleep(every_s)


async def _healthy(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as chan:
        health: Any = health_pb2_grpc.HealthStub(chan)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _write_config(directory: Path, upstream: FakeOpenAI) -> Path:
    path = directory / "llm.yaml"
    entry = {
        "model_name": "soak",
        "litellm_params": {
            "model": "openai/ok",
            "api_base": upstream.base_url,
            "api_key": "os.environ/SOAK_FAKE_OPENAI_KEY",
            "timeout": 10,
        },
    }
    path.write_text(yaml.safe_dump({"model_list": [entry], "router_settings": {"num_retries": 0}}))
    return path


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    """Run the soak; the summary (with "passed" and "problems")."""
    tmp = Path(tempfile.mkdtemp(prefix="ml-serving-soak-"))
    upstream: FakeOpenAI | None = None
    env = {"ML_SERVING_LLM_FALLBACK": "false"}
    if args.route == "fake":
        upstream = await FakeOpenAI(ttft_s=0.02, token_delay_s=0.005).start()
        env.update(
            ML_SERVING_LLM_CONFIG=str(_write_config(tmp, upstream)),
            SOAK_FAKE_OPENAI_KEY=FAKE_KEY,
        )
    proc = ServerProcess(**env)
    samples: list[tuple[float, int]] = []
    tally = Tally()
    problems: list[str] = []
    try:
        await asyncio.to_thread(proc.wait_ready)
        sampler = asyncio.create_task(_sample(proc, args.sample_s, samples))
        started = time.monotonic()
        await _load(proc.address, args.seconds, args.concurrency, args.rate, tally, args.seed)
        elapsed = time.monotonic() - started
        sampler.cancel()
        samples.append((elapsed, proc.rss_bytes()))
        if not await _healthy(proc.address):
            problems.append("health is not SERVING after the soak")
    finally:
        exit_code = proc.stop()
        if upstream is not None:
            await upstream.stop()
    if exit_code != 0:
        problems.append(f"the server exited {exit_code} after SIGTERM:\n{proc.log()}")
    if tally.bad:
        problems.append(f"{tally.bad} unexpected statuses, e.g. {tally.unexpected[:3]}")
    second_half = [s for s in samples if s[0] >= elapsed / 2]
    slope = slope_per_minute(second_half) if len(second_half) >= 3 else 0.0
    if len(second_half) < 3:
        problems.append("too few memory samples in the second half to judge growth")
    elif slope > args.max_slope:
        problems.append(
            f"server RSS keeps growing: {slope:.2f} MiB/min over the second half "
            f"(threshold {args.max_slope} MiB/min)"
        )
    rss = [r for _, r in samples]
    summary: dict[str, Any] = {
        "passed": not problems,
        "problems": problems,
        "route": args.route,
        "seconds": round(elapsed, 1),
        "concurrency": args.concurrency,
        "rate_limit": args.rate,
        "calls": tally.calls,
        "calls_per_s": round(tally.calls / elapsed, 1),
        "statuses": {op: dict(c) for op, c in sorted(tally.statuses.items())},
        "latency_ms": {
            op: {
                "p50": round(statistics.median(v) * 1e3, 1),
                "p99": round(sorted(v)[int(0.99 * (len(v) - 1))] * 1e3, 1),
                "max": round(max(v) * 1e3, 1),
            }
            for op, v in sorted(tally.latencies.items())
        },
        "rss_mib": {
            "first": round(rss[0] / MiB, 1),
            "last": round(rss[-1] / MiB, 1),
            "min": round(min(rss) / MiB, 1),
            "max": round(max(rss) / MiB, 1),
            "second_half_slope_per_min": round(slope, 3),
            "samples": [(round(t, 1), round(r / MiB, 1)) for t, r in samples],
        },
        "server_exit_code": exit_code,
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    """CLI; exit 0 when the soak passed, 1 when it found a problem."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", "120"))
    )
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop workers")
    parser.add_argument(
        "--rate", type=float, default=25.0, help="calls/s for all workers; 0 = none"
    )
    parser.add_argument("--route", choices=("fake", "offline"), default="fake")
    parser.add_argument("--sample-s", type=float, default=3.0, help="seconds between RSS samples")
    parser.add_argument(
        "--max-slope", type=float, default=2.0, help="MiB/min of RSS growth that fails the soak"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args(argv)
    summary = asyncio.run(soak(args))
    text = json.dumps(summary, indent=2)
    if args.json is not None:
        args.json.write_text(text + "\n")
    short = {k: v for k, v in summary.items() if k != "rss_mib"}
    short["rss_mib"] = {k: v for k, v in summary["rss_mib"].items() if k != "samples"}
    print(json.dumps(short, indent=2))
    print(("PASSED" if summary["passed"] else "FAILED") + ": soak", file=sys.stderr)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
