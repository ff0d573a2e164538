"""The whole-call CPU scenario of `make bench`: Generate's server CPU against a raw HTTP client."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from scripts import llm_overhead

ROUNDS = 9
"""Interleaved rounds, as scripts/llm_overhead.py runs by default (about 15 s in all here)."""
CALLS = 100
"""Unary calls per worker per round (and as many ListPromptVersions calls on the server)."""
STREAMS = 20
"""Streams per worker per round."""
WARMUP = 20
BASELINE = "raw_aiohttp"


def rows(measured: Mapping[str, Any]) -> list[dict[str, Any]]:
    """whole_rpc's answer as two rows in the check's format: Generate per call and
    GenerateStream per streamed chunk, each against the raw client of the same rounds."""
    server, raw, settings = measured["server"], measured["raw"], measured["settings"]
    common = {"target": "server", "concurrency": 1, "rounds": settings["rounds"], "error_count": 0}
    unary = {
        "scenario": "generate_overhead_unary",
        "method": "Generate",
        **common,
        "calls_per_round": settings["calls"],
        "server_cpu_ms_per_call": round(server["unary_cpu_ms"], 4),
        "floor_cpu_ms_per_call": round(server["floor_cpu_ms"], 4),
        "above_floor_ms_per_call": round(server["unary_above_floor_ms"], 4),
        "raw_cpu_ms_per_call": round(raw["unary_cpu_ms"], 4),
        "wall_p50_ms": round(server["unary_wall_p50_ms"], 3),
        "raw_wall_p50_ms": round(raw["unary_wall_p50_ms"], 3),
        "vs_baseline": {
            "baseline": BASELINE,
            "cpu_ratio_per_call": round(server["unary_ratio_to_raw"], 3),
        },
    }
    stream = {
        "scenario": "generate_overhead_stream",
        "method": "GenerateStream",
        **common,
        "streams_per_round": settings["streams"],
        "chunks_per_stream": raw["chunks_per_stream"],
        "messages_per_stream": server["messages_per_stream"],
        "server_cpu_ms_per_stream": round(server["stream_cpu_ms"], 4),
        "floor_cpu_ms_per_call": round(server["stream_floor_cpu_ms"], 4),
        "above_floor_ms_per_stream": round(server["stream_above_floor_ms"], 4),
        "above_floor_ms_per_chunk": round(server["chunk_above_floor_ms"], 5),
        "raw_cpu_ms_per_stream": round(raw["stream_cpu_ms"], 4),
        "raw_cpu_ms_per_chunk": round(raw["cpu_ms_per_chunk"], 5),
        "vs_baseline": {
            "baseline": BASELINE,
            "cpu_ratio_per_chunk": round(server["chunk_ratio_to_raw"], 3),
        },
    }
    return [unary, stream]


def failed_rows(error: str) -> list[dict[str, Any]]:
    """The two rows when the measurement broke off: counted as errors, ratios unmeasured."""
    return [
        {
            "scenario": scenario,
            "target": "server",
            "concurrency": 1,
            "method": method,
            "error_count": 1,
            "error": error,
        }
        for scenario, method in (
            ("generate_overhead_unary", "Generate"),
            ("generate_overhead_stream", "GenerateStream"),
        )
    ]


def run(
    log: Callable[[str], None],
    *,
    rounds: int = ROUNDS,
    calls: int = CALLS,
    streams: int = STREAMS,
    warmup: int = WARMUP,
) -> dict[str, Any]:
    """The scenario: results.json's `generate_overhead` section."""
    started = time.monotonic()
    try:
        measured = llm_overhead.whole_rpc(
            rounds=rounds,
            calls=calls,
            streams=streams,
            warmup=warmup,
            log=lambda line: log(f"generate_overhead: {line}"),
        )
    # A broken run (the server or a worker died: SystemExit from the script) must not take the
    # rest of `make bench` with it: its rows say so, and the check fails them.
    except (Exception, SystemExit) as exc:
        log(f"generate_overhead: failed: {exc}")
        return {
            "rows": failed_rows(str(exc)[-2000:]),
            "elapsed_s": round(time.monotonic() - started, 1),
        }
    out = rows(measured)
    for row in out:
        log(f"generate_overhead: {row['method']} {row['vs_baseline']}")
    return {
        "rows": out,
        "setup": measured["settings"],
        "rounds": measured["rounds"],
        "elapsed_s": round(time.monotonic() - started, 1),
    }
