"""`python -m ml_serving.pipelines <flow> [options]`: run one flow now, locally or on a server."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

PROG = "python -m ml_serving.pipelines"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run one pipeline flow in this process: against the Prefect server at "
        "PREFECT_API_URL when it is set, else on a temporary local Prefect API. Unset options "
        "take the server's ML_SERVING_* settings.",
    )
    parser.add_argument("--reports-dir", help="where report files go (default: a temp folder)")
    sub = parser.add_subparsers(dest="flow", required=True)

    feat = sub.add_parser("features", help="event tables, feast apply, materialize-incremental")
    feat.add_argument("--repo", dest="repo_path", help="the Feast repository (feature_repo/)")
    feat.add_argument("--seed", type=int, help="write the simulator's tables of this seed first")
    feat.add_argument("--n-users", type=int, help="the simulated population (with --seed)")

    tr = sub.add_parser("train", help="a new version with its card; never the champion")
    tr.add_argument("--repo", dest="repo_path", help="train from this Feast repository's tables")
    tr.add_argument("--seed", type=int, help="else the simulator's (default: today's YYYYMMDD)")
    tr.add_argument("--model-root", help="file registry (default: ML_SERVING_MODEL_ROOT)")
    tr.add_argument("--model-name", help="default: ML_SERVING_MODEL_NAME")
    tr.add_argument("--tracking-uri", help="MLflow (default: MLFLOW_TRACKING_URI)")
    tr.add_argument(
        "--no-shadow",
        dest="shadow",
        action="store_false",
        help="do not name the new version as Score's shadow (file registry)",
    )

    pr = sub.add_parser("promote", help="the gate: promote the challenger if every check passes")
    pr.add_argument(
        "--challenger", help="version (default: the challenger alias, SHADOW or newest)"
    )
    pr.add_argument(
        "--shadow-metrics",
        action="append",
        metavar="URL_OR_FILE",
        help="a server's /metrics URL or a comparison file (repeatable)",
    )
    pr.add_argument("--require-shadow", action="store_true", help="fail without comparisons")
    which = pr.add_mutually_exclusive_group()
    which.add_argument("--reevaluate", action="store_const", const=True, default=None)
    which.add_argument("--cards-only", dest="reevaluate", action="store_const", const=False)
    pr.add_argument(
        "--override",
        metavar="REASON",
        help="promote even if checks fail: who decided and why (kept in the card's history)",
    )
    pr.add_argument("--auc-margin", type=float, default=None)
    pr.add_argument("--ece-margin", type=float, default=None)
    pr.add_argument("--model-root")
    pr.add_argument("--model-name")
    pr.add_argument("--tracking-uri")

    rw = sub.add_parser("rewards", help="decision log + rewards -> the experiment's snapshot")
    rw.add_argument(
        "--rewards",
        dest="rewards_source",
        required=True,
        help="a CSV of decision_id,reward, or a SQLAlchemy URL (sqlite:///rewards.db)",
    )
    rw.add_argument("--table", dest="rewards_table", default="rewards", help="for a SQL URL")
    rw.add_argument(
        "--decisions",
        dest="decision_logs",
        action="append",
        metavar="FILE",
        help="decision log or collected log output (default: ML_SERVING_DECISION_LOG)",
    )
    rw.add_argument("--experiments", help="default: ML_SERVING_EXPERIMENTS")
    rw.add_argument("--experiment", help="default: the experiments file's")
    rw.add_argument("--out", help="snapshot path (default: the experiments file's)")
    return parser


def _parameters(args: argparse.Namespace) -> dict[str, Any]:
    params = {k: v for k, v in vars(args).items() if k != "flow" and v is not None}
    return params


def main(argv: Sequence[str] | None = None) -> int:
    """Run the flow; 0 when it completed, 2 with a message when it failed."""
    args = _parser().parse_args(argv)
    from ml_serving.pipelines.flows import FLOWS
    from ml_serving.pipelines.local import prefect_api

    flow = FLOWS[args.flow]
    params = _parameters(args)
    started = time.perf_counter()
    with prefect_api() as where:
        print(f"{args.flow}: running on {where}", file=sys.stderr)
        api_ready = time.perf_counter()
        try:
            result = flow(**params)
        except Exception as exc:  # the flow's own failure, already logged by Prefect
            print(f"{PROG} {args.flow}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        done = time.perf_counter()
    print(json.dumps(result, indent=2, sort_keys=True, default=str))
    print(
        f"{args.flow}: flow {done - api_ready:.1f} s, in all {time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
