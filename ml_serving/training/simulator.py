"""Synthetic tip-interaction simulator with a documented ground-truth reaction probability."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ml_serving.scoring import features
from ml_serving.scoring.features import Float32Array, Float64Array

logger = logging.getLogger(__name__)


def _libm(fn: Callable[[float], float]) -> Callable[[npt.ArrayLike], Float64Array]:
    """``fn`` element by element through the C library, as a float64 array.

    numpy dispatches exp, log and log1p to SIMD kernels chosen by the CPU, whose results differ
    from one CPU to another in the last bit (AVX-512 against AVX2, measured); a random draw that
    compares against such a value (a binomial's rejection step, a label's threshold) then turns
    out differently, and the same seed no longer gives the same rows everywhere. The C library's
    functions give the same bits on every x86-64 machine (and the AVX2 kernels agree with them).
    """
    ufunc = np.frompyfunc(fn, 1, 1)

    def apply(x: npt.ArrayLike) -> Float64Array:
        result: Float64Array = np.asarray(ufunc(np.asarray(x, dtype=np.float64)), dtype=np.float64)
        return result

    return apply


_exp = _libm(math.exp)
_log = _libm(math.log)
_log1p = _libm(math.log1p)

SHIPPED_SEED: Final = 20240611
"""Seed of the shipped model's data (models/tips-ranker/1) and of the embedded feature store."""
NEW_USER_TENURE_DAYS: Final = 14
"""Users with a tenure below this are in the ``is_new_user`` segment."""


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """Sizes and mix of the simulated population."""

    n_users: int = 5000
    n_tips: int = 600
    candidates_per_request: int = 20
    mean_extra_requests: float = 2.0
    new_user_share: float = 0.25


@dataclass(frozen=True, slots=True)
class Interactions:
    """Simulated impressions, one row per (request, shown tip).

    ``context`` and ``candidates`` are raw feature values in ``features`` model order, float32,
    with NaN where the feature store has no value (apply ``features.fill_defaults``).
    """

    context: Float32Array
    """Shape (n, N_CONTEXT)."""
    candidates: Float32Array
    """Shape (n, N_CANDIDATE)."""
    labels: npt.NDArray[np.int8]
    """1 for a positive reaction (click or like), else 0."""
    segment: npt.NDArray[np.bool_]
    """True for new users (the fairness segment)."""
    true_prob: Float64Array
    """The ground-truth probability each label was drawn from."""
    user_id: npt.NDArray[np.int64]
    request_id: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, mask: npt.NDArray[np.bool_]) -> Interactions:
        """The rows where ``mask`` is true."""
        return Interactions(
            self.context[mask],
            self.candidates[mask],
            self.labels[mask],
            self.segment[mask],
            self.true_prob[mask],
            self.user_id[mask],
            self.request_id[mask],
        )


def simulate(seed: int, config: SimulatorConfig | None = None) -> Interactions:
    """Draw a data set of impressions with labels from a known ground truth.

    The world
    ---------
    * ``n_users`` users; a share ``new_user_share`` signed up less than 14 days ago (the segment
      ``is_new_user`` used by the fairness check). Each user has latent traits: an activity level, a
      reaction propensity ``z_user ~ N(0, 0.5)`` and true category preferences
      ``pref ~ Dirichlet(0.7, ..., 0.7)`` over the five categories.
    * A catalogue of ``n_tips`` tips, each with a category, a length, an age, a readability score,
      an action-step flag and a latent quality ``q_tip ~ N(0, 0.6)``.
    * Each user makes ``1 + Poisson(mean_extra_requests)`` requests, each at a time of one day of
      the ``WINDOW_DAYS``-day window (after sign-up); each shows ``candidates_per_request``
      distinct tips drawn uniformly from the catalogue. What changes from day to day (tenure,
      sessions, tips seen, streak, a tip's age) is a daily snapshot; a request sees its day's.

    What the model sees is noisy evidence of the latent traits, as a feature store would hold it:
    ``tip_prior_ctr`` is a smoothed click rate from the tip's past impressions (a noisy view of
    ``q_tip``), ``like_rate_30d`` is a smoothed binomial estimate of the user's propensity, and
    ``topic_affinity`` is the share of the user's past likes in the tip's category (a noisy view of
    ``pref``). Users without history have those features missing (NaN), which training fills with
    the defaults of ``ml_serving.scoring.features``, as serving does when the caller omits them.

    Ground truth
    ------------
    ``P(positive reaction) = sigmoid(true_logit)`` with, for every impression (``L`` = ln(length /
    180), ``R`` = (readability - 60) / 15, ``h`` = local hour, ``new`` = is_new_user)::

        true_logit = -2.45
            + 1.0 * q_tip + 0.9 * z_user + 3.0 * (pref[category] - 0.2)
            + 0.25 * ln(1 + sessions_7d) - 0.15 * ln(1 + tips_seen_7d) + 0.15 * ln(1 + streak_days)
            - 0.10 * ln(1 + tip_age_days) - 0.35 * L**2 + 0.12 * R + 0.15 * has_action_step
            + 0.45 * health * cos(2 pi (h - 7) / 24) + 0.30 * productivity * cos(2 pi (h - 11) / 24)
            + new * (-0.25 + 0.55 * has_action_step - 0.50 * L + 0.15 * R)

    so new users favour short, easy, actionable tips, and the time of day matters per category. The
    quadratic length term and the latent traits are out of the model's reach: the held-out AUC of
    ``true_prob`` itself (the oracle) is the ceiling any model can reach on this data.

    Everything is drawn from one ``numpy.random.Generator(PCG64(seed))`` in a fixed order, so a
    seed fixes every row bit for bit. These rows are what the feature store's point-in-time
    join must give back from ``simulate_events``' tables (tests/unit/test_feature_repo.py).
    """
    return _world(seed, config or SimulatorConfig())[1]


def true_logit(
    *,
    q_tip: Float64Array,
    z_user: Float64Array,
    pref_of_category: Float64Array,
    category: npt.NDArray[np.int64],
    sessions_7d: npt.NDArray[np.int64],
    tips_seen_7d: npt.NDArray[np.int64],
    streak_days: Float64Array,
    tip_age_days: Float64Array,
    tip_length_chars: Float64Array,
    readability: Float64Array,
    has_action_step: Float64Array,
    local_hour: Float64Array,
    is_new_user: Float64Array,
) -> Float64Array:
    """The ground-truth log-odds of a positive reaction (the formula in ``simulate``)."""
    length_term = _log(tip_length_chars / 180.0)
    read_term = (readability - 60.0) / 15.0
    health = (category == features.CATEGORIES.index("health")).astype(np.float64)
    productivity = (category == features.CATEGORIES.index("productivity")).astype(np.float64)
    logit: Float64Array = (
        -2.45
        + 1.0 * q_tip
        + 0.9 * z_user
        + 3.0 * (pref_of_category - 0.2)
        + 0.25 * _log1p(sessions_7d)
        - 0.15 * _log1p(tips_seen_7d)
        + 0.15 * _log1p(streak_days)
        - 0.10 * _log1p(tip_age_days)
        - 0.35 * length_term**2
        + 0.12 * read_term
        + 0.15 * has_action_step
        + 0.45 * health * np.cos(2 * np.pi * (local_hour - 7.0) / 24.0)
        + 0.30 * productivity * np.cos(2 * np.pi * (local_hour - 11.0) / 24.0)
        + is_new_user * (-0.25 + 0.55 * has_action_step - 0.50 * length_term + 0.15 * read_term)
    )
    return logit


# --- the same world as timestamped event tables, for the feature store --------------------------

WINDOW_START: Final = "2026-01-01T00:00:00+00:00"
"""UTC start of the simulated window: fixed, so a seed fixes every timestamp too."""
WINDOW_DAYS: Final = 7
"""Days simulated; user and tip snapshots are written at 00:00 UTC of each day."""
LOCALES: Final = ("en-US", "en-GB", "de-DE", "fr-FR", "es-ES")


@dataclass(frozen=True, slots=True)
class EventTables:
    """What a product's data platform would hold, as pandas DataFrames (UTC timestamps).

    ``users``: one snapshot per user and day (``user_id``, ``event_timestamp``, the fields of
    ``features.USER_FIELDS`` and ``features.PROFILE_FIELDS``), null where there is no evidence.
    ``tips``: one snapshot per tip and day (``tip_id``, ``event_timestamp``, ``TIP_FIELDS``).
    ``impressions``: one row per shown tip (``user_id``, ``tip_id``, ``event_timestamp``,
    ``request_id``, ``local_hour``, ``label``, ``true_prob``): the labels, whose features come
    from the views as of ``event_timestamp`` (point in time).
    """

    users: Any
    tips: Any
    impressions: Any


def user_key(index: npt.ArrayLike) -> list[str]:
    """Entity keys of simulated users (``user-17``), as the recommender would send them."""
    return [f"user-{i}" for i in np.asarray(index).tolist()]


def tip_key(index: npt.ArrayLike) -> list[str]:
    """Entity keys of simulated tips (``tip-3``)."""
    return [f"tip-{i}" for i in np.asarray(index).tolist()]


def simulate_events(seed: int, config: SimulatorConfig | None = None) -> EventTables:
    """The world of ``simulate`` as the event tables a data platform holds: daily user and tip
    snapshots and timestamped impressions with their labels (local time is UTC here)."""
    return _world(seed, config or SimulatorConfig())[0]


def _world(seed: int, cfg: SimulatorConfig) -> tuple[EventTables, Interactions]:
    import pandas as pd

    rng = np.random.Generator(np.random.PCG64(seed))
    n_cat = len(features.CATEGORIES)
    days = WINDOW_DAYS
    start = pd.Timestamp(WINDOW_START)

    # --- users (tenure as of the last day) ------------------------------------------------
    nu = cfg.n_users
    is_new_end = rng.random(nu) < cfg.new_user_share
    tenure_end = np.where(
        is_new_end,
        rng.integers(0, NEW_USER_TENURE_DAYS, nu),
        NEW_USER_TENURE_DAYS
        + np.floor(np.minimum(rng.lognormal(math.log(150.0), 1.0, nu), 3000.0)),
    ).astype(np.int64)
    signup_day = np.maximum(days - 1 - tenure_end, 0)  # first day of the window they exist
    activity = rng.lognormal(math.log(0.8), 0.6, nu)
    z_user = rng.normal(0.0, 0.5, nu)
    pref = rng.dirichlet(np.full(n_cat, 0.7), nu)
    history_days = np.minimum(tenure_end, 30.0)
    seen_30d = rng.poisson(history_days * activity * 2.0)
    likes_30d = rng.binomial(seen_30d, 1.0 / (1.0 + _exp(2.2 - 1.5 * z_user)))
    like_rate = np.where(
        seen_30d > 0,
        (likes_30d + features.LIKE_RATE_SMOOTHING * features.LIKE_RATE_PRIOR)
        / (seen_30d + features.LIKE_RATE_SMOOTHING),
        np.nan,
    )
    past_likes = rng.poisson(np.minimum(tenure_end, 365.0) * activity * 0.15)
    cat_likes = rng.multinomial(past_likes, pref)
    with np.errstate(invalid="ignore", divide="ignore"):
        affinity = np.where(
            past_likes[:, None] > 0, (cat_likes + 0.4) / (past_likes[:, None] + 2.0), np.nan
        )
    locale = rng.integers(0, len(LOCALES), nu)

    # --- daily user snapshots ---------------------------------------------------------------
    snap_user = np.repeat(np.arange(nu), days)
    snap_day = np.tile(np.arange(days), nu)
    exists = snap_day >= signup_day[snap_user]
    snap_user, snap_day = snap_user[exists], snap_day[exists]
    ns = len(snap_user)
    tenure = tenure_end[snap_user] - (days - 1 - snap_day)
    sessions = rng.poisson(activity[snap_user] * 7.0)
    tips_seen = rng.poisson(sessions * 2.5)
    streak = np.minimum(rng.geometric(0.12, ns) - 1, tenure)
    streak[rng.random(ns) < 0.4] = 0
    snap_index = {
        (int(u), int(d)): i for i, (u, d) in enumerate(zip(snap_user, snap_day, strict=True))
    }

    # --- tips (age as of the last day; every tip exists through the window) ------------------
    nt = cfg.n_tips
    category = rng.integers(0, n_cat, nt)
    length = np.clip(rng.lognormal(math.log(180.0), 0.45, nt), 40.0, 700.0).round()
    age_end = days + np.floor(rng.exponential(90.0, nt))
    readability = np.clip(rng.normal(60.0, 15.0, nt), 5.0, 100.0).round(1)
    has_action = (rng.random(nt) < 0.6).astype(np.float64)
    q_tip = rng.normal(0.0, 0.6, nt)
    past_impr = rng.poisson(np.minimum(age_end, 180.0) * 8.0)
    past_clicks = rng.binomial(past_impr, 1.0 / (1.0 + _exp(2.2 - q_tip)))
    with np.errstate(invalid="ignore", divide="ignore"):
        prior_ctr = np.where(
            past_impr > 0,
            (past_clicks + 2.0 * features.TIP_CTR_PRIOR) / (past_impr + 2.0),
            np.nan,
        )
    recent = rng.integers(0, nt, (nu, 2))

    # --- requests and impressions -----------------------------------------------------------
    n_req_per_user = 1 + rng.poisson(cfg.mean_extra_requests, nu)
    req_user = np.repeat(np.arange(nu), n_req_per_user)
    nr = len(req_user)
    span = days - signup_day[req_user]
    req_day = signup_day[req_user] + np.floor(rng.random(nr) * span).astype(np.int64)
    hour = (
        np.where(rng.random(nr) < 0.5, rng.normal(8.5, 2.0, nr), rng.normal(20.0, 2.5, nr)) % 24.0
    )
    k = cfg.candidates_per_request
    shown = np.sort(np.argpartition(rng.random((nr, nt)), k, axis=1)[:, :k], axis=1)
    req_snap = np.array(
        [snap_index[(int(u), int(d))] for u, d in zip(req_user, req_day, strict=True)]
    )

    row_req = np.repeat(np.arange(nr), k)
    u = req_user[row_req]
    s = req_snap[row_req]
    t = shown.ravel()
    n = len(t)
    tip_age = age_end[t] - (days - 1 - req_day[row_req])
    true_prob = 1.0 / (
        1.0
        + _exp(
            -true_logit(
                q_tip=q_tip[t],
                z_user=z_user[u],
                pref_of_category=pref[u, category[t]],
                category=category[t],
                sessions_7d=sessions[s],
                tips_seen_7d=tips_seen[s],
                streak_days=streak[s].astype(np.float64),
                tip_age_days=tip_age,
                tip_length_chars=length[t],
                readability=readability[t],
                has_action_step=has_action[t],
                local_hour=hour[row_req],
                is_new_user=(tenure[s] < NEW_USER_TENURE_DAYS).astype(np.float64),
            )
        )
    )
    labels = (rng.random(n) < true_prob).astype(np.int64)

    day_ts = start + pd.to_timedelta(np.arange(days), unit="D")
    interests = [
        [features.CATEGORIES[j] for j in np.argsort(-pref[i], kind="stable")[:2]] for i in range(nu)
    ]
    users = pd.DataFrame(
        {
            "user_id": user_key(snap_user),
            "event_timestamp": day_ts[snap_day],
            "tenure_days": tenure,
            "sessions_7d": sessions,
            "tips_seen_7d": tips_seen,
            "streak_days": streak,
            "like_rate_30d": like_rate[snap_user],
            "is_new_user": (tenure < NEW_USER_TENURE_DAYS).astype(np.int64),
            **{f: affinity[snap_user, j] for j, f in enumerate(features.AFFINITY_FIELDS)},
            "interests": [interests[i] for i in snap_user],
            "experience_level": np.where(
                tenure < NEW_USER_TENURE_DAYS,
                "beginner",
                np.where(tenure < 180, "intermediate", "advanced"),
            ),
            "locale": np.array(LOCALES)[locale[snap_user]],
            "recent_tips": [
                [f"a {features.CATEGORIES[category[j]]} tip ({tip_key([j])[0]})" for j in recent[i]]
                for i in snap_user
            ],
        }
    )
    tip_day = np.tile(np.arange(days), nt)
    tip_of = np.repeat(np.arange(nt), days)
    tips = pd.DataFrame(
        {
            "tip_id": tip_key(tip_of),
            "event_timestamp": day_ts[tip_day],
            "category": np.array(features.CATEGORIES)[category[tip_of]],
            "tip_length_chars": length[tip_of].astype(np.int64),
            "tip_age_days": (age_end[tip_of] - (days - 1 - tip_day)).astype(np.int64),
            "tip_prior_ctr": prior_ctr[tip_of],
            "readability": readability[tip_of],
            "has_action_step": has_action[tip_of].astype(np.int64),
        }
    )
    impressions = pd.DataFrame(
        {
            "user_id": user_key(u),
            "tip_id": tip_key(t),
            "event_timestamp": day_ts[req_day[row_req]]
            + pd.to_timedelta(hour[row_req] * 3600.0, unit="s").round("s"),
            "request_id": row_req.astype(np.int64),
            "local_hour": hour[row_req],
            "label": labels,
            "true_prob": true_prob,
        }
    )
    # The rows a point-in-time join must give: each impression with its own day's snapshots.
    user_columns = {
        name: np.asarray(users[name], dtype=np.float64)[s] for name in features.USER_FIELDS
    }
    context = features.context_from_store(user_columns, n)
    sin, cos = features.local_hour_features(hour[row_req])
    context[:, features.CONTEXT_FEATURE_NAMES.index("local_hour_sin")] = sin
    context[:, features.CONTEXT_FEATURE_NAMES.index("local_hour_cos")] = cos
    tip_row = t * days + (req_day[row_req])
    tip_columns = {
        name: np.asarray(tips[name], dtype=np.float64)[tip_row]
        for name, kind in features.TIP_FIELDS.items()
        if kind != "string"
    }
    candidates = features.candidates_from_store(
        tip_columns,
        category[t].astype(np.intp),
        np.column_stack([user_columns[f] for f in features.AFFINITY_FIELDS]),
    )
    rows = Interactions(
        context=context,
        candidates=candidates,
        labels=labels.astype(np.int8),
        segment=context[:, features.CONTEXT_FEATURE_NAMES.index("is_new_user")] == 1.0,
        true_prob=true_prob,
        user_id=u.astype(np.int64),
        request_id=row_req.astype(np.int64),
    )
    return EventTables(users=users, tips=tips, impressions=impressions), rows


def write_event_tables(tables: EventTables, directory: Path) -> dict[str, Path]:
    """Write the tables as Parquet files (``users``, ``tips``, ``impressions``) for Feast."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in ("users", "tips", "impressions"):
        path = directory / f"{name}.parquet"
        getattr(tables, name).to_parquet(path, index=False)
        paths[name] = path
    return paths
