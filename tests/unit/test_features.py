"""Tests of the shared feature definition: names, order, defaults, transforms, design matrix."""

from __future__ import annotations

import numpy as np
import pytest

from ml_serving.scoring import features
from ml_serving.scoring.features import Group


def test_names_and_order_are_pinned() -> None:
    # The order is part of every trained model: changing it needs a new model version.
    assert features.CONTEXT_FEATURE_NAMES == (
        "tenure_days",
        "sessions_7d",
        "tips_seen_7d",
        "streak_days",
        "like_rate_30d",
        "is_new_user",
        "local_hour_sin",
        "local_hour_cos",
    )
    assert features.CANDIDATE_FEATURE_NAMES == (
        "category_health",
        "category_productivity",
        "category_finance",
        "category_learning",
        "category_relationships",
        "tip_length_chars",
        "tip_age_days",
        "tip_prior_ctr",
        "readability",
        "has_action_step",
        "topic_affinity",
    )
    assert features.N_CONTEXT == 8
    assert features.N_CANDIDATE == 11


def test_names_are_unique_across_groups() -> None:
    names = features.CONTEXT_FEATURE_NAMES + features.CANDIDATE_FEATURE_NAMES
    assert len(set(names)) == len(names)
    assert all(f.group is Group.CONTEXT for f in features.CONTEXT_FEATURES)
    assert all(f.group is Group.CANDIDATE for f in features.CANDIDATE_FEATURES)


def test_defaults_policy_is_pinned() -> None:
    optional = {f.name: f.default for f in features.CONTEXT_FEATURES + features.CANDIDATE_FEATURES}
    optional = {k: v for k, v in optional.items() if v is not None}
    assert optional == {
        "like_rate_30d": features.LIKE_RATE_PRIOR,
        "streak_days": 0.0,
        "tip_prior_ctr": features.TIP_CTR_PRIOR,
        "topic_affinity": features.TOPIC_AFFINITY_PRIOR,
    }
    ctx_defaults = features.defaults(Group.CONTEXT)
    assert ctx_defaults.dtype == features.DTYPE
    assert np.isnan(ctx_defaults[0])  # tenure_days is required
    assert ctx_defaults[features.CONTEXT_FEATURE_NAMES.index("streak_days")] == 0.0


def test_design_columns_cover_features_and_crosses() -> None:
    assert features.N_DESIGN == features.N_CONTEXT + features.N_CANDIDATE + len(features.CROSSES)
    assert len(set(features.DESIGN_COLUMNS)) == features.N_DESIGN
    for cross in features.CROSSES:
        assert cross.context in features.CONTEXT_FEATURE_NAMES
        assert cross.candidate in features.CANDIDATE_FEATURE_NAMES
        assert cross.name in features.DESIGN_COLUMNS


def test_fill_defaults_fills_optional_and_refuses_required() -> None:
    row = np.full((2, features.N_CANDIDATE), 1.0, dtype=np.float32)
    ctr = features.CANDIDATE_FEATURE_NAMES.index("tip_prior_ctr")
    row[1, ctr] = np.nan
    filled = features.fill_defaults(row, Group.CANDIDATE)
    assert filled[1, ctr] == np.float32(features.TIP_CTR_PRIOR)
    assert filled[0, ctr] == 1.0
    assert np.isnan(row[1, ctr])  # the input is not modified

    row[0, features.CANDIDATE_FEATURE_NAMES.index("readability")] = np.nan
    with pytest.raises(ValueError, match="required candidate feature 'readability' has NaN"):
        features.fill_defaults(row, Group.CANDIDATE)


def test_transform_log1p_and_negative_counts() -> None:
    raw = np.zeros(features.N_CONTEXT, dtype=np.float32)
    raw[0] = np.e - 1.0  # tenure_days
    raw[1] = -5.0  # a negative count is treated as zero, not NaN
    raw[4] = 0.3  # like_rate_30d: identity
    out = features.transform(raw, Group.CONTEXT)
    assert out.dtype == np.float64
    assert out[0] == pytest.approx(1.0)
    assert out[1] == 0.0
    assert out[4] == pytest.approx(0.3)
    assert raw[1] == -5.0


def _training_like_rows(n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ctx = rng.uniform(0.0, 50.0, (n, features.N_CONTEXT)).astype(np.float32)
    ctx[:, features.CONTEXT_FEATURE_NAMES.index("is_new_user")] = rng.integers(0, 2, n)
    cand = rng.uniform(0.0, 100.0, (n, features.N_CANDIDATE)).astype(np.float32)
    cand[:, :5] = np.eye(5)[rng.integers(0, 5, n)]
    cand[:, features.CANDIDATE_FEATURE_NAMES.index("readability")] = 42.0  # constant column
    return ctx, cand


def test_normalization_fit_standardizes_only_continuous_features() -> None:
    ctx, cand = _training_like_rows()
    norm = features.Normalization.fit(ctx, cand)
    norm.check()
    for group, mean, std in (
        (Group.CONTEXT, norm.context_mean, norm.context_std),
        (Group.CANDIDATE, norm.candidate_mean, norm.candidate_std),
    ):
        for i, spec in enumerate(features.specs(group)):
            if not spec.standardize:
                assert (mean[i], std[i]) == (0.0, 1.0), spec.name
    z = norm.normalize_context(ctx)
    scaled = [i for i, f in enumerate(features.CONTEXT_FEATURES) if f.standardize]
    np.testing.assert_allclose(z[:, scaled].mean(axis=0), 0.0, atol=1e-9)
    np.testing.assert_allclose(z[:, scaled].std(axis=0), 1.0, atol=1e-9)
    # A constant column gets std 1 instead of a division by zero.
    assert norm.candidate_std[features.CANDIDATE_FEATURE_NAMES.index("readability")] == 1.0


def test_normalization_clips_absurd_inputs() -> None:
    ctx, cand = _training_like_rows()
    norm = features.Normalization.fit(ctx, cand)
    row = cand[:1].copy()
    row[0, features.CANDIDATE_FEATURE_NAMES.index("tip_prior_ctr")] = 3e38
    z = norm.normalize_candidates(row)
    assert np.isfinite(z).all()
    assert z.max() == features.Z_CLIP


def test_normalization_round_trip_and_shape_check() -> None:
    ctx, cand = _training_like_rows()
    norm = features.Normalization.fit(ctx, cand)
    again = features.Normalization.from_arrays(norm.to_arrays())
    for key, arr in norm.to_arrays().items():
        np.testing.assert_array_equal(arr, again.to_arrays()[key])
    bad = norm.to_arrays()
    bad["context_mean"] = bad["context_mean"][:-1]
    with pytest.raises(ValueError, match=r"context_mean: expected float64 shape \(8,\)"):
        features.Normalization.from_arrays(bad)
    bad = norm.to_arrays()
    bad["candidate_std"] = np.zeros(features.N_CANDIDATE)
    with pytest.raises(ValueError, match="standard deviation must be positive"):
        features.Normalization.from_arrays(bad)


def test_describe_lists_every_input_with_its_normalisation() -> None:
    ctx, cand = _training_like_rows()
    described = features.Normalization.fit(ctx, cand).describe()
    assert [f["name"] for f in described["context"]] == list(features.CONTEXT_FEATURE_NAMES)
    assert [f["name"] for f in described["candidate"]] == list(features.CANDIDATE_FEATURE_NAMES)
    tenure = described["context"][0]
    assert tenure["transform"] == "log1p" and tenure["dtype"] == "float32"
    assert tenure["default"] is None and tenure["std"] > 0


def test_design_matrix_broadcasts_one_context_like_repeated_rows() -> None:
    rng = np.random.default_rng(1)
    ctx = rng.normal(size=features.N_CONTEXT)
    cand = rng.normal(size=(5, features.N_CANDIDATE))
    one = features.design_matrix(ctx, cand)
    rows = features.design_matrix(np.repeat(ctx[None, :], 5, axis=0), cand)
    np.testing.assert_array_equal(one, rows)
    assert one.shape == (5, features.N_DESIGN)
    col = features.DESIGN_COLUMNS.index("is_new_user*has_action_step")
    left = features.CONTEXT_FEATURE_NAMES.index("is_new_user")
    right = features.CANDIDATE_FEATURE_NAMES.index("has_action_step")
    np.testing.assert_array_equal(one[:, col], ctx[left] * cand[:, right])
    np.testing.assert_array_equal(one[:, features.N_CONTEXT], cand[:, 0])


def test_rows_from_mappings() -> None:
    rows = features.rows_from_mappings(
        [
            {
                "tenure_days": 3.0,
                "sessions_7d": 1.0,
                "tips_seen_7d": 2.0,
                "is_new_user": 1.0,
                "local_hour_sin": 0.0,
                "local_hour_cos": 1.0,
            }
        ],
        Group.CONTEXT,
    )
    assert rows.shape == (1, features.N_CONTEXT)
    assert rows[0, features.CONTEXT_FEATURE_NAMES.index("like_rate_30d")] == np.float32(
        features.LIKE_RATE_PRIOR
    )
    with pytest.raises(KeyError, match="unknown context feature 'nope'"):
        features.rows_from_mappings([{"nope": 1.0}], Group.CONTEXT)
    with pytest.raises(ValueError, match="'tenure_days' must be finite"):
        features.rows_from_mappings([{"tenure_days": float("nan")}], Group.CONTEXT)
    with pytest.raises(ValueError, match="required context feature 'tenure_days'"):
        features.rows_from_mappings([{"sessions_7d": 1.0}], Group.CONTEXT)


def test_context_fold_equals_the_design_matrix_product() -> None:
    rng = np.random.default_rng(7)
    coef = rng.normal(size=features.N_DESIGN)
    intercept = float(rng.normal())
    context = rng.normal(size=features.N_CONTEXT)
    candidates = rng.normal(size=(25, features.N_CANDIDATE))
    fold = features.ContextFold.of(coef, intercept)
    folded = context @ fold.matrix + fold.offset
    weights, bias = folded[: features.N_CANDIDATE], folded[features.N_CANDIDATE]
    expected = features.design_matrix(context, candidates) @ coef + intercept
    np.testing.assert_allclose(candidates @ weights + bias, expected, rtol=0, atol=1e-12)


def test_scoring_plan_equals_transform_normalize_and_design_matrix() -> None:
    # The serving fold (bounds, log1p, weights with the z-scoring folded in) against the plain
    # path training and predict_rows use, on raw rows that reach every branch: negative inputs
    # to log1p features, values far past the z-score clip on both sides, huge finite float32.
    rng = np.random.default_rng(11)
    context_raw = rng.uniform(0, 50, size=(200, features.N_CONTEXT)).astype(np.float32)
    candidates_raw = rng.uniform(0, 400, size=(200, features.N_CANDIDATE)).astype(np.float32)
    norm = features.Normalization.fit(context_raw, candidates_raw)
    coef = rng.normal(size=features.N_DESIGN)
    intercept = float(rng.normal())
    plan = features.ScoringPlan.of(norm, coef, intercept)
    extremes = np.array([-1e30, -5.0, -0.5, 0.0, 1e-3, 3e5, 3.4e38], dtype=np.float32)
    for trial in range(40):
        context = rng.uniform(-10, 60, size=features.N_CONTEXT).astype(np.float32)
        candidates = rng.uniform(-50, 500, size=(17, features.N_CANDIDATE)).astype(np.float32)
        if trial % 2:
            context[rng.integers(features.N_CONTEXT)] = rng.choice(extremes)
            mask = rng.random(candidates.shape) < 0.2
            candidates[mask] = rng.choice(extremes, size=int(mask.sum()))
        want = (
            features.design_matrix(
                norm.normalize_context(context), norm.normalize_candidates(candidates)
            )
            @ coef
            + intercept
        )
        np.testing.assert_allclose(plan.logits(context, candidates), want, rtol=1e-12, atol=1e-12)
        probabilities = 1.0 / (1.0 + np.exp(-want))
        np.testing.assert_allclose(
            plan.probabilities(context, candidates), probabilities, rtol=1e-12, atol=1e-15
        )
        packed = np.concatenate([context, candidates.ravel()])
        np.testing.assert_array_equal(
            plan.probabilities_packed(packed, len(candidates)),
            plan.probabilities(context, candidates),
        )
    # The packed bounds grow past their first capacity (64 rows) and still fit smaller requests.
    for n in (100, 3):
        context = rng.uniform(0, 50, size=features.N_CONTEXT).astype(np.float32)
        candidates = rng.uniform(-1, 400, size=(n, features.N_CANDIDATE)).astype(np.float32)
        packed = np.concatenate([context, candidates.ravel()])
        np.testing.assert_array_equal(
            plan.probabilities_packed(packed, n), plan.probabilities(context, candidates)
        )
