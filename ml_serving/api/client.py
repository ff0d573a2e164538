"""Python client for callers and tools: deadlines, request ids, bearer token, its message types."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from typing import Final

import grpc

from ml_serving._proto.mlserving.v1 import inference_service_pb2 as pb
from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from ml_serving._proto.mlserving.v1.generation_pb2 import (
    ExperienceLevel,
    FinishReason,
    GenerateStreamEnd,
    GenerationLimits,
    TipContext,
    TokenUsage,
)
from ml_serving._proto.mlserving.v1.inference_service_pb2 import (
    GenerateRequest,
    GenerateResponse,
    GenerateStreamRequest,
    GenerateStreamResponse,
    ListPromptVersionsRequest,
    ListPromptVersionsResponse,
    ScoreRequest,
    ScoreResponse,
)
from ml_serving._proto.mlserving.v1.prompt_pb2 import PromptAssignment, PromptChoice, PromptVersion
from ml_serving._proto.mlserving.v1.scoring_pb2 import Candidate, CandidateScore, ScoreLayout
from ml_serving.api.security import AUTHORIZATION_KEY, Metadata

__all__ = [
    "DEFAULT_TIMEOUTS_S",
    "REQUEST_ID_KEY",
    "SERVICE",
    "Candidate",
    "CandidateScore",
    "ExperienceLevel",
    "FinishReason",
    "GenerateRequest",
    "GenerateResponse",
    "GenerateStreamEnd",
    "GenerateStreamRequest",
    "GenerateStreamResponse",
    "GenerationLimits",
    "InferenceClient",
    "ListPromptVersionsRequest",
    "ListPromptVersionsResponse",
    "PromptAssignment",
    "PromptChoice",
    "PromptVersion",
    "ScoreLayout",
    "ScoreRequest",
    "ScoreResponse",
    "TipContext",
    "TokenUsage",
    "channel_options",
    "service_config",
]

(_SERVICE_DESCRIPTOR,) = pb.DESCRIPTOR.services_by_name.values()
SERVICE: Final = _SERVICE_DESCRIPTOR.full_name
"""Full name of the service the client calls, from the generated descriptor."""

REQUEST_ID_KEY: Final = "x-request-id"
"""Metadata key of the request id the server logs and returns in the trailing metadata."""

# What an HTTP/2 header value may hold unquoted; grpc would refuse anything else at call time
# with a message that does not say which argument was wrong.
_TOKEN_RE: Final = re.compile(r"[\x21-\x7e]+")

DEFAULT_TIMEOUTS_S = {
    "Score": 2.0,
    "Generate": 30.0,
    "GenerateStream": 60.0,
    "ListPromptVersions": 5.0,
}
"""Per-method deadlines when the caller gives none: Score is online, Generate waits on an LLM."""


def service_config(max_attempts: int = 3) -> str:
    """gRPC service config: Score (idempotent) is retried on UNAVAILABLE; Generate never is,
    because a retried generation costs tokens and may answer twice."""
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": SERVICE, "method": "Score"}],
                    "retryPolicy": {
                        "maxAttempts": max_attempts,
                        "initialBackoff": "0.05s",
                        "maxBackoff": "0.5s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


def channel_options(max_attempts: int = 3) -> list[tuple[str, str | int]]:
    """Options for grpc.insecure_channel / grpc.aio.insecure_channel (and the secure ones)."""
    return [
        ("grpc.service_config", service_config(max_attempts)),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", 30_000),
    ]


class InferenceClient:
    """Blocking client over a grpc.Channel; every call carries a deadline and an x-request-id.

    ``bearer_token`` (the server's ``ML_SERVING_AUTH_TOKEN``) is sent on every call as
    ``authorization: Bearer <token>``; over a plaintext channel it travels in clear, so use a
    TLS channel or the mesh's mTLS. ``metadata`` is sent on every call; a call's own
    ``metadata`` replaces the client's entries with the same keys (its ``authorization`` the
    token, its ``x-request-id`` the generated id).
    """

    def __init__(
        self,
        channel: grpc.Channel,
        timeouts_s: dict[str, float] | None = None,
        *,
        bearer_token: str | None = None,
        metadata: Metadata = (),
    ) -> None:
        self._stub = pb_grpc.InferenceServiceStub(channel)
        self._timeouts = {**DEFAULT_TIMEOUTS_S, **(timeouts_s or {})}
        self._metadata = tuple(metadata)
        if bearer_token is not None:
            if not _TOKEN_RE.fullmatch(bearer_token):
                # Never echo the value: it is a secret.
                raise ValueError("bearer_token must be visible ASCII characters with no spaces")
            self._metadata = (
                *(entry for entry in self._metadata if entry[0].lower() != AUTHORIZATION_KEY),
                (AUTHORIZATION_KEY, f"Bearer {bearer_token}"),
            )

    def _timeout(self, method: str, timeout_s: float | None) -> float:
        return timeout_s if timeout_s is not None else self._timeouts[method]

    def _call_metadata(
        self, request_id: str | None, metadata: Metadata
    ) -> tuple[tuple[str, str | bytes], ...]:
        own = tuple(metadata)
        keys = {key.lower() for key, _ in own}
        if request_id is not None and REQUEST_ID_KEY in keys:
            raise ValueError(f"give the request id as request_id or {REQUEST_ID_KEY}, not both")
        generated = () if REQUEST_ID_KEY in keys else ((REQUEST_ID_KEY, request_id or _new_id()),)
        inherited = tuple(entry for entry in self._metadata if entry[0].lower() not in keys)
        return (*generated, *inherited, *own)

    def score(
        self,
        request: ScoreRequest,
        *,
        timeout_s: float | None = None,
        request_id: str | None = None,
        metadata: Metadata = (),
    ) -> ScoreResponse:
        """Score candidates (retried by the channel on UNAVAILABLE)."""
        return self._stub.Score(
            request,
            timeout=self._timeout("Score", timeout_s),
            metadata=self._call_metadata(request_id, metadata),
        )

    def generate(
        self,
        request: GenerateRequest,
        *,
        timeout_s: float | None = None,
        request_id: str | None = None,
        metadata: Metadata = (),
    ) -> GenerateResponse:
        """Write one tip (never retried)."""
        return self._stub.Generate(
            request,
            timeout=self._timeout("Generate", timeout_s),
            metadata=self._call_metadata(request_id, metadata),
        )

    def generate_stream(
        self,
        request: GenerateStreamRequest,
        *,
        timeout_s: float | None = None,
        request_id: str | None = None,
        metadata: Metadata = (),
    ) -> Iterator[GenerateStreamResponse]:
        """Write one tip as text deltas, then the totals (never retried)."""
        return self._stub.GenerateStream(
            request,
            timeout=self._timeout("GenerateStream", timeout_s),
            metadata=self._call_metadata(request_id, metadata),
        )

    def list_prompt_versions(
        self,
        *,
        timeout_s: float | None = None,
        request_id: str | None = None,
        metadata: Metadata = (),
    ) -> ListPromptVersionsResponse:
        """What the prompt registry holds and the default version."""
        return self._stub.ListPromptVersions(
            ListPromptVersionsRequest(),
            timeout=self._timeout("ListPromptVersions", timeout_s),
            metadata=self._call_metadata(request_id, metadata),
        )


def _new_id() -> str:
    return uuid.uuid4().hex
