"""The experiment loop on the prompt simulator: Thompson beats uniform assignment and converges."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest

from ml_serving.experiments import bandit
from ml_serving.training.prompt_simulator import (
    DEFAULT_RATES,
    LoopConfig,
    PromptWorld,
    compare,
)


def test_the_world_has_its_documented_rates() -> None:
    world = PromptWorld()
    assert world.best == "v3-few-shot"
    for version, rate in DEFAULT_RATES.items():
        assert world.reaction_prob(version, 0.0) == pytest.approx(rate)
    # Averaged over users the rates rise (the sigmoid is convex below 0.5) but keep their order.
    means = [world.mean_rate(v) for v in ("v1", "v2-mentor", "v3-few-shot")]
    assert means == sorted(means)
    z = np.random.Generator(np.random.PCG64(0)).normal(0.0, world.user_sd, 200_000)
    monte_carlo = float(np.mean(1 / (1 + np.exp(-(math.log(0.1 / 0.9) + z)))))
    assert world.mean_rate("v1") == pytest.approx(monte_carlo, abs=5e-4)
    assert world.value({"v1": 1, "v3-few-shot": 1}) == pytest.approx(
        (world.mean_rate("v1") + world.mean_rate("v3-few-shot")) / 2
    )


def test_thompson_beats_uniform_on_a_small_seeded_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = LoopConfig(epochs=10, calls_per_epoch=1000, population=10_000, seed=0)
    with caplog.at_level(logging.INFO, logger="ml_serving.experiments"):
        result = compare(config, tmp_path)
    print(
        f"\nregret thompson {result.thompson.cumulative_regret:.1f} "
        f"uniform {result.uniform.cumulative_regret:.1f} ratio {result.regret_ratio:.3f}; "
        f"final shares {dict(result.thompson.final_shares)}"
    )
    assert result.regret_ratio <= 0.5
    assert result.final_best_share >= 0.8
    # Uniform really is uniform, and both saw the same calls.
    assert result.uniform.final_shares == pytest.approx(dict.fromkeys(DEFAULT_RATES, 1 / 3))
    assert result.thompson.calls == result.uniform.calls == 10_000
    # Each epoch's snapshot was written by the tool and loaded while "serving".
    snap = bandit.read_snapshot(tmp_path / "thompson" / "snapshot.json")
    assert sum(a.trials for a in snap.arms.values()) == 10_000
    assert caplog.text.count("shares from the snapshot") == 10


def test_the_loop_is_reproducible(tmp_path: Path) -> None:
    config = LoopConfig(epochs=3, calls_per_epoch=300, population=1000, seed=5)
    first = compare(config, tmp_path / "a")
    second = compare(config, tmp_path / "b")
    assert first.thompson.epochs == second.thompson.epochs
    assert first.regret_ratio == second.regret_ratio
