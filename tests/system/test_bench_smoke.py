"""The bench's load generator, baselines, report and threshold check, exercised in-process on
tiny loads. Nothing here asserts timing: only counts, zero errors and the shape of the output."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from bench import check, generate_overhead, report, runner
from bench.__main__ import _ints, _per_scenario
from bench.echo import start_echo
from bench.loadgen import (
    ClientPool,
    GrpcJob,
    HttpJob,
    JobResult,
    Samples,
    concat_results,
    merge_results,
    run_job,
    split_job,
    summarize,
)
from bench.scenarios import (
    default_plan,
    ghz_configs,
    override,
    parse_duration,
    smoke_plan,
    split_call,
)
from bench.upstream import BenchUpstream
from ml_serving.api import server

CONFIGS = ghz_configs()
SMALL: dict[str, Any] = {"concurrency": 4, "total": 24, "duration_s": 60.0, "warmup_calls": 2}


def grpc_job(port: int, *stems: str, echo: bool = False, **overrides: Any) -> GrpcJob:
    specs = tuple(replace(CONFIGS[stem].spec(), echo=echo) for stem in stems)
    fields = {**SMALL, **overrides}
    return GrpcJob(target=f"127.0.0.1:{port}", specs=specs, weights=(1.0,) * len(specs), **fields)


@pytest.mark.parametrize("stem", sorted(CONFIGS))
async def test_each_ghz_scenario_runs_against_the_server_without_errors(
    app: server.App, stem: str
) -> None:
    result = await run_job(grpc_job(app.port, stem))
    samples = result.samples[CONFIGS[stem].method.name]
    assert samples.errors == Counter()
    assert samples.ok == SMALL["total"] == len(samples.latency)
    if CONFIGS[stem].method.server_streaming:
        assert len(samples.ttft) == samples.ok
        assert samples.messages > samples.ok  # deltas, then the end message


async def test_mixed_load_counts_each_method(app: server.App) -> None:
    job = replace(grpc_job(app.port, "score", "generate"), weights=(0.8, 0.2), total=40)
    result = await run_job(job)
    assert set(result.samples) <= {"Score", "Generate"}
    assert sum(s.ok for s in result.samples.values()) == 40
    assert all(not s.errors for s in result.samples.values())


async def test_a_grpc_error_is_never_a_success(app: server.App) -> None:
    config = CONFIGS["generate"]
    bad = replace(config, data={**config.data, "prompt_version": "no-such-version"})
    job = GrpcJob(target=f"127.0.0.1:{app.port}", specs=(bad.spec(),), weights=(1.0,), **SMALL)
    samples = (await run_job(job)).samples["Generate"]
    assert samples.ok == 0 and samples.latency == []
    assert samples.errors == Counter({"INVALID_ARGUMENT": SMALL["total"]})


async def test_echo_server_returns_the_request_bytes() -> None:
    echo, port = await start_echo()
    try:
        payload = CONFIGS["score"].spec().request
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call: Any = channel.unary_unary("/mlserving.v1.InferenceService/Score")
            assert await call(payload) == payload
        result = await run_job(grpc_job(port, "score", echo=True))
        assert result.samples["Score"].ok == SMALL["total"]
        assert not result.samples["Score"].errors
    finally:
        await echo.stop(0)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_direct_client_against_the_fake_upstream(stream: bool) -> None:
    fake = BenchUpstream()
    await fake.start()
    try:
        job = HttpJob(
            url=f"{fake.base_url}/chat/completions",
            body=runner.direct_body(CONFIGS["generate"], stream),
            **SMALL,
        )
        samples = (await run_job(job)).samples["direct"]
        assert samples.ok == SMALL["total"] and not samples.errors
        if stream:
            assert samples.messages == fake.tokens * samples.ok
            assert len(samples.gap) == samples.ok
        assert fake.stats()["completed"] == SMALL["total"] + SMALL["warmup_calls"]
    finally:
        await fake.stop()


async def test_client_processes_split_a_job_and_merge_results(app: server.App) -> None:
    # The pool blocks while its processes run: keep this loop (and the server on it) free.
    pool = await asyncio.to_thread(ClientPool, 2, False)
    try:
        job = grpc_job(app.port, "score", concurrency=6, total=60)
        result = await asyncio.to_thread(pool.run, job, 2)
    finally:
        await asyncio.to_thread(pool.close)
    assert result.processes == 2
    assert result.samples["Score"].ok == 60 and not result.samples["Score"].errors


def test_split_job_shares_concurrency_total_and_request_numbers() -> None:
    job = grpc_job(1, "generate_stream", concurrency=1000, total=2001)
    parts = split_job(job, 2)
    assert [p.concurrency for p in parts] == [500, 500]
    assert sum(p.total for p in parts) == 2001
    assert parts[1].request_offset == parts[0].total
    single = replace(job, concurrency=1)
    assert split_job(single, 2) == [single]  # never more processes than callers


def test_summarize_uses_nearest_rank_percentiles() -> None:
    stats = summarize([ms / 1000 for ms in range(1, 101)])
    assert stats == {"p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0, "mean": 50.5}
    assert summarize([]) is None


def test_ghz_parsing_helpers() -> None:
    assert split_call("mlserving.v1.InferenceService.Score") == (
        "mlserving.v1.InferenceService",
        "Score",
    )
    assert split_call("mlserving.v1.InferenceService/Score")[1] == "Score"
    assert parse_duration("10s") == 10.0
    assert parse_duration("250ms") == 0.25
    assert parse_duration("1m30s") == 90.0
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_command_line_overrides_apply_per_scenario() -> None:
    parse = _per_scenario(_ints)
    plan = override(
        default_plan(),
        concurrency=dict([parse("2,4"), parse("score=1,8")]),
        total={"generate": 50},
        duration={"*": 3.0},
        timeout={},
    )
    by_name = {s.name: s for s in plan}
    assert by_name["score"].concurrencies == (1, 8)
    assert by_name["generate_stream"].concurrencies == (2, 4)
    assert by_name["generate"].total == 50
    assert {s.duration_s for s in plan} == {3.0}
    assert {s.name for s in smoke_plan()} == {s.name for s in default_plan()}


# --- report and check, on synthetic results -----------------------------------------------------


def _result(ok: int, latency_ms: float, errors: dict[str, int] | None = None) -> JobResult:
    samples = Samples(latency=[latency_ms / 1000] * ok, ok=ok, errors=Counter(errors or {}))
    return JobResult({"Score": samples}, started=0.0, finished=1.0)


def synthetic_results(score_qps_ratio: float) -> dict[str, Any]:
    rows = []
    for c in (1, 8, 64):
        echo = runner.make_row("score", "echo", c, _result(1000, 2.0), 1000)
        ours = runner.make_row("score", "server", c, _result(int(1000 * score_qps_ratio), 3.0), 0)
        echo["server_cpu_s"] = 0.25
        ours["server_cpu_s"] = 0.3 * ours["calls"] / 1000  # 1.2x the echo's CPU per call
        ours["vs_baseline"] = runner.compare(ours, echo)
        ours["server_cores_used"] = 0.9
        rows += [echo, ours]
    for scenario in ("generate", "generate_stream"):
        held = runner.make_row(scenario, "server", 1000, _result(1000, 900.0), 2000)
        held["held_added_ttft_ms"] = {"p50": 20.0, "p99": 120.0}
        rows.append(held)
        if scenario == "generate_stream":  # the 200-stream wave judged on its added TTFT
            wave = runner.make_row(scenario, "server", 200, _result(200, 900.0), 400)
            wave["held_added_ttft_ms"] = {"p50": 20.0, "p99": 120.0}
            rows.append(wave)
        direct = runner.make_row(scenario, "direct", 32, _result(1000, 100.0), 1000)
        ours = runner.make_row(scenario, "server", 32, _result(950, 105.0), 1000)
        if scenario == "generate_stream":
            direct["ttft_ms"] = {"p50": 100.0, "p99": 120.0}
            ours["ttft_ms"] = {"p50": 110.0, "p99": 140.0}
        ours["vs_baseline"] = runner.compare(ours, direct)
        rows += [direct, ours]
    side = {"score_p99_ms": 6.0, "score_errors": 0, "generate_errors": 0}
    for topology, p99_ratio in (("single", 3.0), ("split", 1.2)):  # only split is judged
        rows.append(
            {
                "scenario": "isolation",
                "target": topology,
                "concurrency": 32,
                "score_alone": side,
                "score_with_generate": side,
                "p99_ratio": p99_ratio,
                "error_count": 0,
            }
        )
    mixed = merge_results([_result(10, 2.0)])
    mixed.samples["Generate"] = Samples(latency=[0.5], ok=1)
    rows.append(runner.make_row("mixed", "server", 32, mixed, 100))
    by_ids = {"calls": 900, "server_cpu_per_call_ms": 0.7, "p50_ms": 5.0, "p99_ms": 12.0}
    full = {"calls": 1000, "server_cpu_per_call_ms": 0.65, "p50_ms": 5.0, "p99_ms": 11.0}
    lookup = {
        "ours_cpu_us": 30.0,
        "ours_cpu_us_one_at_a_time": 45.0,
        "sdk_cpu_us": 400.0,
        "sdk_cpu_ratio": 13.3,
        "sdk_cpu_ratio_one_at_a_time": 8.9,
    }
    feature_rows = [
        {
            "scenario": "features_score",
            "target": "server",
            "concurrency": 8,
            "by_ids": by_ids,
            "every_value_sent": full,
            "error_count": 0,
            "vs_baseline": {"cpu_per_call_ratio": 1.077, "p99_ratio": 1.09, "p50_ratio": 1.0},
        },
        *(
            {
                "scenario": "features_lookup",
                "target": store,
                "concurrency": 1,
                "error_count": 0,
                **lookup,
                "vs_baseline": {"sdk_cpu_ratio": 13.3},
            }
            for store in ("redis", "sqlite")
        ),
    ]
    return {
        "mode": "full",
        "command": "python -m bench",
        "machine": runner.machine(),
        "elapsed_s": 1.0,
        "setup": {"plan": [], "client_processes": {"chosen": 1, "probe": None}},
        "rows": rows,
        "features": {"rows": feature_rows},
        "generate_overhead": {
            "rows": generate_overhead.rows(WHOLE_RPC),
            "setup": WHOLE_RPC["settings"],
        },
    }


# scripts.llm_overhead.whole_rpc's answer, made up: 2.84x raw per call, 2.71x per chunk.
WHOLE_RPC: dict[str, Any] = {
    "server": {
        "unary_cpu_ms": 2.2,
        "floor_cpu_ms": 0.6,
        "unary_above_floor_ms": 1.6,
        "unary_wall_p50_ms": 3.9,
        "stream_cpu_ms": 5.4,
        "stream_floor_cpu_ms": 0.7,
        "stream_above_floor_ms": 4.7,
        "chunk_above_floor_ms": 0.147,
        "messages_per_stream": 3.0,
        "unary_ratio_to_raw": 2.84,
        "chunk_ratio_to_raw": 2.71,
    },
    "raw": {
        "unary_cpu_ms": 0.56,
        "unary_wall_p50_ms": 0.7,
        "stream_cpu_ms": 1.73,
        "chunks_per_stream": 32.0,
        "cpu_ms_per_chunk": 0.054,
    },
    "settings": {"rounds": 5, "calls": 100, "streams": 20, "warmup": 20, "tokens": 32},
}


def test_report_writes_json_markdown_and_plot(tmp_path: Path) -> None:
    results = synthetic_results(0.9)
    verdicts = report.write_all(results, tmp_path, check.THRESHOLDS)
    assert json.loads((tmp_path / "results.json").read_text()) == results
    markdown = (tmp_path / "RESULTS.md").read_text()
    assert "## Score vs the bare gRPC ceiling" in markdown
    assert "| 64 |" in markdown and "What limits scaling here" in markdown
    assert "## Feature store" in markdown and "get_online_features" in markdown
    overhead = markdown.split("## Generate's whole-call CPU overhead")[1].split("\n## ")[0]
    assert "schedstat" in overhead and "aiohttp" in overhead
    assert "| Generate | call | 2.200 | 0.600 | 1.600 | 0.560 | 2.84x |" in overhead
    assert "| GenerateStream | chunk |  |  | 0.1470 | 0.0540 | 2.71x |" in overhead
    assert "| GenerateStream | stream (32 chunks) | 5.400 | 0.700 | 4.700 | 1.730 |  |" in overhead
    isolation = markdown.split("## Score beside saturating Generate (isolation)")[1]
    assert "| one process (one port) |" in isolation and "| 3.00 |" in isolation
    assert "| split: Generate on `ML_SERVING_GENERATE_PORT` (nice +10, SCHED_IDLE) |" in isolation
    assert (tmp_path / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert verdicts is not None and len(verdicts) == len(check.load_thresholds())


def test_check_passes_good_results_and_fails_bad_ones(tmp_path: Path) -> None:
    rules = check.load_thresholds()
    assert all(v.ok for v in check.evaluate(synthetic_results(0.9), rules))

    slow = check.evaluate(synthetic_results(0.5), rules)
    assert [v.rule.metric for v in slow if not v.ok] == ["vs_baseline.qps_ratio"]

    broken = synthetic_results(0.9)
    broken["rows"][0] = runner.make_row("score", "echo", 1, _result(5, 1.0, {"UNAVAILABLE": 1}), 6)
    assert [v.rule.metric for v in check.evaluate(broken, rules) if not v.ok] == ["error_count"]

    missing = synthetic_results(0.9)
    missing["rows"] = [r for r in missing["rows"] if r["scenario"] != "generate_stream"]
    failed = [v for v in check.evaluate(missing, rules) if not v.ok]
    assert failed and all(
        v.rule.scenario == "generate_stream" and "not measured" in v.detail for v in failed
    )

    slow_lookup = synthetic_results(0.9)
    slow_lookup["features"]["rows"][1]["vs_baseline"]["sdk_cpu_ratio"] = 4.0
    slow_scenarios = [v.rule.scenario for v in check.evaluate(slow_lookup, rules) if not v.ok]
    assert slow_scenarios == ["features_lookup"]

    # Like the feature-store scenario's, its rules fail unmeasured where it did not run (a
    # --scenario run), and only they.
    for section in ("features", "generate_overhead"):
        without = synthetic_results(0.9)
        del without[section]
        failed = [v for v in check.evaluate(without, rules) if not v.ok]
        assert failed and all(
            v.rule.scenario.startswith(section) and "not measured" in v.detail for v in failed
        )
    assert sorted(v.rule.metric for v in failed) == [
        "vs_baseline.cpu_ratio_per_call",
        "vs_baseline.cpu_ratio_per_chunk",
    ]

    for key, scenario in (
        ("unary_ratio_to_raw", "generate_overhead_unary"),
        ("chunk_ratio_to_raw", "generate_overhead_stream"),
    ):
        slow_rpc = synthetic_results(0.9)
        whole_rpc = {**WHOLE_RPC, "server": {**WHOLE_RPC["server"], key: 3.1}}
        slow_rpc["generate_overhead"]["rows"] = generate_overhead.rows(whole_rpc)
        assert [v.rule.scenario for v in check.evaluate(slow_rpc, rules) if not v.ok] == [scenario]

    broken_rpc = synthetic_results(0.9)
    broken_rpc["generate_overhead"]["rows"] = generate_overhead.failed_rows("worker died")
    assert sorted(v.rule.metric for v in check.evaluate(broken_rpc, rules) if not v.ok) == [
        "error_count",
        "vs_baseline.cpu_ratio_per_call",
        "vs_baseline.cpu_ratio_per_chunk",
    ]
    assert "failed: worker died" in report.render_markdown(broken_rpc, None)

    path = tmp_path / "results.json"
    path.write_text(json.dumps(missing))
    assert check.main(path) == 1
    path.write_text(json.dumps(synthetic_results(0.9)))
    assert check.main(path) == 0


def test_rounds_add_up_their_wall_time() -> None:
    first, second = _result(10, 1.0), _result(30, 2.0)
    second.started, second.finished = 5.0, 8.0
    both = concat_results([first, second])
    assert both.wall_s == 4.0
    assert both.samples["Score"].ok == 40
    assert both.processes == 1


def test_generate_overhead_scenario_runs_end_to_end() -> None:
    # A real server, raw client and fake upstream (scripts/llm_overhead.py), a handful of calls:
    # the shape of the rows, never their values.
    lines: list[str] = []
    section = generate_overhead.run(lines.append, rounds=1, calls=3, streams=1, warmup=1)
    rows = section["rows"]
    assert [r["scenario"] for r in rows] == ["generate_overhead_unary", "generate_overhead_stream"]
    assert all(r["error_count"] == 0 and r["target"] == "server" for r in rows), rows
    assert rows[0]["vs_baseline"]["cpu_ratio_per_call"] > 0
    assert rows[1]["vs_baseline"]["cpu_ratio_per_chunk"] > 0
    assert rows[1]["chunks_per_stream"] == section["setup"]["tokens"]
    assert set(section["rounds"]) == {"raw", "server"}
    assert any("round 1/1" in line for line in lines)
