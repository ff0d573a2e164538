"""Score server CPU per call: two checkouts of ml-serving under the same load at the same time.

On a shared, noisy machine, runs one after the other measure the neighbours as much as the
change (back-to-back `make bench` Score rows move by ±15%). Here both servers run side by side
(`python -m ml_serving` from each checkout, INFO access log on, metrics port off); each round
one client process drives both, each with its own checkout's ghz Score request (so a change of
the request's form is measured too), half the concurrency each, for
--seconds, so whatever else the machine does hits both alike. Per round it reads each server's
CPU from /proc: the event-loop thread (the one that saturates first) and the whole process. The
report gives every round and the median of the paired differences, B minus A; the two servers
swap client slots every round.

    git worktree add /tmp/ml-serving-head HEAD
    .venv/bin/python -m scripts.score_ab /tmp/ml-serving-head .        # A = HEAD, B = this tree
    .venv/bin/python -m scripts.score_ab A B --rounds 9 --seconds 8 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from bench import procs
from ml_serving._proto.mlserving.v1 import inference_service_pb2 as pb
from tests.support.server_process import ServerProcess

METHOD = "/mlserving.v1.InferenceService/Score"


def _cpu_s(pid: int) -> tuple[float, float]:
    """CPU seconds (user + sys) of the process's main thread and of all its threads."""
    main = total = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            seconds = procs.cpu_s(procs.stat_fields(f"/proc/{pid}/task/{tid}/stat"))
        except OSError:
            continue  # a thread that just ended
        total += seconds
        if tid == str(pid):
            main = seconds
    return main, total


async def _round(
    servers: list[ServerProcess],
    requests: list[pb.ScoreRequest],
    seconds: float,
    concurrency: int,
) -> list[dict[str, float]]:
    channels = [grpc.aio.insecure_channel(s.address) for s in servers]
    try:
        calls: list[grpc.aio.UnaryUnaryMultiCallable[pb.ScoreRequest, bytes]] = [
            ch.unary_unary(METHOD, request_serializer=pb.ScoreRequest.SerializeToString)
            for ch in channels
        ]
        for call, request in zip(calls, requests, strict=True):
            for _ in range(100):  # warm both connections and servers
                await call(request)
        done = [0] * len(servers)
        stop = time.perf_counter() + seconds

        async def worker(i: int) -> None:
            call, request = calls[i], requests[i]
            while time.perf_counter() < stop:
                await call(request)
                done[i] += 1

        before = [_cpu_s(s.pid) for s in servers]
        await asyncio.gather(*(worker(j % len(servers)) for j in range(concurrency)))
        after = [_cpu_s(s.pid) for s in servers]
    finally:
        for ch in channels:
            await ch.close()
    return [
        {
            "calls": done[i],
            "main_us": (after[i][0] - before[i][0]) / done[i] * 1e6,
            "process_us": (after[i][1] - before[i][1]) / done[i] * 1e6,
        }
        for i in range(len(servers))
    ]


def _ghz_request(checkout: Path) -> pb.ScoreRequest:
    """The Score request of a checkout's bench/ghz/score.json (the form that checkout sends)."""
    data = json.loads((checkout / "bench/ghz/score.json").read_text())["data"]
    return json_format.ParseDict(data, pb.ScoreRequest(), ignore_unknown_fields=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path, help="checkout A (the baseline)")
    parser.add_argument("b", type=Path, help="checkout B (the change)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    requests = [_ghz_request(args.a), _ghz_request(args.b)]
    env = {"ML_SERVING_LOG_LEVEL": "INFO"}
    servers = [
        ServerProcess(cwd=args.a.resolve(), **env),
        ServerProcess(cwd=args.b.resolve(), **env),
    ]
    rows: list[list[dict[str, Any]]] = []
    try:
        for server in servers:
            server.wait_ready()
        for r in range(args.rounds):
            order = servers if r % 2 == 0 else servers[::-1]
            sent = requests if r % 2 == 0 else requests[::-1]
            result = asyncio.run(_round(order, sent, args.seconds, args.concurrency))
            a, b = result if r % 2 == 0 else result[::-1]
            rows.append([a, b])
            print(
                f"round {r + 1}: A {a['calls']:6d} calls, main {a['main_us']:5.0f} µs/call, "
                f"process {a['process_us']:5.0f} | B {b['calls']:6d} calls, "
                f"main {b['main_us']:5.0f}, process {b['process_us']:5.0f}",
                flush=True,
            )
    finally:
        for server in servers:
            server.stop()
    for key in ("main_us", "process_us"):
        a_med = statistics.median(a[key] for a, _ in rows)
        diffs = [b[key] - a[key] for a, b in rows]
        diff = statistics.median(diffs)
        worse = sum(d > 0 for d in diffs)
        print(
            f"{key[:-3]:8s} CPU µs/call: A median {a_med:5.0f}, B - A median {diff:+5.0f} "
            f"({diff / a_med:+.1%}); B cost more in {worse} of {len(diffs)} rounds"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
