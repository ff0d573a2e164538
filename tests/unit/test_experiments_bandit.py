"""Thompson sampling: snapshot files, probability-best shares, the floor, reloads while serving."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from ml_serving.experiments import bandit
from ml_serving.experiments.assignment import Experiment, PromptSelector
from ml_serving.experiments.bandit import Arm, Snapshot
from ml_serving.experiments.config import ExperimentConfig, Policy

NAME = "tip-prompts"
VERSIONS = ("v1", "v2-mentor", "v3-few-shot")
T0 = dt.datetime(2024, 5, 1, 12, tzinfo=dt.UTC)


def snapshot(as_of: dt.datetime = T0, **arms: tuple[int, int]) -> Snapshot:
    counts = arms or {"v1": (1000, 100), "v2_mentor": (1000, 120), "v3_few_shot": (1000, 150)}
    return Snapshot(NAME, as_of, {k.replace("_", "-"): Arm(*v) for k, v in counts.items()})


def test_snapshot_round_trip() -> None:
    snap = snapshot()
    text = snap.to_json()
    assert json.loads(text) == {
        "experiment": NAME,
        "as_of": "2024-05-01T12:00:00Z",
        "arms": {
            "v1": {"trials": 1000, "successes": 100},
            "v2-mentor": {"trials": 1000, "successes": 120},
            "v3-few-shot": {"trials": 1000, "successes": 150},
        },
    }
    assert bandit.parse_snapshot(text) == snap


def test_the_seed_ignores_as_of_but_not_the_counts() -> None:
    assert snapshot().seed() == snapshot(T0 + dt.timedelta(days=1)).seed()
    assert snapshot().seed() != snapshot(v1=(1000, 101), v2_mentor=(1000, 120)).seed()


GOOD = {"experiment": NAME, "as_of": "2024-05-01T12:00:00+02:00", "arms": {}}


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ("{", "not valid JSON"),
        ([], "(top level)"),
        ({**GOOD, "experiment": 3}, "experiment"),
        ({**GOOD, "as_of": "yesterday"}, "as_of"),
        ({**GOOD, "as_of": "2024-05-01T12:00:00"}, "as_of: '2024-05-01T12:00:00' has no time"),
        ({**GOOD, "arms": [1]}, "arms"),
        ({**GOOD, "arms": {"v1": 5}}, "arms.v1"),
        ({**GOOD, "arms": {"v1": {"trials": 5}}}, "arms.v1.successes"),
        ({**GOOD, "arms": {"v1": {"trials": -1, "successes": 0}}}, "arms.v1.trials"),
        ({**GOOD, "arms": {"v1": {"trials": 1.5, "successes": 0}}}, "arms.v1.trials"),
        ({**GOOD, "arms": {"v1": {"trials": True, "successes": 0}}}, "arms.v1.trials"),
        ({**GOOD, "arms": {"v1": {"trials": 2, "successes": 3}}}, "arms.v1.successes"),
    ],
)
def test_a_malformed_snapshot_is_refused_naming_the_key(data: Any, key: str) -> None:
    text = data if isinstance(data, str) else json.dumps(data)
    with pytest.raises(ValueError) as info:
        bandit.parse_snapshot(text)
    assert str(info.value).startswith(key)


def test_unknown_snapshot_keys_are_ignored() -> None:
    parsed = bandit.parse_snapshot(json.dumps({**GOOD, "source": "batch-17"}))
    assert parsed.as_of == T0 - dt.timedelta(hours=2)  # 12:00+02:00 is 10:00Z
    assert parsed.arms == {}


def test_probability_best_is_deterministic_and_sensible() -> None:
    arms = [Arm(1000, 100), Arm(1000, 120), Arm(1000, 150)]
    first = bandit.probability_best(arms, 20_000, seed=7)
    assert first == bandit.probability_best(arms, 20_000, seed=7)
    assert sum(first) == pytest.approx(1.0)
    assert first[2] > 0.95 and first[0] < 0.01
    # Without data every arm is as likely to be best.
    for p in bandit.probability_best([Arm(0, 0)] * 3, 20_000, seed=1):
        assert abs(p - 1 / 3) < 0.02


@pytest.mark.parametrize(
    ("shares", "floor", "expected"),
    [
        ([0.98, 0.01, 0.01], 0.05, [0.9, 0.05, 0.05]),
        ([0.5, 0.3, 0.2], 0.05, [0.5, 0.3, 0.2]),
        # 0.0 is floored first; then 0.1 of the remaining 0.8 falls below 0.2 and is floored.
        ([0.9, 0.1, 0.0], 0.2, [0.6, 0.2, 0.2]),
        ([0.7, 0.3, 0.0], 0.0, [0.7, 0.3, 0.0]),
        ([1.0, 0.0, 0.0], 1 / 3, [1 / 3, 1 / 3, 1 / 3]),
        ([0.0, 0.0], 0.1, [0.5, 0.5]),
        ([2.0, 1.0, 1.0], 0.0, [0.5, 0.25, 0.25]),
    ],
)
def test_floor_shares(shares: list[float], floor: float, expected: list[float]) -> None:
    result = bandit.floor_shares(shares, floor)
    assert result == pytest.approx(expected)
    assert sum(result) == pytest.approx(1.0)
    assert min(result) >= floor - 1e-12


def test_floor_shares_water_fills_in_rounds() -> None:
    # The 0.04 arm is floored first; renormalising then pushes the 0.07 one below the floor.
    result = bandit.floor_shares([0.89, 0.07, 0.04], 0.1)
    assert result == pytest.approx([0.8, 0.1, 0.1])


def thompson(tmp_path: Path, **changes: Any) -> ExperimentConfig:
    fields: dict[str, Any] = {
        "name": NAME,
        "salt": NAME,
        "variants": dict.fromkeys(VERSIONS, 1.0),
        "policy": Policy.THOMPSON,
        "snapshot": tmp_path / "snapshot.json",
        "min_share": 0.05,
        "draws": 20_000,
    }
    fields.update(changes)
    return ExperimentConfig(**fields)


def write(path: Path, snap: Snapshot | str) -> None:
    bandit.write_snapshot(path, snap) if isinstance(snap, Snapshot) else path.write_text(snap)


def test_thompson_starts_from_the_file_weights_without_a_snapshot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        exp = Experiment(thompson(tmp_path))
    assert exp.shares.shares == pytest.approx(dict.fromkeys(VERSIONS, 1 / 3))
    assert exp.snapshot is None and exp.snapshot_age_s() is None
    assert "cannot read snapshot" in caplog.text


def test_a_snapshot_at_start_sets_the_shares(tmp_path: Path) -> None:
    write(tmp_path / "snapshot.json", snapshot())
    exp = Experiment(thompson(tmp_path))
    expected = bandit.thompson_shares(snapshot(), VERSIONS, min_share=0.05, draws=20_000)
    assert exp.shares.shares == expected
    assert exp.shares.shares["v3-few-shot"] > 0.85
    assert exp.shares.shares["v1"] == pytest.approx(0.05)
    assert exp.snapshot == snapshot()
    age = exp.snapshot_age_s(now=T0.timestamp() + 90)
    assert age == pytest.approx(90)
    # Every replica computes the same shares from the same file.
    assert Experiment(thompson(tmp_path)).shares.shares == exp.shares.shares


def test_reload_picks_up_a_new_snapshot_and_only_then(tmp_path: Path) -> None:
    path = tmp_path / "snapshot.json"
    write(path, snapshot(v1=(100, 10), v2_mentor=(100, 10), v3_few_shot=(100, 10)))
    exp = Experiment(thompson(tmp_path))
    before = exp.shares
    assert not exp.reload_if_changed()  # same file: a stat, no parse
    assert exp.shares is before
    write(path, snapshot(T0 + dt.timedelta(hours=1)))
    assert exp.reload_if_changed()
    assert exp.shares.shares["v3-few-shot"] > 0.85
    assert not exp.reload_if_changed()


def test_a_newer_snapshot_with_the_same_counts_only_refreshes_the_age(tmp_path: Path) -> None:
    path = tmp_path / "snapshot.json"
    write(path, snapshot())
    exp = Experiment(thompson(tmp_path))
    shares = exp.shares
    later = T0 + dt.timedelta(hours=3)
    write(path, snapshot(later))
    assert not exp.reload_if_changed()
    assert exp.shares is shares
    assert exp.snapshot is not None and exp.snapshot.as_of == later


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("{not json", "refused: not valid JSON"),
        (json.dumps({**GOOD, "arms": {"v1": {"trials": 1, "successes": 2}}}), "exceeds trials"),
        (Snapshot("other-experiment", T0 + dt.timedelta(days=1), {}), "for experiment"),
        (snapshot(T0 - dt.timedelta(seconds=1), v1=(9, 9)), "stale"),
    ],
)
def test_a_bad_or_stale_snapshot_is_refused_and_the_shares_stay(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: Snapshot | str, reason: str
) -> None:
    path = tmp_path / "snapshot.json"
    write(path, snapshot())
    exp = Experiment(thompson(tmp_path))
    shares, loaded = exp.shares, exp.snapshot
    write(path, bad)
    with caplog.at_level(logging.WARNING, logger="ml_serving.experiments.assignment"):
        assert not exp.reload_if_changed()
        assert not exp.reload_if_changed()  # polled again: not re-read, not re-logged
    assert exp.shares is shares and exp.snapshot is loaded
    assert exp.refused == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and reason in warnings[0].getMessage()
    assert "the shares stay" in warnings[0].getMessage()


def test_a_vanished_snapshot_keeps_the_shares(tmp_path: Path) -> None:
    path = tmp_path / "snapshot.json"
    write(path, snapshot())
    exp = Experiment(thompson(tmp_path))
    shares = exp.shares
    os.unlink(path)
    assert not exp.reload_if_changed()
    assert exp.shares is shares


def test_arms_of_other_versions_are_ignored(tmp_path: Path) -> None:
    write(tmp_path / "snapshot.json", snapshot(v1=(100, 90), v9=(100, 100)))
    exp = Experiment(thompson(tmp_path, variants={"v1": 1.0, "v2-mentor": 1.0}))
    assert set(exp.shares.shares) == {"v1", "v2-mentor"}
    # v1 at 90/100 against v2-mentor without data (Beta(1, 1)): v2-mentor is best ~1 in 10.
    assert 0.85 < exp.shares.shares["v1"] < 0.95


def test_a_fixed_experiment_never_polls(tmp_path: Path) -> None:
    write(tmp_path / "snapshot.json", snapshot())
    exp = Experiment(thompson(tmp_path, policy=Policy.FIXED))
    assert not exp.reload_if_changed()
    assert exp.shares.shares == pytest.approx(dict.fromkeys(VERSIONS, 1 / 3))


async def test_watch_reloads_in_the_background(tmp_path: Path) -> None:
    path = tmp_path / "snapshot.json"
    exp = Experiment(thompson(tmp_path))
    selector = PromptSelector(exp)
    task = asyncio.create_task(exp.watch(0.01))
    try:
        write(path, snapshot())
        async with asyncio.timeout(30):
            while exp.snapshot is None:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    a = selector.select("user-1")
    assert a.propensity == exp.shares.shares[a.version]


async def test_watch_returns_at_once_for_a_fixed_policy(tmp_path: Path) -> None:
    async with asyncio.timeout(30):
        await Experiment(thompson(tmp_path, policy=Policy.FIXED)).watch(0.01)


def test_write_snapshot_is_atomic_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "snapshot.json"
    bandit.write_snapshot(path, snapshot())
    bandit.write_snapshot(path, snapshot(T0 + dt.timedelta(hours=1)))
    assert os.listdir(path.parent) == ["snapshot.json"]
    assert bandit.read_snapshot(path).as_of == T0 + dt.timedelta(hours=1)
