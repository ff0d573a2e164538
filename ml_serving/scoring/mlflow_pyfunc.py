"""The tips-ranker as an MLflow pyfunc model, so ``mlflow.pyfunc.load_model`` scores like Score."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, Schema

from ml_serving.scoring import features
from ml_serving.scoring.features import Float64Array, Group
from ml_serving.scoring.model import Model
from ml_serving.scoring.registry import CARD_FILE, WEIGHTS_FILE, load_version_dir

ARTIFACT_KEYS: Final = {"weights": WEIGHTS_FILE, "card": CARD_FILE}
"""pyfunc artifact names -> the registry file each one is (pyfunc copies them to artifacts/)."""


def signature() -> ModelSignature:
    """One row per candidate: every context and candidate feature as a float column (those with
    a default may be absent or NaN); the output is one probability per row."""
    columns = [
        ColSpec("double", f.name, required=f.default is None)
        for group in (Group.CONTEXT, Group.CANDIDATE)
        for f in features.specs(group)
    ]
    return ModelSignature(inputs=Schema(columns), outputs=Schema([ColSpec("double")]))


def _raw(frame: Any, group: Group) -> np.ndarray[Any, np.dtype[np.float32]]:
    # NaN marks "not provided" here as in training: fill_defaults applies the defaults and
    # refuses a missing required feature.
    out = np.full((len(frame), len(features.specs(group))), np.nan, dtype=features.DTYPE)
    for i, spec in enumerate(features.specs(group)):
        if spec.name in frame.columns:
            out[:, i] = np.asarray(frame[spec.name], dtype=np.float64)
    return features.fill_defaults(out, group)


class TipsRankerModel(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
    """Loads the registry files of one version (validated as the server does) and predicts
    through ``Model.predict_rows``, the offline path that serving is tested against."""

    def __init__(self) -> None:
        self._model: Model | None = None

    def load_context(self, context: Any) -> None:
        """Load and validate ``weights.npz`` and ``card.json`` from the model's artifacts."""
        directory = Path(context.artifacts["card"]).parent
        card_name, card_version = _card_identity(directory)
        self._model = load_version_dir(directory, card_name, card_version)

    # MLflow reads these hints (a DataFrame in, an array out) besides the logged signature.
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> np.ndarray[Any, Any]:
        """Probabilities for a DataFrame with one row per (user context, candidate) pair."""
        if self._model is None:
            raise RuntimeError("load_context has not run")
        unknown = (
            set(model_input.columns)
            - set(features.CONTEXT_FEATURE_NAMES)
            - set(features.CANDIDATE_FEATURE_NAMES)
        )
        if unknown:
            raise ValueError(f"unknown feature columns: {sorted(unknown)}")
        probs: Float64Array = self._model.predict_rows(
            _raw(model_input, Group.CONTEXT), _raw(model_input, Group.CANDIDATE)
        )
        return probs


def _card_identity(directory: Path) -> tuple[str, str]:
    card = json.loads((directory / CARD_FILE).read_text(encoding="utf-8"))
    return str(card["model_name"]), str(card["version"])


# Logged as a model from code: MLflow runs this file at load time, so loading unpickles nothing.
mlflow.models.set_model(TipsRankerModel())
