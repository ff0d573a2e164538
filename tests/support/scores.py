"""What the promoted model predicts offline for a request's rows: the parity reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ml_serving._proto.mlserving.v1 import inference_service_pb2 as pb
from ml_serving.config import REPO_MODELS
from ml_serving.scoring import features
from ml_serving.scoring.registry import ModelRegistry


def offline_scores(request: pb.ScoreRequest, root: Path = REPO_MODELS) -> np.ndarray:
    """What the promoted model predicts offline for the request's rows (model feature order)."""
    registry = ModelRegistry(root)
    model = registry.load("tips-ranker", registry.promoted_version("tips-ranker"))
    ctx = dict(zip(request.context_feature_names, request.context_values, strict=True))
    context = np.array([ctx[n] for n in features.CONTEXT_FEATURE_NAMES], dtype=np.float32)
    order = [
        list(request.candidate_feature_names).index(n) for n in features.CANDIDATE_FEATURE_NAMES
    ]
    candidates = np.array(
        [[c.values[i] for i in order] for c in request.candidates], dtype=np.float32
    )
    return model.predict(context, candidates)
