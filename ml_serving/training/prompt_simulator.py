"""Prompt-version simulator: per-variant reaction rates, and the experiment loop run against it.

The world (``PromptWorld``): a user reacts to a tip written with prompt version ``v`` with
probability ``sigmoid(logit(rate_v) + b_user)``, where ``rate_v`` is the version's reaction
rate for a typical user and ``b_user ~ N(0, user_sd)`` is the user's own leaning, drawn once
per user (``user_sd`` = 0.45 = 0.9 x the N(0, 0.5) reaction propensity of
``training.simulator.simulate``). The offsets add on the log-odds, so the same version is best
for every user; ``mean_rate`` is a version's rate over the population (Gauss-Hermite
quadrature), the truth an estimator is judged against. The default rates (v1 0.10, v2-mentor
0.12, v3-few-shot 0.15) are made up for the simulation, not measured.

The loop (``run_loop``, 20 epochs by default): each epoch ``calls_per_epoch`` calls from users
drawn uniformly from a population, each assigned by the server's ``PromptSelector``, logged by
``DecisionLog`` to a file, rewarded by a draw from the world into a ``decision_id,reward`` CSV;
then ``python -m ml_serving.experiments snapshot`` (its ``main``) counts everything so far into
the snapshot file and ``Experiment.reload_if_changed`` picks it up. Regret per call is
``P(react | best version) - P(react | chosen version)`` for that user. ``compare`` runs Thompson
and uniform assignment (fixed, equal weights) on the same users and draws.

    .venv/bin/python -m ml_serving.training.prompt_simulator            # the full run, JSON out
    .venv/bin/python -m ml_serving.training.prompt_simulator --epochs 8 --calls 1000
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import math
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from ml_serving.experiments import cli
from ml_serving.experiments.assignment import Experiment, PromptSelector
from ml_serving.experiments.config import Policy, load_experiments
from ml_serving.experiments.decisions import DecisionLog

DEFAULT_RATES: Final = {"v1": 0.10, "v2-mentor": 0.12, "v3-few-shot": 0.15}
"""Made-up reaction rates of a typical user per prompt version."""
EXPERIMENT: Final = "tip-prompts"
_EPOCH_ZERO: Final = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
_USER_KEY: Final = b"prompt-simulator"


def _sigmoid(x: float) -> float:
    # math.exp, not numpy's: the C library gives the same bits on every x86-64 CPU (see
    # training.simulator._libm).
    return 1.0 / (1.0 + math.exp(-x))


@dataclass(frozen=True, slots=True)
class PromptWorld:
    """Per-version reaction rates and the users' spread around them (module docstring)."""

    rates: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_RATES))
    user_sd: float = 0.45

    def logit(self, version: str) -> float:
        rate = self.rates[version]
        return math.log(rate / (1.0 - rate))

    def reaction_prob(self, version: str, user_offset: float) -> float:
        """P(positive reaction) of a user with log-odds offset ``user_offset``."""
        return _sigmoid(self.logit(version) + user_offset)

    def mean_rate(self, version: str) -> float:
        """The version's reaction rate averaged over the population of users."""
        nodes, weights = np.polynomial.hermite_e.hermegauss(80)
        logit = self.logit(version)
        values = [_sigmoid(logit + self.user_sd * float(x)) for x in nodes]
        return math.fsum(float(w) * v for w, v in zip(weights, values, strict=True)) / math.sqrt(
            2.0 * math.pi
        )

    def value(self, shares: Mapping[str, float]) -> float:
        """The mean reaction rate of a policy giving each version its share of the calls."""
        total = math.fsum(shares.values())
        return math.fsum(s / total * self.mean_rate(v) for v, s in shares.items())

    @property
    def best(self) -> str:
        return max(self.rates, key=lambda v: self.rates[v])

    def draw_users(self, n: int, rng: np.random.Generator) -> npt.NDArray[np.float64]:
        """``n`` users' log-odds offsets."""
        offsets: npt.NDArray[np.float64] = rng.normal(0.0, self.user_sd, n)
        return offsets


def write_experiments_file(
    path: Path,
    *,
    name: str,
    variants: Mapping[str, float],
    policy: Policy,
    snapshot: str | None = None,
    min_share: float = 0.0,
    draws: int | None = None,
    salt: str | None = None,
) -> Path:
    """An experiments YAML file of one experiment (JSON is YAML)."""
    entry: dict[str, object] = {"name": name, "variants": dict(variants), "policy": policy.value}
    if salt is not None:
        entry["salt"] = salt
    if snapshot is not None:
        entry["snapshot"] = snapshot
    if min_share:
        entry["min_share"] = min_share
    if draws is not None:
        entry["draws"] = draws
    path.write_text(json.dumps({"experiments": [entry]}, indent=2) + "\n", encoding="utf-8")
    return path


@dataclass(frozen=True)
class LoopConfig:
    """Sizes of one simulated run of the experiment loop."""

    world: PromptWorld = field(default_factory=PromptWorld)
    epochs: int = 20
    calls_per_epoch: int = 3000
    population: int = 30_000
    seed: int = 0
    min_share: float = 0.05
    draws: int = 20_000


@dataclass(frozen=True)
class EpochStats:
    """One epoch of a run: what was served and what it cost."""

    epoch: int
    calls: Mapping[str, int]
    """Calls per version this epoch."""
    regret: float
    shares_after: Mapping[str, float]
    """The shares serving the next epoch."""


@dataclass(frozen=True)
class LoopResult:
    """A whole run of one policy."""

    policy: str
    cumulative_regret: float
    reward: int
    """Positive reactions drawn over the run."""
    calls: int
    epochs: list[EpochStats]

    @property
    def final_shares(self) -> Mapping[str, float]:
        return self.epochs[-1].shares_after


def run_loop(policy: Policy, config: LoopConfig, workdir: Path) -> LoopResult:
    """Run the loop (module docstring) with ``policy`` in ``workdir``; uniform when fixed."""
    world = config.world
    versions = sorted(world.rates)
    workdir.mkdir(parents=True, exist_ok=True)
    path = write_experiments_file(
        workdir / "experiments.yaml",
        name=EXPERIMENT,
        variants=dict.fromkeys(versions, 1.0),
        policy=policy,
        snapshot="snapshot.json",
        min_share=config.min_share,
        draws=config.draws,
    )
    experiment_config = load_experiments(path, known_versions=versions)
    assert experiment_config is not None and experiment_config.snapshot is not None
    experiment = Experiment(experiment_config)
    selector = PromptSelector(experiment, known_versions=versions)
    log_path, rewards_path = workdir / "decisions.jsonl", workdir / "rewards.csv"
    log = DecisionLog(log_path, _USER_KEY)
    rewards_path.write_text("decision_id,reward\n", encoding="utf-8")

    rng = np.random.Generator(np.random.PCG64(config.seed))
    offsets = world.draw_users(config.population, rng)
    best_logit = world.logit(world.best)
    logits = {v: world.logit(v) for v in versions}
    epochs: list[EpochStats] = []
    total_regret, total_reward = 0.0, 0
    try:
        for epoch in range(config.epochs):
            users = rng.integers(0, config.population, config.calls_per_epoch)
            draws = rng.random(config.calls_per_epoch)
            calls = dict.fromkeys(versions, 0)
            regret = 0.0
            rows = []
            for user, draw in zip(users.tolist(), draws.tolist(), strict=True):
                user_id = f"user-{user}"
                assignment = selector.select(user_id)
                offset = float(offsets[user])
                p = _sigmoid(logits[assignment.version] + offset)
                regret += _sigmoid(best_logit + offset) - p
                reward = 1 if draw < p else 0
                total_reward += reward
                calls[assignment.version] += 1
                log.record(
                    assignment,
                    user_id=user_id,
                    prompt_hash="sim",
                    model="simulated",
                    fallback=False,
                )
                rows.append(f"{assignment.decision_id},{reward}\n")
            with rewards_path.open("a", encoding="utf-8") as f:
                f.writelines(rows)
            as_of = _EPOCH_ZERO + dt.timedelta(hours=epoch + 1)
            with contextlib.redirect_stderr(io.StringIO()) as report:
                code = cli.main(
                    [
                        "snapshot",
                        "--decisions",
                        str(log_path),
                        "--rewards",
                        str(rewards_path),
                        "--experiments",
                        str(path),
                        "--as-of",
                        as_of.isoformat(),
                    ]
                )
            if code != 0:
                raise RuntimeError(f"the snapshot tool failed: {report.getvalue()}")
            if policy is Policy.THOMPSON and not experiment.reload_if_changed():
                raise RuntimeError(f"epoch {epoch}: the new snapshot did not load")
            total_regret += regret
            epochs.append(EpochStats(epoch, calls, regret, dict(experiment.shares.shares)))
    finally:
        log.close()
    return LoopResult(
        policy=policy.value,
        cumulative_regret=total_regret,
        reward=total_reward,
        calls=config.epochs * config.calls_per_epoch,
        epochs=epochs,
    )


def simulate_log(
    world: PromptWorld,
    workdir: Path,
    *,
    seed: int,
    calls: int,
    users: int,
    weights: Mapping[str, float],
) -> tuple[Path, Path]:
    """A decision log and its rewards CSV from a fixed experiment with ``weights``: ``calls``
    calls from ``users`` fresh users (drawn uniformly, so most call more than once), assigned by
    ``PromptSelector`` (salt ``trial-<seed>``) and rewarded from ``world``. For judging offline
    estimators: the truth of a policy is ``world.value(its shares)``."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = write_experiments_file(
        workdir / "logging.yaml",
        name=EXPERIMENT,
        variants=weights,
        policy=Policy.FIXED,
        salt=f"trial-{seed}",
    )
    config = load_experiments(path, known_versions=world.rates)
    assert config is not None
    selector = PromptSelector(Experiment(config))
    rng = np.random.Generator(np.random.PCG64(seed))
    offsets = world.draw_users(users, rng)
    picks = rng.integers(0, users, calls).tolist()
    draws = rng.random(calls).tolist()
    log_path, rewards_path = workdir / "decisions.jsonl", workdir / "rewards.csv"
    log = DecisionLog(log_path, _USER_KEY)
    rows = ["decision_id,reward\n"]
    try:
        for user, draw in zip(picks, draws, strict=True):
            user_id = f"user-{user}"
            assignment = selector.select(user_id)
            p = world.reaction_prob(assignment.version, float(offsets[user]))
            log.record(
                assignment, user_id=user_id, prompt_hash="sim", model="simulated", fallback=False
            )
            # Only positive reactions get a row, as a reaction feed would: no row is reward 0.
            if draw < p:
                rows.append(f"{assignment.decision_id},1\n")
    finally:
        log.close()
    rewards_path.write_text("".join(rows), encoding="utf-8")
    return log_path, rewards_path


@dataclass(frozen=True)
class Comparison:
    """Thompson against uniform assignment on the same users and draws."""

    thompson: LoopResult
    uniform: LoopResult
    best: str

    @property
    def regret_ratio(self) -> float:
        return self.thompson.cumulative_regret / self.uniform.cumulative_regret

    @property
    def final_best_share(self) -> float:
        return self.thompson.final_shares[self.best]


def compare(config: LoopConfig, workdir: Path) -> Comparison:
    """``run_loop`` for Thompson and for uniform assignment (subfolders of ``workdir``)."""
    return Comparison(
        thompson=run_loop(Policy.THOMPSON, config, workdir / "thompson"),
        uniform=run_loop(Policy.FIXED, config, workdir / "uniform"),
        best=config.world.best,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``compare`` and print its figures as JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m ml_serving.training.prompt_simulator", description=__doc__
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--calls", type=int, default=3000, help="calls per epoch")
    parser.add_argument("--population", type=int, default=30_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-share", type=float, default=0.05)
    parser.add_argument("--per-epoch", action="store_true", help="print every epoch too")
    args = parser.parse_args(argv)
    config = LoopConfig(
        epochs=args.epochs,
        calls_per_epoch=args.calls,
        population=args.population,
        seed=args.seed,
        min_share=args.min_share,
    )
    with tempfile.TemporaryDirectory(prefix="prompt-sim-") as tmp:
        result = compare(config, Path(tmp))
    figures: dict[str, object] = {
        "config": {k: v for k, v in asdict(config).items() if k != "world"},
        "rates": dict(config.world.rates),
        "mean_rates": {v: config.world.mean_rate(v) for v in sorted(config.world.rates)},
        "best": result.best,
        "thompson_regret": result.thompson.cumulative_regret,
        "uniform_regret": result.uniform.cumulative_regret,
        "regret_ratio": result.regret_ratio,
        "thompson_reward_rate": result.thompson.reward / result.thompson.calls,
        "uniform_reward_rate": result.uniform.reward / result.uniform.calls,
        "final_shares": dict(result.thompson.final_shares),
        "final_best_share": result.final_best_share,
    }
    if args.per_epoch:
        figures["thompson_epochs"] = [asdict(e) for e in result.thompson.epochs]
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
