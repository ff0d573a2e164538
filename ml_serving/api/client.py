"""A small Python client for callers and tools: deadlines, request ids, retries for Score only."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import grpc

from ml_serving._proto.mlserving.v1 import inference_service_pb2 as pb
from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc

SERVICE = "mlserving.v1.InferenceService"

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
    """Blocking client over a grpc.Channel; every call carries a deadline and an x-request-id."""

    def __init__(self, channel: grpc.Channel, timeouts_s: dict[str, float] | None = None) -> None:
        self._stub = pb_grpc.InferenceServiceStub(channel)
        self._timeouts = {**DEFAULT_TIMEOUTS_S, **(timeouts_s or {})}

    def _timeout(self, method: str, timeout_s: float | None) -> float:
        return timeout_s if timeout_s is not None else self._timeouts[method]

    def score(
        self,
        request: pb.ScoreRequest,
        *,
        timeout_s: float | None = None,
        request_id: str | None = None,
    ) -> pb.ScoreResponse:
        """Score candidates (retried by the channel on UNAVAILABLE)."""
        return self._stub.Score(
            request, timeout=self._timeout("Score", timeout_s), metadata=_metadata(request_id)
        )

    def generate(
        self,
        request: pb.GenerateRequest,
        *,
        timeout_s: float | None = None,
        request_id: str | None = None,
    ) -> pb.GenerateResponse:
        """Write one tip (never retried)."""
        return self._stub.Generate(
            request, timeout=self._timeout("Generate", timeout_s), metadata=_metadata(request_id)
        )

    def generate_stream(
        self,
        request: pb.GenerateStreamRequest,
        *,
        timeout_s: float | None = None,
        request_id: str | None = None,
    ) -> Iterator[pb.GenerateStreamResponse]:
        """Write one tip as text deltas, then the totals (never retried)."""
        return self._stub.GenerateStream(
            request,
            timeout=self._timeout("GenerateStream", timeout_s),
            metadata=_metadata(request_id),
        )

    def list_prompt_versions(
        self, *, timeout_s: float | None = None
    ) -> pb.ListPromptVersionsResponse:
        """What the prompt registry holds and the default version."""
        return self._stub.ListPromptVersions(
            pb.ListPromptVersionsRequest(),
            timeout=self._timeout("ListPromptVersions", timeout_s),
            metadata=_metadata(None),
        )


def _metadata(request_id: str | None) -> tuple[tuple[str, str], ...]:
    return (("x-request-id", request_id or uuid.uuid4().hex),)
