"""LiteLLM gateway: calls over the configured routes, the offline provider, and error mapping.

This is the only module that imports litellm. Importing it takes seconds, so the server imports
this module in a worker thread after it starts listening, and reports readiness only once
`LLMGateway.warm_up` has run.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Before the import: by default litellm fetches a price map over the network at import time,
# and retries from a background thread when there is no network.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # noqa: E402
from litellm import CustomLLM  # noqa: E402
from litellm import exceptions as llm_errors  # noqa: E402
from litellm.secret_managers.main import get_secret_str  # noqa: E402
from litellm.types.utils import GenericStreamingChunk, ModelResponse  # noqa: E402

from ml_serving import errors  # noqa: E402
from ml_serving.generation.llm.routes import (  # noqa: E402
    OFFLINE_ALIAS,
    OFFLINE_MODEL,
    OFFLINE_PROVIDER,
    ROUTER_ONLY_PARAMS,
    RetryPlan,
    RouteConfig,
    load_routes,
    offline_routes,
)

__all__ = [
    "OFFLINE_ALIAS",
    "OFFLINE_MODEL",
    "Completion",
    "LLMGateway",
    "RouteConfig",
    "load_routes",
    "offline_routes",
]

logger = logging.getLogger(__name__)

METADATA_KEY = "mlserving_offline_tip"
"""Metadata key carrying the offline provider's pre-composed tip (set by the caller)."""


@dataclass(frozen=True)
class Completion:
    """The outcome of one generation: the text (empty for a stream's end) and its totals."""

    text: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    """"stop", "length", "content_filter" or "" when the provider did not say."""


class OfflineTipComposer(CustomLLM):  # type: ignore[misc]
    """A LiteLLM custom provider that needs no network: it returns the tip the caller composed
    deterministically from the prompt context (metadata), so every RPC works on a fresh machine.
    """

    async def acompletion(self, *args: Any, **kwargs: Any) -> ModelResponse:
        text = _offline_text(kwargs)
        prompt_tokens, completion_tokens = _offline_usage(kwargs, text)
        return ModelResponse(
            model=OFFLINE_MODEL,
            choices=[
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": text},
                }
            ],
            usage={
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        )

    async def astreaming(self, *args: Any, **kwargs: Any) -> AsyncIterator[GenericStreamingChunk]:
        text = _offline_text(kwargs)
        prompt_tokens, completion_tokens = _offline_usage(kwargs, text)
        words = text.split(" ")
        for i, word in enumerate(words):
            last = i == len(words) - 1
            yield GenericStreamingChunk(
                text=word if i == 0 else " " + word,
                is_finished=last,
                finish_reason="stop" if last else "",
                usage={
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                }
                if last
                else None,
                index=0,
                tool_use=None,
            )


def _offline_text(kwargs: Mapping[str, Any]) -> str:
    metadata = (kwargs.get("litellm_params") or {}).get("metadata") or {}
    text = metadata.get(METADATA_KEY)
    if not isinstance(text, str) or not text:
        # Called without our metadata (e.g. a warm-up): still deterministic, from the prompt.
        digest = hashlib.sha256(repr(kwargs.get("messages")).encode()).hexdigest()[:8]
        text = f"Pick one small step you can finish in five minutes today ({digest})."
    max_tokens = (kwargs.get("optional_params") or {}).get("max_tokens")
    if isinstance(max_tokens, int) and max_tokens > 0:
        text = " ".join(text.split(" ")[:max_tokens])
    return text


def _offline_usage(kwargs: Mapping[str, Any], text: str) -> tuple[int, int]:
    """Word counts stand in for tokens: the offline route has no tokenizer, and says so."""
    messages = kwargs.get("messages") or []
    prompt_words = sum(len(str(m.get("content", "")).split()) for m in messages)
    return prompt_words, len(text.split())


_offline_handler = OfflineTipComposer()


def _register_offline_provider() -> None:
    entry = {"provider": OFFLINE_PROVIDER, "custom_handler": _offline_handler}
    if entry not in litellm.custom_provider_map:
        litellm.custom_provider_map = [*litellm.custom_provider_map, entry]


def _quiet_litellm() -> None:
    """Turn off per-call work we do not use: telemetry, debug info, message redaction.

    LiteLLM also installs its own plain-text stderr handlers and logs every call at INFO:
    drop them so its warnings reach our JSON handler once, and keep INFO out of production.
    """
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):
        litellm_logger = logging.getLogger(name)
        litellm_logger.handlers.clear()
        litellm_logger.propagate = True
        litellm_logger.setLevel(max(logging.WARNING, logging.getLogger().getEffectiveLevel()))
    litellm.telemetry = False
    litellm.suppress_debug_info = True
    # No logging callback is registered, so nothing is logged; True only deep-copies responses.
    litellm.turn_off_message_logging = False
    _speed_up_openai_models()


class _HasPopulationFlag(type):
    """isinstance(x, C) for C of this metaclass: x has `allow_population_by_field_name`."""

    def __instancecheck__(cls, instance: object) -> bool:
        return hasattr(instance, "allow_population_by_field_name")


class _FastConfigCheck(metaclass=_HasPopulationFlag):
    """Stands in for the OpenAI SDK's runtime-checkable `_ConfigProtocol` (same answer)."""


def _speed_up_openai_models() -> None:
    """Give the OpenAI SDK a fast `isinstance(config, _ConfigProtocol)`.

    LiteLLM's OpenAI path parses every streamed chunk with the SDK's `BaseModel.construct`, which
    asks that isinstance for each model it builds (several per chunk). On a runtime-checkable
    Protocol the check walks the class's MRO with inspect.getattr_static: measured at 15% of the
    server's CPU while relaying 1,000 streams. A protocol with one attribute is an attribute
    check (what typing does, slowly), so the stand-in gives the same answer for any object.
    Skipped when the SDK no longer has that name.
    """
    try:
        from openai import _models
    except ImportError:  # pragma: no cover - litellm depends on openai
        return
    if isinstance(getattr(_models, "_ConfigProtocol", None), type):
        setattr(_models, "_ConfigProtocol", _FastConfigCheck)  # noqa: B010 - a private name


@dataclass(frozen=True)
class _Deployment:
    """One model_list entry, ready to call: its litellm_params with `os.environ/NAME` resolved."""

    model: str
    params: Mapping[str, Any]
    """litellm_params less the timeout and the Router-only keys (weight, rpm, ...)."""
    timeout_s: float
    weight: float


def _deployment(entry: Mapping[str, Any], default_timeout_s: float) -> _Deployment:
    params: dict[str, Any] = {}
    for key, value in entry["litellm_params"].items():
        if isinstance(value, str) and value.startswith("os.environ/"):
            # LiteLLM's own reading of the reference (the Router's, too): once, at start.
            value = get_secret_str(value)
        params[key] = value
    # Retries are the loop's (num_retries), as under the Router: the OpenAI SDK's own (2 by
    # default) only where the route asks for them.
    params.setdefault("max_retries", 0)
    timeout = params.pop("timeout", None)
    weight = params.get("weight", 1)
    for key in ROUTER_ONLY_PARAMS:
        params.pop(key, None)
    timeout_s = float(timeout) if isinstance(timeout, int | float) and timeout > 0 else None
    return _Deployment(
        model=str(params["model"]),
        params=params,
        timeout_s=timeout_s or default_timeout_s,
        weight=float(weight) if isinstance(weight, int | float) and weight > 0 else 1.0,
    )


def _fallback_kind(exc: BaseException) -> str:
    """Which router_settings fallback list applies to a failure (see RetryPlan.fallbacks_for)."""
    if isinstance(exc, llm_errors.ContextWindowExceededError):
        return "context_window"
    if isinstance(exc, llm_errors.ContentPolicyViolationError):
        return "content_policy"
    return ""


def _retryable(exc: BaseException) -> bool:
    """Whether another try on the same alias may succeed: the Router's rule (429, 408, 5xx,
    connection errors and timeouts are; 400, 401, 403, 404, 422 are not)."""
    if isinstance(exc, _NOT_RETRYABLE) and not isinstance(exc, _RETRYABLE):
        return False
    if isinstance(exc, _RETRYABLE):
        return True
    status = getattr(exc, "status_code", None)
    return isinstance(status, int) and (status >= 500 or status in (408, 409, 429))


_RETRYABLE = (
    llm_errors.RateLimitError,
    llm_errors.APIConnectionError,  # includes llm_errors.Timeout
    llm_errors.Timeout,
    llm_errors.InternalServerError,
    llm_errors.ServiceUnavailableError,
    llm_errors.BadGatewayError,
    llm_errors.APIError,
    llm_errors.APIResponseValidationError,
)
_NOT_RETRYABLE = (
    llm_errors.BadRequestError,
    llm_errors.UnprocessableEntityError,
    llm_errors.AuthenticationError,
    llm_errors.PermissionDeniedError,
    llm_errors.NotFoundError,
)


class LLMGateway:
    """Generate's only door to LLMs: litellm.acompletion over the configured routes, with the
    Router's retries and fallbacks done by a small loop of our own.

    Why not litellm.Router: it costs ~1,100 Python calls (~3 ms of CPU) per call over
    litellm.acompletion, whatever its settings, and we use a sliver of it. The loop keeps the
    config format and the meaning of what we use: an alias with several deployments picks one
    by `weight` and tries the others on retries; `num_retries` more tries per alias on a
    retryable error (429, 408, 5xx, connection errors, timeouts; never 400/401/403/404/422);
    then `fallbacks` (or `context_window_fallbacks` / `content_policy_fallbacks` for those
    errors), each fallback alias with its own retries, not chained; if all fail, the first
    alias's error. Between tries of one deployment it sleeps LiteLLM's backoff (Retry-After,
    else exponential from 0.5 s with jitter, at least `retry_after`), but never past the
    deadline: a sleep that would outlast it moves on to the fallbacks at once. Each try's
    timeout is the smaller of the deployment's `timeout` (else router_settings.timeout) and
    the time left to the deadline.

    What changed from the Router: no cooldowns (a failing deployment is not benched: each
    call tries it again; disable_cooldowns/allowed_fails/cooldown_time are accepted and
    ignored), no rpm/tpm routing, and other router_settings are refused at start.
    """

    def __init__(self, routes: RouteConfig, alias: str | None = None) -> None:
        _quiet_litellm()
        _register_offline_provider()
        if alias is not None and alias not in routes.aliases:
            raise ValueError(
                f"ML_SERVING_LLM_MODEL={alias!r} is not a route alias; "
                f"known: {', '.join(routes.aliases)}"
            )
        self.alias = alias or routes.aliases[0]
        self._plan = RetryPlan.from_settings(routes.router_settings, routes.aliases)
        groups: dict[str, list[_Deployment]] = {}
        for entry in routes.model_list:
            groups.setdefault(entry["model_name"], []).append(
                _deployment(entry, self._plan.timeout_s)
            )
        self._groups = {name: tuple(deployments) for name, deployments in groups.items()}
        _register_unpriced_models(d.model for ds in self._groups.values() for d in ds)

    @property
    def route_model(self) -> str:
        """The configured model string of the route Generate uses (a metrics label)."""
        return self._groups[self.alias][0].model

    async def warm_up(self) -> None:
        """Exercise the call path once without network (mock response), so the first real
        request does not pay for lazy imports and client set-up."""
        started = time.perf_counter()
        await litellm.acompletion(
            **self._groups[self.alias][0].params,
            messages=[{"role": "user", "content": "warm-up"}],
            mock_response="ok",
        )
        logger.info("LLM gateway warm", extra={"warm_up_ms": (time.perf_counter() - started) * 1e3})

    async def complete(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        max_tokens: int,
        temperature: float | None,
        timeout_s: float | None,
        offline_text: str,
    ) -> Completion:
        """One non-streaming generation; upstream failures become errors.ServingError."""
        args = self._call_args(messages, max_tokens, temperature, offline_text)
        try:
            async with asyncio.timeout(timeout_s):
                response, _, model = await self._call(args, timeout_s, stream=False)
        except BaseException as exc:
            raise _map_exception(exc) from exc
        choice = response.choices[0]
        usage = getattr(response, "usage", None)
        return Completion(
            text=choice.message.content or "",
            model=model,
            prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            finish_reason=choice.finish_reason or "",
        )

    async def stream(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        max_tokens: int,
        temperature: float | None,
        timeout_s: float | None,
        offline_text: str,
    ) -> AsyncGenerator[str | Completion, None]:
        """Yield text deltas as they arrive, then one Completion with the totals (empty text)."""
        args = self._call_args(messages, max_tokens, temperature, offline_text)
        args["stream"] = True
        args["stream_options"] = {"include_usage": True}
        prompt_tokens = completion_tokens = 0
        finish_reason = ""
        pieces = 0
        try:
            async with asyncio.timeout(timeout_s):
                response, first, model = await self._call(args, timeout_s, stream=True)
                try:
                    chunk = first
                    while chunk is not None:
                        usage = getattr(chunk, "usage", None)
                        if usage is not None:
                            prompt_tokens = int(usage.prompt_tokens or 0)
                            completion_tokens = int(usage.completion_tokens or 0)
                        if chunk.choices:
                            choice = chunk.choices[0]
                            if choice.finish_reason:
                                finish_reason = choice.finish_reason
                            delta = choice.delta.content
                            if delta:
                                pieces += 1
                                yield delta
                        chunk = await anext(response, None)
                finally:
                    # Now, not when garbage collected: a caller that went away (a cancelled
                    # RPC) must free its upstream connection at once.
                    await _aclose(response)
        except BaseException as exc:
            raise _map_exception(exc) from exc
        if completion_tokens == 0:
            completion_tokens = pieces  # provider sent no usage: count the deltas it streamed
        yield Completion("", model, prompt_tokens, completion_tokens, finish_reason)

    async def _call(
        self, args: Mapping[str, Any], timeout_s: float | None, *, stream: bool
    ) -> tuple[Any, Any, str]:
        """The retry and fallback loop: (response, a stream's first chunk, the model that
        answered). A stream that fails before its first chunk fails its try, as in the Router."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        first_error: BaseException | None = None
        aliases: tuple[str, ...] = (self.alias,)
        i = 0
        while i < len(aliases):
            alias = aliases[i]
            try:
                return await self._call_alias(alias, args, deadline, stream)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if first_error is None:
                    first_error = exc
                    aliases += self._plan.fallbacks_for(alias, _fallback_kind(exc))
                logger.debug("LLM route %s failed: %s", alias, type(exc).__name__)
            i += 1
        assert first_error is not None
        raise first_error

    async def _call_alias(
        self, alias: str, args: Mapping[str, Any], deadline: float | None, stream: bool
    ) -> tuple[Any, Any, str]:
        deployments = self._groups[alias]
        start = 0
        if len(deployments) > 1:
            weights = [d.weight for d in deployments]
            start = random.choices(range(len(deployments)), weights)[0]
        tries = self._plan.num_retries + 1
        loop = asyncio.get_running_loop()
        for attempt in range(tries):
            deployment = deployments[(start + attempt) % len(deployments)]
            timeout = deployment.timeout_s
            if deadline is not None:
                # Rounded up: LiteLLM makes a client per timeout value; asyncio.timeout is exact.
                timeout = min(timeout, float(max(1, math.ceil(deadline - loop.time()))))
            try:
                response = await litellm.acompletion(**deployment.params, **args, timeout=timeout)
                first = await _first_chunk(response) if stream else None
                return response, first, deployment.model
            except Exception as exc:
                if attempt + 1 == tries or not _retryable(exc):
                    raise
                logger.debug("LLM try %d on %s failed: %s", attempt + 1, alias, type(exc).__name__)
                if len(deployments) > 1:
                    continue  # another deployment next: no wait, as the Router does
                sleep_s = litellm.calculate_retry_after(
                    remaining_retries=tries - attempt - 1,
                    max_retries=tries - 1,
                    response_headers=_response_headers(exc),
                    min_timeout=self._plan.retry_after_s,
                )
                if deadline is not None and loop.time() + sleep_s >= deadline:
                    raise  # no time for another try: on to the fallbacks now
                await asyncio.sleep(sleep_s)
        raise AssertionError("unreachable")  # pragma: no cover

    def _call_args(
        self,
        messages: Sequence[Mapping[str, str]],
        max_tokens: int,
        temperature: float | None,
        offline_text: str,
    ) -> dict[str, Any]:
        args: dict[str, Any] = {
            "messages": [dict(m) for m in messages],
            "max_tokens": max_tokens,
            "metadata": {METADATA_KEY: offline_text},
        }
        if temperature is not None:
            args["temperature"] = temperature
        return args


def _register_unpriced_models(models: Iterable[str]) -> None:
    """Give LiteLLM a zero price for route models missing from its price map (a self-hosted
    model, or a name newer than the map): it prices every response, and for an unknown model
    each call pays ~600 Python calls of failed lookups to end with no cost. We never read
    LiteLLM's cost, so a zero price changes nothing we report."""
    for model in set(models):
        provider, _, name = model.partition("/")
        if not name or provider == OFFLINE_PROVIDER:
            continue
        try:
            litellm.get_model_info(model)
        except Exception:
            litellm.register_model(
                {
                    model: {
                        "litellm_provider": provider,
                        "mode": "chat",
                        "input_cost_per_token": 0.0,
                        "output_cost_per_token": 0.0,
                        "cache_creation_input_token_cost": 0.0,
                        "cache_read_input_token_cost": 0.0,
                    }
                }
            )


async def _first_chunk(stream: Any) -> Any:
    """A stream's first chunk (None for an empty stream); the stream is closed if that fails."""
    try:
        return await anext(stream, None)
    except BaseException:
        await _aclose(stream)
        raise


def _response_headers(exc: BaseException) -> Any:
    response = getattr(exc, "response", None)
    return getattr(response, "headers", None) or getattr(exc, "litellm_response_headers", None)


async def _aclose(stream: object) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


def _map_exception(exc: BaseException) -> BaseException:
    """Map a LiteLLM / provider exception onto the error table (CancelledError passes through)."""
    # The type is enough for operators; provider messages can quote the completion, so the
    # traceback (and its text) goes out only at DEBUG, like prompts and completions.
    logger.info("LLM call failed: %s", type(exc).__name__)
    logger.debug("LLM call failure detail", exc_info=exc)
    if isinstance(exc, asyncio.CancelledError | errors.ServingError):
        return exc
    if isinstance(exc, TimeoutError | llm_errors.Timeout):
        return errors.DeadlineExceeded("the LLM did not answer within the call's deadline")
    if isinstance(exc, llm_errors.RateLimitError):
        return errors.UpstreamRateLimited("the LLM provider is rate limiting; retry later")
    if isinstance(exc, llm_errors.ContextWindowExceededError):
        return errors.InvalidArgument("context", "the prompt is too long for the model")
    if isinstance(exc, llm_errors.ContentPolicyViolationError):
        return errors.ProviderRejected("the LLM provider's content policy refused the request")
    if isinstance(exc, llm_errors.AuthenticationError | llm_errors.PermissionDeniedError):
        return errors.NotReady("the LLM route's credentials were refused; check its API key")
    if isinstance(exc, llm_errors.NotFoundError):
        return errors.NotReady("the LLM route names a model the provider does not have")
    if isinstance(
        exc, llm_errors.BadRequestError | llm_errors.UnprocessableEntityError
    ) and not isinstance(exc, llm_errors.ServiceUnavailableError):
        return errors.ProviderRejected("the LLM provider rejected the request as invalid")
    if isinstance(
        exc,
        llm_errors.APIConnectionError
        | llm_errors.ServiceUnavailableError
        | llm_errors.InternalServerError
        | llm_errors.BadGatewayError
        | llm_errors.APIError
        | llm_errors.MidStreamFallbackError
        | llm_errors.APIResponseValidationError,
    ):
        return errors.UpstreamUnavailable("the LLM provider is unavailable; retry later")
    if isinstance(exc, ValueError) and "No deployments available" in str(exc):
        return errors.UpstreamUnavailable("no LLM route is available right now; retry later")
    return exc
