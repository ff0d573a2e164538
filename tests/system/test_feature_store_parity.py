"""The online-store reader against Feast's own SDK, on sqlite and on a real Redis: Feast writes
(materialize), ml_serving.features reads, get_online_features is the reference for every value
type the repository uses (int64, float64, string, string list, null)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from ml_serving.features import codec
from ml_serving.features.lookup import FeatureLookup, LookupPolicy
from ml_serving.features.repo import StoreConfig
from ml_serving.features.stores import open_store
from ml_serving.scoring import features
from ml_serving.training import feature_store
from tests.support.feature_store import RedisServer, small_repo

VIEWS = {
    features.USER_FEATURE_VIEW: ("user_id", features.USER_FIELDS),
    features.USER_PROFILE_VIEW: ("user_id", features.PROFILE_FIELDS),
    features.TIP_FEATURE_VIEW: ("tip_id", features.TIP_FIELDS),
}


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def repo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp(f"repo-{request.param}")
    if request.param == "redis":
        return small_repo(directory, redis=request.getfixturevalue("redis"))
    return small_repo(directory)


def _sdk(repo: Path, view: str, key: str, ids: list[str]) -> dict[str, list[Any]]:
    fs = feature_store.store(repo)
    refs = [f"{view}:{name}" for name in VIEWS[view][1]]
    answer: dict[str, list[Any]] = fs.get_online_features(
        features=refs, entity_rows=[{key: i} for i in ids]
    ).to_dict(include_event_timestamps=True)
    return answer


def _same(ours: codec.Scalar, theirs: Any) -> bool:
    if theirs is None or (isinstance(theirs, float) and math.isnan(theirs)):
        return ours is None
    if isinstance(theirs, list):
        return ours == tuple(theirs)
    if isinstance(theirs, int | float):
        return isinstance(ours, float) and ours == float(theirs)
    return bool(ours == theirs)


@pytest.mark.parametrize("view", list(VIEWS))
async def test_every_stored_value_reads_as_get_online_features_answers(
    repo: Path, view: str
) -> None:
    key, fields = VIEWS[view]
    table = "users" if key == "user_id" else "tips"
    ids = sorted(set(pd.read_parquet(repo / "data" / f"{table}.parquet")[key]))
    ids.append(f"{key}-unknown")
    sdk = _sdk(repo, view, key, ids)
    store = open_store(StoreConfig.load(repo))
    seen_null = False
    await store.connect()
    try:
        for i, entity in enumerate(ids):
            row = await store.read(view, key, entity, tuple(fields), 1.0)
            if entity.endswith("-unknown"):
                assert row is None
                assert all(sdk[name][i] is None for name in fields)
                continue
            assert row is not None, entity
            event_time, values = row
            for name in fields:
                ours = codec.decode_value(values[name]) if name in values else None
                seen_null |= ours is None
                assert _same(ours, sdk[name][i]), (entity, name, ours, sdk[name][i])
                stamp = sdk[f"{name}__ts"][i]
                want = stamp if isinstance(stamp, int | float) else pd.Timestamp(stamp).timestamp()
                assert event_time == pytest.approx(want)
    finally:
        await store.close()
    if view == features.USER_FEATURE_VIEW:
        assert seen_null, "the small data set has users without likes (null affinities)"


def test_the_tip_scan_holds_what_the_sdk_serves(repo: Path) -> None:
    store = open_store(StoreConfig.load(repo))
    rows = store.scan(features.TIP_FEATURE_VIEW, "tip_id", tuple(features.TIP_FIELDS))
    ids = sorted(rows)
    assert len(ids) == len(set(pd.read_parquet(repo / "data" / "tips.parquet")["tip_id"]))
    sdk = _sdk(repo, features.TIP_FEATURE_VIEW, "tip_id", ids)
    for i, tip in enumerate(ids):
        for name in features.TIP_FIELDS:
            ours = codec.decode_value(rows[tip][1][name]) if name in rows[tip][1] else None
            assert _same(ours, sdk[name][i]), (tip, name)


async def test_lookup_rows_are_the_sdks_values_in_model_order(repo: Path) -> None:
    """The policy's model-order context row for a user equals the SDK's values placed by
    scoring/features.py (a stored null as the feature's default)."""
    users = sorted(set(pd.read_parquet(repo / "data" / "users.parquet")["user_id"]))[:10]
    sdk = _sdk(repo, features.USER_FEATURE_VIEW, "user_id", users)

    lookup = FeatureLookup(open_store(StoreConfig.load(repo)), LookupPolicy(budget_s=1.0))
    await lookup.store.connect()
    try:
        got_rows = [await lookup.user(u) for u in users]
    finally:
        await lookup.close()
    for i, got in enumerate(got_rows):
        assert got is not None
        columns = {n: np.array([np.nan if sdk[n][i] is None else sdk[n][i]]) for n in sdk}
        want = features.context_from_store(columns, 1)[0]
        for j, spec in enumerate(features.CONTEXT_FEATURES):
            if np.isnan(want[j]) and spec.default is not None and spec.name in sdk:
                want[j] = spec.default
        np.testing.assert_array_equal(got.context, want)
