"""The experiments figures: assignment cost, shares and moves over 100k ids, the loop, coverage.

    .venv/bin/python -m scripts.experiments_figures            # everything (about a minute here)
    .venv/bin/python -m scripts.experiments_figures --skip-loop --skip-coverage

Cost is the best of ``--repeat`` timeit runs of ``--number`` calls (the least disturbed run on a
shared machine), per call, in microseconds: ``PromptSelector.select`` for a user in a
three-variant experiment (decision id, hash, record) and its parts. Shares and moves use the ids
``user-0`` .. ``user-99999``. Also the cost of an unchanged snapshot poll and of computing
Thompson shares when a snapshot loads (20,000 draws). The loop is
``ml_serving.training.prompt_simulator.compare`` at its
defaults (20 epochs x 3,000 calls); coverage is the test's: 100 simulated logs of 3,000 calls
from 1,000 users under 50/25/25, candidate 10/20/70.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
import tempfile
import timeit
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from ml_serving.experiments import bandit
from ml_serving.experiments.assignment import (
    Experiment,
    PromptSelector,
    Shares,
    new_decision_id,
)
from ml_serving.experiments.config import ExperimentConfig, Policy
from ml_serving.experiments.decisions import DecisionLog, read_decisions, read_rewards
from ml_serving.experiments.evaluation import evaluate
from ml_serving.training.prompt_simulator import LoopConfig, PromptWorld, compare, simulate_log

SALT = "tip-prompts"
WEIGHTS = {"v1": 50.0, "v2-mentor": 25.0, "v3-few-shot": 25.0}
CHANGES = [
    {"v1": 40.0, "v2-mentor": 30.0, "v3-few-shot": 30.0},
    {"v1": 25.0, "v2-mentor": 50.0, "v3-few-shot": 25.0},
    {"v1": 60.0, "v2-mentor": 10.0, "v3-few-shot": 30.0},
]


def per_call_us(stmt: object, number: int, repeat: int) -> float:
    runs = timeit.repeat(stmt, number=number, repeat=repeat)  # type: ignore[arg-type]
    return min(runs) / number * 1e6


def cost(number: int, repeat: int, workdir: Path) -> dict[str, float]:
    config = ExperimentConfig(name=SALT, salt=SALT, variants=WEIGHTS)
    selector = PromptSelector(Experiment(config), "v1")
    shares = Shares(SALT, WEIGHTS)
    users = [f"user-{i}" for i in range(1000)]
    state = {"i": 0}

    def select() -> None:
        i = state["i"] = (state["i"] + 1) % 1000
        selector.select(users[i])

    log = DecisionLog(workdir / "bench.jsonl", b"bench-key")
    assignment = selector.select("user-1")

    def record() -> None:
        log.record(assignment, user_id="user-1", prompt_hash="h", model="m", fallback=False)

    snapshot_path = workdir / "snapshot.json"
    snap = bandit.Snapshot(
        SALT,
        dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
        {
            "v1": bandit.Arm(1000, 100),
            "v2-mentor": bandit.Arm(1000, 120),
            "v3-few-shot": bandit.Arm(1000, 150),
        },
    )
    bandit.write_snapshot(snapshot_path, snap)
    thompson = Experiment(
        ExperimentConfig(SALT, SALT, WEIGHTS, Policy.THOMPSON, snapshot_path, min_share=0.05)
    )
    versions = sorted(WEIGHTS)

    def shares_from_snapshot() -> None:
        bandit.thompson_shares(snap, versions, min_share=0.05, draws=20_000)

    try:
        return {
            "poll_unchanged_snapshot_us": per_call_us(thompson.reload_if_changed, number, repeat),
            "shares_from_snapshot_20k_draws_us": per_call_us(shares_from_snapshot, 20, repeat),
            "select_experiment_us": per_call_us(select, number, repeat),
            "select_request_us": per_call_us(
                lambda: selector.select("u", "v2-mentor"), number, repeat
            ),
            "shares_choose_us": per_call_us(lambda: shares.choose("user-12345"), number, repeat),
            "decision_id_us": per_call_us(new_decision_id, number, repeat),
            "decision_log_record_file_us": per_call_us(record, number // 4, repeat),
        }
    finally:
        log.close()


def shares_and_moves() -> dict[str, object]:
    users = [f"user-{i}" for i in range(100_000)]

    def assign(weights: Mapping[str, float]) -> list[str]:
        s = Shares(SALT, weights)
        return [s.choose(u)[0] for u in users]

    base = assign(WEIGHTS)
    counts = Counter(base)
    moves = []
    for new in CHANGES:
        after = assign(new)
        moved = sum(a != b for a, b in zip(base, after, strict=True)) / len(users)
        total = sum(max(0.0, WEIGHTS[v] - new[v]) for v in WEIGHTS) / 100
        moves.append({"to": new, "moved": moved, "total_share_moved": total})
    return {
        "ids": len(users),
        "weights": {v: w / 100 for v, w in WEIGHTS.items()},
        "observed": {v: counts[v] / len(users) for v in WEIGHTS},
        "moves_from_50_25_25": moves,
    }


def loop() -> dict[str, object]:
    config = LoopConfig()
    with tempfile.TemporaryDirectory(prefix="exp-loop-") as tmp:
        result = compare(config, Path(tmp))
    return {
        "epochs": config.epochs,
        "calls_per_epoch": config.calls_per_epoch,
        "thompson_regret": result.thompson.cumulative_regret,
        "uniform_regret": result.uniform.cumulative_regret,
        "regret_ratio": result.regret_ratio,
        "final_shares": dict(result.thompson.final_shares),
        "final_best_share": result.final_best_share,
        "thompson_reward_rate": result.thompson.reward / result.thompson.calls,
        "uniform_reward_rate": result.uniform.reward / result.uniform.calls,
        "best_share_by_epoch": [e.shares_after[result.best] for e in result.thompson.epochs],
    }


def coverage() -> dict[str, object]:
    world = PromptWorld()
    candidate = {"v1": 10.0, "v2-mentor": 20.0, "v3-few-shot": 70.0}
    truth = world.value(candidate)
    covered = {"ips": 0, "snips": 0}
    with tempfile.TemporaryDirectory(prefix="exp-cov-") as tmp:
        for seed in range(100):
            decisions, rewards = simulate_log(
                world, Path(tmp) / str(seed), seed=seed, calls=3000, users=1000, weights=WEIGHTS
            )
            e = evaluate(
                read_decisions([decisions]), read_rewards([rewards]), candidate, experiment=None
            )
            covered["ips"] += e.ips.covers(truth)
            covered["snips"] += e.snips.covers(truth)
    return {"truth": truth, "trials": 100, "covered": covered}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--number", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--skip-loop", action="store_true")
    parser.add_argument("--skip-coverage", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the loop's missing first snapshot is expected
    figures: dict[str, object] = {"python": platform.python_version()}
    with tempfile.TemporaryDirectory(prefix="exp-cost-") as tmp:
        figures["cost"] = cost(args.number, args.repeat, Path(tmp))
    figures["shares"] = shares_and_moves()
    if not args.skip_loop:
        figures["loop"] = loop()
    if not args.skip_coverage:
        figures["coverage"] = coverage()
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
