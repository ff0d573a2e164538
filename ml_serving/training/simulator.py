"""Synthetic tip-interaction simulator with a documented ground-truth reaction probability."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ml_serving.scoring import features
from ml_serving.scoring.features import DTYPE, Float32Array, Float64Array

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


def _stack(group: features.Group, columns: Mapping[str, npt.NDArray[Any]]) -> Float64Array:
    """The group's feature matrix from columns named like its features, in model order.

    A feature with no column (one added to features.py but not simulated), or a column no
    feature has, stops the run: it can never train on an unset column.
    """
    names = [f.name for f in features.specs(group)]
    missing = [n for n in names if n not in columns]
    extra = [n for n in columns if n not in names]
    if missing or extra:
        raise ValueError(
            f"simulator {group.value} columns do not match the features: "
            f"missing {missing}, unknown {extra}"
        )
    return np.column_stack([np.asarray(columns[n], dtype=np.float64) for n in names])


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
    * Each user makes ``1 + Poisson(mean_extra_requests)`` requests; each request shows
      ``candidates_per_request`` distinct tips drawn uniformly from the catalogue.

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
    seed fixes every row bit for bit.
    """
    cfg = config or SimulatorConfig()
    rng = np.random.Generator(np.random.PCG64(seed))
    n_cat = len(features.CATEGORIES)

    # --- users -----------------------------------------------------------------------------
    nu = cfg.n_users
    is_new = rng.random(nu) < cfg.new_user_share
    tenure = np.where(
        is_new,
        rng.integers(0, NEW_USER_TENURE_DAYS, nu),
        NEW_USER_TENURE_DAYS
        + np.floor(np.minimum(rng.lognormal(math.log(150.0), 1.0, nu), 3000.0)),
    )
    activity = rng.lognormal(math.log(0.8), 0.6, nu)  # sessions per day
    z_user = rng.normal(0.0, 0.5, nu)
    pref = rng.dirichlet(np.full(n_cat, 0.7), nu)
    history_days = np.minimum(tenure, 30.0)
    # Like rate over the last 30 days: binomial evidence of the propensity.
    seen_30d = rng.poisson(history_days * activity * 2.0)
    likes_30d = rng.binomial(seen_30d, 1.0 / (1.0 + _exp(2.2 - 1.5 * z_user)))
    like_rate = np.where(
        seen_30d > 0,
        (likes_30d + features.LIKE_RATE_SMOOTHING * features.LIKE_RATE_PRIOR)
        / (seen_30d + features.LIKE_RATE_SMOOTHING),
        np.nan,
    )
    # Topic affinity: share of all past likes per category, shrunk towards uniform.
    past_likes = rng.poisson(np.minimum(tenure, 365.0) * activity * 0.15)
    cat_likes = rng.multinomial(past_likes, pref)
    with np.errstate(invalid="ignore", divide="ignore"):
        affinity = np.where(
            past_likes[:, None] > 0,
            (cat_likes + 0.4) / (past_likes[:, None] + 2.0),
            np.nan,
        )

    # --- tips --------------------------------------------------------------------------------
    nt = cfg.n_tips
    category = rng.integers(0, n_cat, nt)
    length = np.clip(rng.lognormal(math.log(180.0), 0.45, nt), 40.0, 700.0).round()
    age = np.floor(rng.exponential(90.0, nt))
    readability = np.clip(rng.normal(60.0, 15.0, nt), 5.0, 100.0).round(1)
    has_action = (rng.random(nt) < 0.6).astype(np.float64)
    q_tip = rng.normal(0.0, 0.6, nt)
    past_impr = rng.poisson(np.minimum(age, 180.0) * 8.0)
    past_clicks = rng.binomial(past_impr, 1.0 / (1.0 + _exp(2.2 - q_tip)))
    with np.errstate(invalid="ignore", divide="ignore"):
        prior_ctr = np.where(
            past_impr > 0,
            (past_clicks + 2.0 * features.TIP_CTR_PRIOR) / (past_impr + 2.0),
            np.nan,
        )

    # --- requests and impressions -----------------------------------------------------------
    n_req_per_user = 1 + rng.poisson(cfg.mean_extra_requests, nu)
    req_user = np.repeat(np.arange(nu), n_req_per_user)
    nr = len(req_user)
    # Local hour: a morning and an evening peak.
    hour = (
        np.where(rng.random(nr) < 0.5, rng.normal(8.5, 2.0, nr), rng.normal(20.0, 2.5, nr)) % 24.0
    )
    sessions = rng.poisson(activity[req_user] * 7.0)
    tips_seen = rng.poisson(sessions * 2.5)
    streak = np.minimum(rng.geometric(0.12, nr) - 1, tenure[req_user]).astype(np.float64)
    streak[rng.random(nr) < 0.4] = 0.0
    k = cfg.candidates_per_request
    # argpartition finds the same k tips everywhere but lists them in an order that depends on
    # the CPU's sort kernel (AVX-512 against AVX2, measured): sorted, every machine agrees.
    shown = np.sort(np.argpartition(rng.random((nr, nt)), k, axis=1)[:, :k], axis=1)

    row_req = np.repeat(np.arange(nr), k)
    u = req_user[row_req]
    t = shown.ravel()
    n = len(t)

    ctx = _stack(
        features.Group.CONTEXT,
        {
            "tenure_days": tenure[u],
            "sessions_7d": sessions[row_req],
            "tips_seen_7d": tips_seen[row_req],
            "like_rate_30d": like_rate[u],
            "streak_days": streak[row_req],
            "is_new_user": is_new[u],
            "local_hour_sin": np.sin(2 * np.pi * hour[row_req] / 24.0),
            "local_hour_cos": np.cos(2 * np.pi * hour[row_req] / 24.0),
        },
    )
    onehot = np.eye(n_cat)[category[t]]
    cand = _stack(
        features.Group.CANDIDATE,
        {
            **{f"category_{name}": onehot[:, j] for j, name in enumerate(features.CATEGORIES)},
            "tip_length_chars": length[t],
            "tip_age_days": age[t],
            "tip_prior_ctr": prior_ctr[t],
            "readability": readability[t],
            "has_action_step": has_action[t],
            "topic_affinity": affinity[u, category[t]],
        },
    )

    true_prob = 1.0 / (
        1.0
        + _exp(
            -true_logit(
                q_tip=q_tip[t],
                z_user=z_user[u],
                pref_of_category=pref[u, category[t]],
                category=category[t],
                sessions_7d=sessions[row_req],
                tips_seen_7d=tips_seen[row_req],
                streak_days=streak[row_req],
                tip_age_days=age[t],
                tip_length_chars=length[t],
                readability=readability[t],
                has_action_step=has_action[t],
                local_hour=hour[row_req],
                is_new_user=is_new[u].astype(np.float64),
            )
        )
    )
    labels = (rng.random(n) < true_prob).astype(np.int8)
    return Interactions(
        context=ctx.astype(DTYPE),
        candidates=cand.astype(DTYPE),
        labels=labels,
        segment=is_new[u],
        true_prob=true_prob,
        user_id=u.astype(np.int64),
        request_id=row_req.astype(np.int64),
    )


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
