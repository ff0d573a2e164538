"""Tests of the numpy scorer: alignment of named features, validation errors, predictions."""

from __future__ import annotations

import array
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from ml_serving.errors import InvalidArgument
from ml_serving.scoring import features
from ml_serving.scoring import model as scoring
from ml_serving.scoring.registry import ModelRegistry
from tests.support import REPO

MODELS = REPO / "models"

CONTEXT = {
    "tenure_days": 120.0,
    "sessions_7d": 9.0,
    "tips_seen_7d": 20.0,
    "streak_days": 4.0,
    "like_rate_30d": 0.2,
    "is_new_user": 0.0,
    "local_hour_sin": 0.5,
    "local_hour_cos": -0.8660254,
}
CANDIDATES = [
    {
        "category_health": 1.0,
        "category_productivity": 0.0,
        "category_finance": 0.0,
        "category_learning": 0.0,
        "category_relationships": 0.0,
        "tip_length_chars": 140.0,
        "tip_age_days": 12.0,
        "tip_prior_ctr": 0.15,
        "readability": 70.0,
        "has_action_step": 1.0,
        "topic_affinity": 0.4,
    },
    {
        "category_health": 0.0,
        "category_productivity": 0.0,
        "category_finance": 1.0,
        "category_learning": 0.0,
        "category_relationships": 0.0,
        "tip_length_chars": 420.0,
        "tip_age_days": 300.0,
        "tip_prior_ctr": 0.05,
        "readability": 35.0,
        "has_action_step": 0.0,
        "topic_affinity": 0.05,
    },
    {
        "category_health": 0.0,
        "category_productivity": 1.0,
        "category_finance": 0.0,
        "category_learning": 0.0,
        "category_relationships": 0.0,
        "tip_length_chars": 200.0,
        "tip_age_days": 1.0,
        "tip_prior_ctr": 0.1,
        "readability": 60.0,
        "has_action_step": 1.0,
        "topic_affinity": 0.2,
    },
]


@pytest.fixture(scope="module")
def model() -> scoring.Model:
    return ModelRegistry(MODELS).load("tips-ranker", "1")


def make_request(
    context: dict[str, float] | None = None,
    candidates: list[dict[str, float]] | None = None,
    *,
    max_candidates: int = 50,
) -> dict[str, Any]:
    """Keyword arguments of ``score`` for named rows (names taken from the first candidate)."""
    ctx = CONTEXT if context is None else context
    cands = CANDIDATES if candidates is None else candidates
    names = list(cands[0]) if cands else list(features.CANDIDATE_FEATURE_NAMES)
    return {
        "context_feature_names": list(ctx),
        "context_values": list(ctx.values()),
        "candidate_feature_names": names,
        "candidate_ids": [f"tip-{i}" for i in range(len(cands))],
        "candidate_values": [[c[n] for n in names] for c in cands],
        "max_candidates": max_candidates,
    }


def test_score_returns_probabilities_in_request_order(model: scoring.Model) -> None:
    result = scoring.score(model, **make_request())
    assert isinstance(result, scoring.ScoreResult)
    assert (result.model_name, result.model_version) == ("tips-ranker", "1")
    assert result.scores.dtype == np.float64 and result.scores.shape == (3,)
    assert ((result.scores > 0) & (result.scores < 1)).all()
    # Candidate 0 (short, fresh, popular, liked topic) beats the long, stale, unpopular one.
    assert result.scores[0] > result.scores[1]
    single = scoring.score(model, **make_request(candidates=[CANDIDATES[1]]))
    assert single.scores[0] == pytest.approx(result.scores[1], abs=1e-12)


def test_feature_order_does_not_matter(model: scoring.Model) -> None:
    base = scoring.score(model, **make_request()).scores
    rev_ctx = dict(reversed(list(CONTEXT.items())))
    rev_cands = [dict(reversed(list(c.items()))) for c in CANDIDATES]
    shuffled = scoring.score(model, **make_request(rev_ctx, rev_cands)).scores
    np.testing.assert_array_equal(base, shuffled)


def test_accepts_any_sequences_like_protobuf_containers(model: scoring.Model) -> None:
    req = make_request()
    base = scoring.score(model, **req).scores
    # array('f') holds float32 like a packed proto field; tuples stand in for other sequences.
    req["context_values"] = array.array("f", req["context_values"])
    req["candidate_values"] = tuple(array.array("f", v) for v in req["candidate_values"])
    req["context_feature_names"] = tuple(req["context_feature_names"])
    np.testing.assert_array_equal(base, scoring.score(model, **req).scores)


def test_omitted_feature_takes_its_default(model: scoring.Model) -> None:
    explicit_ctx = {**CONTEXT, "like_rate_30d": features.LIKE_RATE_PRIOR}
    explicit_cands = [{**c, "tip_prior_ctr": features.TIP_CTR_PRIOR} for c in CANDIDATES]
    explicit = scoring.score(model, **make_request(explicit_ctx, explicit_cands)).scores
    omitted_ctx = {k: v for k, v in CONTEXT.items() if k != "like_rate_30d"}
    omitted_cands = [{k: v for k, v in c.items() if k != "tip_prior_ctr"} for c in CANDIDATES]
    omitted = scoring.score(model, **make_request(omitted_ctx, omitted_cands)).scores
    np.testing.assert_array_equal(explicit, omitted)


def test_align_request_puts_values_in_model_order() -> None:
    rev_ctx = dict(reversed(list(CONTEXT.items())))
    aligned = scoring.align_request(**make_request(context=rev_ctx))
    assert aligned.context.dtype == np.float32 and aligned.candidates.dtype == np.float32
    np.testing.assert_array_equal(
        aligned.context,
        np.array([CONTEXT[n] for n in features.CONTEXT_FEATURE_NAMES], dtype=np.float32),
    )
    assert aligned.candidates.shape == (3, features.N_CANDIDATE)


def test_alignment_is_computed_once_per_name_order() -> None:
    req = make_request()
    scoring.align_request(**req)
    before = scoring._alignment.cache_info()
    scoring.align_request(**req)  # the same names as the last request: taken as they are
    assert scoring._alignment.cache_info() == before
    rev_ctx = dict(reversed(list(CONTEXT.items())))
    scoring.align_request(**make_request(context=rev_ctx))
    scoring.align_request(**req)  # back to the first order: from the cache
    after = scoring._alignment.cache_info()
    # Two lookups (the context names changed twice; the candidates' never did), the second a hit.
    assert after.hits + after.misses == before.hits + before.misses + 2
    assert after.hits >= before.hits + 1


Mutation = Callable[[dict[str, Any]], None]


def _set(key: str, value: Any) -> Mutation:
    def mutate(req: dict[str, Any]) -> None:
        req[key] = value

    return mutate


def _ctx_name(i: int, name: str) -> Mutation:
    def mutate(req: dict[str, Any]) -> None:
        req["context_feature_names"][i] = name

    return mutate


def _cand_name(i: int, name: str) -> Mutation:
    def mutate(req: dict[str, Any]) -> None:
        req["candidate_feature_names"][i] = name

    return mutate


def _ctx_value(i: int, value: float) -> Mutation:
    def mutate(req: dict[str, Any]) -> None:
        req["context_values"][i] = value

    return mutate


def _cand_value(i: int, j: int, value: float) -> Mutation:
    def mutate(req: dict[str, Any]) -> None:
        req["candidate_values"][i][j] = value

    return mutate


def _drop_ctx(name: str) -> Mutation:
    def mutate(req: dict[str, Any]) -> None:
        i = req["context_feature_names"].index(name)
        del req["context_feature_names"][i]
        del req["context_values"][i]

    return mutate


def _drop_cand(name: str) -> Mutation:
    def mutate(req: dict[str, Any]) -> None:
        j = req["candidate_feature_names"].index(name)
        del req["candidate_feature_names"][j]
        for values in req["candidate_values"]:
            del values[j]

    return mutate


def _cand_id(i: int, value: str) -> Mutation:
    def mutate(req: dict[str, Any]) -> None:
        req["candidate_ids"][i] = value

    return mutate


def _append_value(i: int) -> Mutation:
    def mutate(req: dict[str, Any]) -> None:
        req["candidate_values"][i].append(1.0)

    return mutate


def _no_candidates(req: dict[str, Any]) -> None:
    req["candidate_ids"] = []
    req["candidate_values"] = []


ERROR_CASES: list[tuple[str, Mutation, str, str]] = [
    (
        "unknown context name",
        _ctx_name(2, "tips_seen_30d"),
        "context_feature_names[2]",
        "unknown feature 'tips_seen_30d'; known: tenure_days, sessions_7d",
    ),
    (
        "duplicate context name",
        _ctx_name(3, "tenure_days"),
        "context_feature_names[3]",
        "duplicate feature 'tenure_days' (also at index 0)",
    ),
    (
        "missing required context feature",
        _drop_ctx("sessions_7d"),
        "context_feature_names",
        "missing required feature(s): sessions_7d",
    ),
    (
        "context value count",
        _set("context_values", [1.0] * 7),
        "context_values",
        "expected 8 values (one per context_feature_names entry), got 7",
    ),
    (
        "NaN context value",
        _ctx_value(1, float("nan")),
        "context_values[1]",
        "feature 'sessions_7d' must be a finite float32, got nan",
    ),
    (
        "infinite context value",
        _ctx_value(0, float("-inf")),
        "context_values[0]",
        "feature 'tenure_days' must be a finite float32, got -inf",
    ),
    (
        "context value overflowing float32",
        _ctx_value(4, 1e39),
        "context_values[4]",
        "feature 'like_rate_30d' must be a finite float32, got 1e+39",
    ),
    (
        "unknown candidate name",
        _cand_name(5, "tip_len"),
        "candidate_feature_names[5]",
        "unknown feature 'tip_len'; known: category_health",
    ),
    (
        "duplicate candidate name",
        _cand_name(10, "readability"),
        "candidate_feature_names[10]",
        "duplicate feature 'readability' (also at index 8)",
    ),
    (
        "missing required candidate features",
        _drop_cand("category_finance"),
        "candidate_feature_names",
        "missing required feature(s): category_finance",
    ),
    ("no candidates", _no_candidates, "candidates", "at least one candidate is required"),
    (
        "too many candidates",
        _set("max_candidates", 2),
        "candidates",
        "at most 2 candidates per request, got 3",
    ),
    ("empty candidate id", _cand_id(1, ""), "candidates[1].id", "must be non-empty"),
    (
        "duplicate candidate id",
        _cand_id(2, "tip-0"),
        "candidates[2].id",
        "duplicate id 'tip-0' (also candidates[0].id)",
    ),
    (
        "candidate value count",
        _append_value(1),
        "candidates[1].values",
        "expected 11 values (one per candidate_feature_names entry), got 12",
    ),
    (
        "NaN candidate value",
        _cand_value(2, 7, float("nan")),
        "candidates[2].values[7]",
        "feature 'tip_prior_ctr' must be a finite float32, got nan",
    ),
    (
        "infinite candidate value",
        _cand_value(0, 10, float("inf")),
        "candidates[0].values[10]",
        "feature 'topic_affinity' must be a finite float32, got inf",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "field", "description"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
def test_invalid_requests_name_the_field(
    model: scoring.Model, mutate: Mutation, field: str, description: str
) -> None:
    req = make_request()
    mutate(req)
    with pytest.raises(InvalidArgument) as info:
        scoring.score(model, **req)
    assert info.value.field == field
    assert info.value.description.startswith(description), info.value.description
    assert str(info.value) == f"{field}: {info.value.description}"
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("faults", "field"),
    [
        ((_ctx_value(1, float("nan")), _no_candidates), "context_values[1]"),
        ((_ctx_value(1, float("nan")), _cand_name(0, "nope")), "context_values[1]"),
        ((_ctx_value(1, float("nan")), _cand_id(2, "tip-0")), "context_values[1]"),
        ((_ctx_value(1, float("nan")), _append_value(1)), "context_values[1]"),
        ((_ctx_value(1, float("nan")), _cand_value(0, 0, float("inf"))), "context_values[1]"),
        ((_cand_value(0, 0, float("nan")), _cand_id(2, "tip-0")), "candidates[2].id"),
        ((_cand_value(0, 0, float("nan")), _append_value(2)), "candidates[2].values"),
        (
            (_cand_value(2, 2, float("nan")), _cand_value(1, 5, float("inf"))),
            "candidates[1].values[5]",
        ),
    ],
)
def test_the_first_fault_in_field_order_is_reported(
    model: scoring.Model, faults: tuple[Mutation, ...], field: str
) -> None:
    # Context values are checked together with the candidates' values on the happy path; a
    # request with several faults must still name the earliest field (see align_request).
    req = make_request()
    for fault in faults:
        fault(req)
    with pytest.raises(InvalidArgument) as info:
        scoring.score(model, **req)
    assert info.value.field == field


def test_missing_required_lists_every_missing_name(model: scoring.Model) -> None:
    req = make_request()
    _drop_ctx("is_new_user")(req)
    _drop_ctx("tenure_days")(req)
    with pytest.raises(InvalidArgument) as info:
        scoring.score(model, **req)
    assert info.value.description == "missing required feature(s): tenure_days, is_new_user"


def test_omitting_only_optional_features_is_fine(model: scoring.Model) -> None:
    req = make_request()
    for name in ("like_rate_30d", "streak_days"):
        _drop_ctx(name)(req)
    for name in ("tip_prior_ctr", "topic_affinity"):
        _drop_cand(name)(req)
    assert scoring.score(model, **req).scores.shape == (3,)


def test_extreme_finite_inputs_still_give_probabilities(model: scoring.Model) -> None:
    big = float(np.finfo(np.float32).max)
    ctx = {k: big for k in CONTEXT}
    cands = [{k: -big for k in CANDIDATES[0]}, {k: big for k in CANDIDATES[0]}]
    scores = scoring.score(model, **make_request(ctx, cands)).scores
    assert np.isfinite(scores).all() and ((scores >= 0) & (scores <= 1)).all()


def test_predict_checks_shapes(model: scoring.Model) -> None:
    ctx = np.zeros(features.N_CONTEXT, dtype=np.float32)
    cand = np.zeros((2, features.N_CANDIDATE), dtype=np.float32)
    assert model.predict(ctx, cand).shape == (2,)
    with pytest.raises(ValueError, match="context: expected shape"):
        model.predict(ctx[:-1], cand)
    with pytest.raises(ValueError, match="candidates: expected shape"):
        model.predict(ctx, cand[:, :-1])
    with pytest.raises(ValueError, match="does not fit"):
        model.predict_rows(np.zeros((3, features.N_CONTEXT)), cand)


def test_predict_rows_equals_per_request_predict(model: scoring.Model) -> None:
    # Micro-batching stacks requests: one product must equal the per-request answers.
    rng = np.random.default_rng(3)
    ctx_a = rng.uniform(0, 5, features.N_CONTEXT).astype(np.float32)
    ctx_b = rng.uniform(0, 5, features.N_CONTEXT).astype(np.float32)
    cand = rng.uniform(0, 5, (5, features.N_CANDIDATE)).astype(np.float32)
    stacked = model.predict_rows(np.stack([ctx_a] * 2 + [ctx_b] * 3), cand)
    np.testing.assert_allclose(stacked[:2], model.predict(ctx_a, cand[:2]), rtol=0, atol=1e-12)
    np.testing.assert_allclose(stacked[2:], model.predict(ctx_b, cand[2:]), rtol=0, atol=1e-12)


def test_sigmoid_is_stable() -> None:
    z = np.array([-1000.0, -5.0, 0.0, 5.0, 1000.0])
    p = scoring.sigmoid(z)
    np.testing.assert_allclose(p, [0.0, 1 / (1 + np.exp(5.0)), 0.5, 1 / (1 + np.exp(-5.0)), 1.0])


@pytest.mark.parametrize("reverse_context", [False, True])
def test_one_buffer_path_scores_as_the_two_array_path(
    model: scoring.Model, reverse_context: bool
) -> None:
    # A columnar request's values arrive as one float32 buffer (api.packed); when the
    # candidates are in model order they stay one buffer (the context reordered into it if need
    # be) and predict_aligned bounds them in one pass: same scores as predict on the arrays.
    req = make_request(context=dict(reversed(list(CONTEXT.items()))) if reverse_context else None)
    values = np.array(
        [*req["context_values"], *(v for row in req["candidate_values"] for v in row)],
        dtype=np.float32,
    )
    aligned = scoring.align_columnar_request(
        **{**req, "candidate_values": [v for row in req["candidate_values"] for v in row]},
        values=values,
    )
    assert aligned.values is not None
    np.testing.assert_array_equal(
        aligned.context,
        np.array([CONTEXT[n] for n in features.CONTEXT_FEATURE_NAMES], dtype=np.float32),
    )
    np.testing.assert_array_equal(
        model.predict_aligned(aligned), model.predict(aligned.context, aligned.candidates)
    )
    np.testing.assert_allclose(
        model.predict_aligned(aligned), scoring.score(model, **req).scores, rtol=0, atol=1e-15
    )
