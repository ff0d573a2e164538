"""LiteLLM as the provider layer: every LiteLLM name the LLM package uses, called with keywords.

For each route LiteLLM does what it is for: it resolves the provider (`get_llm_provider`), and
the provider's chat config (`ProviderConfigManager.get_provider_chat_config`) builds the URL
(`get_complete_url`), the headers (`validate_environment`) and the body (`get_optional_params`,
`transform_request`), parses the answer (`transform_response`) and each streamed chunk (the
config's own chunk iterator, fed by LiteLLM's own SSE line splitter), and classifies failures
(`get_error_class`, then `exception_type`, into LiteLLM's exception types). Only the I/O is
ours (transport.py): that is what takes Generate from ~9 ms of CPU a call through
`litellm.acompletion` to about 1 ms.

A route this path cannot serve goes through `litellm.acompletion` instead (AcompletionRoute),
decided once at start (`resolve`). Keyword arguments everywhere: `validate_environment` and
`get_complete_url` gained parameters between releases, and positional calls would silently
shift. tests/unit/test_llm_provider_parity.py holds this module to acompletion's answers,
family by family, so an upgrade that changes one fails CI, not production.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ml_serving import errors
from ml_serving.generation.llm import tuning
from ml_serving.generation.llm.transport import AnswerTooLarge, TransportError

tuning.before_import()

import httpx  # noqa: E402 - LiteLLM's transforms read an httpx.Response
import litellm  # noqa: E402
from litellm import CustomLLM, ModelResponse  # noqa: E402
from litellm import exceptions as llm_errors  # noqa: E402
from litellm.litellm_core_utils.url_utils import ensure_api_route  # noqa: E402
from litellm.llms.anthropic.chat.handler import (  # noqa: E402
    ModelResponseIterator as AnthropicStreamIterator,
)
from litellm.llms.custom_httpx.sse_lines import aiter_sse_lines  # noqa: E402
from litellm.secret_managers.main import get_secret_str  # noqa: E402
from litellm.types.utils import GenericStreamingChunk, ModelResponseStream  # noqa: E402
from litellm.utils import ProviderConfigManager, get_optional_params  # noqa: E402

__all__ = [
    "AcompletionRoute",
    "litellm",
    "CustomLLM",
    "GenericStreamingChunk",
    "ModelResponse",
    "ProviderRoute",
    "calculate_retry_after",
    "get_secret_str",
    "llm_errors",
    "register_custom_provider",
    "resolve",
]

logger = logging.getLogger(__name__)

tuning.after_import(litellm)

# Route keys the provider path understands. Any other key in a route's litellm_params (Azure's
# api_version, Vertex's project, a custom client...) means LiteLLM's own handler knows more
# than this path does: such a route goes through acompletion.
_ROUTE_KEYS = frozenset({"model", "api_base", "api_key", "max_retries", "drop_params"})
_ROUTE_HEADER_KEYS = frozenset({"extra_headers", "headers"})
# OpenAI parameters a route may fix (LiteLLM maps them per provider, as acompletion does).
_ROUTE_OPENAI_PARAMS = frozenset(
    {"temperature", "top_p", "stop", "presence_penalty", "frequency_penalty", "seed", "user"}
)
# Families the parity tests hold to acompletion's answers. Other providers with a chat config
# would likely work too, but nothing proves it: they keep LiteLLM's own path.
_OPENAI_COMPATIBLE = frozenset({"openai", "hosted_vllm"})
_ANTHROPIC = frozenset({"anthropic"})
_ANTHROPIC_DEFAULT_BASE = "https://api.anthropic.com"

# What an answer of N characters can take on the wire, so that a longer one is refused while it
# is read. A character is at most 12 bytes of JSON (an astral one, escaped as a surrogate pair
# "\ud83d\ude00", is one Python character); an answer's envelope (ids, usage, a request id
# header echoed in the body, error bodies) stays within 64 KiB; each streamed event adds its
# frame: OpenAI's chunk repeats id, model, created and fingerprint (about 250 bytes, and its
# "obfuscation" padding), Anthropic's content_block_delta about 100. Every token may be its own
# event, plus a few for role, finish and usage.
_BYTES_PER_CHAR = 12
_ENVELOPE_BYTES = 64 * 1024
_EVENT_FRAME_BYTES = {"anthropic": 512}
_DEFAULT_EVENT_FRAME_BYTES = 1024
_EXTRA_EVENTS = 16


def calculate_retry_after(
    *,
    remaining_retries: int,
    max_retries: int,
    response_headers: Any,
    min_timeout: float,
) -> float:
    """LiteLLM's backoff between tries (Retry-After when the provider sent one)."""
    return float(
        litellm.calculate_retry_after(
            remaining_retries=remaining_retries,
            max_retries=max_retries,
            response_headers=response_headers,
            min_timeout=min_timeout,
        )
    )


def register_custom_provider(provider: str, handler: CustomLLM) -> None:
    """Register a CustomLLM under `provider/` (LiteLLM's documented custom_provider_map)."""
    entry = {"provider": provider, "custom_handler": handler}
    if entry not in litellm.custom_provider_map:
        litellm.custom_provider_map = [*litellm.custom_provider_map, entry]


class _CallLog:
    """The logging object LiteLLM's transforms report to: we log each RPC once, ourselves."""

    model_call_details: dict[str, Any] = {}

    def pre_call(self, **_: Any) -> None:
        """LiteLLM's pre-call hook: nothing to record."""

    def post_call(self, **_: Any) -> None:
        """LiteLLM's post-call hook: nothing to record."""


_NO_LOG = _CallLog()


@dataclass(frozen=True)
class Prepared:
    """One request, built by the provider's config: where, what, and what the parse needs."""

    url: str
    headers: dict[str, str]
    body: bytes
    data: dict[str, Any]
    messages: list[dict[str, Any]]
    optional_params: dict[str, Any]


@dataclass
class ProviderRoute:
    """A deployment LiteLLM's provider layer serves, resolved once at start."""

    model: str
    """The configured model string (e.g. "openai/gpt-4o-mini"): labels and parity."""
    provider: str
    name: str
    """The provider's own model name (what goes into the request body)."""
    api_key: str | None
    api_base: str | None
    config: Any
    """The provider's chat config (a litellm BaseConfig)."""
    litellm_params: dict[str, Any]
    extra_headers: Mapping[str, str]
    route_params: Mapping[str, Any]
    drop_params: bool | None
    strict_sse: bool
    """acompletion reaches this provider through its SDK, which fails on a malformed chunk;
    LiteLLM's own iterators skip one. Kept the same as acompletion, provider by provider."""
    _optional: dict[tuple[int, float | None, bool], dict[str, Any]] = field(default_factory=dict)
    _headers: dict[tuple[int, float | None, bool], dict[str, str]] = field(default_factory=dict)
    _urls: dict[bool, str] = field(default_factory=dict)
    _requests: dict[str, httpx.Request] = field(default_factory=dict)
    """The httpx.Request each parsed answer refers to, one per URL (parsing a URL costs more
    than the rest of building the response object)."""

    # --- requests ----------------------------------------------------------------------------

    def answer_bound(self, max_tokens: int, max_chars: int, *, stream: bool) -> int:
        """Most bytes an answer of `max_tokens` tokens and `max_chars` characters of text takes
        in this provider's format (JSON, or SSE events when streamed)."""
        bound = _ENVELOPE_BYTES + max_chars * _BYTES_PER_CHAR
        if stream:
            frame = _EVENT_FRAME_BYTES.get(self.provider, _DEFAULT_EVENT_FRAME_BYTES)
            bound += (max_tokens + _EXTRA_EVENTS) * frame
        return bound

    def url(self, *, stream: bool) -> str:
        """The complete URL, as LiteLLM builds it for this provider (once per kind of call: it
        follows from the route alone, and building it costs ~8 us)."""
        cached = self._urls.get(stream)
        if cached is not None:
            return cached
        if self.provider in _ANTHROPIC:
            # acompletion's anthropic branch appends the route; its config's URL is the base.
            url = str(ensure_api_route(self.api_base or _ANTHROPIC_DEFAULT_BASE, "v1/messages"))
        else:
            url = str(
                self.config.get_complete_url(
                    api_base=self.api_base,
                    api_key=self.api_key,
                    model=self.name,
                    optional_params={},
                    litellm_params=self.litellm_params,
                    stream=stream,
                )
            )
        self._urls[stream] = url
        return url

    def optional_params(
        self, *, max_tokens: int, temperature: float | None, stream: bool
    ) -> dict[str, Any]:
        """LiteLLM's get_optional_params for this call's knobs, computed once per distinct set
        (a few hundred Python calls; a route sees a handful of distinct max_tokens)."""
        key = (max_tokens, temperature, stream)
        cached = self._optional.get(key)
        if cached is None:
            cached = get_optional_params(
                model=self.name,
                custom_llm_provider=self.provider,
                max_tokens=max_tokens,
                temperature=temperature,
                stream=stream,
                stream_options={"include_usage": True} if stream else None,
                drop_params=self.drop_params,
                **self.route_params,
            )
            if len(self._optional) < 256:
                self._optional[key] = cached
        return dict(cached)

    def prepare(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        max_tokens: int,
        temperature: float | None,
        stream: bool,
    ) -> Prepared:
        """Headers and body for one call, built by the provider's chat config."""
        msgs: list[dict[str, Any]] = [dict(m) for m in messages]
        optional = self.optional_params(
            max_tokens=max_tokens, temperature=temperature, stream=stream
        )
        optional.pop("stream", None)
        extra_body = optional.pop("extra_body", None)
        key = (max_tokens, temperature, stream)
        headers = self._headers.get(key)
        if headers is None:
            # The headers follow from the route, its key and the call's parameters, and from
            # message features (cache_control, files, tools) Generate's prompts never carry:
            # built by the provider's config once per set of parameters, like optional_params
            # (Anthropic's looks the model's capabilities up each time: ~0.3 ms a call).
            headers = self.config.validate_environment(
                headers=dict(self.extra_headers),
                model=self.name,
                messages=msgs,
                optional_params=dict(optional),
                litellm_params=self.litellm_params,
                api_key=self.api_key,
                api_base=self.api_base,
            )
            if len(self._headers) < 256:
                self._headers[key] = headers
        headers = dict(headers)
        data = self.config.transform_request(
            model=self.name,
            messages=msgs,
            optional_params=optional,
            litellm_params=self.litellm_params,
            headers=headers,
        )
        if extra_body:
            data = {
                **data,
                **self.config.transform_extra_body(
                    extra_body=extra_body,
                    request=data,
                    model=self.name,
                    litellm_params=self.litellm_params,
                ),
            }
        if stream and self.config.supports_stream_param_in_request_body:
            data["stream"] = True
        return Prepared(
            url=self.url(stream=stream),
            headers=headers,
            body=json.dumps(data).encode(),
            data=data,
            messages=msgs,
            optional_params=optional,
        )

    async def warm(self) -> None:
        """Build, parse and stream one canned exchange in this provider's format, without
        network: LiteLLM imports and builds much of its parsing path lazily, on first use."""
        messages = [{"role": "user", "content": "warm-up"}]
        for stream in (False, True):
            prepared = self.prepare(messages, max_tokens=16, temperature=None, stream=stream)
            answer, events = _CANNED_ANTHROPIC if self.provider in _ANTHROPIC else _CANNED_OPENAI
            if not stream:
                headers = {"content-type": "application/json"}
                self.parse(prepared, 200, headers, json.dumps(answer).encode())
                continue
            text = "".join(f"data: {json.dumps(event)}\n\n" for event in events)
            async for _ in self.chunks(prepared, _once(text)):
                pass

    # --- answers -----------------------------------------------------------------------------

    def parse(
        self, prepared: Prepared, status: int, headers: Mapping[str, str], content: bytes
    ) -> ModelResponse:
        """A 2xx answer through the provider's transform_response; failures are mapped."""
        request = self._requests.get(prepared.url)
        if request is None:
            request = self._requests[prepared.url] = httpx.Request("POST", prepared.url)
        raw = httpx.Response(
            status_code=status, headers=dict(headers), content=content, request=request
        )
        try:
            response: ModelResponse = self.config.transform_response(
                model=self.name,
                raw_response=raw,
                model_response=ModelResponse(),
                logging_obj=_NO_LOG,
                request_data=prepared.data,
                messages=prepared.messages,
                optional_params=prepared.optional_params,
                litellm_params=self.litellm_params,
                encoding=None,
                api_key=self.api_key,
                json_mode=False,
            )
        except Exception as exc:
            raise self.mapped(exc) from exc
        return response

    def status_error(self, status: int, headers: Mapping[str, str], content: bytes) -> Exception:
        """An error answer as LiteLLM classifies it (the provider's error class, then
        exception_type): the same LiteLLM exception acompletion raises."""
        text = content.decode("utf-8", errors="replace")
        error: Exception = self.config.get_error_class(
            error_message=text, status_code=status, headers=dict(headers)
        )
        return self.mapped(error)

    def connection_error(self, cause: BaseException) -> Exception:
        """No answer at all (refused, reset): LiteLLM's handlers report it as the provider's
        error with status 500, which exception_type maps (acompletion does the same)."""
        error: Exception = self.config.get_error_class(
            error_message=f"{type(cause).__name__}: {cause}", status_code=500, headers={}
        )
        return self.mapped(error)

    def timeout_error(self) -> Exception:
        """A try that ran out of time: LiteLLM's Timeout, as acompletion raises it."""
        error: Exception = llm_errors.Timeout(
            message="the LLM did not answer within the try's timeout",
            model=self.name,
            llm_provider=self.provider,
        )
        return error

    def mid_stream_error(self, cause: BaseException) -> Exception:
        """A stream that broke after its answer began: LiteLLM's MidStreamFallbackError, as its
        stream wrapper raises it around any failure while iterating."""
        mapped: Exception = (
            cause if isinstance(cause, llm_errors.MidStreamFallbackError) else self.mapped(cause)
        )
        if not isinstance(mapped, llm_errors.MidStreamFallbackError):
            mapped = llm_errors.MidStreamFallbackError(
                message=f"{type(mapped).__name__} while streaming",
                model=self.name,
                llm_provider=self.provider,
                original_exception=mapped,
            )
        return mapped

    def eof_error(self) -> Exception:
        """A stream that ended cleanly with no finish reason: cut short somewhere upstream.
        LiteLLM's stream wrapper fails such a stream (as a mid-stream RemoteProtocolError)."""
        return self.mid_stream_error(
            httpx.RemoteProtocolError("Stream ended before a finish_reason was received")
        )

    def mapped(self, error: BaseException) -> Exception:
        """LiteLLM's exception_type over a provider error (it raises the mapped exception)."""
        try:
            litellm.exception_type(
                model=self.name,
                original_exception=error,
                custom_llm_provider=self.provider,
                completion_kwargs={},
                extra_kwargs={},
            )
        except Exception as mapped:
            return mapped
        return error if isinstance(error, Exception) else RuntimeError(str(error))

    def chunks(self, prepared: Prepared, text: AsyncIterator[str]) -> AsyncIterator[Any]:
        """Parsed stream chunks (ModelResponseStream) from the body's text, as it arrives; a
        failure while iterating is LiteLLM's MidStreamFallbackError, as acompletion's stream
        wrapper raises it."""
        lines = aiter_sse_lines(text)
        iterator = self._iterator(prepared, lines)
        if self.strict_sse:
            return self._strict_chunks(iterator.chunk_parser, lines)
        return self._lenient_chunks(iterator)

    def _iterator(self, prepared: Prepared, lines: AsyncIterator[str]) -> Any:
        """The provider's own stream iterator, as LiteLLM's handler for it makes one."""
        if self.provider in _ANTHROPIC:
            # acompletion's anthropic handler builds this iterator itself (its chat config
            # has none): the same class, the same arguments.
            return AnthropicStreamIterator(
                streaming_response=lines, sync_stream=False, json_mode=False
            )
        return self.config.get_model_response_iterator_for_request(
            streaming_response=lines,
            sync_stream=False,
            json_mode=False,
            optional_params=prepared.optional_params,
            logging_obj=_NO_LOG,
        )

    async def _strict_chunks(
        self, parse: Callable[..., Any], lines: AsyncIterator[str]
    ) -> AsyncIterator[Any]:
        try:
            async for line in lines:
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    return
                try:
                    chunk = json.loads(payload)
                except ValueError as exc:
                    raise self.config.get_error_class(
                        error_message=f"malformed stream chunk: {exc}", status_code=500, headers={}
                    ) from exc
                yield parse(chunk=chunk)
        except (AnswerTooLarge, errors.ServingError):
            raise  # the answer's bound, the answer budget: classified by us, not LiteLLM
        except TransportError as exc:
            raise self.mid_stream_error(self.connection_error(exc)) from exc
        except Exception as exc:
            raise self.mid_stream_error(exc) from exc

    async def _lenient_chunks(self, iterator: Any) -> AsyncIterator[Any]:
        """The iterator's parsed chunks; the placeholders it returns for non-data SSE lines
        and for "[DONE]" (GenericStreamingChunk dicts with no text) are skipped here."""
        try:
            async for chunk in iterator:
                if isinstance(chunk, ModelResponseStream):
                    yield chunk
                elif isinstance(chunk, dict) and chunk.get("text"):
                    # "[DONE]" says finish_reason "stop" whatever the stream said before
                    # (LiteLLM's stream wrapper keeps the stream's own): skipped as well.
                    yield chunk
        except (AnswerTooLarge, errors.ServingError):
            raise  # the answer's bound, the answer budget: classified by us, not LiteLLM
        except TransportError as exc:
            raise self.mid_stream_error(self.connection_error(exc)) from exc
        except Exception as exc:
            raise self.mid_stream_error(exc) from exc


_CANNED_OPENAI: tuple[dict[str, Any], tuple[dict[str, Any], ...]] = (
    {
        "id": "warm",
        "object": "chat.completion",
        "created": 0,
        "model": "warm",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    },
    (
        {
            "id": "warm",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "warm",
            "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}],
        },
        {"id": "warm", "object": "chat.completion.chunk", "created": 0, "model": "warm",
         "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}},
    ),
)  # fmt: skip
_CANNED_ANTHROPIC: tuple[dict[str, Any], tuple[dict[str, Any], ...]] = (
    {
        "id": "warm",
        "type": "message",
        "role": "assistant",
        "model": "warm",
        "content": [{"type": "text", "text": "ok"}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 1, "output_tokens": 1},
    },
    (
        {"type": "message_start", "message": {"id": "warm", "type": "message",
         "role": "assistant", "model": "warm", "content": [],
         "usage": {"input_tokens": 1, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "ok"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
         "usage": {"output_tokens": 1}},
        {"type": "message_stop"},
    ),
)  # fmt: skip
"""One answer and one stream in each family's format, for ProviderRoute.warm."""


async def _once(text: str) -> AsyncIterator[str]:
    yield text


@dataclass(frozen=True)
class AcompletionRoute:
    """A deployment served by litellm.acompletion (LiteLLM's own handler and HTTP client)."""

    model: str
    params: Mapping[str, Any]
    """litellm_params as acompletion takes them (model included)."""
    reason: str
    """Why this deployment is not on the provider path (logged once at start)."""

    async def acompletion(self, **kwargs: Any) -> Any:
        """One litellm.acompletion call with the route's params and `kwargs`."""
        return await litellm.acompletion(**self.params, **kwargs)


def resolve(
    params: Mapping[str, Any], *, force_acompletion: bool = False
) -> ProviderRoute | AcompletionRoute:
    """Decide, once at start, how a deployment is served; `params` has secrets resolved."""
    model = str(params["model"])
    acompletion_params = {k: v for k, v in params.items() if k not in ("timeout",)}

    def fallback(reason: str) -> AcompletionRoute:
        return AcompletionRoute(model=model, params=acompletion_params, reason=reason)

    if force_acompletion:
        return fallback("forced by ML_SERVING_LLM_ACOMPLETION_ROUTES")
    unknown = set(params) - _ROUTE_KEYS - _ROUTE_HEADER_KEYS - _ROUTE_OPENAI_PARAMS - {"timeout"}
    if unknown:
        return fallback(f"route params the provider path does not cover: {sorted(unknown)}")
    try:
        name, provider, dynamic_key, api_base = litellm.get_llm_provider(
            model=model, api_base=params.get("api_base"), api_key=params.get("api_key")
        )
    except Exception as exc:
        return fallback(f"LiteLLM does not resolve the provider ({type(exc).__name__})")
    if provider not in _OPENAI_COMPATIBLE | _ANTHROPIC:
        return fallback(f"provider {provider!r} has no parity test on the provider path")
    config = ProviderConfigManager.get_provider_chat_config(
        model=name, provider=litellm.LlmProviders(provider)
    )
    if config is None:
        return fallback(f"LiteLLM has no chat config for provider {provider!r}")
    if (
        config.has_custom_stream_wrapper
        or config.should_fake_stream(model=name, stream=True, custom_llm_provider=provider)
        or type(config).sign_request is not _BASE_SIGN_REQUEST
    ):
        return fallback("the provider's config signs requests or wraps streams itself")
    api_key = params.get("api_key") or dynamic_key
    if provider in _ANTHROPIC and not api_key:
        # Without a static key LiteLLM's Anthropic config runs an auth flow (OAuth, workload
        # identity federation) that may call out at request time: its own path does that.
        return fallback("no static api_key: the provider's own auth flow")
    headers = {**(params.get("headers") or {}), **(params.get("extra_headers") or {})}
    drop_params = params.get("drop_params")
    return ProviderRoute(
        model=model,
        provider=provider,
        name=name,
        api_key=api_key,
        api_base=api_base or params.get("api_base"),
        config=config,
        litellm_params=litellm.get_litellm_params(
            api_key=api_key,
            api_base=api_base or params.get("api_base"),
            custom_llm_provider=provider,
            drop_params=drop_params,
        ),
        extra_headers={str(k): str(v) for k, v in headers.items()},
        route_params={k: v for k, v in params.items() if k in _ROUTE_OPENAI_PARAMS},
        drop_params=drop_params if isinstance(drop_params, bool) else None,
        strict_sse=provider == "openai",
    )


def _base_sign_request() -> Any:
    from litellm.llms.base_llm.chat.transformation import BaseConfig

    return BaseConfig.sign_request


_BASE_SIGN_REQUEST = _base_sign_request()


def price_unknown_models(models: Sequence[str]) -> list[str]:
    """tuning.price_unknown_models on this litellm (once, at start)."""
    return tuning.price_unknown_models(litellm, models)


async def warm_acompletion(params: Mapping[str, Any]) -> None:
    """One acompletion call without network (mock_response): the lazy imports of its path."""
    with tuning.schema_warnings_quiet():
        await litellm.acompletion(
            **params, messages=[{"role": "user", "content": "warm-up"}], mock_response="ok"
        )
