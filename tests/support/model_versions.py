"""Builders of extra valid model versions (from the shipped version 1) for registry tests."""

from __future__ import annotations

import copy
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from ml_serving.scoring import features
from ml_serving.scoring.model import Model
from ml_serving.scoring.registry import ModelRegistry
from tests.support import REPO

NAME = "tips-ranker"
"""The shipped model."""


def copy_shipped(root: Path) -> ModelRegistry:
    """A copy of the shipped registry (version 1, promoted) under `root`."""
    shutil.copytree(REPO / "models" / NAME, root / NAME)
    return ModelRegistry(root)


def add_derived_version(
    registry: ModelRegistry, version: str, *, flip: bool = False, shift: float = 0.0
) -> Model:
    """A valid new version from version 1: `flip` negates coefficients and intercept (every
    score s becomes 1 - s: the ranking reversed), `shift` moves the intercept (same ranking);
    the card's reference rows are recomputed, so the registry's validation passes."""
    v1 = registry.load(NAME, "1")
    sign = -1.0 if flip else 1.0
    weights = replace(
        v1.weights, coef=sign * v1.weights.coef, intercept=sign * v1.weights.intercept + shift
    )
    card: dict[str, Any] = copy.deepcopy(dict(v1.card))
    card["version"] = version
    card["rollout_history"] = [{"event": "trained", "version": version}]
    model = Model(NAME, version, card, weights)
    for row in card["reference_rows"]:
        ctx = features.rows_from_mappings([row["context"]], features.Group.CONTEXT)[0]
        cand = features.rows_from_mappings([row["candidate"]], features.Group.CANDIDATE)
        row["prediction"] = float(model.predict(ctx, cand)[0])
    registry.add_version(NAME, version, weights, card)
    return registry.load(NAME, version)
