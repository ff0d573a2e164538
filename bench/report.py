"""Writes a run's results: results.json, the RESULTS.md tables and the latency.png plot."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.check import Verdict, evaluate, load_thresholds

Row = dict[str, Any]


def rows_of(results: dict[str, Any], scenario: str, target: str) -> list[Row]:
    return sorted(
        (r for r in results["rows"] if r["scenario"] == scenario and r["target"] == target),
        key=lambda r: r["concurrency"],
    )


def find(results: dict[str, Any], scenario: str, target: str, concurrency: int) -> Row | None:
    for r in rows_of(results, scenario, target):
        if r["concurrency"] == concurrency:
            return r
    return None


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float | int):
        return f"{value:,.{digits}f}"
    return str(value)


def _lat(row: Row | None, key: str, p: str, digits: int = 1) -> str:
    if row is None or not row.get(key):
        return "–"
    return _f(row[key].get(p), digits)


def _errors(row: Row | None) -> str:
    if row is None:
        return "–"
    if not row["errors"]:
        return "0"
    return ", ".join(f"{k} {v}" for k, v in row["errors"].items())


def _mib(row: Row | None) -> str:
    if row is None or not row.get("server_rss_kb") or row["server_rss_kb"].get("peak") is None:
        return "–"
    return _f(row["server_rss_kb"]["peak"] / 1024, 0)


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" ---: " for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _against_echo(row: dict[str, Any], echo: dict[str, Any] | None) -> list[str]:
    """Cells shared by the Score tables: QPS and p99 ratios, errors, cores used ours / echo."""
    v = row.get("vs_baseline") or {}
    cores = (
        _f(row.get("server_cores_used"), 2) + " / " + _f((echo or {}).get("server_cores_used"), 2)
    )
    return [_f(v.get("qps_ratio"), 2), _f(v.get("p99_ratio"), 2), _errors(row), cores]


def score_table(results: dict[str, Any]) -> list[str]:
    body = []
    for row in rows_of(results, "score", "server"):
        c = row["concurrency"]
        echo = find(results, "score", "echo", c)
        body.append(
            [
                str(c),
                _f(row["qps"], 0),
                _lat(row, "latency_ms", "p50", 2),
                _lat(row, "latency_ms", "p90", 2),
                _lat(row, "latency_ms", "p99", 2),
                _lat(row, "latency_ms", "max", 1),
                _f(echo["qps"], 0) if echo else "–",
                _lat(echo, "latency_ms", "p50", 2),
                _lat(echo, "latency_ms", "p99", 2),
                *_against_echo(row, echo),
            ]
        )
    return _table(
        [
            "concurrency",
            "QPS",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "echo QPS",
            "echo p50 ms",
            "echo p99 ms",
            "QPS ÷ echo",
            "p99 ÷ echo",
            "errors",
            "cores used, ours / echo",
        ],
        body,
    )


def generate_table(results: dict[str, Any]) -> list[str]:
    body = []
    for row in rows_of(results, "generate", "server"):
        c = row["concurrency"]
        direct = find(results, "generate", "direct", c)
        v = row.get("vs_baseline") or {}
        body.append(
            [
                str(c),
                _f(row["qps"], 1),
                _lat(row, "latency_ms", "p50"),
                _lat(row, "latency_ms", "p90"),
                _lat(row, "latency_ms", "p99"),
                _lat(row, "latency_ms", "max"),
                _f(direct["qps"], 1) if direct else "–",
                _lat(direct, "latency_ms", "p50"),
                _lat(direct, "latency_ms", "p99"),
                _f(v.get("added_p50_ms"), 1),
                _f(v.get("added_p99_ms"), 1),
                _errors(row),
                _mib(row),
                _f(row.get("server_cores_used"), 2),
                _f(row.get("upstream_peak_in_progress"), 0),
            ]
        )
    return _table(
        [
            "concurrency",
            "calls/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "direct calls/s",
            "direct p50 ms",
            "direct p99 ms",
            "added p50 ms/call",
            "added p99 ms/call",
            "errors",
            "server peak RSS MiB",
            "server cores",
            "upstream peak in flight",
        ],
        body,
    )


def stream_table(results: dict[str, Any]) -> list[str]:
    body = []
    for row in rows_of(results, "generate_stream", "server"):
        c = row["concurrency"]
        direct = find(results, "generate_stream", "direct", c)
        v = row.get("vs_baseline") or {}
        body.append(
            [
                str(c),
                _f(row["qps"], 1),
                _lat(row, "ttft_ms", "p50"),
                _lat(row, "ttft_ms", "p99"),
                _lat(row, "latency_ms", "p50"),
                _lat(row, "latency_ms", "p99"),
                _lat(row, "latency_ms", "max"),
                _lat(direct, "ttft_ms", "p50"),
                _lat(direct, "latency_ms", "p50"),
                _lat(row, "inter_token_ms", "mean", 2)
                + " / "
                + _lat(direct, "inter_token_ms", "mean", 2),
                _f(v.get("added_ttft_p50_ms"), 1),
                _f(v.get("added_p50_ms"), 1),
                _f(v.get("added_per_token_ms"), 2),
                _errors(row),
                _mib(row),
                _f(row.get("server_cores_used"), 2),
                _f(row.get("upstream_peak_in_progress"), 0),
            ]
        )
    return _table(
        [
            "concurrent streams",
            "streams/s",
            "TTFT p50 ms",
            "TTFT p99 ms",
            "stream p50 ms",
            "stream p99 ms",
            "max ms",
            "direct TTFT p50",
            "direct stream p50",
            "ms/token gateway / direct",
            "added TTFT p50 ms",
            "added p50 ms/stream",
            "added ms/token",
            "errors",
            "server peak RSS MiB",
            "server cores",
            "upstream peak in flight",
        ],
        body,
    )


def mixed_table(results: dict[str, Any]) -> list[str]:
    body = []
    for row in rows_of(results, "mixed", "server"):
        by = row.get("by_method") or {}
        cells = [str(row["concurrency"]), _f(row["qps"], 0)]
        for label in sorted(by):
            m = by[label]
            cells.append(
                f"{label}: {_f(m['qps'], 0)}/s, p50 {_lat(m, 'latency_ms', 'p50')}, "
                f"p99 {_lat(m, 'latency_ms', 'p99')}"
            )
        cells.append(_errors(row))
        cells.append(_f(row.get("server_cores_used"), 2))
        body.append(cells)
    width = max((len(b) for b in body), default=4)
    header = ["concurrency", "calls/s", *["per method (calls/s, ms)"] * (width - 4)]
    return _table([*header, "errors", "server cores"], body)


ISOLATION_TOPOLOGIES = (
    ("single", "one process (one port)"),
    ("split", "split: Generate on `ML_SERVING_GENERATE_PORT` (nice +10, SCHED_IDLE)"),
)


def isolation_table(results: dict[str, Any]) -> list[str]:
    """Score's p99 alone and beside saturating Generate, per topology, from the same run."""
    body = []
    for target, label in ISOLATION_TOPOLOGIES:
        for row in rows_of(results, "isolation", target):
            alone, loaded = row["score_alone"], row["score_with_generate"]
            body.append(
                [
                    label,
                    _f(row.get("score_rate"), 0),
                    _f(alone.get("score_p50_ms"), 2),
                    _f(alone.get("score_p99_ms"), 2),
                    _f(loaded.get("score_p50_ms"), 2),
                    _f(loaded.get("score_p99_ms"), 2),
                    _f(row.get("p99_ratio"), 2),
                    f"{row.get('concurrency')} in flight, "
                    f"{_f(loaded.get('generate_calls_per_s'), 1)}/s",
                    f"{_f(alone.get('server_cores'), 2)} / {_f(loaded.get('server_cores'), 2)}",
                    str(row.get("error_count", 0)),
                ]
            )
    return _table(
        [
            "topology",
            "Score offered/s",
            "alone p50 ms",
            "alone p99 ms",
            "beside Generate p50 ms",
            "beside Generate p99 ms",
            "p99 ÷ alone",
            "Generate",
            "server cores, alone / beside",
            "errors",
        ],
        body,
    )


def verdict_lines(verdicts: list[Verdict]) -> list[str]:
    return [f"- {'PASS' if v.ok else 'FAIL'}: {v.describe()}" for v in verdicts]


def scaling_table(results: dict[str, Any]) -> list[str]:
    body = []
    for row in rows_of(results, "scaling", "server"):
        workers = row.get("workers", 1)
        echo = next(
            (r for r in rows_of(results, "scaling", "echo") if r.get("workers", 1) == workers),
            None,
        )
        body.append(
            [
                str(workers),
                str(row["concurrency"]),
                _f(row["qps"], 0),
                _lat(row, "latency_ms", "p99", 2),
                _f(echo["qps"], 0) if echo else "–",
                _lat(echo, "latency_ms", "p99", 2),
                *_against_echo(row, echo),
                _f(_cores(row, "client"), 2),
                _f(row.get("machine_cores_busy"), 2),
            ]
        )
    return _table(
        [
            "worker processes",
            "concurrency",
            "QPS",
            "p99 ms",
            "echo QPS",
            "echo p99 ms",
            "QPS ÷ echo",
            "p99 ÷ echo",
            "errors",
            "cores used, ours / echo",
            "client cores",
            "machine busy",
        ],
        body,
    )


def _run_label(row: Row) -> str:
    workers = row.get("workers", 1)
    return f"{row['scenario']} c={row['concurrency']}" + (
        f" ×{workers} workers" if workers > 1 else ""
    )


def _cores(row: Row, key: str) -> float | None:
    if key == "client":
        return round(row["client_cpu_s"] / row["wall_s"], 2) if row["wall_s"] else None
    value = row.get(f"{key}_cores_used")
    return float(value) if value is not None else None


def cpu_table(results: dict[str, Any]) -> list[str]:
    body = []
    for row in results["rows"]:
        if row["target"] != "server":
            continue
        parts = [_cores(row, k) for k in ("server", "client", "upstream")]
        ours = sum(p for p in parts if p is not None)
        busy = row.get("machine_cores_busy")
        body.append(
            [
                _run_label(row),
                *(_f(p, 2) for p in parts),
                _f(ours, 2),
                _f(busy, 2),
                _f(max(0.0, busy - ours), 2) if busy is not None else "–",
            ]
        )
    return _table(
        [
            "run",
            "server",
            "client processes",
            "fake upstream",
            "bench total",
            "whole machine busy",
            "everything else",
        ],
        body,
    )


def _scaling_text(results: dict[str, Any]) -> list[str]:
    m = results["machine"]
    cores = m["cores_usable"]
    ours = [r for r in results["rows"] if r["target"] == "server"]
    loop_bound = [_run_label(r) for r in ours if (_cores(r, "server") or 0) >= 0.85]
    machine_bound = [
        _run_label(r) for r in ours if (r.get("machine_cores_busy") or 0) >= 0.85 * cores
    ]
    workers = results["setup"].get("workers", 1)
    lines = [
        f"- **{workers} server process{'es' if workers > 1 else ''} in the scenarios above.** "
        "One `python -m ml_serving` process is one asyncio event loop: its Python work runs on "
        "one core at a time (the GIL), plus gRPC's C-core threads. `ML_SERVING_WORKERS=N` runs "
        "N processes on one port (SO_REUSEPORT; the kernel balances connections, so the "
        "client opens several); the sweep below measures it from 1 worker up, against an "
        "echo ceiling with as many processes (`python -m bench --scaling 1,2,4,8` on a bigger "
        "machine).",
        f"- **{cores} cores for everything.** Load generator, server, echo ceiling and fake "
        "upstream share them, so every core the client or the upstream uses is a core the "
        "server cannot have: past the first worker, more workers compete with the client "
        "processes for the same cores, so QPS here cannot grow the way it would with the "
        "client on another machine.",
    ]
    if loop_bound:
        lines.append(
            "- The server's event loop used ≥ 0.85 of a core (saturated: more load only queues) "
            f"at: {', '.join(loop_bound)}."
        )
    if machine_bound:
        lines.append(
            f"- The whole machine was ≥ 85% busy (all {cores} cores) at: "
            f"{', '.join(machine_bound)}."
        )
    probe = (results["setup"].get("client_processes") or {}).get("probe")
    if probe:
        q = probe["qps_by_client_processes"]
        lines.append(
            f"- **Client processes.** Score at c={probe['concurrency']}, alternating 1 and 2 "
            f"client processes: echo {q['echo']['1']:.0f} QPS with one, {q['echo']['2']:.0f} "
            f"with two; our server {q['server']['1']:.0f} vs {q['server']['2']:.0f}. Every run "
            f"with concurrency > 1 used {results['setup']['client_processes']['chosen']} "
            "(a second process is used only when it lifts the echo ceiling by more than 5%; "
            "otherwise it just takes CPU from the server)."
        )
    load = m.get("load_average_at_start")
    shared = (
        f" The machine is shared: its load average was {load[0]:.2f} when the run started, and "
        "*everything else* below is CPU that processes outside the bench took meanwhile."
        if load
        else ""
    )
    return [
        *lines,
        "",
        f"Cores used during each ml-serving run (from /proc; the machine has {cores}).{shared}",
        "",
        *cpu_table(results),
    ]


def render_markdown(results: dict[str, Any], verdicts: list[Verdict] | None) -> str:
    m = results["machine"]
    setup = results["setup"]
    up = setup.get("upstream") or {}
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `{results['command']}` (`make bench`) on {m['date']} in "
        f"{results['elapsed_s']:.0f} s; `make bench-check` checks them against "
        "`bench/thresholds.json`. Regenerated by every run: do not edit by hand.",
        "",
        "## Machine",
        "",
        *_table(
            ["CPU", "cores", "kernel", "Python", "grpcio", "protobuf", "litellm", "numpy"]
            + ["uvloop"],
            [
                [
                    m["cpu_model"],
                    f"{m['cores_usable']} (of {m['cores']})",
                    m["kernel"],
                    m["python"],
                    m["grpcio"],
                    m["protobuf"],
                    m["litellm"],
                    m["numpy"],
                    m["uvloop"],
                ]
            ],
        ),
        "",
        "## How it was measured",
        "",
        "- **Server**: `python -m ml_serving` in its own process on 127.0.0.1 (metrics off, "
        "INFO JSON logs to a file, everything else at its defaults), ready when health for "
        "`mlserving.v1.InferenceService` is SERVING.",
        "- **Client**: the bench's own grpc.aio closed-loop generator (uvloop) in separate "
        "processes; each scenario's request is the `data` of its `bench/ghz/*.json`, parsed with "
        "`json_format` into the generated request type. Each run stops after its duration or its "
        "call count (see results.json `setup.plan`), after 20 unrecorded warm-up calls. "
        "Latencies are over successful calls; a gRPC error, a fallback answer or a stream "
        "without its end message is an error, never a success.",
        "- **Score baseline**: a bare grpc.aio echo server (same options from "
        f"`ml_serving.api.server.grpc_options`, uvloop={setup.get('echo', {}).get('uvloop')}) that "
        "returns the request bytes; same client, same concurrency, same Score payload.",
    ]
    if up:
        lines.append(
            "- **Generate baseline**: the fake OpenAI upstream "
            f"(`tests/support/fake_openai.py`, own process): TTFT {up['ttft_s'] * 1e3:.0f} ms, "
            f"{up['token_delay_s'] * 1e3:.0f} ms "
            f"between tokens, {up['tokens']} tokens; a unary answer waits the whole generation. "
            "The server reaches it through LiteLLM (one route, no retries, fallback off); the "
            "direct baseline is an aiohttp client calling it with the same concurrency. "
            "*Added* = gateway minus direct. Where either side is CPU-bound (the upstream is "
            "one Python process too), the difference compares two saturated systems; the "
            "concurrency-1 rows are the clean per-call and per-token overhead."
        )
    held = sorted(
        {
            (p["scenario"], h["concurrency"], h["ttft_s"], h["token_delay_s"], h.get("timeout_s"))
            for p in setup["plan"]
            for h in p.get("held", [])
        }
    )
    for scenario, concurrency, ttft_s, token_delay_s, held_timeout_s in held:
        why_paced = (
            " (one core relays well under 1,000 streamed chunks a second through LiteLLM, so "
            "the pacing keeps the wave a test of holding streams, not of throughput)"
            if "stream" in scenario
            else ""
        )
        deadline = (
            f"each call's deadline is {held_timeout_s:.0f} s (not the config's own): the wave "
            "checks that this many open calls all complete (the lower-concurrency rows measure "
            "throughput, at the configs' deadlines); it has no direct baseline, which would "
            "only measure the pacing"
            if held_timeout_s
            else "the deadline stays the ghz config's"
        )
        lines.append(
            f"- **Held `{scenario}` calls at {concurrency:,}**: one wave of exactly "
            f"{concurrency:,} calls, all "
            f"started at once, the upstream paced at TTFT {ttft_s * 1e3:.0f} ms and "
            f"{token_delay_s * 1e3:.0f} ms between tokens (about "
            f"{ttft_s + 28 * token_delay_s:.1f} s a call) so that all of them are open together"
            f"{why_paced}; "
            f"{deadline}. *Upstream peak in flight* is how many calls the upstream saw open at "
            "once."
        )
    rounds = setup.get("score_rounds", 1)
    lines += [
        "",
        "## Score vs the bare gRPC ceiling",
        "",
        f"Echo and ml-serving alternate in {rounds} rounds per concurrency (echo, ours, echo, "
        "...), so other load on the machine hits both sides of each ratio.",
        "",
        *score_table(results),
        "",
    ]
    if rows_of(results, "generate", "server"):
        lines += ["## Generate (unary) vs a direct upstream client", "", *generate_table(results)]
        lines.append("")
    if rows_of(results, "generate_stream", "server"):
        lines += [
            "## GenerateStream vs a direct upstream client",
            "",
            *stream_table(results),
            "",
        ]
    if rows_of(results, "mixed", "server"):
        mix = next((p for p in setup["plan"] if p["scenario"] == "mixed"), None)
        lines += ["## Mixed load", ""]
        if mix:
            lines += [
                "Weights: "
                + ", ".join(f"{w:.0%} `{src}`" for src, w in mix["sources"].items())
                + ".",
                "",
            ]
        lines += [*mixed_table(results), ""]
    if any(rows_of(results, "isolation", target) for target, _ in ISOLATION_TOPOLOGIES):
        lines += [
            "## Score beside saturating Generate (isolation)",
            "",
            "Score offered open loop at a fixed rate from its own client process, alone and then "
            "beside Generate kept at its concurrency in flight (closed loop, another process), "
            "in alternating rounds of the same run, each topology in turn within every round; "
            "server cores count every process of the server. `bench/thresholds.json` judges "
            "the split topology; the single process is reported beside it.",
            "",
            *isolation_table(results),
            "",
        ]
    unhealthy = [
        r
        for r in results["rows"]
        if r["target"] == "server"
        and (r.get("health_after") or {}).get("status", "SERVING") != "SERVING"
    ]
    if unhealthy:
        lines += [
            "## Server health after runs",
            "",
            "A readiness check (5 s deadline) after each run did not answer SERVING here:",
            "",
            *[
                f"- after {r['scenario']} c={r['concurrency']}: {r['health_after']['status']} "
                f"in {r['health_after']['ms']:.0f} ms"
                + (" (client processes could not connect)" if r.get("target_unreachable") else "")
                for r in unhealthy
            ],
            "",
        ]
    if verdicts is not None:
        lines += ["## Thresholds (`bench/thresholds.json`)", "", *verdict_lines(verdicts), ""]
    if rows_of(results, "scaling", "server"):
        lines += [
            "## Worker processes (scaling)",
            "",
            "Score at the highest Score concurrency, ours with `ML_SERVING_WORKERS=N` against the "
            "echo ceiling run as N processes on one port; each client process opens 4 "
            "connections per worker so that every worker gets some.",
            "",
            *scaling_table(results),
            "",
        ]
    lines += ["## What limits scaling here", "", *_scaling_text(results), ""]
    if results.get("generate_overhead"):
        lines += [
            "## Generate's whole-call CPU overhead (`bench/generate_overhead.py`)",
            "",
            *overhead_lines(results),
            "",
        ]
    if results.get("features"):
        lines += ["## Feature store (`bench/features.py`)", "", *feature_lines(results), ""]
    return "\n".join(lines)


def overhead_lines(results: dict[str, Any]) -> list[str]:
    """The generate_overhead scenario: server CPU above a trivial RPC's against a raw client."""
    section = results["generate_overhead"]
    setup = section.get("setup") or {}
    out = [
        "`scripts/llm_overhead.py`'s whole-RPC measurement (`whole_rpc`, as its `--server`): "
        "`python -m ml_serving` in its own process (INFO access log, one LiteLLM route to the "
        "fake OpenAI upstream, no retries, fallback off), called over gRPC by a worker "
        "process one call after another; its CPU is every thread's, from "
        "`/proc/<pid>/task/*/schedstat` (ns). Each batch of "
        f"{setup.get('calls', '–')} Generate calls or {setup.get('streams', '–')} "
        "GenerateStream calls is followed by as many ListPromptVersions calls: the floor, a "
        "trivial RPC's gRPC and layer cost. The baseline is a raw `aiohttp.ClientSession` in "
        "its own process (one POST, the JSON parsed; streams: every SSE line parsed), its own "
        "CPU (all threads). The fake upstream "
        f"({setup.get('tokens', '–')} tokens, no delay) runs in a third process, counted on "
        f"neither side. {setup.get('rounds', '–')} interleaved rounds (the order alternates), "
        "after warm-up calls; figures are medians over the rounds, ratios the median of each "
        "round's (whole call − floor) ÷ raw; per chunk is per stream over the upstream's "
        "chunks per stream.",
        "",
    ]
    body = []
    for row in section["rows"]:
        if row.get("error_count"):
            body.append([row["method"], "–", "–", "–", "–", "–", f"failed: {row.get('error')}"])
        elif row["method"] == "Generate":
            body.append(
                [
                    "Generate",
                    "call",
                    _f(row["server_cpu_ms_per_call"], 3),
                    _f(row["floor_cpu_ms_per_call"], 3),
                    _f(row["above_floor_ms_per_call"], 3),
                    _f(row["raw_cpu_ms_per_call"], 3),
                    _f(row["vs_baseline"]["cpu_ratio_per_call"], 2) + "x",
                ]
            )
        else:
            chunks = row["chunks_per_stream"]
            body += [
                [
                    "GenerateStream",
                    f"stream ({_f(chunks, 0)} chunks)",
                    _f(row["server_cpu_ms_per_stream"], 3),
                    _f(row["floor_cpu_ms_per_call"], 3),
                    _f(row["above_floor_ms_per_stream"], 3),
                    _f(row["raw_cpu_ms_per_stream"], 3),
                    "",
                ],
                [
                    "GenerateStream",
                    "chunk",
                    "",
                    "",
                    _f(row["above_floor_ms_per_chunk"], 4),
                    _f(row["raw_cpu_ms_per_chunk"], 4),
                    _f(row["vs_baseline"]["cpu_ratio_per_chunk"], 2) + "x",
                ],
            ]
    out += _table(
        [
            "RPC",
            "per",
            "server CPU, whole call (ms)",
            "floor: ListPromptVersions (ms)",
            "above the floor (ms)",
            "raw aiohttp client (ms)",
            "above the floor ÷ raw",
        ],
        body,
    )
    return out


def feature_lines(results: dict[str, Any]) -> list[str]:
    """The feature-store scenario: Score by ids against every value sent, lookup CPU."""
    rows = results["features"]["rows"]
    out = [
        "Score at 8 in flight on one server whose online store is a real Redis filled by "
        "Feast (5,000 users, 600 tips), a different user each call, 20 candidates, alternating "
        "rounds of the two request forms; the user lookup against Feast's own "
        "`get_online_features` for the same 11 fields (CPU of the calling process per lookup).",
        "",
    ]
    for row in rows:
        if row["scenario"] == "features_score":
            ids, full = row["by_ids"], row["every_value_sent"]
            out += _table(
                ["request", "calls", "server CPU / call (ms)", "p50 (ms)", "p99 (ms)"],
                [
                    [
                        "ids + request-time values",
                        str(ids["calls"]),
                        _f(ids["server_cpu_per_call_ms"], 3),
                        _f(ids["p50_ms"], 2),
                        _f(ids["p99_ms"], 2),
                    ],
                    [
                        "every value sent",
                        str(full["calls"]),
                        _f(full["server_cpu_per_call_ms"], 3),
                        _f(full["p50_ms"], 2),
                        _f(full["p99_ms"], 2),
                    ],
                ],
            )
            ratio = row["vs_baseline"]
            out += [
                "",
                f"By ids / every value sent: CPU per call {ratio['cpu_per_call_ratio']}x, "
                f"p99 {ratio['p99_ratio']}x.",
                "",
            ]
    lookups = [r for r in rows if r["scenario"] == "features_lookup"]
    if lookups:
        out += _table(
            [
                "store",
                "ours, 8 in flight (µs)",
                "ours, one at a time (µs)",
                "get_online_features (µs)",
                "SDK / ours",
            ],
            [
                [
                    r["target"],
                    _f(r["ours_cpu_us"], 1),
                    _f(r["ours_cpu_us_one_at_a_time"], 1),
                    _f(r["sdk_cpu_us"], 1),
                    f"{r['sdk_cpu_ratio']}x ({r['sdk_cpu_ratio_one_at_a_time']}x one at a time)",
                ]
                for r in lookups
            ],
        )
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    """Latency percentiles against concurrency, one panel per scenario, baselines dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("score", "Score", "echo"),
        ("generate", "Generate", "direct"),
        ("generate_stream", "GenerateStream", "direct"),
    ]
    panels = [p for p in panels if rows_of(results, p[0], "server")]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    colors = {"p50": "tab:blue", "p90": "tab:orange", "p99": "tab:red"}
    for ax, (scenario, title, baseline) in zip(axes[0], panels, strict=True):
        for target, style in (("server", "-"), (baseline, "--")):
            rows = [r for r in rows_of(results, scenario, target) if r["latency_ms"]]
            if not rows:
                continue
            xs = [r["concurrency"] for r in rows]
            for p, color in colors.items():
                ax.plot(
                    xs,
                    [r["latency_ms"][p] for r in rows],
                    style,
                    marker="o",
                    color=color,
                    label=f"{'ml-serving' if target == 'server' else target} {p}",
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("concurrent calls")
        ax.set_ylabel("latency (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"ml-serving latency vs concurrency ({results['machine']['cores_usable']} cores, "
        f"{results['machine']['date'][:10]})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(
    results: dict[str, Any], out_dir: Path, thresholds: Path | None = None
) -> list[Verdict] | None:
    """results.json, RESULTS.md and latency.png into out_dir; returns the threshold verdicts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    verdicts = evaluate(results, load_thresholds(thresholds)) if thresholds else None
    (out_dir / "RESULTS.md").write_text(render_markdown(results, verdicts))
    plot(results, out_dir / "latency.png")
    return verdicts
