"""Tests of the simulator, the metrics, the training pipeline and its reproducibility."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ml_serving.scoring import features
from ml_serving.scoring import model as scoring
from ml_serving.scoring.registry import ModelRegistry
from ml_serving.training import simulator, train
from ml_serving.training.reproducibility import EXACT, model_differences
from tests.support import REPO

SHIPPED = REPO / "models"
NAME = train.MODEL_NAME
SMALL = simulator.SimulatorConfig(n_users=200, n_tips=80, candidates_per_request=5)


@pytest.fixture(scope="module")
def shipped_card() -> dict[str, Any]:
    card: dict[str, Any] = json.loads((SHIPPED / NAME / "1" / "card.json").read_text())
    return card


@pytest.fixture(scope="module")
def retrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped pipeline re-run from scratch through its CLI (one run for the module)."""
    root = tmp_path_factory.mktemp("models")
    argv = ["--root", str(root), "--seed", str(train.SHIPPED_SEED), "--version", "1", "--promote"]
    assert train.main(argv) == 0
    return root


# --- reproducibility (the definition: ml_serving/training/reproducibility.py) ---------------------


def test_retraining_reproduces_the_shipped_model(retrained: Path) -> None:
    new = ModelRegistry(retrained).load(NAME, "1")
    old = ModelRegistry(SHIPPED).load(NAME, "1")
    # Weights, normalisation, reference predictions and every card section, each within its
    # tolerance: the shipped files may come from another CPU, whose kernels add in another order.
    assert model_differences(new, old) == []
    assert ModelRegistry(retrained).promoted_version(NAME) == "1"


def test_same_seed_same_bits_in_process() -> None:
    a = train.train(3, config=SMALL)
    b = train.train(3, config=SMALL)
    assert model_differences(a.model, b.model, EXACT) == []  # one CPU, one set of kernels
    c = train.train(4, config=SMALL)
    assert any(d.startswith("metrics.heldout.auc: ") for d in model_differences(c.model, a.model))


# --- the shipped card -----------------------------------------------------------------------------


def test_shipped_card_has_every_section(shipped_card: dict[str, Any]) -> None:
    for key in (
        "inputs",
        "metrics",
        "calibration",
        "fairness",
        "training_data",
        "rollout_history",
        "reference_rows",
        "model_selection",
        "intended_use",
    ):
        assert shipped_card[key], key
    assert shipped_card["training_data"]["seed"] == train.SHIPPED_SEED
    assert shipped_card["rollout_history"][0]["event"] == "trained"
    assert shipped_card["rollout_history"][-1]["event"] == "promoted"
    assert len(shipped_card["calibration"]["bins"]) == train.N_BINS
    assert len(shipped_card["reference_rows"]) == train.N_REFERENCE_ROWS
    # Some reference rows omit optional features, so the parity check covers defaults.
    assert any(len(r["context"]) < features.N_CONTEXT for r in shipped_card["reference_rows"])
    assert any(len(r["candidate"]) < features.N_CANDIDATE for r in shipped_card["reference_rows"])


def test_shipped_model_beats_baseline_and_passes_fairness(shipped_card: dict[str, Any]) -> None:
    m = shipped_card["metrics"]
    assert m["heldout"]["auc"] > m["baseline_main_effects"]["auc"] > m["baseline_popularity_auc"]
    assert m["heldout"]["log_loss"] < m["baseline_main_effects"]["log_loss"]
    assert m["heldout"]["auc"] < m["oracle_true_probability"]["auc"]
    assert m["heldout"]["ece"] < 0.01
    assert shipped_card["fairness"]["passed"] is True
    groups = shipped_card["fairness"]["groups"]
    assert groups["new"]["n_rows"] + groups["established"]["n_rows"] == m["heldout"]["n_rows"]
    # No training row reaches the clip: clipping only ever touches absurd serving inputs.
    assert shipped_card["training"]["max_abs_normalized_value"] < features.Z_CLIP
    assert shipped_card["training"]["converged"] is True


# --- serving equals offline ----------------------------------------------------------------------


def test_serving_predictions_equal_offline_predictions() -> None:
    model = ModelRegistry(SHIPPED).load(NAME, "1")
    data = simulator.simulate(99, SMALL)
    for request_id in np.unique(data.request_id)[:20]:
        rows = np.flatnonzero(data.request_id == request_id)
        context = {
            n: float(v)
            for n, v in zip(features.CONTEXT_FEATURE_NAMES, data.context[rows[0]], strict=True)
            if not np.isnan(v)
        }
        cands = [
            {
                n: float(v)
                for n, v in zip(features.CANDIDATE_FEATURE_NAMES, data.candidates[r], strict=True)
                if not np.isnan(v)
            }
            for r in rows
        ]
        offline = train.offline_predict(SHIPPED / NAME / "1", context, cands)
        # Online: names in another order, one candidate name list shared by all candidates.
        cand_names = sorted(features.CANDIDATE_FEATURE_NAMES)
        present = [n for n in cand_names if all(n in c for c in cands)]
        if len(present) < len(cand_names):
            # An optional feature missing for some candidates: send its default explicitly.
            cand_values = [[c[n] if n in c else _default(n) for n in cand_names] for c in cands]
        else:
            cand_values = [[c[n] for n in cand_names] for c in cands]
        online = scoring.score(
            model,
            context_feature_names=list(reversed(list(context))),
            context_values=list(reversed(list(context.values()))),
            candidate_feature_names=cand_names,
            candidate_ids=[f"t{r}" for r in rows],
            candidate_values=cand_values,
            max_candidates=50,
        )
        np.testing.assert_allclose(online.scores, offline, rtol=0, atol=1e-12)


def _default(name: str) -> float:
    spec = next(f for f in features.CANDIDATE_FEATURES if f.name == name)
    assert spec.default is not None
    return spec.default


def test_offline_predict_refuses_missing_required_feature() -> None:
    with pytest.raises(ValueError, match="required context feature"):
        train.offline_predict(SHIPPED / NAME / "1", {"sessions_7d": 1.0}, [{}])


# --- simulator ------------------------------------------------------------------------------------


def test_simulator_is_deterministic_and_shaped() -> None:
    a = simulator.simulate(5, SMALL)
    b = simulator.simulate(5, SMALL)
    for field in ("context", "candidates", "labels", "segment", "true_prob"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    n = len(a)
    assert a.context.shape == (n, features.N_CONTEXT) and a.context.dtype == np.float32
    assert a.candidates.shape == (n, features.N_CANDIDATE) and a.candidates.dtype == np.float32
    assert set(np.unique(a.labels)) <= {0, 1}
    assert ((a.true_prob > 0) & (a.true_prob < 1)).all()
    # Exactly one category per tip; NaN only where a default exists.
    np.testing.assert_array_equal(a.candidates[:, :5].sum(axis=1), 1.0)
    for group, arr in (
        (features.Group.CONTEXT, a.context),
        (features.Group.CANDIDATE, a.candidates),
    ):
        for spec, col in zip(features.specs(group), arr.T, strict=True):
            if spec.required:
                assert not np.isnan(col).any(), spec.name
    assert not np.array_equal(simulator.simulate(6, SMALL).labels, a.labels)


def test_simulator_segment_matches_the_feature() -> None:
    data = simulator.simulate(5, SMALL)
    new_col = data.context[:, features.CONTEXT_FEATURE_NAMES.index("is_new_user")]
    np.testing.assert_array_equal(new_col == 1.0, data.segment)
    tenure = data.context[:, features.CONTEXT_FEATURE_NAMES.index("tenure_days")]
    assert (tenure[data.segment] < simulator.NEW_USER_TENURE_DAYS).all()
    assert (tenure[~data.segment] >= simulator.NEW_USER_TENURE_DAYS).all()


# --- metrics and the solver -----------------------------------------------------------------------


def test_auc() -> None:
    y = np.array([0, 0, 1, 1])
    assert train.auc(y, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert train.auc(y, np.array([0.4, 0.3, 0.2, 0.1])) == 0.0
    assert train.auc(y, np.full(4, 0.5)) == 0.5
    assert train.auc(y, np.array([0.1, 0.3, 0.3, 0.4])) == pytest.approx(0.875)
    assert np.isnan(train.auc(np.ones(3), np.array([0.1, 0.2, 0.3])))


def test_log_loss_and_calibration() -> None:
    y = np.array([1, 0])
    assert train.log_loss(y, np.array([0.5, 0.5])) == pytest.approx(np.log(2))
    assert np.isfinite(train.log_loss(y, np.array([0.0, 1.0])))
    # 10 rows at p=0.15 with 2 positives (0.2 observed) and 10 at p=0.85 with 8 (0.8 observed).
    p = np.r_[np.full(10, 0.15), np.full(10, 0.85)]
    labels = np.r_[[1, 1] + [0] * 8, [1] * 8 + [0, 0]]
    bins = train.calibration_bins(labels, p)
    assert [b["count"] for b in bins] == [0, 10, 0, 0, 0, 0, 0, 0, 10, 0]
    assert bins[1]["observed_rate"] == pytest.approx(0.2)
    assert bins[0]["mean_predicted"] is None
    assert train.expected_calibration_error(labels, p) == pytest.approx(0.05)
    edge = train.calibration_bins(np.array([1]), np.array([1.0]))
    assert edge[-1]["count"] == 1


def test_fit_logistic_recovers_known_coefficients() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40_000, 3))
    true = np.array([1.0, -0.5, 0.25])
    y = (rng.random(40_000) < scoring.sigmoid(x @ true - 1.0)).astype(np.int8)
    coef, intercept, info = train.fit_logistic(x, y, l2=1e-6)
    assert info.converged and info.iterations < 15
    np.testing.assert_allclose(coef, true, atol=0.05)
    assert intercept == pytest.approx(-1.0, abs=0.05)


def test_fairness_flags_a_miscalibrated_segment() -> None:
    labels = np.r_[np.zeros(90), np.ones(10), np.zeros(90), np.ones(10)].astype(np.int8)
    probs = np.r_[np.full(100, 0.1), np.full(100, 0.3)]
    segment = np.r_[np.zeros(100, bool), np.ones(100, bool)]
    report = train.fairness(labels, probs, segment)
    assert report["mean_predicted_minus_observed"] == {"new": 0.2, "established": 0.0}
    assert report["checks"]["calibration_in_the_large"] is False
    assert report["passed"] is False
