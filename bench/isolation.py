"""Score unharmed by Generate: Score at a fixed rate alone, then with Generate pushed to
saturation, in alternating rounds of the same run, side by side, in both topologies.

Score is offered open loop (a call every 1/rate seconds, whether or not earlier ones have
answered: a closed loop would slow down with the server and hide the harm), from its own client
process; Generate runs closed loop at `--generate-concurrency` from another, against the fake
upstream, as fast as the server answers it. Each round measures Score alone, then Score with
Generate running, for each topology in turn:

- **single**: one `python -m ml_serving` process serves both (Generate on the same port);
- **split**: the same command with ML_SERVING_GENERATE_PORT: Score on the main port's process,
  Generate on the Generate port's, which runs at a lower CPU priority (ML_SERVING_GENERATE_NICE,
  SCHED_IDLE).

The report gives, per topology, both p99s (over all rounds) and their ratio, with Generate's
calls/s and the server's CPU (every process of it).

    .venv/bin/python -m bench.isolation                     # starts upstream and servers itself
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
    machine_busy_s: float = 0.0
    """CPU seconds the whole machine was busy (the bench, the server and anything else)."""
    round_p99_ms: list[float | None] = field(default_factory=list)
    """Each round's own p99: a round another load on the machine hit stands out here."""

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
            "machine_cores_busy": (
                round(self.machine_busy_s / self.wall_s, 2) if self.wall_s else 0
            ),
            "round_p99_ms": self.round_p99_ms,
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
        # Each command names the target (one scorer serves every topology) and the seconds.
        while (command := conn.recv()) is not None:
            score_target, seconds = command
            conn.send(uvloop.run(_score_open_loop(score_target, spec, arg, seconds)))
    else:
        conn.send(uvloop.run(_generate_closed_loop(target, spec, int(arg), conn)))


# --- the orchestrator ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Topology:
    """One way of serving both methods, and where each load goes."""

    name: str
    """"single" (one process serves both) or "split" (ML_SERVING_GENERATE_PORT)."""
    score_target: str
    generate_target: str
    server: procs.Proc
    """The server's process tree: its CPU is every process of it."""


TOPOLOGIES: dict[str, str] = {
    "single": "one process serves Score and Generate (one port)",
    "split": "Score on the main port's process, Generate on the Generate port's "
    "(ML_SERVING_GENERATE_PORT, nice +10, SCHED_IDLE)",
}


def measure(
    plan: Plan, topologies: list[Topology], log: Any = print, ghz_dir: Path | None = None
) -> dict[str, dict[str, Any]]:
    """Per topology, Score alone then Score with saturating Generate, `plan.rounds` times, the
    topologies taking turns within each round (requests from `ghz_dir`'s configs, default
    bench/ghz); {topology name: both sides and the p99 ratio}."""
    configs = ghz_configs(ghz_dir) if ghz_dir is not None else ghz_configs()
    score = configs["score"].spec()
    stem = "generate_stream" if plan.generate_method == "GenerateStream" else "generate"
    generate = configs[stem].spec()
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    scorer = ctx.Process(
        target=_client, args=(child, "score", "", score, plan.score_rate), daemon=True
    )
    scorer.start()
    phases = {t.name: (Phase(), Phase()) for t in topologies}
    try:
        for r in range(plan.rounds):
            for topology in topologies:
                for phase, with_generate in zip(phases[topology.name], (False, True), strict=True):
                    _phase(plan, topology, phase, with_generate, generate, parent, ctx)
                    log(
                        f"  isolation round {r + 1}/{plan.rounds} {topology.name}: "
                        f"{'with ' + plan.generate_method if with_generate else 'Score alone'}: "
                        f"Score p99 {phase.round_p99_ms[-1]} ms"
                    )
                    time.sleep(0.5)
    finally:
        parent.send(None)
        scorer.join(10)
    out = {}
    for name, (alone, loaded) in phases.items():
        a, b = alone.summary(), loaded.summary()
        ratio = None
        if a["score_p99_ms"] and b["score_p99_ms"]:
            ratio = round(b["score_p99_ms"] / a["score_p99_ms"], 3)
        out[name] = {
            "plan": plan.__dict__,
            "score_alone": a,
            "score_with_generate": b,
            "p99_ratio": ratio,
        }
    return out


def _phase(
    plan: Plan,
    topology: Topology,
    phase: Phase,
    with_generate: bool,
    generate: CallSpec,
    scorer: Connection,
    ctx: Any,
) -> None:
    """One phase of one round: Score offered for plan.round_s, Generate running or not."""
    gen_conn = gen = None
    if with_generate:
        gen_conn, gen_child = ctx.Pipe()
        gen = ctx.Process(
            target=_client,
            args=(
                gen_child,
                "generate",
                topology.generate_target,
                generate,
                plan.generate_concurrency,
            ),
            daemon=True,
        )
        gen.start()
        assert gen_conn.recv() == "running"
        time.sleep(1.0)  # let it reach its steady state
        gen_conn.send("count")
    cpu0, busy0, t0 = topology.server.cpu_s(), procs.machine_busy_s(), time.monotonic()
    scorer.send((topology.score_target, plan.round_s))
    result = scorer.recv()
    phase.wall_s += time.monotonic() - t0
    phase.server_cpu_s += topology.server.cpu_s() - cpu0
    phase.machine_busy_s += procs.machine_busy_s() - busy0
    phase.latency += result["latency"]
    lat = np.asarray(result["latency"]) * 1e3
    phase.round_p99_ms.append(round(float(np.percentile(lat, 99)), 3) if lat.size else None)
    phase.offered += result["offered"]
    phase.errors += result["errors"]
    if gen_conn is not None and gen is not None:
        gen_conn.send("stop")
        counts = gen_conn.recv()
        phase.generate_ok += counts["ok"]
        phase.generate_errors += counts["errors"]
        gen.join(30)


def result_row(name: str, plan: Plan, result: dict[str, Any], workers: int = 1) -> dict[str, Any]:
    """One topology's measurement as a results.json row (scenario "isolation", target = the
    topology's name; bench/thresholds.json judges the split one)."""
    alone, loaded = result["score_alone"], result["score_with_generate"]
    errors = alone["score_errors"] + loaded["score_errors"] + loaded.get("generate_errors", 0)
    return {
        "scenario": "isolation",
        "target": name,
        "topology": TOPOLOGIES[name],
        "concurrency": plan.generate_concurrency,
        "score_rate": plan.score_rate,
        "generate_method": plan.generate_method,
        "rounds": plan.rounds,
        "score_alone": alone,
        "score_with_generate": loaded,
        "p99_ratio": result["p99_ratio"],
        "error_count": errors,
        "workers": workers,
    }


def split_server(env: dict[str, str], work: Path, workers: int = 1) -> tuple[procs.Proc, int, int]:
    """`python -m ml_serving` in the split topology on free loopback ports, ready on both:
    (the supervisor's process, main port, Generate port)."""
    generate_port = procs.free_port()
    server, port = procs.start_server(
        {**env, "ML_SERVING_GENERATE_PORT": str(generate_port)},
        work / "isolation-split-server.log",
        work,
        workers,
    )
    try:
        procs.wait_ready(server, port, workers=workers)
        procs.wait_ready(server, generate_port)
    except BaseException:
        server.stop()
        raise
    return server, port, generate_port


def run(
    plan: Plan,
    single: tuple[str, procs.Proc],
    server_env: dict[str, str],
    work: Path,
    workers: int = 1,
    log: Any = print,
) -> list[dict[str, Any]]:
    """Both topologies in one run: `single` is (target, process) of the server the other
    scenarios use; a split one is started with `server_env` (its LLM route and settings) for
    the measurement and stopped after it. One results row per topology."""
    server, port, generate_port = split_server(server_env, work, workers)
    log(f"  isolation: split server pid {server.pid} on :{port} (Generate port :{generate_port})")
    try:
        topologies = [
            Topology("single", single[0], single[0], single[1]),
            Topology("split", f"127.0.0.1:{port}", f"127.0.0.1:{generate_port}", server),
        ]
        results = measure(plan, topologies, log)
    finally:
        server.stop()
    return [result_row(name, plan, result, workers) for name, result in results.items()]


def llm_env(config: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The server settings of an isolation run: the LiteLLM route to the fake upstream, the
    fallback off (an upstream failure must count as one), then `extra`."""
    return {
        "ML_SERVING_LLM_CONFIG": str(config),
        "ML_SERVING_LLM_FALLBACK": "false",
        "BENCH_UPSTREAM_KEY": procs.UPSTREAM_KEY,
        **(extra or {}),
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
        env = llm_env(config, dict(item.split("=", 1) for item in args.server_env))
        server, port = procs.start_server(env, work / "iso-server.log", work)
        procs.wait_ready(server, port)
        rows = run(plan, (f"127.0.0.1:{port}", server), env, work)
    finally:
        if server is not None:
            server.stop()
        upstream.stop()
    print(json.dumps(rows, indent=2))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
