"""The lookup policy on a scripted store: stored nulls mean the feature's default, malformed
values and stale rows default (counted, logged once), the breaker opens and half-opens, and
complete() fills what a request left out: request, store, then training means."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pytest
from feast.protos.feast.types.Value_pb2 import Value

from ml_serving.features.lookup import Breaker, FeatureLookup, LookupPolicy
from ml_serving.features.stores import Row, StoreError
from ml_serving.scoring import features

NOW = 1_800_000_000.0


def _v(**kw: object) -> bytes:
    return Value(**kw).SerializeToString()  # type: ignore[arg-type]


USER: dict[str, bytes] = {
    "tenure_days": _v(int64_val=120),
    "sessions_7d": _v(int64_val=9),
    "tips_seen_7d": _v(int64_val=20),
    "streak_days": _v(int64_val=3),
    "like_rate_30d": _v(),  # null: the user saw no tips -> the feature's default
    "is_new_user": _v(int64_val=0),
    "affinity_health": _v(double_val=0.6),
    "affinity_productivity": _v(),
}
TIP: dict[str, bytes] = {
    "category": _v(string_val="health"),
    "tip_length_chars": _v(int64_val=140),
    "tip_age_days": _v(int64_val=12),
    "tip_prior_ctr": _v(double_val=0.2),
    "readability": _v(double_val=70.0),
    "has_action_step": _v(int64_val=1),
}


class ScriptedStore:
    """Answers from dicts; `fail` makes every read raise that cause."""

    def __init__(self) -> None:
        self.users: dict[str, Row] = {"u1": (NOW - 60, dict(USER))}
        self.tips: dict[str, Row] = {"t1": (NOW - 60, dict(TIP))}
        self.fail: str | None = None
        self.reads = 0

    async def read(
        self, view: str, join_key: str, entity: str, fields: Sequence[str], timeout_s: float
    ) -> Row | None:
        self.reads += 1
        if self.fail:
            raise StoreError(self.fail, f"scripted {self.fail}")
        return self.users.get(entity)

    def scan(self, view: str, join_key: str, fields: Sequence[str]) -> dict[str, Row]:
        return dict(self.tips)

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None


def _lookup(store: ScriptedStore, **policy: float) -> FeatureLookup:
    return FeatureLookup(store, LookupPolicy(**policy), clock=lambda: NOW)  # type: ignore[arg-type]


def _index(name: str) -> int:
    return features.CONTEXT_FEATURE_NAMES.index(name)


async def test_a_users_row_in_model_order_with_nulls_as_defaults() -> None:
    lookup = _lookup(ScriptedStore())
    got = await lookup.user("u1")
    assert got is not None
    assert got.context[_index("tenure_days")] == 120
    assert got.context[_index("like_rate_30d")] == pytest.approx(features.LIKE_RATE_PRIOR)
    assert np.isnan(got.context[_index("local_hour_sin")])  # request-time: never stored
    assert got.affinity[0] == 0.6
    assert got.affinity[1] == features.TOPIC_AFFINITY_PRIOR
    assert lookup.lookups[(features.USER_FEATURE_VIEW, "hit")] == 1


async def test_a_malformed_value_is_a_default_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = ScriptedStore()
    store.users["u1"][1]["sessions_7d"] = b"\xff\xff"
    lookup = _lookup(store)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            got = await lookup.user("u1")
            assert got is not None and np.isnan(got.context[_index("sessions_7d")])
    assert lookup.errors["malformed"] == 3
    assert sum("malformed sessions_7d" in r.getMessage() for r in caplog.records) == 1


async def test_rows_older_than_the_max_age_are_stale() -> None:
    store = ScriptedStore()
    store.users["u1"] = (NOW - 7200, dict(USER))
    assert await _lookup(store, max_age_s=3600).user("u1") is None
    assert await _lookup(store, max_age_s=0).user("u1") is not None  # 0 keeps every row


async def test_the_breaker_opens_after_failures_and_half_opens() -> None:
    clock = [0.0]
    breaker = Breaker(3, 5.0, lambda: clock[0])
    for _ in range(3):
        assert breaker.allow()
        breaker.failure()
    assert breaker.is_open and not breaker.allow()
    clock[0] = 5.1
    assert breaker.allow()  # the one trial
    assert not breaker.allow()  # no second one while it runs
    breaker.success()
    assert not breaker.is_open and breaker.allow()


async def test_a_failing_store_skips_lookups_once_the_breaker_is_open() -> None:
    store = ScriptedStore()
    store.fail = "unavailable"
    lookup = _lookup(store, breaker_failures=2, breaker_open_s=60)
    for _ in range(5):
        assert await lookup.user("u1") is None
    assert store.reads == 2
    assert lookup.errors["unavailable"] == 2
    assert lookup.lookups[(features.USER_FEATURE_VIEW, "skipped")] == 3


async def test_complete_fills_request_gaps_from_store_then_training_means() -> None:
    store = ScriptedStore()
    lookup = _lookup(store)
    assert await lookup.refresh_tips()
    nan = np.float32(np.nan)
    context = np.full(features.N_CONTEXT, nan, dtype=np.float32)
    context[_index("local_hour_sin")] = 0.5
    context[_index("local_hour_cos")] = 0.8
    context[_index("tenure_days")] = 999  # sent: wins over the store's 120
    candidates = np.full((2, features.N_CANDIDATE), nan, dtype=np.float32)
    fallback = (
        np.arange(features.N_CONTEXT, dtype=np.float32) + 100,
        np.arange(features.N_CANDIDATE, dtype=np.float32) + 200,
    )
    done = await lookup.complete("u1", ["t1", "unknown-tip"], context, candidates, fallback)
    assert done.context[_index("tenure_days")] == 999
    assert done.context[_index("sessions_7d")] == 9
    names = features.CANDIDATE_FEATURE_NAMES
    assert done.candidates[0, names.index("category_health")] == 1.0
    assert done.candidates[0, names.index("topic_affinity")] == pytest.approx(0.6)
    np.testing.assert_array_equal(done.candidates[1], fallback[1])  # the unknown tip
    assert done.defaulted == features.N_CANDIDATE
    assert not np.isnan(done.context).any() and not np.isnan(done.candidates).any()
