"""The one exception table: its rows, its rules (held to LiteLLM's own), and what it logs."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest

from ml_serving import errors

pytestmark = pytest.mark.filterwarnings(
    "ignore:Items .* are using the `ReadOnly` qualifier:UserWarning"
)


def table() -> Any:
    from ml_serving.generation.llm import exceptions

    return exceptions


def llm_errors() -> Any:
    from ml_serving.generation.llm.provider import llm_errors

    return llm_errors


def make(kind: Any, status: int = 500) -> Any:
    """An instance of a LiteLLM exception class (their constructors differ)."""
    e = llm_errors()
    if kind is e.MidStreamFallbackError:
        return kind(message="m", model="m", llm_provider="openai")
    if kind in (e.APIConnectionError, e.Timeout):
        return kind(message="m", model="m", llm_provider="openai")
    if kind is e.APIError:
        return kind(status_code=status, message="m", llm_provider="openai", model="m")
    if kind is e.APIResponseValidationError:
        return kind(message="m", llm_provider="openai", model="m")
    if kind is e.BadGatewayError or kind is e.ServiceUnavailableError:
        return kind(message="m", llm_provider="openai", model="m")
    if kind in (table().NoRouteAvailable, TimeoutError, table().AnswerTooLarge):
        return kind("m")
    try:
        return kind(message="m", llm_provider="openai", model="m")
    except TypeError:  # some also need the provider's response
        import httpx

        response = httpx.Response(status, request=httpx.Request("POST", "http://upstream/"))
        return kind(message="m", llm_provider="openai", model="m", response=response)


# Each row's canonical HTTP status, for the rules LiteLLM states by status.
STATUS = {
    "ContextWindowExceededError": 400,
    "ContentPolicyViolationError": 400,
    "PaymentRequiredError": 402,
    "BadRequestError": 400,
    "UnprocessableEntityError": 422,
    "AuthenticationError": 401,
    "PermissionDeniedError": 403,
    "NotFoundError": 404,
    "RateLimitError": 429,
    "Timeout": 408,
    "ServiceUnavailableError": 503,
    "InternalServerError": 500,
    "BadGatewayError": 502,
    "APIResponseValidationError": 500,
}


def test_no_row_is_shadowed_by_an_earlier_one() -> None:
    rows = table().TABLE
    for i, (kind, _) in enumerate(rows):
        for earlier, _ in rows[:i]:
            assert not issubclass(kind, earlier), f"{kind.__name__} never reached: {earlier}"


def test_every_row_is_reached_by_its_own_exception() -> None:
    exceptions = table()
    for kind, row in exceptions.TABLE:
        assert exceptions.outcome(make(kind)) is row, kind.__name__


def test_retryable_is_litellms_should_retry_and_cooldown_the_routers_rule() -> None:
    """The Router's rules, from LiteLLM itself: retry by litellm._should_retry(status), cool down
    by router_utils.cooldown_handlers._is_cooldown_required (which ignores connection errors)."""
    import litellm
    from litellm.router_utils.cooldown_handlers import _is_cooldown_required

    exceptions = table()
    for kind, row in exceptions.TABLE:
        status = STATUS.get(kind.__name__)
        if status is None:
            continue
        assert row.retryable == litellm._should_retry(status), kind.__name__
        assert row.cooldown == _is_cooldown_required(None, "d", status, kind.__name__), kind
    for status in (401, 403, 404, 408, 409, 429, 418, 500, 529):
        row = exceptions.outcome(make(llm_errors().APIError, status))
        assert row.retryable == litellm._should_retry(status), status
        assert row.cooldown == _is_cooldown_required(None, "d", status, "APIError"), status
    connection = exceptions.outcome(make(llm_errors().APIConnectionError))
    assert connection.retryable
    assert connection.cooldown == _is_cooldown_required(None, "d", 500, "APIConnectionError")


@pytest.mark.parametrize(
    ("kind", "status", "code"),
    [
        ("ContextWindowExceededError", 400, grpc.StatusCode.INVALID_ARGUMENT),
        ("ContentPolicyViolationError", 400, grpc.StatusCode.FAILED_PRECONDITION),
        ("BadRequestError", 400, grpc.StatusCode.FAILED_PRECONDITION),
        ("AuthenticationError", 401, grpc.StatusCode.FAILED_PRECONDITION),
        ("PaymentRequiredError", 402, grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("NotFoundError", 404, grpc.StatusCode.FAILED_PRECONDITION),
        ("RateLimitError", 429, grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("Timeout", 408, grpc.StatusCode.UNAVAILABLE),  # a try's own timeout: upstream failure
        ("APIConnectionError", 500, grpc.StatusCode.UNAVAILABLE),
        ("MidStreamFallbackError", 503, grpc.StatusCode.UNAVAILABLE),
        ("InternalServerError", 500, grpc.StatusCode.UNAVAILABLE),
        ("APIError", 529, grpc.StatusCode.UNAVAILABLE),
        ("APIError", 403, grpc.StatusCode.FAILED_PRECONDITION),
        ("APIError", 418, grpc.StatusCode.FAILED_PRECONDITION),
        ("APIError", 200, grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_failures_map_to_statuses_with_fixed_messages(
    kind: str, status: int, code: grpc.StatusCode
) -> None:
    exc = make(getattr(llm_errors(), kind), status)
    mapped = table().to_serving_error(exc)
    assert isinstance(mapped, errors.ServingError)
    assert mapped.code == code
    assert "m" != str(mapped) and "openai" not in str(mapped)  # no provider text


def test_the_deadline_and_every_route_cooling_down_have_rows() -> None:
    exceptions = table()
    assert isinstance(exceptions.to_serving_error(TimeoutError()), errors.DeadlineExceeded)
    cooling = exceptions.to_serving_error(exceptions.NoRouteAvailable("all benched"))
    assert isinstance(cooling, errors.UpstreamUnavailable)
    assert not exceptions.outcome(exceptions.NoRouteAvailable("x")).retryable


@pytest.mark.parametrize(
    "exc",
    [
        asyncio.CancelledError(),
        GeneratorExit(),
        errors.DeadlineExceeded("passed through"),
        errors.InvalidArgument("limits.max_tokens", "too many"),
        KeyError("a bug, not an LLM failure"),
    ],
    ids=["cancelled", "generator-exit", "deadline", "domain", "bug"],
)
def test_what_is_not_an_llm_failure_passes_through_unlogged(
    exc: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="ml_serving.generation.llm.exceptions"):
        assert table().to_serving_error(exc) is exc
    assert not caplog.records


def test_an_llm_failure_is_logged_once_by_type_and_its_text_only_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    exc = make(llm_errors().RateLimitError)
    with caplog.at_level(logging.INFO, logger="ml_serving.generation.llm.exceptions"):
        table().to_serving_error(exc)
    assert [r.getMessage() for r in caplog.records] == ["LLM call failed: RateLimitError"]
