"""The experiments command line: snapshot, evaluate, shares and assign (``python -m``)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from ml_serving.experiments import bandit
from ml_serving.experiments.assignment import Experiment
from ml_serving.experiments.config import ExperimentConfig, ExperimentConfigError, load_experiments
from ml_serving.experiments.decisions import (
    build_snapshot,
    read_decisions,
    read_rewards,
)
from ml_serving.experiments.evaluation import evaluate

PROG = "python -m ml_serving.experiments"


def _load(path: str) -> ExperimentConfig:
    # Offline tools check versions against the log (evaluate) or not at all: no prompt registry.
    config = load_experiments(path, None)
    if config is None:
        raise ExperimentConfigError(path, "experiments", "lists no experiment")
    return config


def _cmd_snapshot(args: argparse.Namespace) -> int:
    name: str | None = args.experiment
    out: str | None = args.out
    if args.experiments:
        config = _load(args.experiments)
        name = name or config.name
        if out is None and config.snapshot is not None:
            out = str(config.snapshot)
    as_of = bandit.parse_time(args.as_of, "--as-of") if args.as_of else dt.datetime.now(dt.UTC)
    decisions = read_decisions(args.decisions)
    rewards = read_rewards(args.rewards)
    snapshot, report = build_snapshot(decisions, rewards, experiment=name, as_of=as_of)
    if out is None or out == "-":
        sys.stdout.write(snapshot.to_json())
    else:
        bandit.write_snapshot(Path(out), snapshot)
    err = sys.stderr
    print(
        f"experiment {report.experiment}: {report.decisions} decisions counted "
        f"({report.rewarded} with a reward), "
        + ", ".join(f"{v} {a.successes}/{a.trials}" for v, a in snapshot.arms.items()),
        file=err,
    )
    if report.duplicate_decisions or report.duplicate_rewards:
        print(
            f"duplicates ignored: {report.duplicate_decisions} decision lines, "
            f"{report.duplicate_rewards} reward rows (the highest reward counts)",
            file=err,
        )
    if report.uncounted_rewards:
        print(
            f"{report.uncounted_rewards} rewards are for decisions not chosen by this experiment",
            file=err,
        )
    if report.unmatched_rewards:
        sample = ", ".join(report.unmatched_rewards[:10])
        more = "" if len(report.unmatched_rewards) <= 10 else ", ..."
        print(
            f"{len(report.unmatched_rewards)} rewards match no decision: {sample}{more}", file=err
        )
    if decisions.malformed:
        print(f"{decisions.malformed} malformed decision lines ignored", file=err)
    if out not in (None, "-"):
        print(f"wrote {out}", file=err)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    config = _load(args.policy)
    candidate = Experiment(config).shares.shares
    decisions = read_decisions(args.decisions)
    rewards = read_rewards(args.rewards)
    name = args.experiment
    if name is None:
        logged = {d.experiment for d in decisions.decisions.values() if d.experiment}
        name = config.name if config.name in logged else None
    result = evaluate(decisions, rewards, candidate, experiment=name)
    print(json.dumps(asdict(result), indent=2, sort_keys=True))
    err = sys.stderr
    for label, iv in (("IPS", result.ips), ("SNIPS", result.snips), ("logged", result.logged)):
        print(f"{label:>6}: {iv.estimate:.4f}  95% [{iv.low:.4f}, {iv.high:.4f}]", file=err)
    print(
        f"{result.decisions} decisions of {result.experiment} from {result.users} users, "
        f"effective sample size {result.effective_sample_size:.0f}",
        file=err,
    )
    if result.unsupported:
        print(
            "never logged, estimated as reward 0: "
            + ", ".join(f"{v} ({s:.3f})" for v, s in result.unsupported.items()),
            file=err,
        )
    return 0


def _cmd_shares(args: argparse.Namespace) -> int:
    experiment = Experiment(_load(args.experiments))
    as_of = None if experiment.snapshot is None else bandit.format_time(experiment.snapshot.as_of)
    print(
        json.dumps(
            {"experiment": experiment.name, "snapshot_as_of": as_of, **experiment.shares.shares}
        )
    )
    return 0


def _cmd_assign(args: argparse.Namespace) -> int:
    experiment = Experiment(_load(args.experiments))
    for user in args.user_ids:
        version, share = experiment.assign(user)
        print(f"{user}\t{version}\t{share:.6f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; 2 with a message for bad input."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    snap = sub.add_parser("snapshot", help="count rewards per version into a snapshot file")
    snap.add_argument("--decisions", action="append", required=True, metavar="FILE")
    snap.add_argument("--rewards", action="append", required=True, metavar="CSV")
    snap.add_argument("--experiment", help="the experiment (default: the log's only one)")
    snap.add_argument(
        "--experiments", metavar="YAML", help="take the name and --out from this file"
    )
    snap.add_argument("--as-of", help="RFC 3339 time the counts stand for (default: now)")
    snap.add_argument("--out", help="snapshot path, written atomically ('-' = stdout)")
    snap.set_defaults(run=_cmd_snapshot)

    ev = sub.add_parser("evaluate", help="IPS/SNIPS estimate of a candidate experiments file")
    ev.add_argument("--policy", required=True, metavar="YAML", help="the candidate's file")
    ev.add_argument("--decisions", action="append", required=True, metavar="FILE")
    ev.add_argument("--rewards", action="append", required=True, metavar="CSV")
    ev.add_argument(
        "--experiment",
        help="the logged experiment (default: the candidate's name, else the log's only one)",
    )
    ev.set_defaults(run=_cmd_evaluate)

    sh = sub.add_parser("shares", help="the shares an experiments file serves now")
    sh.add_argument("--experiments", required=True, metavar="YAML")
    sh.set_defaults(run=_cmd_shares)

    asg = sub.add_parser("assign", help="the version each user id gets now")
    asg.add_argument("--experiments", required=True, metavar="YAML")
    asg.add_argument("user_ids", nargs="+")
    asg.set_defaults(run=_cmd_assign)

    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except (OSError, ValueError) as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return 2
    return code
