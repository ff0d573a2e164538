"""Feature refresh: write or load the event tables, apply the Feast repository, materialize.

The steps are ``training.feature_store``'s (what ``make features`` runs): the simulator's
event tables written as Parquet into the repository's ``data/`` when a seed is given (else the
tables already there), ``apply`` (``feast apply`` in-process), then materialization. It is
incremental: each run loads what is newer than the last run's end, up to the newest event (the
first run of a repository, the whole window of its tables).
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ml_serving.training import feature_store, simulator

REPO: Final = feature_store.SHIPPED_REPO
"""The project's Feast repository."""
TABLES: Final = ("users", "tips", "impressions")
MARKER: Final = "materialized_to"
"""``data/<MARKER>``: where the last run materialized up to (absent: the first run loads the
tables' whole window)."""


@dataclass
class FeaturesRun:
    """What one feature refresh wrote, applied and materialized."""

    repo: Path
    seed: int | None
    """The simulator seed the tables were written from; None when they were loaded."""
    rows: dict[str, int]
    end: dt.datetime
    """Materialized up to here (the newest event timestamp)."""
    seconds: dict[str, float] = field(default_factory=dict)
    views: list[str] = field(default_factory=list)
    """The feature views materialized."""

    def summary(self) -> dict[str, Any]:
        """The run's figures as plain values."""
        return {
            "repo": str(self.repo),
            "seed": self.seed,
            "rows": self.rows,
            "materialized_to": self.end.isoformat(),
            "seconds": self.seconds,
            "views": self.views,
        }


def _tables(data: Path) -> tuple[dict[str, int], dt.datetime, dt.datetime]:
    import pandas as pd

    rows: dict[str, int] = {}
    oldest: dt.datetime | None = None
    newest: dt.datetime | None = None
    for name in TABLES:
        path = data / f"{name}.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no event table (run with a seed to write them)")
        frame = pd.read_parquet(path, columns=["event_timestamp"])
        rows[name] = len(frame)
        if len(frame):
            first = pd.Timestamp(frame["event_timestamp"].min()).to_pydatetime()
            last = pd.Timestamp(frame["event_timestamp"].max()).to_pydatetime()
            oldest = first if oldest is None or first < oldest else oldest
            newest = last if newest is None or last > newest else newest
    if oldest is None or newest is None:
        raise ValueError(f"{data}: the event tables hold no rows")
    return rows, oldest, newest


def run_features(
    repo: Path | None = None,
    *,
    seed: int | None = None,
    config: simulator.SimulatorConfig | None = None,
) -> FeaturesRun:
    """Write the event tables of ``seed`` (or load those in ``data/``), ``feast apply`` and
    materialize incrementally up to the newest event."""
    repo = repo or REPO
    data = repo / "data"
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    if seed is not None:
        feature_store.write_events(repo, seed, config)
        seconds["write_event_tables"] = round(time.perf_counter() - started, 2)
    rows, oldest, newest = _tables(data)
    started = time.perf_counter()
    fs = feature_store.apply(repo)
    views = sorted(view.name for view in fs.list_feature_views())
    seconds["apply"] = round(time.perf_counter() - started, 2)
    end = newest.astimezone(dt.UTC) + dt.timedelta(seconds=1)
    started = time.perf_counter()
    marker = data / MARKER
    if marker.is_file():
        feature_store.materialize_incremental(repo, end)
        seconds["materialize_incremental"] = round(time.perf_counter() - started, 2)
    else:
        # Feast starts a first incremental run at now - ttl, which skips event tables whose
        # times lie further back (the simulator's window): the first run loads them all.
        feature_store.materialize(repo, start=oldest.astimezone(dt.UTC), end=end)
        seconds["materialize_first"] = round(time.perf_counter() - started, 2)
    marker.write_text(end.isoformat() + "\n", encoding="utf-8")
    return FeaturesRun(repo=repo, seed=seed, rows=rows, end=end, seconds=seconds, views=views)


def report_markdown(run: FeaturesRun) -> str:
    """The feature refresh's report."""
    source = (
        f"written from the simulator (seed {run.seed})"
        if run.seed is not None
        else "loaded from data/"
    )
    lines = [
        f"# Feature refresh: {run.repo.name}",
        "",
        f"Event tables {source}; applied and materialized incrementally up to "
        f"{run.end.isoformat()}.",
        "",
        "| table | rows |",
        "| --- | --- |",
        *(f"| {name} | {count} |" for name, count in run.rows.items()),
        "",
        "| step | seconds |",
        "| --- | --- |",
        *(f"| {step} | {s} |" for step, s in run.seconds.items()),
        "",
        "Feature views: " + ", ".join(run.views) + ".",
    ]
    return "\n".join(lines) + "\n"
