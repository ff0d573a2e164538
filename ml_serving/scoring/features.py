"""The one feature definition shared by training and serving: names, order, defaults, transforms."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

DTYPE: Final = np.float32
"""Dtype of raw feature values: what the wire carries (proto ``float``) and what training stores.

Arithmetic after alignment (transforms, matrix product) runs in float64; rounding every raw value
to float32 first means training rows and serving rows see the same numbers.
"""

Float32Array = npt.NDArray[np.float32]
Float64Array = npt.NDArray[np.float64]

Z_CLIP: Final = 8.0
"""Normalised values are clipped to [-Z_CLIP, Z_CLIP].

No training row gets near it (the tests check); it bounds what an absurd but finite input (a
readability of 1e30) can do to a score, identically in training and serving.
"""

LIKE_RATE_PRIOR: Final = 0.10
"""Population like rate: the default ``like_rate_30d`` of a user shown no tips in 30 days."""

LIKE_RATE_SMOOTHING: Final = 5.0
"""Pseudo-impressions in ``like_rate_30d = (likes + 5 * 0.10) / (seen + 5)``.

Smoothing keeps a user with one like out of one tip from looking like a fan (a raw 1/1 sat eight
standard deviations out); with no tips seen the formula gives the prior, which is the default.
"""

TIP_CTR_PRIOR: Final = 0.10
"""Catalogue-wide click rate: the default ``tip_prior_ctr`` of a tip with no impressions yet."""

CATEGORIES: Final = ("health", "productivity", "finance", "learning", "relationships")
"""Tip categories, one-hot encoded as ``category_<name>`` candidate features."""

TOPIC_AFFINITY_PRIOR: Final = 1.0 / len(CATEGORIES)
"""Default ``topic_affinity``: a user with no like history likes every category alike."""


class Group(StrEnum):
    """Which part of a Score request a feature travels in."""

    CONTEXT = "context"
    CANDIDATE = "candidate"


class Transform(StrEnum):
    """Fixed, stateless transform applied to a raw value before z-scoring."""

    IDENTITY = "identity"
    LOG1P = "log1p"
    """``log1p(max(x, 0))``: for counts and durations; a negative count is treated as zero."""


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """One named model input.

    ``default`` is the raw value used when a caller omits the feature; ``None`` makes the feature
    required (omitting it is an INVALID_ARGUMENT, never a silent zero). ``standardize`` says
    whether a z-score (mean/std fitted at training, stored in the model artefact) follows the
    transform; flags and one-hots stay 0/1 so their crosses read as "only for this segment".
    """

    name: str
    group: Group
    description: str
    transform: Transform = Transform.IDENTITY
    standardize: bool = True
    default: float | None = None

    @property
    def required(self) -> bool:
        """True when the caller must send this feature."""
        return self.default is None


_C = Group.CONTEXT
_T = Group.CANDIDATE

CONTEXT_FEATURES: Final[tuple[FeatureSpec, ...]] = (
    FeatureSpec("tenure_days", _C, "Days since the user signed up.", Transform.LOG1P),
    FeatureSpec("sessions_7d", _C, "App sessions in the last 7 days.", Transform.LOG1P),
    FeatureSpec("tips_seen_7d", _C, "Tips shown to the user in the last 7 days.", Transform.LOG1P),
    FeatureSpec(
        "streak_days",
        _C,
        "Length of the user's current daily-use streak; omit when there is no active streak.",
        Transform.LOG1P,
        default=0.0,
    ),
    FeatureSpec(
        "like_rate_30d",
        _C,
        "Smoothed like rate over the last 30 days, (likes + 0.5) / (tips seen + 5); omit "
        "when the user saw no tips.",
        default=LIKE_RATE_PRIOR,
    ),
    FeatureSpec(
        "is_new_user",
        _C,
        "1 when the user signed up less than 14 days ago, else 0 (the fairness segment).",
        standardize=False,
    ),
    FeatureSpec(
        "local_hour_sin",
        _C,
        "sin(2*pi*h/24) of the user's local hour h (fractional).",
        standardize=False,
    ),
    FeatureSpec(
        "local_hour_cos",
        _C,
        "cos(2*pi*h/24) of the user's local hour h (fractional).",
        standardize=False,
    ),
)
"""User context features, in model order."""

CANDIDATE_FEATURES: Final[tuple[FeatureSpec, ...]] = (
    *(
        FeatureSpec(
            f"category_{c}", _T, f"1 when the tip's category is {c}, else 0.", standardize=False
        )
        for c in CATEGORIES
    ),
    FeatureSpec("tip_length_chars", _T, "Length of the tip text in characters.", Transform.LOG1P),
    FeatureSpec("tip_age_days", _T, "Days since the tip was published.", Transform.LOG1P),
    FeatureSpec(
        "tip_prior_ctr",
        _T,
        "Smoothed historical click rate of the tip over all users; omit for a tip never shown.",
        default=TIP_CTR_PRIOR,
    ),
    FeatureSpec(
        "readability", _T, "Flesch reading ease of the tip text (0-100, higher is easier)."
    ),
    FeatureSpec(
        "has_action_step",
        _T,
        "1 when the tip ends in one concrete action to take, else 0.",
        standardize=False,
    ),
    FeatureSpec(
        "topic_affinity",
        _T,
        "Share of the user's past likes in this tip's category; omit for a user with no likes.",
        default=TOPIC_AFFINITY_PRIOR,
    ),
)
"""Per-candidate tip features, in model order."""

CONTEXT_FEATURE_NAMES: Final = tuple(f.name for f in CONTEXT_FEATURES)
"""Context feature names in model order."""
CANDIDATE_FEATURE_NAMES: Final = tuple(f.name for f in CANDIDATE_FEATURES)
"""Candidate feature names in model order."""
N_CONTEXT: Final = len(CONTEXT_FEATURES)
"""Number of context features."""
N_CANDIDATE: Final = len(CANDIDATE_FEATURES)
"""Number of candidate features."""


@dataclass(frozen=True, slots=True)
class Cross:
    """A product of one normalised context feature and one normalised candidate feature."""

    context: str
    candidate: str

    @property
    def name(self) -> str:
        """Design-matrix column name."""
        return f"{self.context}*{self.candidate}"


CROSSES: Final[tuple[Cross, ...]] = (
    # New users react to different tips: short, easy, actionable ones.
    Cross("is_new_user", "has_action_step"),
    Cross("is_new_user", "tip_length_chars"),
    Cross("is_new_user", "readability"),
    # A new user's topic affinity rests on a handful of likes, so it should count for less.
    Cross("is_new_user", "topic_affinity"),
    # Users who like a lot follow their favourite topics more closely.
    Cross("like_rate_30d", "topic_affinity"),
    # Time of day matters per category (health tips in the morning, productivity at work hours).
    Cross("local_hour_sin", "category_health"),
    Cross("local_hour_cos", "category_health"),
    Cross("local_hour_cos", "category_productivity"),
)
"""Context x candidate interactions appended to the design matrix, in column order."""

DESIGN_COLUMNS: Final = (
    *CONTEXT_FEATURE_NAMES,
    *CANDIDATE_FEATURE_NAMES,
    *(c.name for c in CROSSES),
)
"""Names of the design-matrix columns, in order (the intercept is kept apart)."""
N_DESIGN: Final = len(DESIGN_COLUMNS)
"""Width of the design matrix."""


def specs(group: Group) -> tuple[FeatureSpec, ...]:
    """The features of ``group``, in model order."""
    return CONTEXT_FEATURES if group is Group.CONTEXT else CANDIDATE_FEATURES


def _index(group: Group) -> dict[str, int]:
    return {f.name: i for i, f in enumerate(specs(group))}


_CROSS_LEFT: Final = np.array([_index(_C)[c.context] for c in CROSSES], dtype=np.intp)
_CROSS_RIGHT: Final = np.array([_index(_T)[c.candidate] for c in CROSSES], dtype=np.intp)


def _log1p_columns(group: Group) -> slice | npt.NDArray[np.intp]:
    cols = [i for i, f in enumerate(specs(group)) if f.transform is Transform.LOG1P]
    # Contiguous columns (the features above are ordered so) transform in place through a view.
    if cols == list(range(cols[0], cols[-1] + 1)):
        return slice(cols[0], cols[-1] + 1)
    return np.array(cols, dtype=np.intp)


_LOG1P_COLS: Final = {g: _log1p_columns(g) for g in Group}


def defaults(group: Group) -> Float32Array:
    """Raw defaults of ``group`` in model order, NaN for required features."""
    return np.array([np.nan if f.default is None else f.default for f in specs(group)], dtype=DTYPE)


def fill_defaults(raw: Float32Array, group: Group) -> Float32Array:
    """Replace NaN (= not provided) by each feature's default; used on training rows.

    Serving applies the same policy when a caller omits a name. A NaN left in a required column
    raises ``ValueError``: training data must not silently invent a value either.
    """
    out = np.array(raw, dtype=DTYPE, copy=True)
    missing = np.isnan(out)
    if missing.any():
        fill = np.broadcast_to(defaults(group), out.shape)
        bad = missing & np.isnan(fill)
        if bad.any():
            col = int(np.flatnonzero(bad.any(axis=tuple(range(bad.ndim - 1))))[0])
            raise ValueError(f"required {group} feature {specs(group)[col].name!r} has NaN")
        out[missing] = fill[missing]
    return out


def transform(raw: npt.NDArray[Any], group: Group) -> Float64Array:
    """Apply the fixed per-feature transforms (before z-scoring); returns a new float64 array."""
    out = np.array(raw, dtype=np.float64, copy=True)
    cols = _LOG1P_COLS[group]
    if isinstance(cols, slice):
        view = out[..., cols]
        np.log1p(np.maximum(view, 0.0, out=view), out=view)
    else:
        out[..., cols] = np.log1p(np.maximum(out[..., cols], 0.0))
    return out


@dataclass(frozen=True, slots=True)
class Normalization:
    """Z-score parameters fitted on the training rows (after ``transform``), per group.

    Features with ``standardize=False`` keep mean 0 and std 1, so one formula serves all columns.
    """

    context_mean: Float64Array
    context_std: Float64Array
    candidate_mean: Float64Array
    candidate_std: Float64Array

    @classmethod
    def fit(cls, context_raw: Float32Array, candidates_raw: Float32Array) -> Normalization:
        """Fit on raw training rows (defaults already filled), shapes (n, N_*)."""
        mc, sc = _fit_group(transform(context_raw, _C), CONTEXT_FEATURES)
        mt, st = _fit_group(transform(candidates_raw, _T), CANDIDATE_FEATURES)
        return cls(mc, sc, mt, st)

    def check(self) -> None:
        """Raise ``ValueError`` unless shapes match this module's features and values are sane."""
        for label, arr, n in (
            ("context_mean", self.context_mean, N_CONTEXT),
            ("context_std", self.context_std, N_CONTEXT),
            ("candidate_mean", self.candidate_mean, N_CANDIDATE),
            ("candidate_std", self.candidate_std, N_CANDIDATE),
        ):
            if arr.shape != (n,) or arr.dtype != np.float64:
                raise ValueError(
                    f"{label}: expected float64 shape ({n},), got {arr.dtype} {arr.shape}"
                )
            if not np.isfinite(arr).all():
                raise ValueError(f"{label}: non-finite value")
        if (self.context_std <= 0).any() or (self.candidate_std <= 0).any():
            raise ValueError("std: every standard deviation must be positive")

    def normalize_context(self, raw: npt.NDArray[Any]) -> Float64Array:
        """Raw context values, shape (N_CONTEXT,) or (n, N_CONTEXT) -> normalised float64."""
        return _normalize(transform(raw, _C), self.context_mean, self.context_std)

    def normalize_candidates(self, raw: npt.NDArray[Any]) -> Float64Array:
        """Raw candidate values, shape (n, N_CANDIDATE) -> normalised float64."""
        return _normalize(transform(raw, _T), self.candidate_mean, self.candidate_std)

    def to_arrays(self) -> dict[str, Float64Array]:
        """The parameters as named arrays, for the weights file."""
        return {
            "context_mean": self.context_mean,
            "context_std": self.context_std,
            "candidate_mean": self.candidate_mean,
            "candidate_std": self.candidate_std,
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, npt.NDArray[Any]]) -> Normalization:
        """Inverse of ``to_arrays``; validates shapes against this module's features."""
        norm = cls(
            np.asarray(arrays["context_mean"]),
            np.asarray(arrays["context_std"]),
            np.asarray(arrays["candidate_mean"]),
            np.asarray(arrays["candidate_std"]),
        )
        norm.check()
        return norm

    def describe(self) -> dict[str, list[dict[str, Any]]]:
        """Model-card ``inputs`` section: every feature with its transform, default and z-score."""
        out: dict[str, list[dict[str, Any]]] = {}
        for group, mean, std in (
            (_C, self.context_mean, self.context_std),
            (_T, self.candidate_mean, self.candidate_std),
        ):
            out[group.value] = [
                {
                    "name": f.name,
                    "description": f.description,
                    "dtype": np.dtype(DTYPE).name,
                    "transform": f.transform.value,
                    "standardize": f.standardize,
                    "mean": float(mean[i]),
                    "std": float(std[i]),
                    "default": f.default,
                }
                for i, f in enumerate(specs(group))
            ]
        return out


def _fit_group(
    transformed: Float64Array, group_specs: Sequence[FeatureSpec]
) -> tuple[Float64Array, Float64Array]:
    mean = transformed.mean(axis=0)
    std = transformed.std(axis=0)
    keep = np.array([not f.standardize for f in group_specs])
    mean[keep] = 0.0
    std[keep] = 1.0
    # A constant column in a tiny training set must not divide by zero.
    std[std < 1e-12] = 1.0
    return mean, std


def _normalize(t: Float64Array, mean: Float64Array, std: Float64Array) -> Float64Array:
    t -= mean
    t /= std
    # Two ufuncs instead of np.clip: same result, a fraction of the call overhead on the hot path.
    np.maximum(t, -Z_CLIP, out=t)
    np.minimum(t, Z_CLIP, out=t)
    return t


def design_matrix(context: Float64Array, candidates: Float64Array) -> Float64Array:
    """Build the model's design matrix from *normalised* features; used by training and serving.

    ``context`` is one user (shape (N_CONTEXT,), broadcast to every candidate, the serving case)
    or one row per candidate (shape (n, N_CONTEXT), the training and micro-batch case).
    ``candidates`` has shape (n, N_CANDIDATE). Columns are ``DESIGN_COLUMNS``.
    """
    n = candidates.shape[0]
    x = np.empty((n, N_DESIGN), dtype=np.float64)
    x[:, :N_CONTEXT] = context
    x[:, N_CONTEXT : N_CONTEXT + N_CANDIDATE] = candidates
    np.multiply(
        context[..., _CROSS_LEFT],
        candidates[:, _CROSS_RIGHT],
        out=x[:, N_CONTEXT + N_CANDIDATE :],
    )
    return x


@dataclass(frozen=True, slots=True)
class ContextFold:
    """The design matrix's coefficients regrouped around one *normalised* context row: for
    ``fold = ContextFold.of(coef, intercept)`` and ``folded = context @ fold.matrix +
    fold.offset``, ``c @ folded[:N_CANDIDATE] + folded[N_CANDIDATE]`` equals
    ``design_matrix(context, c) @ coef + intercept`` for any candidates ``c``: the context
    columns and the crosses become one weight vector, so one user's candidates are scored
    without a design matrix (``ScoringPlan`` builds on it).
    """

    matrix: Float64Array
    """Shape (N_CONTEXT, N_CANDIDATE + 1): crosses per (context, candidate) pair, then the
    context columns' own coefficients."""
    offset: Float64Array
    """Shape (N_CANDIDATE + 1,): the candidate columns' coefficients, then the intercept."""

    @classmethod
    def of(cls, coef: Float64Array, intercept: float) -> ContextFold:
        """Build the fold for a model's design-matrix coefficients and intercept."""
        matrix = np.zeros((N_CONTEXT, N_CANDIDATE + 1), dtype=np.float64)
        np.add.at(matrix, (_CROSS_LEFT, _CROSS_RIGHT), coef[N_CONTEXT + N_CANDIDATE :])
        matrix[:, N_CANDIDATE] = coef[:N_CONTEXT]
        offset = np.append(coef[N_CONTEXT : N_CONTEXT + N_CANDIDATE], intercept)
        return cls(matrix, offset)


@dataclass(slots=True)
class ScoringPlan:
    """One model's serving arithmetic with the normalisation folded into its weights: for
    ``plan = ScoringPlan.of(normalization, coef, intercept)``, ``plan.logits(context, c)``
    equals ``design_matrix(normalize_context(context), normalize_candidates(c)) @ coef +
    intercept`` for raw rows (the same sums in another order: they agree to ~1e-15), and
    ``plan.probabilities`` is its logistic function.

    Why: a Score call is one user and ~20 candidates, so each numpy call's fixed cost, not the
    arithmetic, is what a request pays. Clipping the z-score to [-Z_CLIP, Z_CLIP] is the same as
    clipping the transformed value to [mean - Z_CLIP std, mean + Z_CLIP std], and for a LOG1P
    feature the same as clipping the raw value to the expm1 of those bounds (log1p is
    increasing; its max(x, 0) is one more lower bound): the transform, the normalisation and
    the clip become two bounds and one log1p, and the affine z-scoring goes into the folded
    weights. The weights are kept negated, so that the logistic function takes three calls.
    ``probabilities_packed`` takes the context row and the candidate rows as one buffer (as a
    request sends them) and bounds them all at once: 12 numpy calls a request, where
    transform + normalise + fold + sigmoid took 20.
    """

    context_low: Float64Array
    context_high: Float64Array
    context_log: npt.NDArray[np.bool_]
    """Which context columns take log1p (after the bounds)."""
    candidate_low: Float64Array
    candidate_high: Float64Array
    candidate_log: npt.NDArray[np.bool_]
    neg_matrix: Float64Array
    """Shape (N_CONTEXT, N_CANDIDATE + 1): maps a bounded, transformed context row to the
    negated candidate weights (on bounded, transformed candidate values) and bias, last."""
    neg_offset: Float64Array
    """Shape (N_CANDIDATE + 1,): added to ``context @ neg_matrix``."""
    _packed: tuple[int, Float64Array, Float64Array, npt.NDArray[np.bool_]] | None = None
    """The bounds and log1p mask of a context row and `capacity` candidate rows laid end to
    end: (capacity, low, high, log); a request of n <= capacity rows slices them."""

    @classmethod
    def of(cls, norm: Normalization, coef: Float64Array, intercept: float) -> ScoringPlan:
        """Fold ``norm`` and the design-matrix coefficients into one plan."""
        fold = ContextFold.of(coef, intercept)
        c_low, c_high, c_log = _bounds(_C, norm.context_mean, norm.context_std)
        t_low, t_high, t_log = _bounds(_T, norm.candidate_mean, norm.candidate_std)
        # Candidate side: w_j * (t_j - m_j) / s_j summed = t @ (w / s) - (m / s) @ w, so the
        # weights scale by 1/s and the bias takes -(m/s) @ w; both are linear in the context's
        # z-scores, hence columns of one matrix.
        k = N_CANDIDATE
        inv_s = 1.0 / norm.candidate_std
        m_over_s = norm.candidate_mean * inv_s
        matrix = np.empty_like(fold.matrix)
        matrix[:, :k] = fold.matrix[:, :k] * inv_s
        matrix[:, k] = fold.matrix[:, k] - fold.matrix[:, :k] @ m_over_s
        offset = np.empty_like(fold.offset)
        offset[:k] = fold.offset[:k] * inv_s
        offset[k] = fold.offset[k] - fold.offset[:k] @ m_over_s
        # Context side: z = (t - m) / s, so z @ matrix = t @ (matrix / s) - (m / s) @ matrix.
        inv_sc = 1.0 / norm.context_std
        offset -= (norm.context_mean * inv_sc) @ matrix
        matrix *= inv_sc[:, None]
        return cls(c_low, c_high, c_log, t_low, t_high, t_log, -matrix, -offset)

    def logits(self, context: npt.NDArray[Any], candidates: npt.NDArray[Any]) -> Float64Array:
        """The model's logit for each candidate row (raw values, model order, defaults filled):
        ``context`` shape (N_CONTEXT,), ``candidates`` (n, N_CANDIDATE); float64, shape (n,)."""
        z: Float64Array = np.negative(self._neg_logits(context, candidates))
        return z

    def probabilities(
        self, context: npt.NDArray[Any], candidates: npt.NDArray[Any]
    ) -> Float64Array:
        """The logistic function of ``logits``: each candidate's probability, float64."""
        return sigmoid_of_negated(self._neg_logits(context, candidates))

    def probabilities_packed(self, values: npt.NDArray[Any], n: int) -> Float64Array:
        """``probabilities`` for one buffer: the context row, then the ``n`` candidate rows
        (shape (N_CONTEXT + n * N_CANDIDATE,), model order, defaults filled)."""
        packed = self._packed
        if packed is None or packed[0] < n:
            packed = self._packed = self._packed_bounds(max(n, 64))
        size = N_CONTEXT + n * N_CANDIDATE
        t = values.astype(np.float64)
        np.maximum(t, packed[1][:size], out=t)
        np.minimum(t, packed[2][:size], out=t)
        np.log1p(t, out=t, where=packed[3][:size])
        folded = np.dot(t[:N_CONTEXT], self.neg_matrix)
        folded += self.neg_offset
        u: Float64Array = np.dot(t[N_CONTEXT:].reshape(n, N_CANDIDATE), folded[:N_CANDIDATE])
        u += folded[N_CANDIDATE]
        return sigmoid_of_negated(u)

    def _packed_bounds(
        self, capacity: int
    ) -> tuple[int, Float64Array, Float64Array, npt.NDArray[np.bool_]]:
        return (
            capacity,
            np.concatenate([self.context_low, np.tile(self.candidate_low, capacity)]),
            np.concatenate([self.context_high, np.tile(self.candidate_high, capacity)]),
            np.concatenate([self.context_log, np.tile(self.candidate_log, capacity)]),
        )

    def _neg_logits(self, context: npt.NDArray[Any], candidates: npt.NDArray[Any]) -> Float64Array:
        t = context.astype(np.float64)
        np.maximum(t, self.context_low, out=t)
        np.minimum(t, self.context_high, out=t)
        np.log1p(t, out=t, where=self.context_log)
        folded = np.dot(t, self.neg_matrix)
        folded += self.neg_offset
        c = candidates.astype(np.float64)
        np.maximum(c, self.candidate_low, out=c)
        np.minimum(c, self.candidate_high, out=c)
        np.log1p(c, out=c, where=self.candidate_log)
        u: Float64Array = np.dot(c, folded[:N_CANDIDATE])
        u += folded[N_CANDIDATE]
        return u


def sigmoid_of_negated(u: Float64Array) -> Float64Array:
    """The logistic function of -u, 1 / (1 + exp(u)), in place: exp(-logaddexp(0, u)), accurate
    and warning-free over the whole float64 range (u is the negated logit)."""
    np.logaddexp(0.0, u, out=u)
    np.negative(u, out=u)
    return np.exp(u, out=u)


def _bounds(
    group: Group, mean: Float64Array, std: Float64Array
) -> tuple[Float64Array, Float64Array, npt.NDArray[np.bool_]]:
    """Raw-value bounds equivalent to ``transform`` then the z-score clip, and the log1p mask."""
    low = mean - Z_CLIP * std
    high = mean + Z_CLIP * std
    log = np.array([f.transform is Transform.LOG1P for f in specs(group)])
    with np.errstate(over="ignore"):  # an expm1 past float64 is +inf: no upper bound, as meant
        low[log] = np.maximum(np.expm1(low[log]), 0.0)
        high[log] = np.expm1(high[log])
    return low, high, log


def rows_from_mappings(rows: Sequence[Mapping[str, float]], group: Group) -> Float32Array:
    """Named rows (offline tools, model-card reference rows) -> raw matrix in model order.

    Unknown names raise ``KeyError``; absent names take the default, and a required one absent
    raises ``ValueError`` (through ``fill_defaults``).
    """
    index = _index(group)
    out = np.full((len(rows), len(index)), np.nan, dtype=DTYPE)
    for r, row in enumerate(rows):
        for name, value in row.items():
            if name not in index:
                raise KeyError(f"unknown {group} feature {name!r}")
            if not np.isfinite(value):
                raise ValueError(f"{group} feature {name!r} must be finite, got {value!r}")
            out[r, index[name]] = value
    return fill_defaults(out, group)


# --- where each feature comes from: the request or the feature store (feature_repo/) ----------


class Source(StrEnum):
    """Where serving finds a model input when the caller leaves it out."""

    REQUEST = "request"
    """Computed from the request at call time (never stored): the caller must send it."""
    USER = "user"
    """The user feature view, by ``user_id``; the field has the feature's name."""
    TIP = "tip"
    """The tip feature view, by candidate id; the field has the feature's name."""
    TIP_CATEGORY = "tip_category"
    """One-hot of the tip view's ``category`` field."""
    USER_AFFINITY_OF_TIP_CATEGORY = "user_affinity_of_tip_category"
    """The user view's ``affinity_<category>`` field for the candidate tip's category."""


FEATURE_SERVICE: Final = "tips_ranker_v1"
"""The Feast feature service of this feature set: training's historical retrieval and serving's
lookups read exactly its fields (named in the model card)."""
USER_FEATURE_VIEW: Final = "user_features"
"""Feast feature view of the per-user model inputs (entity ``user``, join key ``user_id``)."""
TIP_FEATURE_VIEW: Final = "tip_features"
"""Feast feature view of the per-tip model inputs (entity ``tip``, join key ``tip_id``)."""
USER_PROFILE_VIEW: Final = "user_profile"
"""Feast feature view of the prompt context Generate fills in (not a model input)."""

AFFINITY_FIELDS: Final = tuple(f"affinity_{c}" for c in CATEGORIES)
"""User-view fields: share of the user's past likes per category (null without likes)."""

SOURCES: Final[dict[str, Source]] = {
    "tenure_days": Source.USER,
    "sessions_7d": Source.USER,
    "tips_seen_7d": Source.USER,
    "streak_days": Source.USER,
    "like_rate_30d": Source.USER,
    "is_new_user": Source.USER,
    "local_hour_sin": Source.REQUEST,
    "local_hour_cos": Source.REQUEST,
    **{f"category_{c}": Source.TIP_CATEGORY for c in CATEGORIES},
    "tip_length_chars": Source.TIP,
    "tip_age_days": Source.TIP,
    "tip_prior_ctr": Source.TIP,
    "readability": Source.TIP,
    "has_action_step": Source.TIP,
    "topic_affinity": Source.USER_AFFINITY_OF_TIP_CATEGORY,
}
"""Every model input's source; a test keeps it, the feature lists and feature_repo/ in step."""

USER_FIELDS: Final[dict[str, str]] = {
    **{
        n: ("float64" if n == "like_rate_30d" else "int64")
        for n, s in SOURCES.items()
        if s is Source.USER
    },
    **{n: "float64" for n in AFFINITY_FIELDS},
}
"""Fields of the user feature view and their value types (what feast_repo declares)."""
TIP_FIELDS: Final[dict[str, str]] = {
    "category": "string",
    "tip_length_chars": "int64",
    "tip_age_days": "int64",
    "tip_prior_ctr": "float64",
    "readability": "float64",
    "has_action_step": "int64",
}
"""Fields of the tip feature view and their value types."""
PROFILE_FIELDS: Final[dict[str, str]] = {
    "interests": "string_list",
    "experience_level": "string",
    "streak_days": "int64",
    "locale": "string",
    "recent_tips": "string_list",
}
"""Fields of the user-profile view (Generate's prompt context) and their value types."""


def local_hour_features(local_hour: npt.ArrayLike) -> tuple[Float64Array, Float64Array]:
    """``local_hour_sin`` and ``local_hour_cos`` of a (fractional) local hour: the request-time
    features, computed the same way by the simulator, training and any caller."""
    angle = 2 * np.pi * np.asarray(local_hour, dtype=np.float64) / 24.0
    return np.sin(angle), np.cos(angle)


def category_index(categories: Sequence[object]) -> npt.NDArray[np.intp]:
    """Index into ``CATEGORIES`` of each tip category; -1 for a missing or unknown one."""
    lookup = {c: i for i, c in enumerate(CATEGORIES)}
    return np.array(
        [lookup.get(c, -1) if isinstance(c, str) else -1 for c in categories], dtype=np.intp
    )


def context_from_store(user: Mapping[str, npt.ArrayLike], n: int) -> Float32Array:
    """Context rows (n, N_CONTEXT) from user-view columns; NaN where a column is absent or
    null and for the request-time features, which the caller (or training) fills in."""
    out = np.full((n, N_CONTEXT), np.nan, dtype=DTYPE)
    for i, f in enumerate(CONTEXT_FEATURES):
        if SOURCES[f.name] is Source.USER and f.name in user:
            out[:, i] = np.asarray(user[f.name], dtype=np.float64)
    return out


def candidates_from_store(
    tips: Mapping[str, npt.ArrayLike],
    category: npt.NDArray[np.intp],
    affinity: npt.ArrayLike | None,
) -> Float32Array:
    """Candidate rows (n, N_CANDIDATE) from tip-view columns, each tip's category index
    (``category_index``) and the user's ``AFFINITY_FIELDS`` values, shape (5,) for one user or
    (n, 5) for one user per row; NaN where a value is absent, null or its category unknown."""
    n = len(category)
    out = np.full((n, N_CANDIDATE), np.nan, dtype=DTYPE)
    known = category >= 0
    aff = None if affinity is None else np.asarray(affinity, dtype=np.float64)
    for i, f in enumerate(CANDIDATE_FEATURES):
        source = SOURCES[f.name]
        if source is Source.TIP and f.name in tips:
            out[:, i] = np.asarray(tips[f.name], dtype=np.float64)
        elif source is Source.TIP_CATEGORY:
            j = CATEGORIES.index(f.name.removeprefix("category_"))
            out[known, i] = (category[known] == j).astype(np.float64)
        elif source is Source.USER_AFFINITY_OF_TIP_CATEGORY and aff is not None:
            picked = aff[category[known]] if aff.ndim == 1 else aff[known, category[known]]
            out[known, i] = picked
    return out
