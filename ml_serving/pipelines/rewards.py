"""Reward snapshots: the decision log and reward rows (CSV or a SQL table) to an experiment's file.

The steps are the experiments CLI's own (``python -m ml_serving.experiments snapshot``):
``read_decisions`` (raw decision-log files and collected log output alike, each decision once),
rewards, ``build_snapshot``, ``bandit.write_snapshot`` (atomic: a polling server never reads
half a file, and picks the new snapshot up on its next poll). Rewards come from a CSV file of
``decision_id,reward`` or from a SQL table read through a SQLAlchemy URL (sqlite embedded;
Postgres with ``postgresql+psycopg://user@host/db`` once a driver is installed).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ml_serving.experiments import bandit
from ml_serving.experiments.config import ExperimentConfig, load_experiments
from ml_serving.experiments.decisions import (
    DecisionRead,
    RewardRead,
    SnapshotReport,
    build_snapshot,
    read_decisions,
    read_rewards,
)

SQL_URL: Final = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
"""What tells a SQLAlchemy URL (``sqlite:///rewards.db``) from a CSV path."""
_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
UNMATCHED_SHOWN: Final = 20
"""Unmatched reward ids listed in a report (all are counted)."""


def is_sql_url(source: str) -> bool:
    """Whether ``source`` is a SQLAlchemy URL rather than a file path."""
    return bool(SQL_URL.match(source))


def _identifier(kind: str, value: str) -> str:
    # Table and column names go into SQL as identifiers: letters, digits and '_' only.
    if not _IDENTIFIER.fullmatch(value):
        raise ValueError(f"{kind} {value!r}: use letters, digits and '_' (a schema as schema.name)")
    return value


def read_rewards_sql(
    url: str,
    table: str,
    *,
    decision_column: str = "decision_id",
    reward_column: str = "reward",
) -> RewardRead:
    """Every ``(decision_column, reward_column)`` row of ``table`` (``schema.table`` allowed)
    through SQLAlchemy; ValueError naming the table and row of a bad one."""
    import sqlalchemy as sa

    schema, _, name = table.rpartition(".")
    columns: tuple[sa.ColumnClause[Any], sa.ColumnClause[Any]] = (
        sa.column(_identifier("column", decision_column)),
        sa.column(_identifier("column", reward_column)),
    )
    source = sa.table(
        _identifier("table", name),
        *columns,
        schema=_identifier("schema", schema) if schema else None,
    )
    read = RewardRead()
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(sa.select(*columns).select_from(source))
            for number, (decision_id, reward) in enumerate(rows, start=1):
                read.add(decision_id, reward, f"{table} row {number}")
    finally:
        engine.dispose()
    return read


def load_rewards(source: str, *, table: str | None = None) -> RewardRead:
    """Rewards from a CSV path or, for a SQLAlchemy URL, from ``table``."""
    if is_sql_url(source):
        if not table:
            raise ValueError(f"rewards from {_safe_url(source)}: name the table")
        return read_rewards_sql(source, table)
    return read_rewards([source])


def _safe_url(url: str) -> str:
    # A URL may carry a password: never put it in a report or an error.
    return re.sub(r"://[^/@]*@", "://***@", url)


@dataclass(frozen=True)
class RewardsRun:
    """What one rewards run read, counted and wrote."""

    snapshot: bandit.Snapshot
    report: SnapshotReport
    decisions: DecisionRead
    out: Path
    decision_sources: tuple[str, ...]
    rewards_source: str
    shares: dict[str, float]
    """The Thompson shares the new snapshot gives (what a server will serve from it)."""


def resolve_experiment(
    experiments: Path | None, experiment: str | None, out: Path | None
) -> tuple[str | None, Path, ExperimentConfig | None]:
    """The experiment's name and snapshot path from its YAML file and the arguments (which
    win), with the file's configuration; ValueError when no snapshot path is known."""
    config = load_experiments(experiments, None) if experiments is not None else None
    if config is not None:
        experiment = experiment or config.name
        out = out or config.snapshot
    if out is None:
        raise ValueError("no snapshot path: name --out or an experiments file with a snapshot")
    return experiment, out, config


def run_rewards(
    decision_sources: Sequence[str | Path],
    rewards_source: str,
    *,
    rewards_table: str | None = None,
    experiments: Path | None = None,
    experiment: str | None = None,
    out: Path | None = None,
    as_of: dt.datetime | None = None,
) -> RewardsRun:
    """Count the rewards of one experiment's decisions into its snapshot file."""
    name, path, config = resolve_experiment(experiments, experiment, out)
    if not decision_sources:
        raise ValueError("no decision log: set ML_SERVING_DECISION_LOG or name log files")
    decisions = read_decisions(decision_sources)
    rewards = load_rewards(rewards_source, table=rewards_table)
    snapshot, report = build_snapshot(
        decisions, rewards, experiment=name, as_of=as_of or dt.datetime.now(dt.UTC)
    )
    bandit.write_snapshot(path, snapshot)
    shares: dict[str, float] = {}
    if config is not None and config.name == snapshot.experiment and len(config.variants) > 1:
        # The server's own computation from the same file: what it will serve once it polls.
        shares = bandit.thompson_shares(
            snapshot, list(config.variants), min_share=config.min_share, draws=config.draws
        )
    return RewardsRun(
        snapshot=snapshot,
        report=report,
        decisions=decisions,
        out=path,
        decision_sources=tuple(str(s) for s in decision_sources),
        rewards_source=_safe_url(rewards_source)
        + (f" table {rewards_table}" if is_sql_url(rewards_source) else ""),
        shares=shares,
    )


def report_markdown(run: RewardsRun) -> str:
    """The rewards run's report: counts per version, what was left out, where it went."""
    r, d = run.report, run.decisions
    lines = [
        f"# Reward snapshot: {r.experiment}",
        "",
        f"{r.decisions} decisions counted once each ({r.rewarded} with a reward) from "
        f"{len(run.decision_sources)} decision source(s); rewards from {run.rewards_source}.",
        f"Snapshot as of {bandit.format_time(run.snapshot.as_of)} written to `{run.out}`; "
        "a running server picks it up on its next poll.",
        "",
        "| version | trials | successes | rate | Thompson share |",
        "| --- | --- | --- | --- | --- |",
    ]
    for version in sorted(set(run.snapshot.arms) | set(run.shares)):
        arm = run.snapshot.arms.get(version, bandit.Arm(0, 0))
        rate = f"{arm.successes / arm.trials:.4f}" if arm.trials else "n/a"
        share = run.shares.get(version)
        lines.append(
            f"| {version} | {arm.trials} | {arm.successes} | {rate} | "
            f"{'n/a' if share is None else f'{share:.4f}'} |"
        )
    lines += [
        "",
        f"- Unmatched rewards (no decision in the log): {len(r.unmatched_rewards)}"
        + (
            ": "
            + ", ".join(r.unmatched_rewards[:UNMATCHED_SHOWN])
            + (" ..." if len(r.unmatched_rewards) > UNMATCHED_SHOWN else "")
            if r.unmatched_rewards
            else ""
        ),
        f"- Rewards for decisions not chosen by this experiment: {r.uncounted_rewards}",
        f"- Duplicates ignored: {r.duplicate_decisions} decision lines, "
        f"{r.duplicate_rewards} reward rows (the highest reward counts)",
        f"- Shadow lines: {d.shadow_lines}; malformed decision lines: {d.malformed}; other log "
        f"lines skipped: {d.skipped_lines}",
    ]
    return "\n".join(lines) + "\n"
