"""LiteLLM gateway: routes from a model_list YAML, the offline provider, and error mapping.

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
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Before the import: by default litellm fetches a price map over the network at import time,
# and retries from a background thread when there is no network.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # noqa: E402
import yaml  # noqa: E402
from litellm import CustomLLM  # noqa: E402
from litellm import exceptions as llm_errors  # noqa: E402
from litellm.types.utils import GenericStreamingChunk, ModelResponse  # noqa: E402

from ml_serving import errors  # noqa: E402

logger = logging.getLogger(__name__)

OFFLINE_PROVIDER = "offline"
OFFLINE_MODEL = f"{OFFLINE_PROVIDER}/tip-composer-1"
OFFLINE_ALIAS = "offline"
METADATA_KEY = "mlserving_offline_tip"
"""Metadata key carrying the offline provider's pre-composed tip (set by the caller)."""

_DEFAULT_ROUTER_SETTINGS: dict[str, Any] = {"num_retries": 2, "timeout": 30.0}


@dataclass(frozen=True)
class Completion:
    """The outcome of one generation: the text (empty for a stream's end) and its totals."""

    text: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    """"stop", "length", "content_filter" or "" when the provider did not say."""


@dataclass(frozen=True)
class RouteConfig:
    """What a LiteLLM config file holds that we use: the model list and router settings."""

    model_list: tuple[dict[str, Any], ...]
    router_settings: Mapping[str, Any]

    @property
    def aliases(self) -> tuple[str, ...]:
        """Route aliases (model_name) in file order, without repeats."""
        return tuple(dict.fromkeys(entry["model_name"] for entry in self.model_list))


def offline_routes() -> RouteConfig:
    """The built-in route used when no config file is given: the offline provider only."""
    return RouteConfig(
        model_list=({"model_name": OFFLINE_ALIAS, "litellm_params": {"model": OFFLINE_MODEL}},),
        router_settings={},
    )


def load_routes(path: Path) -> RouteConfig:
    """Read and check a LiteLLM config (model_list, optional router_settings); raise ValueError."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read LLM config {path}: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("model_list"), list):
        raise ValueError(f"LLM config {path} needs a 'model_list' list (LiteLLM config format)")
    entries: list[dict[str, Any]] = []
    for i, entry in enumerate(raw["model_list"]):
        params = entry.get("litellm_params") if isinstance(entry, dict) else None
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("model_name"), str)
            or not isinstance(params, dict)
            or not isinstance(params.get("model"), str)
        ):
            raise ValueError(
                f"LLM config {path}: model_list[{i}] needs model_name and litellm_params.model"
            )
        entries.append(entry)
    if not entries:
        raise ValueError(f"LLM config {path}: model_list is empty")
    router_settings = raw.get("router_settings") or {}
    if not isinstance(router_settings, dict):
        raise ValueError(f"LLM config {path}: router_settings must be a mapping")
    return RouteConfig(model_list=tuple(entries), router_settings=router_settings)


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


class LLMGateway:
    """Generate's only door to LLMs: a LiteLLM Router over the configured routes."""

    def __init__(self, routes: RouteConfig, alias: str | None = None) -> None:
        _quiet_litellm()
        _register_offline_provider()
        if alias is not None and alias not in routes.aliases:
            raise ValueError(
                f"ML_SERVING_LLM_MODEL={alias!r} is not a route alias; "
                f"known: {', '.join(routes.aliases)}"
            )
        self.alias = alias or routes.aliases[0]
        self._models = {
            entry["model_name"]: entry["litellm_params"]["model"] for entry in routes.model_list
        }
        settings = {**_DEFAULT_ROUTER_SETTINGS, **routes.router_settings}
        self._router = litellm.Router(model_list=[dict(e) for e in routes.model_list], **settings)

    @property
    def route_model(self) -> str:
        """The configured model string of the route Generate uses (a metrics label)."""
        return str(self._models[self.alias])

    async def warm_up(self) -> None:
        """Exercise the call path once without network (mock response), so the first real
        request does not pay for lazy imports and client set-up."""
        started = time.perf_counter()
        await self._router.acompletion(
            model=self.alias,
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
        try:
            async with asyncio.timeout(timeout_s):
                response = await self._router.acompletion(
                    **self._call_args(messages, max_tokens, temperature, timeout_s, offline_text)
                )
        except BaseException as exc:
            raise _map_exception(exc) from exc
        choice = response.choices[0]
        usage = getattr(response, "usage", None)
        return Completion(
            text=choice.message.content or "",
            model=self._answered_by(response),
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
        model = self._models[self.alias]
        prompt_tokens = completion_tokens = 0
        finish_reason = ""
        pieces = 0
        try:
            async with asyncio.timeout(timeout_s):
                response = await self._router.acompletion(
                    stream=True,
                    stream_options={"include_usage": True},
                    **self._call_args(messages, max_tokens, temperature, timeout_s, offline_text),
                )
                try:
                    async for chunk in response:
                        model = self._answered_by(chunk, model)
                        usage = getattr(chunk, "usage", None)
                        if usage is not None:
                            prompt_tokens = int(usage.prompt_tokens or 0)
                            completion_tokens = int(usage.completion_tokens or 0)
                        if not chunk.choices:
                            continue
                        choice = chunk.choices[0]
                        if choice.finish_reason:
                            finish_reason = choice.finish_reason
                        delta = choice.delta.content
                        if delta:
                            pieces += 1
                            yield delta
                finally:
                    # Now, not when garbage collected: a caller that went away (a cancelled
                    # RPC) must free its upstream connection at once.
                    await _aclose(response)
        except BaseException as exc:
            raise _map_exception(exc) from exc
        if completion_tokens == 0:
            completion_tokens = pieces  # provider sent no usage: count the deltas it streamed
        yield Completion("", model, prompt_tokens, completion_tokens, finish_reason)

    def _call_args(
        self,
        messages: Sequence[Mapping[str, str]],
        max_tokens: int,
        temperature: float | None,
        timeout_s: float | None,
        offline_text: str,
    ) -> dict[str, Any]:
        args: dict[str, Any] = {
            "model": self.alias,
            "messages": [dict(m) for m in messages],
            "max_tokens": max_tokens,
            "metadata": {METADATA_KEY: offline_text},
        }
        if temperature is not None:
            args["temperature"] = temperature
        if timeout_s is not None:
            # Rounded up: LiteLLM makes a client per timeout value; asyncio.timeout stays exact.
            args["timeout"] = float(math.ceil(timeout_s))
        return args

    def _answered_by(self, response: Any, default: str | None = None) -> str:
        """The route's configured model string for the deployment that answered."""
        hidden = getattr(response, "_hidden_params", None) or {}
        deployment = hidden.get("litellm_model_name") or hidden.get("model")
        if isinstance(deployment, str) and deployment:
            return deployment
        return default or self._models[self.alias]


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
