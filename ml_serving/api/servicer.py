"""InferenceService: proto <-> domain translation only; the domain modules do the work."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import AsyncIterator
from typing import Any

import grpc

from ml_serving import errors
from ml_serving._proto.mlserving.v1 import generation_pb2, prompt_pb2, scoring_pb2
from ml_serving._proto.mlserving.v1 import inference_service_pb2 as pb
from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from ml_serving.api import packed, rpc
from ml_serving.config import Settings
from ml_serving.experiments.assignment import HowChosen
from ml_serving.features.lookup import FeatureLookup
from ml_serving.generation.context import TipSignals, check_id, profile_gaps, with_profile
from ml_serving.generation.prompts.registry import PromptRegistry
from ml_serving.generation.service import GenerationRequest, GenerationResult, Generator
from ml_serving.observability import logs, tracing
from ml_serving.scoring import features as model_features
from ml_serving.scoring.model import (
    AlignedRequest,
    ScoreResult,
    align_columnar_request,
    align_request,
    refuse_too_many_candidates,
)
from ml_serving.scoring.registry import ModelHolder
from ml_serving.scoring.shadow import ShadowScorer

_EXPERIENCE = {
    generation_pb2.EXPERIENCE_LEVEL_UNSPECIFIED: "",
    generation_pb2.EXPERIENCE_LEVEL_BEGINNER: "beginner",
    generation_pb2.EXPERIENCE_LEVEL_INTERMEDIATE: "intermediate",
    generation_pb2.EXPERIENCE_LEVEL_ADVANCED: "advanced",
}
_FINISH = {
    "stop": generation_pb2.FINISH_REASON_STOP,
    "length": generation_pb2.FINISH_REASON_LENGTH,
    "content_filter": generation_pb2.FINISH_REASON_CONTENT_FILTER,
}

_NO_FINISH = generation_pb2.FINISH_REASON_UNSPECIFIED
_CHOSEN = {
    HowChosen.REQUEST: prompt_pb2.PROMPT_CHOICE_REQUEST,
    HowChosen.EXPERIMENT: prompt_pb2.PROMPT_CHOICE_EXPERIMENT,
    HowChosen.DEFAULT: prompt_pb2.PROMPT_CHOICE_DEFAULT,
}
DECISION_ID_KEY = "x-decision-id"
"""Trailer carrying a Generate call's decision id (also in the response)."""
_LAYOUTS = frozenset(scoring_pb2.ScoreLayout.values())

GenerateLike = pb.GenerateRequest | pb.GenerateStreamRequest


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    """Serves Score from the promoted model and Generate from the prompt registry and LLM."""

    def __init__(
        self,
        settings: Settings,
        gate: rpc.Gate,
        models: ModelHolder,
        prompts: PromptRegistry,
        generator: Generator,
        shadow: ShadowScorer | None = None,
        features: FeatureLookup | None = None,
    ) -> None:
        self.gate = gate
        self.shadow = shadow
        self.features = features
        self._settings = settings
        self._models = models
        self._prompts = prompts
        self._generator = generator

    @rpc.unary
    async def Score(
        self,
        request: pb.ScoreRequest,
        context: grpc.aio.ServicerContext[pb.ScoreRequest, pb.ScoreResponse],
    ) -> pb.ScoreResponse:
        model = self._models.current  # one version for the whole request, even mid-promotion
        max_candidates = self._settings.max_candidates
        # Each field read once: every read of a repeated field builds a new wrapper.
        context_names = request.context_feature_names
        context_values = request.context_values
        candidate_names = request.candidate_feature_names
        candidate_ids = request.candidate_ids
        candidate_values = request.candidate_values
        columnar = len(candidate_ids) > 0 or len(candidate_values) > 0
        if columnar and len(request.candidates) > 0:
            raise errors.InvalidArgument(
                "candidates", "send candidates, or candidate_ids with candidate_values, not both"
            )
        layout = request.response_layout
        if layout not in _LAYOUTS:
            raise errors.InvalidArgument("response_layout", f"unknown value {layout}")
        if request.user_id:
            check_id("user_id", request.user_id)  # the bound Generate's user_id has
        n = len(candidate_ids) if columnar else len(request.candidates)
        lookup = self.features
        if n > max_candidates:
            # Counted before anything is built per candidate: an oversized request costs no more.
            refuse_too_many_candidates(
                context_feature_names=context_names,
                context_values=context_values,
                candidate_feature_names=candidate_names,
                n_candidates=n,
                max_candidates=max_candidates,
                columnar=columnar,
                lenient=lookup is not None,
            )
        lenient = lookup is not None
        with tracing.child_span("score.model", candidates=n):
            if columnar:
                ids = candidate_ids[:]
                aligned = align_columnar_request(
                    context_feature_names=context_names,
                    context_values=context_values,
                    candidate_feature_names=candidate_names,
                    candidate_ids=ids,
                    candidate_values=candidate_values,
                    max_candidates=max_candidates,
                    lenient=lenient,
                    values=packed.score_values(request),
                )
            else:
                # A list first: iterating the repeated field builds a wrapper per element.
                candidates = request.candidates[:]
                ids = [c.id for c in candidates]
                aligned = align_request(
                    context_feature_names=context_names,
                    context_values=context_values,
                    candidate_feature_names=candidate_names,
                    candidate_ids=ids,
                    candidate_values=[c.values for c in candidates],
                    max_candidates=max_candidates,
                    lenient=lenient,
                )
            defaulted = 0
            # Names are unique and known once aligned: as many as the model has means the
            # request sent every value, all finite, so there is nothing for the store to fill.
            sent_all = (
                len(context_names) == model_features.N_CONTEXT
                and len(candidate_names) == model_features.N_CANDIDATE
            )
            if lookup is not None and not sent_all:
                # Whatever the request left out, from the store (never an error because of it).
                done = await lookup.complete(
                    request.user_id, ids, aligned.context, aligned.candidates, model.fallback
                )
                aligned = AlignedRequest(done.context, done.candidates)
                defaulted = done.defaulted
            result = ScoreResult(
                model.predict_aligned(aligned),
                model.name,
                model.version,
                aligned,
            )
        logs.annotate(model=f"{result.model_name}:{result.model_version}", candidates=n)
        shadow = self.shadow
        if shadow is not None:  # off: this check only; on: a draw, the work after the answer
            shadow.offer(result, self.gate.in_flight)
        response = pb.ScoreResponse(
            model_name=result.model_name,
            model_version=result.model_version,
            defaulted_features=defaulted,
        )
        if layout == scoring_pb2.SCORE_LAYOUT_COLUMNS:
            response.candidate_ids.extend(ids)
            response.candidate_scores.extend(result.scores.tolist())
            return response
        add = response.scores.add  # 3x faster than building CandidateScore messages in a list
        for candidate_id, value in zip(ids, result.scores.tolist(), strict=True):
            add(id=candidate_id, score=value)
        return response

    @rpc.unary
    async def Generate(
        self,
        request: pb.GenerateRequest,
        context: grpc.aio.ServicerContext[pb.GenerateRequest, pb.GenerateResponse],
    ) -> pb.GenerateResponse:
        generation = await self._with_profile(_generation_request(request, context))
        result = await self._generator.generate(generation)
        return pb.GenerateResponse(text=result.text, **_result_fields(result, context))

    @rpc.server_streaming
    async def GenerateStream(
        self,
        request: pb.GenerateStreamRequest,
        context: grpc.aio.ServicerContext[pb.GenerateStreamRequest, pb.GenerateStreamResponse],
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        generation = await self._with_profile(_generation_request(request, context))
        stream = self._generator.stream(generation)
        async with contextlib.aclosing(stream) as events:  # closed at once if the call ends
            async for event in events:
                if isinstance(event, str):
                    yield pb.GenerateStreamResponse(text_delta=event)
                    continue
                yield pb.GenerateStreamResponse(
                    end=generation_pb2.GenerateStreamEnd(**_result_fields(event, context))
                )

    async def _with_profile(self, generation: GenerationRequest) -> GenerationRequest:
        """The request's prompt context, its empty fields filled from the user-profile view
        (when the feature store is on; a store that fails leaves them empty)."""
        lookup = self.features
        signals = generation.signals
        if lookup is None or not signals.user_id or not profile_gaps(signals):
            return generation
        with tracing.child_span("generate.profile"):
            profile = await lookup.profile(signals.user_id)
        if not profile:
            return generation
        return dataclasses.replace(generation, signals=with_profile(signals, profile))

    @rpc.unary
    async def ListPromptVersions(
        self,
        request: pb.ListPromptVersionsRequest,
        context: grpc.aio.ServicerContext[
            pb.ListPromptVersionsRequest, pb.ListPromptVersionsResponse
        ],
    ) -> pb.ListPromptVersionsResponse:
        return pb.ListPromptVersionsResponse(
            versions=[
                prompt_pb2.PromptVersion(
                    version=t.version, description=t.description, content_hash=t.content_hash
                )
                for t in self._prompts.versions()
            ],
            default_version=self._prompts.default_version,
        )


def _generation_request(
    request: GenerateLike, context: grpc.aio.ServicerContext[Any, Any]
) -> GenerationRequest:
    tip = request.context
    temperature: float | None = None
    if request.limits.HasField("temperature"):
        temperature = request.limits.temperature
        if not math.isfinite(temperature) or not 0.0 <= temperature <= 2.0:
            raise errors.InvalidArgument("limits.temperature", "must be a number in [0, 2]")
    return GenerationRequest(
        prompt_version=request.prompt_version,
        signals=TipSignals(
            user_id=request.user_id,
            topic=tip.topic,
            goal=tip.goal,
            note=tip.note,
            interests=tuple(tip.interests),
            # An unknown enum number reaches assemble_context as text it refuses, naming the
            # field: the level is checked in one place.
            experience_level=_EXPERIENCE.get(tip.experience_level, str(tip.experience_level)),
            streak_days=tip.streak_days,
            recent_tips=tuple(tip.recent_tips),
            locale=tip.locale,
        ),
        max_tokens=request.limits.max_tokens,
        temperature=temperature,
        time_remaining_s=context.time_remaining(),
    )


def _result_fields(
    result: GenerationResult, context: grpc.aio.ServicerContext[Any, Any]
) -> dict[str, Any]:
    """What GenerateResponse and GenerateStreamEnd share, from one GenerationResult; the same
    fields go on the access-log line, and the decision id in the trailers too."""
    completion = result.completion
    assignment = result.assignment
    logs.annotate(
        prompt_version=result.prompt_version,
        model=result.model,
        fallback=result.fallback,
        decision_id=assignment.decision_id,
        chosen=assignment.how.value,
    )
    context.set_trailing_metadata(
        ((rpc.REQUEST_ID_KEY, logs.request_id_var.get()), (DECISION_ID_KEY, assignment.decision_id))
    )
    return {
        "decision_id": assignment.decision_id,
        "assignment": prompt_pb2.PromptAssignment(
            experiment=assignment.experiment or "",
            propensity=assignment.propensity,
            chosen=_CHOSEN[assignment.how],
        ),
        "prompt_version": result.prompt_version,
        "prompt_hash": result.prompt_hash,
        "model": completion.model,
        "usage": generation_pb2.TokenUsage(
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            total_tokens=completion.prompt_tokens + completion.completion_tokens,
        ),
        "finish_reason": _FINISH.get(completion.finish_reason, _NO_FINISH),
        "fallback": result.fallback,
    }
