"""The pipelines' plain steps without Prefect: the gate's checks, the shadow figures from a
server's metrics, reward rows from SQL and CSV."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from ml_serving.pipelines import gate, rewards

GOOD = gate.Quality(
    auc=0.73,
    log_loss=0.284,
    ece=0.003,
    fairness_passed=True,
    fairness_checks={"calibration_in_the_large": True, "segment_ece": True, "auc_gap": True},
    auc_gap=0.014,
    rows=1000,
)


def _names(checks: list[gate.Check], passed: bool | None) -> list[str]:
    return [c.name for c in checks if c.passed is passed]


def test_a_challenger_within_every_margin_passes_and_the_shadow_is_skipped() -> None:
    slightly_worse = dataclasses.replace(GOOD, auc=0.726, ece=0.007)
    checks = gate.checks(GOOD, slightly_worse, None, same_set=True, evaluation="cards")
    assert _names(checks, True) == ["same_heldout_set", "auc", "calibration", "fairness"]
    assert _names(checks, None) == ["shadow"]
    required = gate.checks(
        GOOD, slightly_worse, None, same_set=True, evaluation="cards", require_shadow=True
    )
    assert _names(required, False) == ["shadow"]


@pytest.mark.parametrize(
    ("change", "failed"),
    [
        ({"auc": 0.72}, "auc"),
        ({"ece": 0.0081}, "calibration"),
        ({"auc_gap": 0.025}, "fairness"),
        ({"fairness_passed": False, "fairness_checks": {"segment_ece": False}}, "fairness"),
    ],
)
def test_each_check_names_what_failed(change: dict[str, object], failed: str) -> None:
    challenger = dataclasses.replace(GOOD, **change)  # type: ignore[arg-type]
    checks = gate.checks(GOOD, challenger, None, same_set=True, evaluation="cards")
    assert _names(checks, False) == [failed]
    if "fairness_checks" in change:
        (fairness,) = [c for c in checks if c.name == "fairness"]
        assert "segment checks failed: segment_ece" in fairness.detail


def _server_metrics(taus: list[float], deltas: list[float], version: str = "7") -> str:
    # The server's own metric names and buckets (api/metrics.py).
    registry = CollectorRegistry()
    comparisons = Counter("mlserving_shadow_model_comparisons", "", ["version"], registry=registry)
    tau = Histogram(
        "mlserving_shadow_model_kendall_tau",
        "",
        ["version"],
        buckets=(-0.5, 0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
        registry=registry,
    )
    overlap = Histogram(
        "mlserving_shadow_model_top_k_overlap",
        "",
        ["version"],
        buckets=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
        registry=registry,
    )
    delta = Histogram("mlserving_shadow_model_mean_abs_delta", "", ["version"], registry=registry)
    for t, d in zip(taus, deltas, strict=True):
        comparisons.labels(version).inc()
        tau.labels(version).observe(t)
        overlap.labels(version).observe(0.8)
        delta.labels(version).observe(d)
    return generate_latest(registry).decode()


def test_shadow_figures_from_two_servers_metrics(tmp_path: Path) -> None:
    first, second = tmp_path / "pod-a.txt", tmp_path / "pod-b.txt"
    first.write_text(_server_metrics([0.89] * 30, [0.01] * 30))
    second.write_text(_server_metrics([0.89] * 30, [0.03] * 30))
    stats = gate.shadow_stats([str(first), str(second)], "7")
    assert stats.comparisons == 60
    assert stats.mean_top_k_overlap == pytest.approx(0.8)
    assert stats.mean_abs_delta == pytest.approx(0.02)
    # No _sum for a histogram with negative buckets: the bucket's midpoint, (0.8 + 0.9) / 2.
    assert stats.mean_kendall_tau == pytest.approx(0.85)
    checks = gate.checks(GOOD, GOOD, stats, same_set=True, evaluation="cards")
    assert _names(checks, False) == []
    (shadow,) = [c for c in checks if c.name == "shadow"]
    assert shadow.passed is True and shadow.detail.startswith("60 comparisons")
    other = gate.shadow_stats([str(first)], "8")
    assert other.comparisons == 0
    assert _names(gate.checks(GOOD, GOOD, other, same_set=True, evaluation="c"), None) == ["shadow"]


def test_a_disagreeing_shadow_fails_with_its_figures(tmp_path: Path) -> None:
    comparison = tmp_path / "comparison.json"
    comparison.write_text(
        json.dumps(
            {
                "version": "7",
                "comparisons": 80,
                "mean_top_k_overlap": 0.3,
                "mean_kendall_tau": 0.1,
                "mean_abs_delta": 0.2,
            }
        )
    )
    stats = gate.shadow_stats([str(comparison)], "7")
    (shadow,) = [
        c
        for c in gate.checks(GOOD, GOOD, stats, same_set=True, evaluation="c")
        if c.name == "shadow"
    ]
    assert shadow.passed is False
    for problem in ("mean Kendall tau 0.100 < 0.5", "top-k overlap 0.300 < 0.5", "0.2000 > 0.05"):
        assert problem in shadow.detail
    with pytest.raises(OSError, match="shadow comparison .*missing.json"):
        gate.shadow_stats([str(tmp_path / "missing.json")], "7")


def test_rewards_from_a_sql_table(tmp_path: Path) -> None:
    database = tmp_path / "rewards.db"
    with sqlite3.connect(database) as db:
        db.execute("CREATE TABLE rewards (decision_id TEXT, reward REAL, note TEXT)")
        db.executemany(
            "INSERT INTO rewards VALUES (?, ?, ?)",
            [("a", 1.0, ""), ("b", 0.0, ""), ("a", 0.0, "a second row")],
        )
    db.close()
    read = rewards.load_rewards(f"sqlite:///{database}", table="rewards")
    assert read.rewards == {"a": 1.0, "b": 0.0} and read.duplicates == 1
    with sqlite3.connect(database) as db:
        db.execute("INSERT INTO rewards VALUES ('c', NULL, 'no reward')")
    db.close()
    with pytest.raises(ValueError, match="rewards row 4: reward None is not a number"):
        rewards.load_rewards(f"sqlite:///{database}", table="rewards")
    with pytest.raises(ValueError, match="name the table"):
        rewards.load_rewards(f"sqlite:///{database}")
    with pytest.raises(ValueError, match=r"table 'rewards; DROP TABLE x': use letters"):
        rewards.load_rewards(f"sqlite:///{database}", table="rewards; DROP TABLE x")


def test_a_rewards_run_from_csv_writes_the_snapshot_and_reports(tmp_path: Path) -> None:
    decisions = tmp_path / "decisions.jsonl"
    decisions.write_text(
        "".join(
            json.dumps(
                {
                    "decision_id": f"d{i}",
                    "version": "v1" if i % 2 else "v2-mentor",
                    "how": "experiment",
                    "propensity": 0.5,
                    "experiment": "tip-prompts",
                }
            )
            + "\n"
            for i in range(4)
        )
    )
    csv = tmp_path / "rewards.csv"
    csv.write_text("decision_id,reward\nd0,1\nd2,1\nd1,0\nghost,1\n")
    run = rewards.run_rewards(
        [decisions], str(csv), experiment="tip-prompts", out=tmp_path / "snap.json"
    )
    assert json.loads((tmp_path / "snap.json").read_text())["arms"] == {
        "v1": {"trials": 2, "successes": 0},
        "v2-mentor": {"trials": 2, "successes": 2},
    }
    report = rewards.report_markdown(run)
    assert "| v2-mentor | 2 | 2 | 1.0000 |" in report
    assert "Unmatched rewards (no decision in the log): 1: ghost" in report
    with pytest.raises(ValueError, match="no snapshot path"):
        rewards.run_rewards([decisions], str(csv))


def test_a_database_password_stays_out_of_reports() -> None:
    assert (
        rewards._safe_url("postgresql+psycopg://u:secret@db/r") == "postgresql+psycopg://***@db/r"
    )
