"""Offline evaluation: IPS and SNIPS by hand, their 95% intervals on simulated logs, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ml_serving.experiments import cli
from ml_serving.experiments.config import Policy
from ml_serving.experiments.decisions import read_decisions, read_rewards
from ml_serving.experiments.evaluation import estimate, evaluate
from ml_serving.training.prompt_simulator import PromptWorld, simulate_log, write_experiments_file

LOGGING = {"v1": 50.0, "v2-mentor": 25.0, "v3-few-shot": 25.0}
CANDIDATE = {"v1": 10.0, "v2-mentor": 20.0, "v3-few-shot": 70.0}


def test_ips_and_snips_by_hand() -> None:
    e = estimate(
        ["a", "a", "b", "b"],
        [0.5, 0.5, 0.25, 0.25],
        [1.0, 0.0, 1.0, 1.0],
        ["u1", "u2", "u3", "u3"],
        {"a": 1.0, "b": 3.0},
    )
    # Weights: a 0.25 / 0.5 = 0.5, b 0.75 / 0.25 = 3.
    assert e.ips.estimate == pytest.approx((0.5 + 3 + 3) / 4)
    assert e.snips.estimate == pytest.approx((0.5 + 3 + 3) / 7)
    assert e.logged.estimate == pytest.approx(0.75)
    assert (e.decisions, e.users) == (4, 3)
    assert e.effective_sample_size == pytest.approx(7**2 / (0.25 * 2 + 9 * 2))
    assert e.max_weight == 3.0
    # Clustered: u3's two decisions count as one cluster, G / (G - 1) = 3 / 2.
    ips = 6.5 / 4
    clusters = [0.5 - ips, 0 - ips, (3 - ips) + (3 - ips)]
    assert e.ips.std_error == pytest.approx(math.sqrt(1.5 * sum(c * c for c in clusters) / 16))
    assert e.ips.low < e.ips.estimate < e.ips.high


def test_the_logging_policy_itself_is_estimated_as_its_mean() -> None:
    e = estimate(["a", "b", "b"], [0.5, 0.5, 0.5], [1.0, 0.0, 1.0], [None] * 3, {"a": 1, "b": 1})
    assert e.ips.estimate == e.snips.estimate == e.logged.estimate == pytest.approx(2 / 3)
    assert e.users == 3  # without user hashes each decision is its own cluster


def test_unsupported_versions_are_reported() -> None:
    e = estimate(["a", "a"], [1.0, 1.0], [1.0, 1.0], ["u", "v"], {"a": 1, "c": 1})
    assert e.unsupported == {"c": 0.5}
    assert e.ips.estimate == 0.5


def test_nothing_to_evaluate_is_refused() -> None:
    with pytest.raises(ValueError, match="no logged decisions"):
        estimate([], [], [], [], {"a": 1})


def test_the_95_intervals_cover_the_truth_in_at_least_90_of_100_trials(tmp_path: Path) -> None:
    world = PromptWorld()
    truth = world.value(CANDIDATE)
    covered = {"ips": 0, "snips": 0}
    for seed in range(100):
        decisions, rewards = simulate_log(
            world, tmp_path / str(seed), seed=seed, calls=3000, users=1000, weights=LOGGING
        )
        e = evaluate(
            read_decisions([decisions]), read_rewards([rewards]), CANDIDATE, experiment=None
        )
        covered["ips"] += e.ips.covers(truth)
        covered["snips"] += e.snips.covers(truth)
    print(f"\ntruth {truth:.4f}; 95% intervals covering it in 100 trials: {covered}")
    assert covered["ips"] >= 90
    assert covered["snips"] >= 90


def test_the_evaluate_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    world = PromptWorld()
    decisions, rewards = simulate_log(
        world, tmp_path / "log", seed=1, calls=3000, users=1000, weights=LOGGING
    )
    policy = write_experiments_file(
        tmp_path / "candidate.yaml", name="tip-prompts", variants=CANDIDATE, policy=Policy.FIXED
    )
    argv = ["evaluate", "--policy", str(policy)]
    assert cli.main([*argv, "--decisions", str(decisions), "--rewards", str(rewards)]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["experiment"] == "tip-prompts" and result["decisions"] == 3000
    assert result["candidate_shares"] == pytest.approx(
        {"v1": 0.1, "v2-mentor": 0.2, "v3-few-shot": 0.7}
    )
    for key in ("ips", "snips"):
        assert result[key]["low"] < result[key]["estimate"] < result[key]["high"]
    assert "IPS:" in err and "SNIPS:" in err and "effective sample size" in err


def test_the_evaluate_command_names_unsupported_versions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    decisions, rewards = simulate_log(
        PromptWorld(),
        tmp_path / "log",
        seed=2,
        calls=200,
        users=100,
        weights={"v1": 1, "v2-mentor": 1},
    )
    policy = write_experiments_file(
        tmp_path / "candidate.yaml",
        name="candidate",
        variants={"v1": 1, "v3-few-shot": 1},
        policy=Policy.FIXED,
    )
    argv = ["evaluate", "--policy", str(policy), "--decisions", str(decisions)]
    assert cli.main([*argv, "--rewards", str(rewards)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["unsupported"] == {"v3-few-shot": 0.5}
    assert "never logged, estimated as reward 0: v3-few-shot (0.500)" in err
