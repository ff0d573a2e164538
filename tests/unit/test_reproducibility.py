"""The one definition of a reproduced model: what it lets through and what it names."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from ml_serving.scoring.model import Model
from ml_serving.scoring.registry import ModelRegistry
from ml_serving.training import reproducibility, train
from ml_serving.training.reproducibility import (
    ACROSS_MACHINES,
    EXACT,
    card_differences,
    model_differences,
    prediction_differences,
    weight_differences,
)
from tests.support import REPO

NAME = "tips-ranker"


@pytest.fixture(scope="module")
def shipped() -> Model:
    return ModelRegistry(REPO / "models").load(NAME, "1")


def _card(shipped: Model) -> dict[str, Any]:
    return copy.deepcopy(dict(shipped.card))


def _with_coef(model: Model, coef: np.ndarray[Any, Any]) -> Model:
    return replace(model, weights=replace(model.weights, coef=coef))


def test_a_model_reproduces_itself_bit_for_bit(shipped: Model) -> None:
    assert model_differences(shipped, shipped, EXACT) == []
    assert model_differences(shipped, shipped) == []


def test_the_metric_tolerance_is_one_unit_of_the_cards_rounding() -> None:
    assert ACROSS_MACHINES.metric_atol == 10.0**-train.METRIC_DECIMALS


def test_last_bit_noise_in_the_weights_passes_and_a_real_change_is_named(shipped: Model) -> None:
    coef = shipped.weights.coef
    # What another CPU's kernels did to the shipped model: categories and intercept moved
    # together by 1e-13 (measured; see the module's docstring).
    noisy = coef.copy()
    noisy[:5] += 1e-13
    assert model_differences(_with_coef(shipped, noisy), shipped) == []
    assert model_differences(_with_coef(shipped, noisy), shipped, EXACT) == [
        "weights['coef']: 5 of 27 values beyond tolerance; worst weights['coef'][0] "
        f"{float(noisy[0])!r} != {float(coef[0])!r} (|diff| {abs(noisy[0] - coef[0]):.3g} > 0)"
    ]
    changed = coef.copy()
    changed[3] += 1e-6
    (line,) = model_differences(_with_coef(shipped, changed), shipped)
    assert line.startswith("weights['coef']: 1 of 27 values beyond tolerance; worst ")
    assert "weights['coef'][3]" in line


def test_weight_sets_must_have_the_same_arrays_shapes_and_dtypes(shipped: Model) -> None:
    arrays = shipped.weights.to_arrays()
    fewer = {k: v for k, v in arrays.items() if k != "intercept"}
    assert weight_differences(fewer, arrays) == ["weights['intercept']: missing"]
    assert weight_differences(arrays, fewer) == ["weights['intercept']: unexpected"]
    short = {**arrays, "coef": arrays["coef"][:-1]}
    assert weight_differences(short, arrays) == ["weights['coef']: shape (26,) != (27,)"]
    narrow: dict[str, np.ndarray[Any, Any]] = {**arrays, "coef": arrays["coef"].astype(np.float32)}
    assert weight_differences(narrow, arrays) == ["weights['coef']: dtype float32 != float64"]
    nan = {**arrays, "coef": np.where(np.arange(27) == 2, np.nan, arrays["coef"])}
    (line,) = weight_differences(nan, arrays)
    assert "1 of 27" in line and "weights['coef'][2] nan" in line


def test_predictions_are_held_to_their_own_tolerance() -> None:
    want = np.array([0.1, 0.35347947042355030, 0.9])
    assert prediction_differences(want + 3e-16, want) == []  # measured: 2.8e-16 at most
    (line,) = prediction_differences(want + np.array([0, 1e-9, 0]), want, what="scores")
    assert line.startswith("scores: 1 of 3 values beyond tolerance; worst scores[1] ")


def test_card_metrics_may_move_one_unit_of_their_sixth_decimal(shipped: Model) -> None:
    got = _card(shipped)
    auc = shipped.card["metrics"]["heldout"]["auc"]
    got["metrics"]["heldout"]["auc"] = round(auc + 1e-6, 6)  # the rounding went the other way
    assert card_differences(got, shipped.card) == []
    assert card_differences(got, shipped.card, EXACT) == [
        f"metrics.heldout.auc: {round(auc + 1e-6, 6)!r} != {auc!r} (|diff| 1e-06 > 0)"
    ]
    got["metrics"]["heldout"]["auc"] = round(auc + 2e-6, 6)
    (line,) = card_differences(got, shipped.card)
    assert line.startswith("metrics.heldout.auc: ")


def test_counts_flags_and_text_must_be_equal(shipped: Model) -> None:
    got = _card(shipped)
    got["metrics"]["heldout"]["n_rows"] += 1
    got["fairness"]["passed"] = not got["fairness"]["passed"]
    got["training"]["converged"] = 1  # an int is not a bool
    got["calibration"]["bins"].pop()
    got["summary"] += "!"
    assert card_differences(got, shipped.card) == [
        "calibration.bins: 9 items != 10",
        "fairness.passed: False != True",
        f"metrics.heldout.n_rows: {got['metrics']['heldout']['n_rows']} != "
        f"{shipped.card['metrics']['heldout']['n_rows']}",
        f"summary: {got['summary']!r} != {shipped.card['summary']!r}",
        "training.converged: 1 != True",
    ]


def test_numbers_quoted_in_text_follow_their_printed_precision(shipped: Model) -> None:
    got = _card(shipped)
    reason = shipped.card["model_selection"]["reason"]
    first = reason.split("held-out AUC ")[1].split(" ")[0]  # printed with 4 decimals
    nudged = f"{float(first) + 1e-4:.4f}"
    got["model_selection"]["reason"] = reason.replace(first, nudged, 1)
    assert card_differences(got, shipped.card) == []
    got["model_selection"]["reason"] = reason.replace(first, f"{float(first) + 2e-4:.4f}", 1)
    assert [d.split(":")[0] for d in card_differences(got, shipped.card)] == [
        "model_selection.reason"
    ]


def test_each_section_of_the_card_has_its_tolerance(shipped: Model) -> None:
    got = _card(shipped)
    coefficient = next(iter(got["parameters"]["coefficients"]))
    got["parameters"]["coefficients"][coefficient] += 1e-13  # weights: passes
    got["inputs"]["context"][0]["mean"] *= 1 + 1e-12  # normalisation: passes
    got["reference_rows"][0]["prediction"] += 1e-10  # predictions: named
    name, value = next((k, v) for k, v in got["reference_rows"][0]["candidate"].items() if v)
    got["reference_rows"][0]["candidate"][name] = value * (1 + 2.0**-22)  # data: named
    assert [d.split(":")[0] for d in card_differences(got, shipped.card)] == [
        f"reference_rows[0].candidate.{name}",
        "reference_rows[0].prediction",
    ]


def test_a_stored_copys_own_fields_are_not_compared(shipped: Model) -> None:
    got = _card(shipped)
    got["version"] = "7"
    got["weights_sha256"] = "0" * 64  # another machine's bytes: its own file's hash
    got["rollout_history"] = []
    assert card_differences(got, shipped.card, EXACT) == []
    assert {"version", "weights_sha256", "rollout_history"} == reproducibility.NOT_REPRODUCED
    del got["fairness"]
    got["extra"] = 1
    assert card_differences(got, shipped.card) == ["extra: unexpected", "fairness: missing"]
