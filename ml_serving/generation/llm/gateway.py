"""LLMGateway: Generate's door to LLMs, with the Router's retries, fallbacks and cooldowns.

Importing this module imports litellm (through provider.py), which takes seconds, so the
server imports it in a worker thread after it starts listening, and reports readiness only once
`LLMGateway.warm_up` has run.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ml_serving.generation.llm import exceptions, offline, provider, transport, tuning
from ml_serving.generation.llm.cooldowns import Cooldowns, OnCooldown
from ml_serving.generation.llm.exceptions import NoRouteAvailable
from ml_serving.generation.llm.provider import AcompletionRoute, ProviderRoute
from ml_serving.generation.llm.routes import (
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

METADATA_KEY = offline.METADATA_KEY
DEFAULT_CHARS_PER_TOKEN = 16
"""A call's text bound when its caller names none (generation.service cuts replies there)."""


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
class _Deployment:
    """One model_list entry, ready to call."""

    key: str
    """"alias#index": what cooldowns count by."""
    model: str
    route: ProviderRoute | AcompletionRoute
    timeout_s: float
    weight: float


def _deployment(
    key: str, entry: Mapping[str, Any], default_timeout_s: float, *, force_acompletion: bool
) -> _Deployment:
    params: dict[str, Any] = {}
    for name, value in entry["litellm_params"].items():
        if isinstance(value, str) and value.startswith("os.environ/"):
            # LiteLLM's own reading of the reference (the Router's, too): once, at start.
            value = provider.get_secret_str(value)
        params[name] = value
    # Retries are the loop's (num_retries), as under the Router: the OpenAI SDK's own (2 by
    # default, on the acompletion path) only where the route asks for them.
    params.setdefault("max_retries", 0)
    timeout = params.pop("timeout", None)
    weight = params.get("weight", 1)
    for name in ROUTER_ONLY_PARAMS:
        params.pop(name, None)
    timeout_s = float(timeout) if isinstance(timeout, int | float) and timeout > 0 else None
    return _Deployment(
        key=key,
        model=str(params["model"]),
        route=provider.resolve(params, force_acompletion=force_acompletion),
        timeout_s=timeout_s or default_timeout_s,
        weight=float(weight) if isinstance(weight, int | float) and weight > 0 else 1.0,
    )


class _Stream:
    """An open upstream stream: its parsed chunks, the first already read, and how to close."""

    def __init__(
        self,
        chunks: AsyncIterator[Any],
        first: Any,
        close: Callable[[], Any],
        route: ProviderRoute | AcompletionRoute,
    ) -> None:
        self.chunks = chunks
        self.first = first
        self._close = close
        self.route = route

    async def aclose(self) -> None:
        """Close now, not when garbage collected: an abandoned stream frees its connection."""
        aclose = getattr(self.chunks, "aclose", None)
        try:
            if aclose is not None:
                await aclose()
        finally:
            result = self._close()
            if asyncio.iscoroutine(result):
                await result


class LLMGateway:
    """Generate's only door to LLMs: each route through LiteLLM's provider layer on one pooled
    HTTP client (or litellm.acompletion, for a route that path cannot serve), with the
    Router's retries, fallbacks and cooldowns done by a small loop of our own.

    Why not litellm.Router: it costs ~1,100 Python calls (~3 ms of CPU) per call over
    litellm.acompletion, whatever its settings, and we use a sliver of it. The loop keeps the
    config format and the meaning of what we use: an alias with several deployments picks one
    by `weight` and tries the others on retries; `num_retries` more tries per alias on a
    retryable error (429, 408, 5xx, connection errors, timeouts; never 400/401/403/404/422);
    then `fallbacks` (or `context_window_fallbacks` / `content_policy_fallbacks` for those
    errors), each fallback alias with its own retries, not chained; if all fail, the first
    alias's error. A deployment failing more than `allowed_fails` times in a minute (429, 401,
    404, 408, 5xx) is skipped for `cooldown_time` seconds (unless `disable_cooldowns`); an
    alias whose deployments are all cooling down goes straight to its fallbacks. Between tries
    of one deployment it sleeps LiteLLM's backoff (Retry-After, else exponential from 0.5 s
    with jitter, at least `retry_after`), but never past the deadline: a sleep that would
    outlast it moves on to the fallbacks at once. Each try's timeout is the smaller of the
    deployment's `timeout` (else router_settings.timeout) and the time left to the deadline;
    for a stream it bounds the wait for the first chunk, and the deadline the whole stream.

    Not kept from the Router: rpm/tpm routing; other router_settings are refused at start.
    """

    def __init__(
        self,
        routes: RouteConfig,
        alias: str | None = None,
        *,
        http_client: str = "aiohttp",
        max_connections: int = 1000,
        keepalive_s: float = 30.0,
        acompletion_routes: Collection[str] = (),
        stream_coalesce_s: float = 0.0,
        on_cooldown: OnCooldown | None = None,
        clock: Callable[[], float] = time.monotonic,
        answer_budget_bytes: int = transport.DEFAULT_BUDGET_BYTES,
    ) -> None:
        offline.register()
        if alias is not None and alias not in routes.aliases:
            raise ValueError(
                f"ML_SERVING_LLM_MODEL={alias!r} is not a route alias; "
                f"known: {', '.join(routes.aliases)}"
            )
        unknown = set(acompletion_routes) - set(routes.aliases) - {"*"}
        if unknown:
            raise ValueError(
                f"ML_SERVING_LLM_ACOMPLETION_ROUTES names unknown aliases: "
                f"{', '.join(sorted(unknown))}; known: {', '.join(routes.aliases)}"
            )
        self.alias = alias or routes.aliases[0]
        self._plan = RetryPlan.from_settings(routes.router_settings, routes.aliases)
        groups: dict[str, list[_Deployment]] = {}
        for entry in routes.model_list:
            name = entry["model_name"]
            group = groups.setdefault(name, [])
            forced = "*" in acompletion_routes or name in acompletion_routes
            group.append(
                _deployment(
                    f"{name}#{len(group)}", entry, self._plan.timeout_s, force_acompletion=forced
                )
            )
        self._groups = {name: tuple(deployments) for name, deployments in groups.items()}
        for deployment in self.deployments():
            if isinstance(deployment.route, AcompletionRoute):
                logger.info(
                    "LLM route through litellm.acompletion",
                    extra={"llm_deployment": deployment.key, "reason": deployment.route.reason},
                )
        provider.price_unknown_models(
            [d.model for d in self.deployments() if not d.model.startswith(f"{OFFLINE_PROVIDER}/")]
        )
        self._http = transport.make_client(
            http_client,
            max_connections=max_connections,
            keepalive_s=keepalive_s,
            budget_bytes=answer_budget_bytes,
        )
        self._coalesce_s = max(0.0, stream_coalesce_s)
        self.cooldowns = Cooldowns(
            allowed_fails=self._plan.allowed_fails,
            cooldown_time_s=self._plan.cooldown_time_s,
            disabled=self._plan.disable_cooldowns,
            on_cooldown=on_cooldown,
            clock=clock,
        )

    @property
    def answer_budget(self) -> transport.AnswerBudget:
        """The bytes of upstream answers held at once, and how many were refused (metrics)."""
        return self._http.budget

    @property
    def route_model(self) -> str:
        """The configured model string of the route Generate uses (a metrics label)."""
        return self._groups[self.alias][0].model

    def deployments(self) -> list[_Deployment]:
        """Every deployment, in config order."""
        return [d for group in self._groups.values() for d in group]

    def path_of(self, alias: str) -> list[str]:
        """The path ("provider" or "acompletion") of each deployment of `alias`."""
        return [
            "provider" if isinstance(d.route, ProviderRoute) else "acompletion"
            for d in self._groups[alias]
        ]

    async def warm_up(self) -> None:
        """Exercise the call paths once without network, so the first real request does not
        pay for lazy imports (nor leave their objects to the GC, see tuning.freeze_import_heap):
        each provider route builds, parses and streams a canned exchange, and acompletion (the
        offline route, and any route on LiteLLM's own path) answers a mock response."""
        started = time.perf_counter()
        for deployment in self.deployments():
            if isinstance(deployment.route, ProviderRoute):
                await deployment.route.warm()
        first = next(
            (d.route for d in self.deployments() if isinstance(d.route, AcompletionRoute)), None
        )
        if first is not None:
            await provider.warm_acompletion(first.params)
        # What is alive now lives as long as the process: keep the GC from rescanning it.
        tuning.freeze_import_heap()
        logger.info("LLM gateway warm", extra={"warm_up_ms": (time.perf_counter() - started) * 1e3})

    async def aclose(self) -> None:
        """Close the pooled HTTP client (at server stop)."""
        await self._http.aclose()

    # --- calls -----------------------------------------------------------------------------------

    async def complete(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        max_tokens: int,
        temperature: float | None,
        timeout_s: float | None,
        offline_text: OfflineText,
        max_chars: int | None = None,
    ) -> Completion:
        """One non-streaming generation; upstream failures become errors.ServingError. An
        answer longer than `max_chars` (default: max_tokens x 16) would carry, in the route's
        format, is refused while it is read."""
        call = _Call(messages, max_tokens, temperature, offline_text, max_chars)
        try:
            async with asyncio.timeout(timeout_s):
                response, model = await self._attempts(call, timeout_s, stream=False)
        except BaseException as exc:
            raise exceptions.to_serving_error(exc) from exc
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
        offline_text: OfflineText,
        max_chars: int | None = None,
    ) -> AsyncGenerator[str | Completion, None]:
        """Yield text deltas, then one Completion with the totals (empty text).

        The first delta goes out at once; later ones that arrive within the coalescing window
        of the last one sent go out together with the next, as one message (timer-free: what
        has arrived is merged when the next chunk comes in, never waited for).
        """
        call = _Call(messages, max_tokens, temperature, offline_text, max_chars)
        prompt_tokens = completion_tokens = pieces = 0
        finish_reason = ""
        window = self._coalesce_s
        clock = asyncio.get_running_loop().time
        held: list[str] = []
        last_sent = -math.inf
        try:
            async with asyncio.timeout(timeout_s):
                upstream, model = await self._attempts(call, timeout_s, stream=True)
                try:
                    chunks, chunk = upstream.chunks, upstream.first
                    while chunk is not None:
                        text, finish, usage = _fields(chunk)
                        if usage is not None:
                            prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
                            completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
                        if finish:
                            finish_reason = finish
                        if text:
                            pieces += 1
                            held.append(text)
                        if held:
                            now = clock() if window else 0.0
                            if now - last_sent >= window:
                                yield held[0] if len(held) == 1 else "".join(held)
                                held.clear()
                                last_sent = now
                        chunk = await anext(chunks, None)
                    if held:
                        yield "".join(held)
                        held.clear()
                    if not finish_reason and isinstance(upstream.route, ProviderRoute):
                        raise upstream.route.eof_error()
                finally:
                    await upstream.aclose()
        except BaseException as exc:
            raise exceptions.to_serving_error(exc) from exc
        if completion_tokens == 0:
            completion_tokens = pieces  # provider sent no usage: count the deltas it streamed
        yield Completion("", model, prompt_tokens, completion_tokens, finish_reason)

    # --- the retry, fallback and cooldown loop ---------------------------------------------------

    async def _attempts(self, call: _Call, timeout_s: float | None, *, stream: bool) -> Any:
        """(response or _Stream, the model that answered), over the alias and its fallbacks."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        first_error: Exception | None = None
        aliases: tuple[str, ...] = (self.alias,)
        i = 0
        while i < len(aliases):
            alias = aliases[i]
            try:
                return await self._call_alias(alias, call, deadline, stream)
            except Exception as exc:
                row = exceptions.outcome(exc)
                if row is None:
                    raise  # not an LLM failure (a bug): no fallback hides it
                if first_error is None:
                    first_error = exc
                    aliases += self._plan.fallbacks_for(alias, row.fallback)
                logger.debug("LLM route %s failed: %s", alias, type(exc).__name__)
            i += 1
        assert first_error is not None
        raise first_error

    async def _call_alias(
        self, alias: str, call: _Call, deadline: float | None, stream: bool
    ) -> tuple[Any, str]:
        group = self._groups[alias]
        tries = self._plan.num_retries + 1
        loop = asyncio.get_running_loop()
        last_error: Exception | None = None
        start = -1
        for attempt in range(tries):
            ready = [d for d in group if self.cooldowns.available(d.key)]
            if not ready:
                if last_error is not None:
                    raise last_error
                raise NoRouteAvailable(f"every deployment of {alias!r} is cooling down")
            if start < 0:
                # Weighted pick among the ready deployments (one, most often: nothing to draw).
                start = (
                    random.choices(range(len(ready)), [d.weight for d in ready])[0]
                    if len(ready) > 1
                    else 0
                )
            deployment = ready[(start + attempt) % len(ready)]
            timeout = deployment.timeout_s
            if deadline is not None:
                timeout = min(timeout, deadline - loop.time())
            try:
                if stream:
                    return await self._open_stream(deployment, call, timeout), deployment.model
                return await self._complete_once(deployment, call, timeout), deployment.model
            except Exception as exc:
                row = exceptions.outcome(exc)
                if row is None:
                    raise
                if row.cooldown:
                    self.cooldowns.failed(deployment.key, deployment.model)
                if attempt + 1 == tries or not row.retryable:
                    raise
                last_error = exc
                logger.debug("LLM try %d on %s failed: %s", attempt + 1, alias, type(exc).__name__)
                if len(ready) > 1:
                    continue  # another deployment next: no wait, as the Router does
                sleep_s = provider.calculate_retry_after(
                    remaining_retries=tries - attempt - 1,
                    max_retries=tries - 1,
                    response_headers=_response_headers(exc),
                    min_timeout=self._plan.retry_after_s,
                )
                if deadline is not None and loop.time() + sleep_s >= deadline:
                    raise  # no time for another try: on to the fallbacks now
                await asyncio.sleep(sleep_s)
        raise AssertionError("unreachable")  # pragma: no cover

    # --- one try ---------------------------------------------------------------------------------

    async def _complete_once(self, deployment: _Deployment, call: _Call, timeout: float) -> Any:
        route = deployment.route
        if isinstance(route, AcompletionRoute):
            return await route.acompletion(**call.acompletion_args(), timeout=_whole_s(timeout))
        prepared = route.prepare(
            call.messages, max_tokens=call.max_tokens, temperature=call.temperature, stream=False
        )
        bound = route.answer_bound(call.max_tokens, call.max_chars, stream=False)
        try:
            async with asyncio.timeout(timeout):
                response = await self._http.post(
                    prepared.url, prepared.headers, prepared.body, max_bytes=bound
                )
                content = await response.read()
        except TimeoutError:
            raise route.timeout_error() from None
        except transport.AnswerTooLarge:
            raise  # ours to classify (exceptions.TABLE), at no LiteLLM cost
        except transport.TransportError as exc:
            raise route.connection_error(exc) from exc
        try:
            if response.status >= 300:
                raise route.status_error(response.status, response.headers, content)
            return route.parse(prepared, response.status, response.headers, content)
        finally:
            del content
            response.free()  # parsed: the body's bytes go back to the budget

    async def _open_stream(self, deployment: _Deployment, call: _Call, timeout: float) -> _Stream:
        """The stream and its first chunk: a stream failing before that fails its try."""
        route = deployment.route
        if isinstance(route, AcompletionRoute):
            args = call.acompletion_args()
            args["stream"] = True
            args["stream_options"] = {"include_usage": True}
            wrapper = await route.acompletion(**args, timeout=_whole_s(timeout))
            try:
                first = await anext(wrapper, None)
            except BaseException:
                await _aclose(wrapper)
                raise
            return _Stream(wrapper, first, lambda: None, route)
        prepared = route.prepare(
            call.messages, max_tokens=call.max_tokens, temperature=call.temperature, stream=True
        )
        response: transport.Response | None = None
        bound = route.answer_bound(call.max_tokens, call.max_chars, stream=True)
        try:
            async with asyncio.timeout(timeout):
                response = await self._http.post(
                    prepared.url, prepared.headers, prepared.body, max_bytes=bound
                )
                if response.status >= 300:
                    content = await response.read()
                    raise route.status_error(response.status, response.headers, content)
                chunks = route.chunks(prepared, response.text_chunks())
                try:
                    first = await anext(chunks, None)
                except BaseException:
                    await chunks.aclose()  # type: ignore[attr-defined]
                    raise
        except TimeoutError:
            if response is not None:
                await response.close()
            raise route.timeout_error() from None
        except transport.AnswerTooLarge:
            if response is not None:
                await response.close()
            raise
        except transport.TransportError as exc:
            if response is not None:
                await response.close()
            raise route.connection_error(exc) from exc
        except BaseException:
            if response is not None:
                await response.close()
            raise
        return _Stream(chunks, first, response.close, route)


OfflineText = str | Callable[[], str]
"""The offline route's answer for a call, or what makes it: only a call on LiteLLM's own path
(the offline route among them) reads it, so a caller may pass it unmade."""


class _Call:
    """One call's arguments, in the two forms the two paths take."""

    __slots__ = ("max_chars", "max_tokens", "messages", "offline_text", "temperature")

    def __init__(
        self,
        messages: Sequence[Mapping[str, str]],
        max_tokens: int,
        temperature: float | None,
        offline_text: OfflineText,
        max_chars: int | None,
    ) -> None:
        self.messages = messages
        self.max_tokens = max_tokens
        self.max_chars = max_tokens * DEFAULT_CHARS_PER_TOKEN if max_chars is None else max_chars
        self.temperature = temperature
        self.offline_text = offline_text

    def acompletion_args(self) -> dict[str, Any]:
        offline_text = self.offline_text
        if callable(offline_text):
            offline_text = offline_text()  # only this path (the offline route's) reads it
        args: dict[str, Any] = {
            "messages": [dict(m) for m in self.messages],
            "max_tokens": self.max_tokens,
            "metadata": {METADATA_KEY: offline_text},
        }
        if self.temperature is not None:
            args["temperature"] = self.temperature
        return args


def _fields(chunk: Any) -> tuple[str, str, Any]:
    """(text delta, finish reason, usage) of a parsed chunk (ModelResponseStream, or the
    GenericStreamingChunk dict some iterators return)."""
    if isinstance(chunk, dict):
        return chunk.get("text") or "", chunk.get("finish_reason") or "", _usage(chunk)
    usage = _read(chunk, "usage")
    choices = chunk.choices
    if not choices:
        return "", "", usage
    choice = choices[0]
    delta = _read(choice, "delta")
    text = _read(delta, "content") if delta is not None else None
    return text or "", _read(choice, "finish_reason") or "", usage


_DIRECT: dict[tuple[type, str], bool] = {}
"""Per (pydantic model class, name): whether an attribute read can find the name (a declared
field, a property) when the instance's extras do not hold it."""


def _read(obj: Any, name: str) -> Any:
    """`getattr(obj, name, None)`, without pydantic's slow path for LiteLLM's stream types:
    they keep most values (usage, delta, content, finish_reason) as extras, which an attribute
    read reaches only through the model's `__getattr__` (~0.8 us, ~2 us for an absent one: it
    raises), where `model_extra` answers in ~0.1 us. Five reads a chunk: ~0.15 ms a stream."""
    extra = getattr(obj, "model_extra", None)
    if extra is None:
        return getattr(obj, name, None)  # not a pydantic model that keeps extras
    if name in extra:
        return extra[name]
    cls = type(obj)
    direct = _DIRECT.get((cls, name))
    if direct is None:
        direct = _DIRECT[(cls, name)] = name in cls.model_fields or hasattr(cls, name)
    return getattr(obj, name, None) if direct else None


def _usage(chunk: Mapping[str, Any]) -> Any:
    usage = chunk.get("usage")
    if not usage:
        return None
    return _DictUsage(
        int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    )


@dataclass(frozen=True)
class _DictUsage:
    prompt_tokens: int
    completion_tokens: int


def _whole_s(timeout: float) -> float:
    """Rounded up: LiteLLM makes an HTTP client per timeout value; asyncio.timeout is exact."""
    return float(max(1, math.ceil(timeout)))


def _response_headers(exc: BaseException) -> Any:
    response = getattr(exc, "response", None)
    return getattr(response, "headers", None) or getattr(exc, "litellm_response_headers", None)


async def _aclose(stream: object) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
