"""`python -m bench`: run the benchmark (`make bench`); `python -m bench check` (`make
bench-check`); `python -m bench report` re-renders RESULTS.md and latency.png from results.json.

Overrides take `VALUE` (every scenario) or `SCENARIO=VALUE` and may repeat, e.g.
`python -m bench --concurrency score=1,8 --duration 5 --total generate_stream=3000`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from bench import check, features, generate_overhead, report, runner
from bench.scenarios import BENCH_DIR, default_plan, override, smoke_plan

T = TypeVar("T")


def _per_scenario(parse: Callable[[str], T]) -> Callable[[str], tuple[str, T]]:
    def parse_entry(text: str) -> tuple[str, T]:
        name, sep, value = text.partition("=")
        if not sep:
            name, value = "*", text
        try:
            return name.strip(), parse(value.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from exc

    return parse_entry


def _ints(text: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in text.split(",") if v.strip())
    if not values or min(values) < 1:
        raise ValueError("need positive integers, comma-separated")
    return values


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be >= 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError("must be > 0")
    return value


def _env(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    return key, value


def run_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a few hundred calls per scenario (~30 s); fails on any error; writes bench/out/smoke",
    )
    parser.add_argument("--scenario", action="append", help="run only these (repeatable)")
    parser.add_argument(
        "--concurrency", action="append", default=[], type=_per_scenario(_ints), metavar="[S=]N,N"
    )
    parser.add_argument(
        "--total", action="append", default=[], type=_per_scenario(_positive_int), metavar="[S=]N"
    )
    parser.add_argument(
        "--duration",
        action="append",
        default=[],
        type=_per_scenario(_positive_float),
        metavar="[S=]SECONDS",
    )
    parser.add_argument(
        "--timeout",
        action="append",
        default=[],
        type=_per_scenario(_positive_float),
        metavar="[S=]SECONDS",
        help="per-call deadline (default: the ghz config's timeout)",
    )
    parser.add_argument(
        "--clients",
        type=int,
        choices=(1, 2, 3, 4),
        help="client processes for concurrency > 1 (default: measure 1 vs 2 and pick)",
    )
    parser.add_argument("--ttft", type=float, help="fake upstream TTFT, seconds (0.1; smoke 0.02)")
    parser.add_argument(
        "--token-delay",
        type=float,
        help="fake upstream delay between tokens, seconds (0.01; smoke 0.002)",
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="ML_SERVING_WORKERS for every scenario (the echo ceiling runs as many processes)",
    )
    parser.add_argument(
        "--scaling",
        type=_ints,
        help="worker counts for the scaling sweep, e.g. 1,2,4,8 (default: 1 up to the cores "
        "here, at most 2, in a full run; none otherwise)",
    )
    parser.add_argument("--server-env", action="append", default=[], type=_env, metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, help="where results go (default: bench/)")
    args = parser.parse_args(argv)

    plan = smoke_plan() if args.smoke else default_plan()
    # The feature-store scenario materializes two stores with Feast (about a minute) and
    # generate_overhead takes interleaved rounds of a server and a raw client (about 15 s):
    # in a full run, or when named; not in the smoke run.
    extra = check.SECTIONS
    with_extra = {
        name: name in args.scenario if args.scenario else not args.smoke for name in extra
    }
    if args.scenario:
        unknown = set(args.scenario) - {s.name for s in plan} - set(extra)
        if unknown:
            known = [s.name for s in plan] + list(extra)
            parser.error(f"unknown scenario(s) {sorted(unknown)}; known: {known}")
        plan = [s for s in plan if s.name in args.scenario]
    plan = override(
        plan,
        concurrency=dict(args.concurrency),
        total=dict(args.total),
        duration=dict(args.duration),
        timeout=dict(args.timeout),
    )
    mode = "smoke" if args.smoke else "full" if not args.scenario else "partial"
    out = args.out or (BENCH_DIR if mode == "full" else BENCH_DIR / "out" / mode)
    clients = args.clients if args.clients is not None else (1 if args.smoke else None)
    options = runner.Options(
        plan=plan,
        clients=clients,
        ttft_s=args.ttft if args.ttft is not None else (0.02 if args.smoke else 0.1),
        token_delay_s=(
            args.token_delay if args.token_delay is not None else (0.002 if args.smoke else 0.01)
        ),
        server_env=dict(args.server_env),
        mode=mode,
        log=lambda line: print(line, flush=True),
        workers=args.workers,
        scaling=args.scaling
        if args.scaling is not None
        else (tuple(range(1, min(2, os.cpu_count() or 1) + 1)) if mode == "full" else ()),
    )
    results = runner.run(options)
    if with_extra["generate_overhead"]:
        results["generate_overhead"] = generate_overhead.run(options.log)
    if with_extra["features"]:
        results["features"] = features.run(options.log, smoke=args.smoke)
    verdicts = report.write_all(results, out, check.THRESHOLDS if mode == "full" else None)
    print(f"wrote {out / 'results.json'}, {out / 'RESULTS.md'}, {out / 'latency.png'}")
    if verdicts is not None:
        for v in verdicts:
            print(f"  {'PASS' if v.ok else 'FAIL'}  {v.describe()}")
    errors = sum(r["error_count"] for r in check.measured_rows(results))
    if errors:
        print(f"bench: {errors} failed calls (see the errors column)", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and not argv[0].startswith("-") else "run"
    rest = argv[1:] if argv and argv[0] == command else argv
    if command == "run":
        return run_main(rest)
    if command in ("check", "report"):
        parser = argparse.ArgumentParser(prog=f"python -m bench {command}")
        parser.add_argument("--results", type=Path, default=check.RESULTS)
        parser.add_argument("--thresholds", type=Path, default=check.THRESHOLDS)
        args = parser.parse_args(rest)
        if command == "check":
            return check.main(args.results, args.thresholds)
        results = json.loads(args.results.read_text())
        report.write_all(results, args.results.parent, args.thresholds)
        return 0
    print(f"python -m bench: unknown command {command!r} (run, check, report)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
