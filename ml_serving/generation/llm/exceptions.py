"""The one exception table: LiteLLM error type -> (status, retryable, fallback kind, cooldown).

Every LLM failure the gateway sees is a LiteLLM exception (the provider path maps provider
errors through LiteLLM's own exception_type, as acompletion does), our deadline (TimeoutError),
every route cooling down (NoRouteAvailable), or something that is not an LLM failure at all
(a cancellation, a domain error passed through, a bug), which this table leaves alone.

The retryable and cooldown columns are the Router's rules (tests/unit/test_llm_exceptions.py
holds them to `litellm._should_retry` and the Router's `_is_cooldown_required`): retry 408, 429,
5xx, connection errors and timeouts, never 400/401/403/404/422; count towards a cooldown 401,
402, 404, 408, 429 and 5xx, never other 4xx nor an APIConnectionError. (A refused connection is
not one: LiteLLM reports it as the provider's 500, InternalServerError, and so it counts.)
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from ml_serving import errors
from ml_serving.generation.llm.provider import llm_errors
from ml_serving.generation.llm.transport import AnswerTooLarge

logger = logging.getLogger(__name__)


class NoRouteAvailable(Exception):
    """Every deployment of every alias tried is cooling down: nothing was sent."""


@dataclass(frozen=True)
class Outcome:
    """What one failure means for the call, the retry loop and the deployment."""

    error: Callable[[], errors.ServingError]
    """The domain error (and so the gRPC status) the caller sees if this failure is final."""
    retryable: bool
    """Another try on the same alias may succeed."""
    fallback: str
    """Which router_settings fallback list applies: "context_window", "content_policy" or ""
    (`fallbacks`)."""
    cooldown: bool
    """Counts towards the deployment's allowed_fails."""


def _creds() -> errors.ServingError:
    return errors.NotReady("the LLM route's credentials were refused; check its API key")


def _missing_model() -> errors.ServingError:
    return errors.NotReady("the LLM route names a model the provider does not have")


def _rejected() -> errors.ServingError:
    return errors.ProviderRejected("the LLM provider rejected the request as invalid")


def _rate_limited() -> errors.ServingError:
    return errors.UpstreamRateLimited("the LLM provider is rate limiting; retry later")


def _deadline() -> errors.ServingError:
    return errors.DeadlineExceeded("the LLM did not answer within the call's deadline")


def _route_timeout() -> errors.ServingError:
    # A try's own timeout (the route's `timeout`, else router_settings.timeout) on every try:
    # the caller's deadline is our asyncio.timeout (TimeoutError), which fires first when it
    # is the tighter bound (the per-try timeout is rounded up to whole seconds).
    return errors.UpstreamTimedOut("the LLM route did not answer within its timeout; retry later")


def _unavailable() -> errors.ServingError:
    return errors.UpstreamUnavailable("the LLM provider is unavailable; retry later")


def _no_route() -> errors.ServingError:
    return errors.UpstreamUnavailable("no LLM route is available right now; retry later")


def _too_long() -> errors.ServingError:
    return errors.InvalidArgument("context", "the prompt is too long for the model")


def _policy() -> errors.ServingError:
    return errors.ProviderRejected("the LLM provider's content policy refused the request")


def _quota() -> errors.ServingError:
    return errors.UpstreamRateLimited("the LLM provider refused for billing or quota; retry later")


TABLE: tuple[tuple[type[BaseException], Outcome], ...] = (
    # Most specific first: a row's type is never a subclass of an earlier row's (tested).
    (llm_errors.ContextWindowExceededError, Outcome(_too_long, False, "context_window", False)),
    (llm_errors.ContentPolicyViolationError, Outcome(_policy, False, "content_policy", False)),
    (llm_errors.PaymentRequiredError, Outcome(_quota, False, "", True)),  # 402
    (llm_errors.BadRequestError, Outcome(_rejected, False, "", False)),  # 400 (and 422 mapped so)
    (llm_errors.UnprocessableEntityError, Outcome(_rejected, False, "", False)),  # 422
    (llm_errors.AuthenticationError, Outcome(_creds, False, "", True)),  # 401
    (llm_errors.PermissionDeniedError, Outcome(_creds, False, "", False)),  # 403
    (llm_errors.NotFoundError, Outcome(_missing_model, False, "", True)),  # 404
    (llm_errors.RateLimitError, Outcome(_rate_limited, True, "", True)),  # 429
    (llm_errors.Timeout, Outcome(_route_timeout, True, "", True)),  # 408, a try's own timeout
    (llm_errors.APIConnectionError, Outcome(_unavailable, True, "", False)),
    (llm_errors.ServiceUnavailableError, Outcome(_unavailable, True, "", True)),  # 503, mid-stream
    (llm_errors.InternalServerError, Outcome(_unavailable, True, "", True)),  # 500, refused
    (llm_errors.BadGatewayError, Outcome(_unavailable, True, "", True)),  # 502
    (llm_errors.APIResponseValidationError, Outcome(_unavailable, True, "", True)),
    (NoRouteAvailable, Outcome(_no_route, False, "", False)),
    # An answer past its request's bound, refused while read: the route's failure (it counts
    # towards its cooldown, and the fallbacks are tried), not retried as is: it would answer
    # the same. Raised as is, not through LiteLLM's exception_type (2 ms of CPU a call, which
    # a wave of them spent on the event loop Score shares).
    (AnswerTooLarge, Outcome(_unavailable, False, "", True)),
    # Our own deadline (asyncio.timeout): the call's time is spent, nothing left to retry.
    (TimeoutError, Outcome(_deadline, False, "", False)),
)

_BY_STATUS: dict[int, Outcome] = {
    # litellm.APIError carries a status LiteLLM gave no class of its own (an OpenAI-compatible
    # server's 403 or 529, a 200 whose body was not JSON): the same rules, by status.
    401: Outcome(_creds, False, "", True),
    403: Outcome(_creds, False, "", False),
    404: Outcome(_missing_model, False, "", True),
    408: Outcome(_route_timeout, True, "", True),
    409: Outcome(_unavailable, True, "", False),
    429: Outcome(_rate_limited, True, "", True),
}
_OTHER_4XX = Outcome(_rejected, False, "", False)
_ANY_OTHER = Outcome(_unavailable, True, "", True)
"""5xx, 529, and a 2xx LiteLLM could not parse."""


def outcome(exc: BaseException) -> Outcome | None:
    """The table's row for an LLM failure; None for anything that is not one (a cancellation,
    GeneratorExit, a domain error passed through, a bug)."""
    for kind, row in TABLE:
        if isinstance(exc, kind):
            return row
    if isinstance(exc, llm_errors.APIError):
        status = int(exc.status_code)
        return _BY_STATUS.get(status) or (_OTHER_4XX if 400 <= status < 500 else _ANY_OTHER)
    return None


def to_serving_error(exc: BaseException) -> BaseException:
    """What a gateway call raises for `exc`: the table's domain error for an LLM failure
    (logged once, by type), anything else unchanged and unlogged."""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return exc
    if isinstance(exc, errors.ServingError):
        _drop_locals(exc)
        return exc
    row = outcome(exc)
    if row is None:
        return exc
    # The type is enough for operators; provider messages can quote the completion, so the
    # traceback (and its text) goes out only at DEBUG, like prompts and completions.
    logger.info("LLM call failed: %s", type(exc).__name__)
    logger.debug("LLM call failure detail", exc_info=exc)
    _drop_locals(exc)
    return row.error()


def _drop_locals(exc: BaseException) -> None:
    """Clear the locals of the finished frames in `exc`'s tracebacks (its causes' too).

    A failed read leaves its buffers (the bytes read so far, the SSE splitter's unfinished
    line: up to an answer's bound) in those frames, and frame -> exception -> traceback ->
    frame is a cycle: only the cyclic GC, which runs rarely once the import heap is frozen,
    frees it. Measured: a server's heap grew by 6 MB per wave of 64 refused 50 MB answers and
    stayed there. The traceback keeps its lines; frames still running are left alone.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen or len(seen) > 16:
            continue
        seen.add(id(current))
        if current.__traceback__ is not None:
            traceback.clear_frames(current.__traceback__)
        todo += (current.__cause__, current.__context__)
