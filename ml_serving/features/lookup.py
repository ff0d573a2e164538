"""The lookup policy: a user's row within a time budget, no retries, a breaker; the tip view
held in memory and refreshed in the background; values the request lacks filled from the store,
then from each feature's training mean, counting what was defaulted."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from ml_serving.features import codec
from ml_serving.features.stores import OnlineStore, Row, StoreError
from ml_serving.scoring import features
from ml_serving.scoring.features import DTYPE, Float32Array, Source

logger = logging.getLogger(__name__)

MAX_ENTITY_CHARS: Final = 128
"""Longer ids are never looked up (the RPCs refuse them; a key that size is no user)."""
USER_JOIN_KEY: Final = "user_id"
TIP_JOIN_KEY: Final = "tip_id"
_USER_FIELDS: Final = tuple(features.USER_FIELDS)
_TIP_FIELDS: Final = tuple(features.TIP_FIELDS)
_PROFILE_FIELDS: Final = tuple(features.PROFILE_FIELDS)
_CONTEXT_FROM_USER: Final = tuple(
    (i, f.name, f.default)
    for i, f in enumerate(features.CONTEXT_FEATURES)
    if features.SOURCES[f.name] is Source.USER
)
_AFFINITY_COLUMN: Final = features.CANDIDATE_FEATURE_NAMES.index("topic_affinity")
_AFFINITY_DEFAULT: Final = features.TOPIC_AFFINITY_PRIOR
_UNKNOWN_CONTEXT: Final = np.full(features.N_CONTEXT, np.nan, dtype=DTYPE)
_PRIOR_AFFINITY: Final = np.full(len(features.CATEGORIES), _AFFINITY_DEFAULT)
_NEEDS_USER_CONTEXT: Final = np.array(
    [features.SOURCES[f.name] is Source.USER for f in features.CONTEXT_FEATURES]
)


@dataclass(frozen=True, slots=True)
class LookupPolicy:
    """The hot path's bounds (settings ``ML_SERVING_FEATURE_*``)."""

    budget_s: float = 0.005
    """Longest a user lookup may take; past it the call goes on with defaults."""
    breaker_failures: int = 5
    """Consecutive failed lookups that open the breaker."""
    breaker_open_s: float = 5.0
    """How long an open breaker skips lookups before one is tried again."""
    tip_refresh_s: float = 60.0
    """How often the in-memory tip view is reloaded from the store."""
    max_age_s: float = 0.0
    """A stored row older than this is treated as missing (stale); 0 keeps every row."""


class Breaker:
    """Consecutive-failure breaker: open for ``open_s`` after ``failures`` failures in a row,
    then half-open (one lookup is let through; its outcome closes or reopens it)."""

    def __init__(self, failures: int, open_s: float, clock: Callable[[], float]) -> None:
        self.failures = failures
        self.open_s = open_s
        self._clock = clock
        self._consecutive = 0
        self._open_until = 0.0
        self._trial = False

    @property
    def failing(self) -> bool:
        """True after at least one failure since the last success."""
        return self._consecutive > 0

    @property
    def is_open(self) -> bool:
        """True while lookups are being skipped."""
        return self._consecutive >= self.failures and (
            self._clock() < self._open_until or self._trial
        )

    def allow(self) -> bool:
        """Whether a lookup may be tried now (the half-open trial counts as allowed)."""
        if self._consecutive < self.failures:
            return True
        if self._trial or self._clock() < self._open_until:
            return False
        self._trial = True
        return True

    def success(self) -> None:
        self._consecutive = 0
        self._trial = False

    def abandon(self) -> None:
        """A lookup ended without an outcome (its RPC was cancelled): a half-open trial may be
        made again, instead of the breaker waiting forever on one that will never report."""
        self._trial = False

    def failure(self) -> None:
        self._consecutive += 1
        self._trial = False
        if self._consecutive >= self.failures:
            self._open_until = self._clock() + self.open_s


@dataclass(frozen=True, slots=True)
class UserFeatures:
    """One user's stored model inputs, in model order."""

    context: Float32Array
    """Shape (N_CONTEXT,): stored values (a stored null as the feature's default), NaN for the
    request-time features and whatever the store lacks."""
    affinity: npt.NDArray[np.float64]
    """Shape (len(CATEGORIES),): the user's per-category affinities (null -> the prior)."""


@dataclass(frozen=True, slots=True)
class TipTable:
    """The tip view in memory: one candidate row per tip, plus an all-NaN row for unknown ids."""

    index: Mapping[str, int]
    rows: Float32Array
    """Shape (len(index) + 1, N_CANDIDATE); ``topic_affinity`` is NaN (it is the user's)."""
    category: npt.NDArray[np.intp]
    """Category index per row, -1 when unknown."""
    loaded_at: float

    @classmethod
    def empty(cls) -> TipTable:
        return cls(
            {},
            np.full((1, features.N_CANDIDATE), np.nan, dtype=DTYPE),
            np.full(1, -1, dtype=np.intp),
            0.0,
        )


@dataclass(frozen=True, slots=True)
class Completed:
    """A Score request's values after the store and the fallbacks: what the model scores."""

    context: Float32Array
    candidates: Float32Array
    defaulted: int
    """Feature values (context values plus candidate values) that neither the request nor the
    store had: they took the feature's training mean."""


@dataclass
class FeatureLookup:
    """Reads the online store for Score and Generate; never raises because of the store."""

    store: OnlineStore
    policy: LookupPolicy = field(default_factory=LookupPolicy)
    clock: Callable[[], float] = time.time
    lookups: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    """Lookups by (view, result): hit, miss, stale, error, skipped (breaker open)."""
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    """Store errors by cause: timeout, unavailable, malformed."""
    defaults: collections.Counter[str] = field(default_factory=collections.Counter)
    """Feature values filled with training means, by group (context, candidate)."""
    tips: TipTable = field(default_factory=TipTable.empty)
    _warned: set[tuple[str, str]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.breaker = Breaker(
            self.policy.breaker_failures, self.policy.breaker_open_s, time.monotonic
        )

    # --- reading ---------------------------------------------------------------------------

    async def _row(
        self, view: str, join_key: str, entity: str, fields: Sequence[str]
    ) -> Row | None:
        if not entity or len(entity) > MAX_ENTITY_CHARS:
            self.lookups[(view, "miss")] += 1
            return None
        if not self.breaker.allow():
            self.lookups[(view, "skipped")] += 1
            return None
        try:
            row = await self.store.read(view, join_key, entity, fields, self.policy.budget_s)
        except StoreError as exc:
            self.breaker.failure()
            self.lookups[(view, "error")] += 1
            self.errors[exc.cause] += 1
            self._warn_once(view, exc.cause, str(exc))
            return None
        except asyncio.CancelledError:
            self.breaker.abandon()
            raise
        except Exception:  # a reader bug must not fail Score: default, log, count
            self.breaker.failure()
            self.lookups[(view, "error")] += 1
            self.errors["internal"] += 1
            logger.exception("feature store: lookup of %s failed", view)
            return None
        if self.breaker.failing:
            logger.info("feature store: %s answers again", view)
            self._warned.clear()  # the next outage gets its own line
        self.breaker.success()
        if row is None:
            self.lookups[(view, "miss")] += 1
            return None
        if self._stale(row[0]):
            self.lookups[(view, "stale")] += 1
            return None
        self.lookups[(view, "hit")] += 1
        return row

    def _stale(self, event_time: float | None) -> bool:
        max_age = self.policy.max_age_s
        return bool(max_age) and event_time is not None and self.clock() - event_time > max_age

    def _decode(self, view: str, name: str, data: bytes) -> codec.Scalar:
        try:
            return codec.decode_value(data)
        except codec.MalformedValue as exc:
            self.errors["malformed"] += 1
            self._warn_once(view, f"malformed {name}", str(exc))
            return None

    def _warn_once(self, view: str, what: str, detail: str) -> None:
        # One line per distinct fault, not one per call: a dead store would flood the log.
        if (view, what) not in self._warned:
            self._warned.add((view, what))
            logger.warning(
                "feature store: %s on %s: %s (further ones are counted only)", what, view, detail
            )

    def _number(self, view: str, name: str, data: bytes | None) -> float | None:
        if data is None:
            return None
        try:
            value = codec.decode_value(data)
        except codec.MalformedValue as exc:
            self.errors["malformed"] += 1
            self._warn_once(view, f"malformed {name}", str(exc))
            return None
        if value is None or isinstance(value, float):
            return value
        self.errors["malformed"] += 1
        self._warn_once(view, f"malformed {name}", f"expected a number, got {type(value).__name__}")
        return None

    async def user(self, user_id: str) -> UserFeatures | None:
        """The user's model inputs, or None when the store has none (or did not answer)."""
        view = features.USER_FEATURE_VIEW
        row = await self._row(view, USER_JOIN_KEY, user_id, _USER_FIELDS)
        if row is None:
            return None
        values = row[1]
        number = self._number
        context = _UNKNOWN_CONTEXT.copy()  # a copy of a template: a third of np.full's cost
        for i, name, default in _CONTEXT_FROM_USER:
            data = values.get(name)
            if data is None:
                continue
            got = number(view, name, data)
            if got is not None:
                context[i] = got
            elif default is not None:
                context[i] = default  # a stored null means what omission means: the default
        affinity = _PRIOR_AFFINITY.copy()
        for j, name in enumerate(features.AFFINITY_FIELDS):
            data = values.get(name)
            if data is not None:
                got = number(view, name, data)
                if got is not None:
                    affinity[j] = got
        return UserFeatures(context, affinity)

    async def profile(self, user_id: str) -> dict[str, codec.Scalar] | None:
        """The user's prompt-context fields (decoded), or None when the store has none."""
        view = features.USER_PROFILE_VIEW
        row = await self._row(view, USER_JOIN_KEY, user_id, _PROFILE_FIELDS)
        if row is None:
            return None
        return {name: self._decode(view, name, data) for name, data in row[1].items()}

    # --- the tip view ----------------------------------------------------------------------

    async def refresh_tips(self) -> bool:
        """Reload the tip view (in a thread); keeps the old table when the store fails."""
        view = features.TIP_FEATURE_VIEW
        try:
            rows = await asyncio.to_thread(self.store.scan, view, TIP_JOIN_KEY, _TIP_FIELDS)
        except StoreError as exc:
            self.errors[exc.cause] += 1
            self._warn_once(view, exc.cause, str(exc))
            return False
        self.tips = self._tip_table(rows)
        return True

    def _tip_table(self, rows: Mapping[str, Row]) -> TipTable:
        view = features.TIP_FEATURE_VIEW
        live = {k: r for k, r in rows.items() if not self._stale(r[0])}
        ids = sorted(live)
        columns: dict[str, list[float]] = {
            n: [] for n, t in features.TIP_FIELDS.items() if t != "string"
        }
        categories: list[object] = []
        for tip_id in ids:
            values = live[tip_id][1]
            for name in columns:
                number = self._number(view, name, values.get(name))
                spec_default = _tip_default(name)
                if number is None and name in values and spec_default is not None:
                    number = spec_default
                columns[name].append(np.nan if number is None else number)
            raw = values.get("category")
            categories.append(None if raw is None else self._decode(view, "category", raw))
        category = features.category_index(categories)
        table = features.candidates_from_store(
            {n: np.array(v, dtype=np.float64) for n, v in columns.items()}, category, None
        )
        unknown = np.full((1, features.N_CANDIDATE), np.nan, dtype=DTYPE)
        return TipTable(
            index={tip_id: i for i, tip_id in enumerate(ids)},
            rows=np.vstack([table, unknown]),
            category=np.append(category, -1).astype(np.intp),
            loaded_at=self.clock(),
        )

    async def watch_tips(self) -> None:
        """Connect (bounded), then reload the tip view every ``tip_refresh_s`` until cancelled."""
        await self.store.connect()
        while True:
            await self.refresh_tips()
            await asyncio.sleep(self.policy.tip_refresh_s)

    # --- filling a Score request -----------------------------------------------------------

    async def complete(
        self,
        user_id: str,
        candidate_ids: Sequence[str],
        context: Float32Array,
        candidates: Float32Array,
        fallback: tuple[Float32Array, Float32Array],
    ) -> Completed:
        """Fill what the request left NaN: from the store, then the training means."""
        missing_context = np.isnan(context)
        missing_candidates = np.isnan(candidates)
        user: UserFeatures | None = None
        if (missing_context & _NEEDS_USER_CONTEXT).any() or missing_candidates[
            :, _AFFINITY_COLUMN
        ].any():
            user = await self.user(user_id)
        if missing_candidates.any():
            table = self.tips
            unknown = len(table.index)
            index = table.index
            rows = np.array([index.get(c, unknown) for c in candidate_ids], dtype=np.intp)
            stored = table.rows[rows]  # a copy (fancy indexing)
            if user is not None:
                category = table.category[rows]
                known = category >= 0
                stored[known, _AFFINITY_COLUMN] = user.affinity[category[known]]
            candidates = np.where(missing_candidates, stored, candidates).astype(DTYPE, copy=False)
        if user is not None and missing_context.any():
            context = np.where(missing_context, user.context, context).astype(DTYPE, copy=False)
        context, in_context = self._training_means(context, fallback[0], "context")
        candidates, in_candidates = self._training_means(candidates, fallback[1], "candidate")
        return Completed(context, candidates, in_context + in_candidates)

    def _training_means(
        self, values: Float32Array, means: Float32Array, group: str
    ) -> tuple[Float32Array, int]:
        """``values`` with every NaN left replaced by its feature's training mean, and how many
        were (counted in ``defaults``)."""
        still = np.isnan(values)
        if not still.any():
            return values, 0
        n = int(still.sum())
        self.defaults[group] += n
        return np.where(still, means, values).astype(DTYPE, copy=False), n

    async def close(self) -> None:
        await self.store.close()


def _tip_default(name: str) -> float | None:
    for spec in features.CANDIDATE_FEATURES:
        if spec.name == name:
            return spec.default
    return None
