"""The Feast side of training: event tables into a repository, apply, materialize, and the
point-in-time training set from the model's feature service (needs the `training` extra)."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import numpy as np

from ml_serving.scoring import features
from ml_serving.training import simulator

logger = logging.getLogger(__name__)

SHIPPED_REPO: Final = Path(__file__).resolve().parents[2] / "feature_repo"
"""The project's Feast repository (definitions, feature_store.yaml, data/)."""
MANIFEST: Final = "manifest.json"
"""File in ``data/`` saying which simulator seed and configuration wrote the event tables."""


def _definitions(repo: Path) -> list[Any]:
    """Every Feast object defined in the repository's top-level modules (as `feast apply`)."""
    from feast import Entity, FeatureService, FeatureView
    from feast.data_source import DataSource

    objects: list[Any] = []
    for path in sorted(repo.glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"feature_repo_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for value in vars(module).values():
            if isinstance(value, Entity | FeatureView | FeatureService | DataSource):
                if all(value is not seen for seen in objects):
                    objects.append(value)
    return objects


def store(repo: Path) -> Any:
    """A ``feast.FeatureStore`` on ``repo``."""
    from feast import FeatureStore

    return FeatureStore(repo_path=str(repo))


def apply(repo: Path) -> Any:
    """Register the repository's definitions (``feast apply``); returns the store."""
    fs = store(repo)
    fs.apply(_definitions(repo))
    return fs


def copy_definitions(repo: Path, destination: Path) -> Path:
    """A new repository at ``destination`` with ``repo``'s definitions and feature_store.yaml
    (no data): where a training run or a test writes its own event tables."""
    destination.mkdir(parents=True, exist_ok=True)
    for path in [*repo.glob("*.py"), repo / "feature_store.yaml"]:
        shutil.copy2(path, destination / path.name)
    return destination


def write_events(
    repo: Path, seed: int, config: simulator.SimulatorConfig | None = None
) -> simulator.EventTables:
    """Simulate with ``seed`` and write the event tables (and the manifest) into ``repo/data``."""
    cfg = config or simulator.SimulatorConfig()
    tables = simulator.simulate_events(seed, cfg)
    data = repo / "data"
    simulator.write_event_tables(tables, data)
    manifest = {"seed": seed, "simulator_config": asdict(cfg), "window": _window()}
    (data / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return tables


def _window() -> dict[str, str]:
    import pandas as pd

    start = pd.Timestamp(simulator.WINDOW_START)
    end = start + pd.Timedelta(days=simulator.WINDOW_DAYS)
    return {"start": start.isoformat(), "end": end.isoformat()}


def manifest(repo: Path) -> dict[str, Any]:
    """What wrote ``repo``'s event tables (seed, simulator configuration, time window)."""
    loaded: dict[str, Any] = json.loads((repo / "data" / MANIFEST).read_text())
    return loaded


def materialize(repo: Path, start: datetime | None = None, end: datetime | None = None) -> None:
    """Load the offline store's latest values per entity in [start, end) into the online store
    (the whole simulated window by default)."""
    import pandas as pd

    window = manifest(repo)["window"]
    fs = store(repo)
    fs.materialize(
        start_date=start or pd.Timestamp(window["start"]).to_pydatetime(),
        end_date=end or pd.Timestamp(window["end"]).to_pydatetime(),
    )


def materialize_incremental(repo: Path, end: datetime) -> None:
    """Load what arrived since the last materialization, up to ``end`` (Feast's own rule)."""
    store(repo).materialize_incremental(end_date=end)


def training_set(repo: Path) -> simulator.Interactions:
    """The labelled rows of ``repo/data/impressions.parquet`` with their features as of each
    row's ``event_timestamp`` (Feast's point-in-time join on ``features.FEATURE_SERVICE``,
    each view's TTL respected), in the model's order, NaN where the store has no value."""
    import pandas as pd

    impressions = pd.read_parquet(repo / "data" / "impressions.parquet")
    return interactions_from_frame(point_in_time_join(repo, impressions))


def point_in_time_join(repo: Path, rows: Any) -> Any:
    """``rows`` (``user_id``, ``tip_id``, ``event_timestamp``, anything else) with the feature
    service's fields as of each row's timestamp, in the order of ``rows``.

    Each view is joined on its own entity's distinct (key, timestamp) pairs: Feast's file
    offline store keeps one result row per view key and timestamp, so the 20 impressions of one
    request (one user, one time) must not reach the user view as 20 entity rows.
    """
    import pandas as pd

    fs = store(repo)
    service = fs.get_feature_service(features.FEATURE_SERVICE)
    out = rows.reset_index(drop=True)
    for projection in service.feature_view_projections:
        view = fs.get_feature_view(projection.name)
        keys = [column.name for column in view.entity_columns]
        refs = [f"{projection.name}:{f.name}" for f in projection.features]
        entities = out[[*keys, "event_timestamp"]].drop_duplicates(ignore_index=True)
        joined = fs.get_historical_features(entity_df=entities, features=refs).to_df()
        joined["event_timestamp"] = pd.to_datetime(joined["event_timestamp"], utc=True)
        out = out.merge(joined, on=[*keys, "event_timestamp"], how="left", validate="m:1")
    return out


def interactions_from_frame(joined: Any) -> simulator.Interactions:
    """Model rows from a joined frame (impressions + the feature service's fields)."""
    n = len(joined)
    user = {
        name: joined[name].to_numpy(dtype=np.float64, na_value=np.nan)
        for name in features.USER_FIELDS
    }
    context = features.context_from_store(user, n)
    sin, cos = features.local_hour_features(joined["local_hour"].to_numpy(dtype=np.float64))
    names = features.CONTEXT_FEATURE_NAMES
    context[:, names.index("local_hour_sin")] = sin
    context[:, names.index("local_hour_cos")] = cos
    tips = {
        name: joined[name].to_numpy(dtype=np.float64, na_value=np.nan)
        for name, kind in features.TIP_FIELDS.items()
        if kind != "string"
    }
    category = features.category_index(joined["category"].tolist())
    affinity = np.column_stack([user[f] for f in features.AFFINITY_FIELDS])
    candidates = features.candidates_from_store(tips, category, affinity)
    user_index = joined["user_id"].str.removeprefix("user-").astype(np.int64).to_numpy()
    return simulator.Interactions(
        context=context,
        candidates=candidates,
        labels=joined["label"].to_numpy(dtype=np.int8),
        segment=context[:, names.index("is_new_user")] == 1.0,
        true_prob=joined["true_prob"].to_numpy(dtype=np.float64),
        user_id=user_index,
        request_id=joined["request_id"].to_numpy(dtype=np.int64),
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m ml_serving.training.feature_store``: event tables -> apply -> materialize."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ml_serving.training.feature_store")
    parser.add_argument("--repo", type=Path, default=SHIPPED_REPO, help="Feast repository")
    parser.add_argument("--seed", type=int, default=simulator.SHIPPED_SEED, help="simulator seed")
    parser.add_argument(
        "--no-materialize", action="store_true", help="write the event tables and apply only"
    )
    args = parser.parse_args(argv)
    tables = write_events(args.repo, args.seed)
    apply(args.repo)
    print(
        f"wrote {len(tables.users)} user, {len(tables.tips)} tip snapshots and "
        f"{len(tables.impressions)} impressions to {args.repo / 'data'}; applied"
    )
    if not args.no_materialize:
        materialize(args.repo)
        compact_sqlite(args.repo)
        print(f"materialized the online store of {args.repo}")
    return 0


def compact_sqlite(repo: Path) -> None:
    """VACUUM the sqlite online store (materialize leaves free pages; it ships compressed)."""
    import sqlite3

    from ml_serving.features.repo import StoreConfig

    config = StoreConfig.load(repo)
    if config.sqlite_path is not None and config.sqlite_path.exists():
        conn = sqlite3.connect(config.sqlite_path)
        try:
            conn.execute("VACUUM")
        finally:
            conn.close()


if __name__ == "__main__":
    raise SystemExit(main())
