"""feature_repo/ and scoring/features.py in step, and training's point-in-time join: no label
sees a feature value from its own future, and a value older than its view's TTL is not used."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from ml_serving.scoring import features
from ml_serving.training import feature_store, simulator
from tests.support.feature_store import SEED, SMALL

REPO = Path(__file__).resolve().parents[2]
_KINDS = {
    "Int64": "int64",
    "Float64": "float64",
    "String": "string",
    "Array(String)": "string_list",
}


@pytest.fixture(scope="module")
def definitions() -> dict[str, Any]:
    return {o.name: o for o in feature_store._definitions(feature_store.SHIPPED_REPO)}


@pytest.mark.parametrize(
    ("view", "fields"),
    [
        (features.USER_FEATURE_VIEW, features.USER_FIELDS),
        (features.TIP_FEATURE_VIEW, features.TIP_FIELDS),
        (features.USER_PROFILE_VIEW, features.PROFILE_FIELDS),
    ],
)
def test_each_feast_view_declares_the_fields_and_types_serving_reads(
    definitions: dict[str, Any], view: str, fields: dict[str, str]
) -> None:
    declared = {f.name: _KINDS[str(f.dtype)] for f in definitions[view].schema}
    assert declared == fields


def test_the_feature_service_serves_every_stored_model_input(definitions: dict[str, Any]) -> None:
    service = definitions[features.FEATURE_SERVICE]
    served = {(p.name, f.name) for p in service.feature_view_projections for f in p.features}
    wanted = {(features.USER_FEATURE_VIEW, f) for f in features.USER_FIELDS} | {
        (features.TIP_FEATURE_VIEW, f) for f in features.TIP_FIELDS
    }
    assert served == wanted


def test_every_model_input_has_one_source_and_stored_ones_a_field() -> None:
    names = {*features.CONTEXT_FEATURE_NAMES, *features.CANDIDATE_FEATURE_NAMES}
    assert set(features.SOURCES) == names
    for name, source in features.SOURCES.items():
        if source is features.Source.USER:
            assert name in features.USER_FIELDS
        if source is features.Source.TIP:
            assert name in features.TIP_FIELDS
    request_time = {n for n, s in features.SOURCES.items() if s is features.Source.REQUEST}
    assert request_time == {"local_hour_sin", "local_hour_cos"}
    assert "category" in features.TIP_FIELDS
    assert set(features.AFFINITY_FIELDS) <= set(features.USER_FIELDS)


def test_the_shipped_card_names_the_feature_service_and_the_feast_source() -> None:
    card = json.loads((REPO / "models" / "tips-ranker" / "1" / "card.json").read_text())
    assert card["inputs"]["feature_service"] == features.FEATURE_SERVICE
    assert card["training_data"]["feature_service"] == features.FEATURE_SERVICE
    assert "point-in-time" in card["training_data"]["source"]
    for group in ("context", "candidate"):
        for entry in card["inputs"][group]:
            assert entry["source"] == features.SOURCES[entry["name"]].value
            assert np.isfinite(entry["training_mean"])


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = feature_store.copy_definitions(
        feature_store.SHIPPED_REPO, tmp_path_factory.mktemp("feature-repo")
    )
    feature_store.write_events(repo, SEED, SMALL)
    feature_store.apply(repo)
    return repo


def test_the_point_in_time_join_gives_each_label_its_own_days_snapshot(small_repo: Path) -> None:
    """Feast's join on the event tables equals the simulator's own record of what each request
    saw (its day's snapshot, written at 00:00 of that day): had any row been joined with a
    later snapshot (its future), some value would differ, since they change daily."""
    joined = feature_store.training_set(small_repo)
    truth = simulator.simulate(SEED, SMALL)
    assert len(joined) == len(truth) > 0
    np.testing.assert_array_equal(joined.context, truth.context)
    np.testing.assert_array_equal(joined.candidates, truth.candidates)
    np.testing.assert_array_equal(joined.labels, truth.labels)
    np.testing.assert_array_equal(joined.request_id, truth.request_id)
    # Not vacuous: for most rows a later snapshot of the same user exists, with other values.
    users = pd.read_parquet(small_repo / "data" / "users.parquet")
    impressions = pd.read_parquet(small_repo / "data" / "impressions.parquet")
    latest = users.groupby("user_id")["event_timestamp"].max()
    later = impressions["event_timestamp"].to_numpy() < latest[impressions["user_id"]].to_numpy()
    assert later.mean() > 0.3


def test_no_label_sees_its_future_and_expired_values_are_not_used(small_repo: Path) -> None:
    """Hand-made rows around one user's snapshots: before the first snapshot nothing is joined,
    between two snapshots the older one is, and past the view's 2-day TTL nothing is."""
    users = pd.read_parquet(small_repo / "data" / "users.parquet")
    user = users["user_id"].iloc[0]
    snaps = users[users["user_id"] == user].sort_values("event_timestamp")
    first, second = snaps.iloc[0], snaps.iloc[1]
    assert first["sessions_7d"] != second["sessions_7d"] or len(snaps) > 2
    tip = "tip-0"
    hour = pd.Timedelta(hours=1)
    rows = pd.DataFrame(
        {
            "user_id": [user] * 4,
            "tip_id": [tip] * 4,
            "event_timestamp": [
                first["event_timestamp"] - hour,  # before any snapshot of the user
                second["event_timestamp"] - hour,  # the first snapshot only (a day old)
                second["event_timestamp"],  # exactly when the second is written
                snaps["event_timestamp"].iloc[-1] + pd.Timedelta(days=2, hours=1),  # expired
            ],
        }
    )
    joined = feature_store.point_in_time_join(small_repo, rows)
    sessions = joined["sessions_7d"].tolist()
    assert pd.isna(sessions[0])
    assert sessions[1] == first["sessions_7d"]
    assert sessions[2] == second["sessions_7d"]
    assert pd.isna(sessions[3])
