"""Valid, realistic requests for tests (and the source of the bench/ghz request payloads)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ml_serving._proto.mlserving.v1 import generation_pb2, scoring_pb2
from ml_serving._proto.mlserving.v1 import inference_service_pb2 as pb
from ml_serving.scoring import features


def context_row(rng: np.random.Generator) -> dict[str, float]:
    """One user's context features, named."""
    tenure = float(rng.integers(1, 900))
    hour = float(rng.uniform(0, 24))
    return {
        "tenure_days": tenure,
        "sessions_7d": float(rng.integers(0, 30)),
        "tips_seen_7d": float(rng.integers(0, 60)),
        "like_rate_30d": round(float(rng.beta(2, 12)), 4),
        "streak_days": float(rng.integers(0, 40)),
        "is_new_user": 1.0 if tenure < 14 else 0.0,
        "local_hour_sin": round(math.sin(2 * math.pi * hour / 24), 5),
        "local_hour_cos": round(math.cos(2 * math.pi * hour / 24), 5),
    }


def candidate_row(rng: np.random.Generator) -> dict[str, float]:
    """One candidate tip's features, named."""
    category = int(rng.integers(0, len(features.CATEGORIES)))
    row = {f"category_{c}": float(i == category) for i, c in enumerate(features.CATEGORIES)}
    row.update(
        {
            "tip_length_chars": float(rng.integers(40, 400)),
            "tip_age_days": float(rng.integers(0, 720)),
            "tip_prior_ctr": round(float(rng.beta(2, 18)), 4),
            "readability": round(float(rng.uniform(30, 90)), 1),
            "has_action_step": float(rng.integers(0, 2)),
            "topic_affinity": round(float(rng.dirichlet(np.ones(5))[category]), 4),
        }
    )
    return row


def score_request(candidates: int = 20, seed: int = 7) -> pb.ScoreRequest:
    """A valid ScoreRequest for the shipped model with `candidates` candidate tips."""
    rng = np.random.default_rng(seed)
    ctx = context_row(rng)
    rows = [candidate_row(rng) for _ in range(candidates)]
    names = list(features.CANDIDATE_FEATURE_NAMES)
    return pb.ScoreRequest(
        user_id=f"user-{seed}",
        context_feature_names=list(ctx),
        context_values=list(ctx.values()),
        candidate_feature_names=names,
        candidates=[
            scoring_pb2.Candidate(id=f"tip-{i:04d}", values=[row[n] for n in names])
            for i, row in enumerate(rows)
        ],
    )


def tip_context(**overrides: Any) -> generation_pb2.TipContext:
    """A realistic TipContext."""
    fields: dict[str, Any] = {
        "topic": "sleep",
        "goal": "fall asleep before 11pm on weeknights",
        "note": "I keep scrolling my phone in bed",
        "interests": ["reading", "running"],
        "experience_level": generation_pb2.EXPERIENCE_LEVEL_BEGINNER,
        "streak_days": 4,
        "recent_tips": ["Keep your bedroom cool and dark."],
        "locale": "en-GB",
    }
    fields.update(overrides)
    return generation_pb2.TipContext(**fields)


def generate_request(
    prompt_version: str = "", user_id: str = "user-42", **context: Any
) -> pb.GenerateRequest:
    """A valid GenerateRequest (`context` overrides TipContext fields)."""
    return pb.GenerateRequest(
        user_id=user_id,
        prompt_version=prompt_version,
        context=tip_context(**context),
        limits=generation_pb2.GenerationLimits(max_tokens=120),
    )


def generate_stream_request(
    prompt_version: str = "", user_id: str = "user-42", **context: Any
) -> pb.GenerateStreamRequest:
    """A valid GenerateStreamRequest (same fields as GenerateRequest)."""
    return pb.GenerateStreamRequest.FromString(
        generate_request(prompt_version, user_id, **context).SerializeToString()
    )


def columnar(request: pb.ScoreRequest, layout: int = 0) -> pb.ScoreRequest:
    """The same Score request in the columnar form (candidate_ids + row-major candidate_values),
    asking for the response `layout` (a scoring_pb2.ScoreLayout value)."""
    out = pb.ScoreRequest()
    out.CopyFrom(request)
    del out.candidates[:]
    out.candidate_ids.extend(c.id for c in request.candidates)
    out.candidate_values.extend(v for c in request.candidates for v in c.values)
    out.response_layout = layout  # type: ignore[assignment]
    return out
