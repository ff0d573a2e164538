"""Score unharmed by Generate: Score at a fixed rate alone, then with Generate pushed to
saturation, in alternating rounds of the same run, side by side.

Score is offered open loop (a call every 1/rate seconds, whether or not earlier ones have
answered: a closed loop would slow down with the server and hide the harm), from its own client
process; Generate runs closed loop at `--generate-concurrency` from another, against the fake
upstream, as fast as the server answers it. Each round measures Score alone, then Score with
Generate running; the report gives both p99s (over all rounds) and their ratio, with Generate's
calls/s and the server's CPU.

    .venv/bin/python -m bench.isolation                     # starts upstream and server itself
    .venv/bin/python -m bench.isolation --method GenerateStream --generate-concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench import procs
from bench.scenarios import BENCH_DIR, CallSpec, ghz_configs, method_path, resolve_method


@dataclass(frozen=True)
class Plan:
    """What one isolation measurement offers."""

    score_rate: float = 150.0
    """Score calls offered per second (open loop)."""
    generate_method: str = "Generate"
    generate_concurrency: int = 32
    round_s: float = 6.0
    """Seconds of each phase (Score alone, Score with Generate) per round."""
    rounds: int = 3


@dataclass
class Phase:
    """Latencies (seconds) and counts of one kind of phase, over every round."""

    latency: list[float] = field(default_factory=list)
    offered: int = 0
    errors: int = 0
    wall_s: float = 0.0
    generate_ok: int = 0
    generate_errors: int = 0
    server_cpu_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latency) * 1e3
        row: dict[str, Any] = {
            "score_offered_per_s": round(self.offered / self.wall_s, 1) if self.wall_s else 0,
            "score_answered_per_s": round(len(lat) / self.wall_s, 1) if self.wall_s else 0,
            "score_errors": self.errors,
            "score_p50_ms": round(float(np.percentile(lat, 50)), 3) if lat.size else None,
            "score_p99_ms": round(float(np.percentile(lat, 99)), 3) if lat.size else None,
            "score_max_ms": round(float(lat.max()), 3) if lat.size else None,
            "server_cores": round(self.server_cpu_s / self.wall_s, 2) if self.wall_s else 0,
        }
        if self.generate_ok or self.generate_errors:
            row["generate_calls_per_s"] = round(self.generate_ok / self.wall_s, 1)
            row["generate_errors"] = self.generate_errors
        return row


# --- client processes ----------------------------------------------------------------------------


def _stub(channel: grpc.aio.Channel, spec: CallSpec) -> tuple[Any, bool]:
    from google.protobuf import message_factory

    method = resolve_method(spec.call)
    response_cls = message_factory.GetMessageClass(method.output_type)
    path = method_path(method)
    if method.server_streaming:
        return channel.unary_stream(path, response_deserializer=response_cls.FromString), True
    return channel.unary_unary(path, response_deserializer=response_cls.FromString), False


async def _score_open_loop(target: str, spec: CallSpec, rate: float, seconds: float) -> Any:
    """Offer Score every 1/rate s for `seconds`; latencies of the answered calls."""
    async with grpc.aio.insecure_channel(target) as channel:
        call, _ = _stub(channel, spec)
        for _ in range(20):  # warm: connection, first-call work
            await call(spec.request, timeout=spec.timeout_s)
        latencies: list[float] = []
        errors = 0

        async def one() -> None:
            nonlocal errors
            started = time.perf_counter()
            try:
                await call(spec.request, timeout=spec.timeout_s)
            except grpc.aio.AioRpcError:
                errors += 1
                return
            latencies.append(time.perf_counter() - started)

        loop = asyncio.get_running_loop()
        tasks = []
        t0 = loop.time()
        n = int(rate * seconds)
        for i in range(n):
            delay = t0 + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one()))
        await asyncio.gather(*tasks)
        return {"latency": latencies, "offered": n, "errors": errors}


async def _generate_closed_loop(target: str, spec: CallSpec, concurrency: int, conn: Any) -> Any:
    """Keep `concurrency` Generate calls in flight until told to stop; count them."""
    stop = asyncio.Event()
    counts = {"ok": 0, "errors": 0, "counting": False}
    async with grpc.aio.insecure_channel(target) as channel:
        call, streaming = _stub(channel, spec)

        async def caller() -> None:
            while not stop.is_set():
                try:
                    if streaming:
                        async for _ in call(spec.request, timeout=spec.timeout_s):
                            pass
                    else:
                        await call(spec.request, timeout=spec.timeout_s)
                    ok = True
                except grpc.aio.AioRpcError:
                    ok = False
                if counts["counting"]:
                    counts["ok" if ok else "errors"] += 1

        loop = asyncio.get_running_loop()
        tasks = [asyncio.ensure_future(caller()) for _ in range(concurrency)]
        conn.send("running")
        # Commands: "count" starts counting, "stop" stops and reports.
        while True:
            command = await loop.run_in_executor(None, conn.recv)
            if command == "count":
                counts["ok"] = counts["errors"] = 0
                counts["counting"] = True
            else:
                break
        stop.set()
        report = {"ok": counts["ok"], "errors": counts["errors"]}
        await asyncio.gather(*tasks)
        return report


def _client(conn: Connection, role: str, target: str, spec: CallSpec, arg: float) -> None:
    import uvloop

    if role == "score":
        while (seconds := conn.recv()) is not None:
            conn.send(uvloop.run(_score_open_loop(target, spec, arg, seconds)))
    else:
        conn.send(uvloop.run(_generate_closed_loop(target, spec, int(arg), conn)))


# --- the orchestrator ----------------------------------------------------------------------------


def measure(
    plan: Plan, target: str, server: procs.Proc, log: Any = print, ghz_dir: Path | None = None
) -> dict[str, Any]:
    """Alternate Score alone / Score with saturating Generate, `plan.rounds` times (requests
    from `ghz_dir`'s configs, default bench/ghz)."""
    configs = ghz_configs(ghz_dir) if ghz_dir is not None else ghz_configs()
    score = configs["score"].spec()
    stem = "generate_stream" if plan.generate_method == "GenerateStream" else "generate"
    generate = configs[stem].spec()
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    scorer = ctx.Process(
        target=_client, args=(child, "score", target, score, plan.score_rate), daemon=True
    )
    scorer.start()
    alone, loaded = Phase(), Phase()
    try:
        for r in range(plan.rounds):
            for phase, with_generate in ((alone, False), (loaded, True)):
                gen_conn = gen = None
                if with_generate:
                    gen_conn, gen_child = ctx.Pipe()
                    gen = ctx.Process(
                        target=_client,
                        args=(gen_child, "generate", target, generate, plan.generate_concurrency),
                        daemon=True,
                    )
                    gen.start()
                    assert gen_conn.recv() == "running"
                    time.sleep(1.0)  # let it reach its steady state
                    gen_conn.send("count")
                cpu0, t0 = server.cpu_s(), time.monotonic()
                parent.send(plan.round_s)
                result = parent.recv()
                phase.wall_s += time.monotonic() - t0
                phase.server_cpu_s += server.cpu_s() - cpu0
                phase.latency += result["latency"]
                phase.offered += result["offered"]
                phase.errors += result["errors"]
                if gen_conn is not None and gen is not None:
                    gen_conn.send("stop")
                    counts = gen_conn.recv()
                    phase.generate_ok += counts["ok"]
                    phase.generate_errors += counts["errors"]
                    gen.join(30)
                p99 = np.percentile(np.asarray(result["latency"]) * 1e3, 99)
                log(
                    f"  isolation round {r + 1}/{plan.rounds} "
                    f"{'with ' + plan.generate_method if with_generate else 'Score alone'}: "
                    f"Score p99 {p99:.2f} ms"
                )
                time.sleep(0.5)
    finally:
        parent.send(None)
        scorer.join(10)
    a, b = alone.summary(), loaded.summary()
    ratio = None
    if a["score_p99_ms"] and b["score_p99_ms"]:
        ratio = round(b["score_p99_ms"] / a["score_p99_ms"], 3)
    return {
        "plan": plan.__dict__,
        "score_alone": a,
        "score_with_generate": b,
        "p99_ratio": ratio,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.isolation", description=__doc__)
    parser.add_argument("--score-rate", type=float, default=Plan.score_rate)
    parser.add_argument("--method", choices=("Generate", "GenerateStream"), default="Generate")
    parser.add_argument("--generate-concurrency", type=int, default=Plan.generate_concurrency)
    parser.add_argument("--round-s", type=float, default=Plan.round_s)
    parser.add_argument("--rounds", type=int, default=Plan.rounds)
    parser.add_argument("--ttft", type=float, default=0.1)
    parser.add_argument("--token-delay", type=float, default=0.01)
    parser.add_argument("--server-env", action="append", default=[], help="NAME=VALUE")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    plan = Plan(args.score_rate, args.method, args.generate_concurrency, args.round_s, args.rounds)
    work = BENCH_DIR / "out"
    work.mkdir(parents=True, exist_ok=True)
    upstream, up_port = procs.start_upstream(args.ttft, args.token_delay, work / "iso-up.log", work)
    server = None
    try:
        config = procs.write_llm_config(work / "iso-llm.yaml", up_port)
        env = {
            "ML_SERVING_LLM_CONFIG": str(config),
            "ML_SERVING_LLM_FALLBACK": "false",
            "BENCH_UPSTREAM_KEY": procs.UPSTREAM_KEY,
            **dict(item.split("=", 1) for item in args.server_env),
        }
        server, port = procs.start_server(env, work / "iso-server.log", work)
        procs.wait_ready(server, port)
        result = measure(plan, f"127.0.0.1:{port}", server)
    finally:
        if server is not None:
            server.stop()
        upstream.stop()
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
