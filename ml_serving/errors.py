"""Domain exceptions, each carrying the gRPC status it maps to (the README's error table)."""

from __future__ import annotations

from collections.abc import Sequence

import grpc


class ServingError(Exception):
    """Base of every failure the service reports on purpose.

    ``str(exc)`` is the client-facing message: short, actionable, and never containing prompt
    text, keys or tracebacks.
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(ServingError):
    """A request field is missing, malformed or out of range; ``field`` names it."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


def echo(value: str, limit: int = 64) -> str:
    """``repr`` of a caller-sent value for an error message, cut to ``limit`` characters.

    Messages travel in the grpc-message header, which clients cap (16 KiB hard): echoing a huge
    value verbatim turned an INVALID_ARGUMENT into a client-side RESOURCE_EXHAUSTED.
    """
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


class UnknownPromptVersion(InvalidArgument):
    """The requested prompt version is not in the registry; the message lists the known ones."""

    def __init__(self, version: str, known: Sequence[str], field: str = "prompt_version") -> None:
        super().__init__(
            field, f"unknown prompt version {echo(version)}; known versions: {', '.join(known)}"
        )
        self.version = version
        self.known = tuple(known)


class Unauthenticated(ServingError):
    """The call carries no valid credentials (``authorization: Bearer <token>`` metadata)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class NotReady(ServingError):
    """A model, registry or LLM route needed by the call is not loaded or not configured."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ProviderRejected(ServingError):
    """The LLM provider refused the request as malformed (its 400): not safe to retry as is."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Overloaded(ServingError):
    """This server is over its concurrency limit; the caller should back off."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UpstreamRateLimited(ServingError):
    """The LLM provider answered with a rate limit or quota error."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UpstreamUnavailable(ServingError):
    """Every LLM route failed (5xx, connection error) after retries; retrying later is safe."""

    code = grpc.StatusCode.UNAVAILABLE


class UpstreamTimedOut(UpstreamUnavailable):
    """An LLM route did not answer within its own timeout, on every try: an upstream failure
    (the fallback tip covers it), not the caller's deadline."""


class AnswerBudgetSpent(UpstreamUnavailable):
    """The upstream answers held at once reached ML_SERVING_LLM_ANSWER_BUDGET_BYTES: this
    call's answer is not read (the fallback tip covers it), nor the route blamed for it."""

    reason = "answer_budget"
    """The `reason` label of mlserving_llm_errors_total for this failure."""


class Draining(ServingError):
    """The server is shutting down and takes no new calls; another replica should."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServingError):
    """The caller's deadline, or the upstream timeout derived from it, ran out."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotServedHere(ServingError):
    """The method exists but this port does not serve it (the Generate port serves only
    Generate and GenerateStream); the message says which port does."""

    code = grpc.StatusCode.UNIMPLEMENTED


INTERNAL_MESSAGE = "internal error"
"""The fixed message for anything unexpected; the traceback goes to the log only."""
