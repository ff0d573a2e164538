"""Numpy scoring: the Model, and the request-side alignment and validation of named features."""

from __future__ import annotations

import functools
import itertools
import logging
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NoReturn

import numpy as np
import numpy.typing as npt

from ml_serving.errors import InvalidArgument, echo
from ml_serving.scoring import features
from ml_serving.scoring.features import DTYPE, Float32Array, Float64Array, Group

logger = logging.getLogger(__name__)

_F32_MAX: Final = float(np.finfo(np.float32).max)

MAX_CANDIDATE_ID_CHARS: Final = 64
"""Candidate ids are keys, not text: longer ones are refused, which bounds a request's size."""

# A ScoreRequest's parts other than its candidates (user id, feature names, context values):
# far above what a valid request carries (a few hundred bytes), so it never refuses one.
_REQUEST_HEAD_BYTES: Final = 64 * 1024
# One candidate on the wire at most: its id (UTF-8, up to 4 bytes a character), one float per
# candidate feature, and the tags and lengths around them.
_CANDIDATE_BYTES: Final = 4 * MAX_CANDIDATE_ID_CHARS + 4 * features.N_CANDIDATE + 16


def max_request_bytes(max_candidates: int) -> int:
    """The most bytes a valid ScoreRequest with at most `max_candidates` candidates can take.

    Checked on the raw bytes before they are parsed, so an oversized request (millions of empty
    candidates fit in the 4 MiB message limit) costs no per-candidate work or memory.
    """
    return _REQUEST_HEAD_BYTES + max_candidates * _CANDIDATE_BYTES


class _Count(Sequence[Any]):
    """A sequence of which only the length is known: what the count check needs, no elements."""

    def __init__(self, length: int) -> None:
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: Any) -> Any:
        raise AssertionError("only the count of an oversized request is read")  # pragma: no cover


def refuse_too_many_candidates(
    *,
    context_feature_names: Sequence[str],
    context_values: Sequence[float],
    candidate_feature_names: Sequence[str],
    n_candidates: int,
    max_candidates: int,
    columnar: bool = False,
    lenient: bool = False,
) -> None:
    """Raise the error ``align_request`` (``align_columnar_request`` if `columnar`) would give
    a request of `n_candidates` candidates when that is over `max_candidates`, without reading
    one candidate (the caller has only counted them); faults in the fields checked before the
    count (names, context values) come first."""
    if n_candidates <= max_candidates:
        return
    count = _Count(n_candidates)
    (align_columnar_request if columnar else align_request)(
        context_feature_names=context_feature_names,
        context_values=context_values,
        candidate_feature_names=candidate_feature_names,
        candidate_ids=count,
        candidate_values=count,
        max_candidates=max_candidates,
        lenient=lenient,
    )
    raise AssertionError("unreachable: the count check raises")  # pragma: no cover


_NAMES_FIELD: Final = {
    Group.CONTEXT: "context_feature_names",
    Group.CANDIDATE: "candidate_feature_names",
}


def sigmoid(z: Float64Array) -> Float64Array:
    """Logistic function, accurate and warning-free over the whole float64 range (any shape,
    scalars too; ``features.sigmoid_of_negated`` is the same formula in place, for serving)."""
    return np.exp(-np.logaddexp(0.0, -z))


@dataclass(frozen=True, slots=True)
class ModelWeights:
    """Parameters of the logistic model over ``features.design_matrix``."""

    coef: Float64Array
    """One weight per ``features.DESIGN_COLUMNS`` entry."""
    intercept: float
    normalization: features.Normalization

    def check(self) -> None:
        """Raise ``ValueError`` unless the shapes match ``features`` and every value is finite."""
        self.normalization.check()
        if self.coef.shape != (features.N_DESIGN,) or self.coef.dtype != np.float64:
            raise ValueError(
                f"coef: expected float64 shape ({features.N_DESIGN},), "
                f"got {self.coef.dtype} {self.coef.shape}"
            )
        if not (np.isfinite(self.coef).all() and np.isfinite(self.intercept)):
            raise ValueError("coef/intercept: non-finite value")

    def to_arrays(self) -> dict[str, Float64Array]:
        """The parameters as named arrays, for the weights file."""
        return {
            "coef": self.coef,
            "intercept": np.array(self.intercept, dtype=np.float64),
            **self.normalization.to_arrays(),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, npt.NDArray[Any]]) -> ModelWeights:
        """Inverse of ``to_arrays``; raises ``KeyError`` or ``ValueError`` on a malformed file."""
        intercept = np.asarray(arrays["intercept"])
        if intercept.shape != ():
            raise ValueError(f"intercept: expected a scalar, got shape {intercept.shape}")
        weights = cls(
            coef=np.asarray(arrays["coef"]),
            intercept=float(intercept),
            normalization=features.Normalization.from_arrays(arrays),
        )
        weights.check()
        return weights


@dataclass(frozen=True, eq=False)
class Model:
    """One loaded model version. Immutable once built; treat ``card`` as read-only."""

    name: str
    version: str
    card: Mapping[str, Any]
    weights: ModelWeights

    def predict(self, context: npt.NDArray[Any], candidates: npt.NDArray[Any]) -> Float64Array:
        """Probabilities of a positive reaction for one user and ``n`` candidate tips.

        ``context``: raw values, shape (N_CONTEXT,), in ``features.CONTEXT_FEATURE_NAMES`` order.
        ``candidates``: raw values, shape (n, N_CANDIDATE), in ``CANDIDATE_FEATURE_NAMES`` order.
        Defaults must already be applied (``align_request`` does it). Returns float64, shape (n,).
        """
        if context.shape != (features.N_CONTEXT,):
            raise ValueError(
                f"context: expected shape ({features.N_CONTEXT},), got {context.shape}"
            )
        _check_candidates(candidates)
        # One user: the context and the normalisation folded into the weights instead of a
        # design matrix (features.ScoringPlan; predict_rows is the plain path, equal to 1e-12).
        return self._plan.probabilities(context, candidates)

    def predict_aligned(self, request: AlignedRequest) -> Float64Array:
        """``predict`` for an aligned request; in one pass over its values when they are one
        buffer in model order (``AlignedRequest.values``), as most requests send them."""
        if request.values is not None:
            return self._plan.probabilities_packed(request.values, len(request.candidates))
        return self.predict(request.context, request.candidates)

    @functools.cached_property
    def fallback(self) -> tuple[Float32Array, Float32Array]:
        """Raw context and candidate rows for values neither a request nor the feature store
        has: each feature's training mean from the card (``training_mean``); for a card
        without one, the feature's default, else the mean its normalisation was fitted on."""
        norm = self.weights.normalization
        rows = []
        for group, mean in (
            (Group.CONTEXT, norm.context_mean),
            (Group.CANDIDATE, norm.candidate_mean),
        ):
            described = {}
            inputs = self.card.get("inputs") if isinstance(self.card, Mapping) else None
            if isinstance(inputs, Mapping):
                described = {
                    e.get("name"): e.get("training_mean")
                    for e in inputs.get(group.value, ())
                    if isinstance(e, Mapping)
                }
            row = np.empty(len(features.specs(group)), dtype=DTYPE)
            for i, spec in enumerate(features.specs(group)):
                value = described.get(spec.name)
                if isinstance(value, int | float) and np.isfinite(value):
                    row[i] = value
                elif spec.default is not None:
                    row[i] = spec.default
                elif spec.transform is features.Transform.LOG1P:
                    row[i] = np.expm1(mean[i])
                else:
                    row[i] = mean[i]
            rows.append(row)
        return rows[0], rows[1]

    @functools.cached_property
    def _plan(self) -> features.ScoringPlan:
        w = self.weights
        return features.ScoringPlan.of(w.normalization, w.coef, w.intercept)

    def predict_rows(
        self, contexts: npt.NDArray[Any], candidates: npt.NDArray[Any]
    ) -> Float64Array:
        """Like ``predict`` but ``contexts`` may also hold one row per candidate, (n, N_CONTEXT).

        This is the path of offline evaluation and of micro-batching (stack several requests'
        aligned rows, repeating each context per candidate, and score them in one product).
        """
        _check_candidates(candidates)
        if contexts.shape not in ((features.N_CONTEXT,), (len(candidates), features.N_CONTEXT)):
            raise ValueError(f"contexts: shape {contexts.shape} does not fit {candidates.shape}")
        norm = self.weights.normalization
        x = features.design_matrix(
            norm.normalize_context(contexts), norm.normalize_candidates(candidates)
        )
        return sigmoid(x @ self.weights.coef + self.weights.intercept)


def _check_candidates(candidates: npt.NDArray[Any]) -> None:
    if candidates.ndim != 2 or candidates.shape[1] != features.N_CANDIDATE:
        raise ValueError(
            f"candidates: expected shape (n, {features.N_CANDIDATE}), got {candidates.shape}"
        )


@dataclass(frozen=True, slots=True)
class ScoreResult:
    """Scores in request order and the model version that produced all of them."""

    scores: Float64Array
    model_name: str
    model_version: str
    request: AlignedRequest | None = None
    """The aligned request the scores came from (a shadow version re-scores it)."""


@dataclass(frozen=True, slots=True)
class AlignedRequest:
    """A validated Score request in model order with defaults applied, ready for ``predict``.

    The arrays may be read-only views of one buffer holding the request's values.
    """

    context: Float32Array
    """Shape (N_CONTEXT,)."""
    candidates: Float32Array
    """Shape (n, N_CANDIDATE)."""
    values: Float32Array | None = None
    """``context`` then ``candidates``' rows in one buffer, when the request's values already
    were in model order (both arrays are then views of it); None otherwise."""


@dataclass(frozen=True, slots=True)
class _Alignment:
    """How one caller name order maps onto the model order (cached per name tuple)."""

    names: tuple[str, ...]
    positions: npt.NDArray[np.intp] | None
    """Model index of each caller column; None when the caller already sends model order."""
    base: Float32Array
    """Model-order row holding the defaults of the features the caller omits."""


@functools.lru_cache(maxsize=1024)
def _alignment(group: Group, names: tuple[str, ...], lenient: bool = False) -> _Alignment:
    # Cached: callers send the same few name tuples thousands of times a second. Errors are
    # raised, not cached, so a bad request pays the full check each time (fine: it is rare).
    field = _NAMES_FIELD[group]
    group_specs = features.specs(group)
    index = {f.name: i for i, f in enumerate(group_specs)}
    first_seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in first_seen:
            raise InvalidArgument(
                f"{field}[{i}]",
                f"duplicate feature {echo(name)} (also at index {first_seen[name]})",
            )
        if name not in index:
            raise InvalidArgument(
                f"{field}[{i}]",
                f"unknown feature {echo(name)}; known: {', '.join(f.name for f in group_specs)}",
            )
        first_seen[name] = i
    # With a feature store (lenient), only the request-time features must come with the
    # request; whatever else is left out stays NaN here and is filled from the store.
    missing = [
        f.name
        for f in group_specs
        if f.name not in first_seen
        and (features.SOURCES[f.name] is features.Source.REQUEST if lenient else f.required)
    ]
    if missing:
        what = "request-time" if lenient else "required"
        raise InvalidArgument(field, f"missing {what} feature(s): {', '.join(missing)}")
    positions = np.array([index[n] for n in names], dtype=np.intp)
    identity = len(names) == len(group_specs) and bool((positions == np.arange(len(names))).all())
    base = np.full(len(group_specs), np.nan, dtype=DTYPE) if lenient else features.defaults(group)
    return _Alignment(names, None if identity else positions, base)


Values = Sequence[float] | Float32Array
"""A run of feature values: a protobuf repeated field, a list, or a float32 array."""


_recent: dict[tuple[Group, bool], tuple[list[str], _Alignment]] = {}
"""Per group and mode, the names of the last request aligned and their alignment."""


def _aligned(group: Group, names: Sequence[str], lenient: bool) -> _Alignment:
    """``_alignment`` for a request's names, the last request's checked first: callers send the
    same names call after call, and comparing a protobuf repeated field with a list costs a
    third of building the tuple that keys the cache (and hashing its strings)."""
    recent = _recent.get((group, lenient))
    if recent is not None and names == recent[0]:
        return recent[1]
    found = _alignment(group, tuple(names), lenient)
    _recent[group, lenient] = (list(found.names), found)
    return found


def _floats(rows: Iterable[Values], count: int) -> Float64Array:
    """The rows' values, concatenated, as one float64 array (``count`` values in all)."""
    packed = struct.pack(f"{count}d", *itertools.chain.from_iterable([row[:] for row in rows]))
    return np.frombuffer(packed, dtype=np.float64)


def _finite_float32(rows: Iterable[Values], count: int) -> Float32Array | None:
    """The rows' values, concatenated, as one float32 array; None if any of them is NaN,
    infinite or too large for float32 (``_first_bad`` then names it)."""
    # Slicing a protobuf repeated field builds its list in C, and struct packs the lot in one
    # C loop (refusing finite values beyond float32): about half the CPU of np.fromiter pulling
    # the fields' items one by one, and no cast. NaN and infinities are caught below.
    try:
        packed = struct.pack(f"{count}f", *itertools.chain.from_iterable([row[:] for row in rows]))
    except OverflowError:
        return None
    values = np.frombuffer(packed, dtype=DTYPE)
    # isfinite, not a float64 sum: inf + -inf in a sum warns (an error under warnings-as-errors).
    return values if np.isfinite(values).all() else None


def _first_bad(values: Float64Array) -> int | None:
    """Index (flat) of the first value that is NaN, infinite or outside float32 range."""
    # Fast path, one reduction: NaN propagates through max and compares False, like +-inf and
    # values beyond float32 (which a cast would turn into inf, with a warning).
    if values.size == 0 or np.maximum.reduce(np.abs(values)) <= _F32_MAX:
        return None
    return int(np.argmin(np.abs(values) <= _F32_MAX))


def align_request(
    *,
    context_feature_names: Sequence[str],
    context_values: Sequence[float],
    candidate_feature_names: Sequence[str],
    candidate_ids: Sequence[str],
    candidate_values: Sequence[Sequence[float]],
    max_candidates: int,
    lenient: bool = False,
) -> AlignedRequest:
    """Validate a Score request and put its values in model order, defaults filled in.

    Accepts plain sequences or protobuf repeated fields. ``candidate_ids[i]`` and
    ``candidate_values[i]`` describe ``candidates[i]``. Raises ``InvalidArgument`` naming the
    first offending proto field path (names, then context values, then candidate count, ids,
    value counts and values); never fills a required feature with a made-up value.
    """
    ctx_align = _aligned(Group.CONTEXT, context_feature_names, lenient)
    n_ctx = len(ctx_align.names)
    if len(context_values) != n_ctx:
        raise InvalidArgument(
            "context_values",
            f"expected {n_ctx} values (one per context_feature_names entry), "
            f"got {len(context_values)}",
        )
    try:
        cand_align = _aligned(Group.CANDIDATE, candidate_feature_names, lenient)
        k = len(cand_align.names)
        n = _check_candidate_shape(cand_align, candidate_ids, candidate_values, max_candidates)
    except InvalidArgument:
        # The context values come first in the order errors are reported in; the happy path
        # checks them together with the candidates' values, below.
        _check_context_values(ctx_align, _floats((context_values,), n_ctx))
        raise
    # All values in one array: one conversion and one check on the happy path.
    raw = _finite_float32((context_values, *candidate_values), n_ctx + n * k)
    if raw is None:
        values = _floats((context_values, *candidate_values), n_ctx + n * k)
        _check_context_values(ctx_align, values[:n_ctx])
        _check_candidate_values(cand_align, values[n_ctx:])
        raise AssertionError("unreachable: a value was found faulty")  # pragma: no cover
    return _place(ctx_align, cand_align, raw, n)


def align_columnar_request(
    *,
    context_feature_names: Sequence[str],
    context_values: Values,
    candidate_feature_names: Sequence[str],
    candidate_ids: Sequence[str],
    candidate_values: Values,
    max_candidates: int,
    lenient: bool = False,
    values: Float32Array | None = None,
) -> AlignedRequest:
    """``align_request`` for the columnar form: ``candidate_values`` holds every candidate's
    values row-major, ``len(candidate_ids)`` rows of ``len(candidate_feature_names)``. Errors
    name the columnar fields (``candidate_ids[i]``, ``candidate_values[j]`` and the candidate
    it falls in), in the same order as ``align_request``'s.

    ``values``, when given, holds ``context_values`` then ``candidate_values`` as one float32
    array (what ``api.packed`` reads off the wire): then only NaN and infinities remain to be
    found, and no value is copied (the two sequences are only counted, or read to name a bad
    value)."""
    ctx_align = _aligned(Group.CONTEXT, context_feature_names, lenient)
    n_ctx = len(ctx_align.names)
    if len(context_values) != n_ctx:
        raise InvalidArgument(
            "context_values",
            f"expected {n_ctx} values (one per context_feature_names entry), "
            f"got {len(context_values)}",
        )
    try:
        cand_align = _aligned(Group.CANDIDATE, candidate_feature_names, lenient)
        k = len(cand_align.names)
        n = _check_candidate_count(len(candidate_ids), max_candidates, "candidate_ids")
        _check_ids(candidate_ids, n, "candidate_ids[{}]")
        if len(candidate_values) != n * k:
            raise InvalidArgument(
                "candidate_values",
                f"expected {n} x {k} = {n * k} values (one row of candidate_feature_names per "
                f"candidate_ids entry, row-major), got {len(candidate_values)}",
            )
    except InvalidArgument:
        _check_context_values(ctx_align, _floats((context_values,), n_ctx))
        raise
    if values is not None:
        if len(values) != n_ctx + n * k:
            raise ValueError(f"{len(values)} values for {n_ctx} + {n} x {k}")
        raw = values if np.isfinite(values).all() else None
    else:
        raw = _finite_float32((context_values, candidate_values), n_ctx + n * k)
    if raw is None:
        wide = _floats((context_values, candidate_values), n_ctx + n * k)
        _check_context_values(ctx_align, wide[:n_ctx])
        bad = _first_bad(wide[n_ctx:])
        assert bad is not None
        i, j = divmod(bad, k)
        raise InvalidArgument(
            f"candidate_values[{bad}]",
            f"feature {cand_align.names[j]!r} of candidate {i} ({echo(candidate_ids[i])}) "
            f"must be a finite float32, got {wide[n_ctx + bad]}",
        )
    return _place(ctx_align, cand_align, raw, n)


def _place(
    ctx_align: _Alignment, cand_align: _Alignment, raw: Float32Array, n: int
) -> AlignedRequest:
    """Context row and candidate matrix in model order from the request's checked values (the
    context's, then the candidates' rows, in one buffer)."""
    n_ctx = len(ctx_align.names)
    cand32 = raw[n_ctx:].reshape(n, len(cand_align.names))
    if cand_align.positions is None:
        if ctx_align.positions is None:
            return AlignedRequest(raw[:n_ctx], cand32, raw)
        # Only the context's order differs (a few values): one buffer in model order all the
        # same, so that predict takes the one-pass path.
        joined = np.empty(features.N_CONTEXT + cand32.size, dtype=DTYPE)
        context = joined[: features.N_CONTEXT]
        context[:] = ctx_align.base
        context[ctx_align.positions] = raw[:n_ctx]
        joined[features.N_CONTEXT :] = raw[n_ctx:]
        return AlignedRequest(context, joined[features.N_CONTEXT :].reshape(cand32.shape), joined)
    candidates = np.empty((n, features.N_CANDIDATE), dtype=DTYPE)
    candidates[:] = cand_align.base
    candidates[:, cand_align.positions] = cand32
    return AlignedRequest(_place_row(ctx_align, raw[:n_ctx]), candidates)


def _check_candidate_count(n: int, max_candidates: int, field: str) -> int:
    if n == 0:
        raise InvalidArgument(field, "at least one candidate is required")
    if n > max_candidates:
        raise InvalidArgument(field, f"at most {max_candidates} candidates per request, got {n}")
    return n


def _check_ids(candidate_ids: Sequence[str], n: int, field: str) -> None:
    """Ids non-empty, unique and short; `field` formats the path of the i-th one."""
    # C-level checks for the common valid case; the loop only runs to name the culprit.
    if (
        not all(candidate_ids)
        or len(set(candidate_ids)) != n
        or max(map(len, candidate_ids)) > MAX_CANDIDATE_ID_CHARS
    ):
        _raise_bad_id(candidate_ids, field)


def _check_candidate_shape(
    align: _Alignment,
    candidate_ids: Sequence[str],
    candidate_values: Sequence[Sequence[float]],
    max_candidates: int,
) -> int:
    """Count, ids and value counts of the candidates; returns how many there are."""
    n = len(candidate_values)
    if len(candidate_ids) != n:
        # The servicer builds both sequences from one repeated field: a mismatch is our bug.
        raise ValueError(f"{len(candidate_ids)} candidate ids for {n} value lists")
    _check_candidate_count(n, max_candidates, "candidates")
    _check_ids(candidate_ids, n, "candidates[{}].id")
    k = len(align.names)
    lengths = list(map(len, candidate_values))
    if lengths.count(k) != n:
        i = next(i for i, length in enumerate(lengths) if length != k)
        raise InvalidArgument(
            f"candidates[{i}].values",
            f"expected {k} values (one per candidate_feature_names entry), got {lengths[i]}",
        )
    return n


def _check_context_values(align: _Alignment, values: Float64Array) -> None:
    bad = _first_bad(values)
    if bad is not None:
        raise InvalidArgument(
            f"context_values[{bad}]",
            f"feature {align.names[bad]!r} must be a finite float32, got {values[bad]}",
        )


def _check_candidate_values(align: _Alignment, values: Float64Array) -> None:
    bad = _first_bad(values)
    if bad is not None:
        i, j = divmod(bad, len(align.names))
        raise InvalidArgument(
            f"candidates[{i}].values[{j}]",
            f"feature {align.names[j]!r} must be a finite float32, got {values[bad]}",
        )


def _raise_bad_id(candidate_ids: Sequence[str], field: str) -> NoReturn:
    first_index: dict[str, int] = {}
    for i, cid in enumerate(candidate_ids):
        if not cid:
            raise InvalidArgument(field.format(i), "must be non-empty")
        if len(cid) > MAX_CANDIDATE_ID_CHARS:
            raise InvalidArgument(
                field.format(i), f"{echo(cid)} is longer than {MAX_CANDIDATE_ID_CHARS} characters"
            )
        if cid in first_index:
            raise InvalidArgument(
                field.format(i),
                f"duplicate id {echo(cid)} (also {field.format(first_index[cid])})",
            )
        first_index[cid] = i
    raise AssertionError("unreachable: the ids were found faulty")


def _place_row(align: _Alignment, values: Float32Array) -> Float32Array:
    if align.positions is None:
        return values
    row = align.base.copy()
    row[align.positions] = values
    return row


def score(
    model: Model,
    *,
    context_feature_names: Sequence[str],
    context_values: Sequence[float],
    candidate_feature_names: Sequence[str],
    candidate_ids: Sequence[str],
    candidate_values: Sequence[Sequence[float]],
    max_candidates: int,
) -> ScoreResult:
    """Validate, align and score one request with ``model`` (see ``align_request``)."""
    req = align_request(
        context_feature_names=context_feature_names,
        context_values=context_values,
        candidate_feature_names=candidate_feature_names,
        candidate_ids=candidate_ids,
        candidate_values=candidate_values,
        max_candidates=max_candidates,
    )
    return ScoreResult(model.predict(req.context, req.candidates), model.name, model.version, req)


def score_columnar(
    model: Model,
    *,
    context_feature_names: Sequence[str],
    context_values: Sequence[float],
    candidate_feature_names: Sequence[str],
    candidate_ids: Sequence[str],
    candidate_values: Sequence[float],
    max_candidates: int,
) -> ScoreResult:
    """Validate, align and score one columnar request (see ``align_columnar_request``)."""
    req = align_columnar_request(
        context_feature_names=context_feature_names,
        context_values=context_values,
        candidate_feature_names=candidate_feature_names,
        candidate_ids=candidate_ids,
        candidate_values=candidate_values,
        max_candidates=max_candidates,
    )
    return ScoreResult(model.predict(req.context, req.candidates), model.name, model.version, req)
