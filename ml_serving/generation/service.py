"""Generate's domain flow: pick the prompt version, assemble context, call the LLM, fall back."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from ml_serving import errors
from ml_serving.generation.context import PromptContext, TipSignals, assemble_context
from ml_serving.generation.prompts.registry import PromptRegistry, PromptTemplate, fallback_tip
from ml_serving.observability import tracing

if TYPE_CHECKING:
    from ml_serving.generation.llm.gateway import Completion, LLMGateway

logger = logging.getLogger(__name__)

# Failures that mean "no route could answer now": degraded mode may cover these with a curated
# tip. Bad requests and spent deadlines are the caller's to see.
_FALLBACK_COVERS = (errors.UpstreamUnavailable, errors.UpstreamRateLimited)


@dataclass(frozen=True)
class GenerationRequest:
    """One Generate call in domain terms."""

    prompt_version: str
    signals: TipSignals
    max_tokens: int
    """0 means the server's default."""
    temperature: float | None
    time_remaining_s: float | None
    """What is left of the caller's deadline; None when the caller set none."""


@dataclass(frozen=True)
class GenerationResult:
    """How a generation was made: a unary call's answer, and the totals that end a stream."""

    completion: Completion
    """The text (empty at a stream's end: the deltas carried it), model, tokens, finish reason."""
    prompt_version: str
    prompt_hash: str
    fallback: bool
    """True when no LLM route answered and the version's curated tip stood in."""

    @property
    def text(self) -> str:
        return self.completion.text

    @property
    def model(self) -> str:
        return self.completion.model


class Generator:
    """Turns a GenerationRequest into a tip through the LLM gateway, or a fallback tip."""

    def __init__(
        self,
        prompts: PromptRegistry,
        *,
        default_max_tokens: int,
        max_tokens_limit: int,
        timeout_margin_s: float,
        fallback: bool,
    ) -> None:
        self._prompts = prompts
        self._default_max_tokens = default_max_tokens
        self._max_tokens_limit = max_tokens_limit
        self._margin = timeout_margin_s
        self._fallback = fallback
        self.gateway: LLMGateway | None = None
        """Set by the server once LiteLLM is imported and warm; None means not ready."""
        self.observer: LLMObserver | None = None
        """Told about every upstream call (metrics); None means nobody listens."""

    def _prepare(
        self, request: GenerationRequest
    ) -> tuple[PromptTemplate, PromptContext, list[dict[str, str]], int, float | None]:
        template = self._prompts.resolve(request.prompt_version)
        context = assemble_context(request.signals)
        if request.max_tokens > self._max_tokens_limit:
            raise errors.InvalidArgument(
                "limits.max_tokens", f"must be at most {self._max_tokens_limit}"
            )
        max_tokens = request.max_tokens or self._default_max_tokens
        timeout_s = None
        if request.time_remaining_s is not None:
            timeout_s = request.time_remaining_s - self._margin
            if timeout_s <= 0:
                raise errors.DeadlineExceeded("the deadline left no time to call the LLM")
        if self.gateway is None:
            raise errors.NotReady("the LLM gateway is still starting; retry shortly")
        messages = self._prompts.render(template, context)  # logs the prompt at DEBUG
        return template, context, messages, max_tokens, timeout_s

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """One tip, unary."""
        template, context, messages, max_tokens, timeout_s = self._prepare(request)
        assert self.gateway is not None
        call = _LLMCall(self.observer, self.gateway.route_model)
        try:
            with call:
                completion = await self.gateway.complete(
                    messages,
                    max_tokens=max_tokens,
                    temperature=request.temperature,
                    timeout_s=timeout_s,
                    offline_text=compose_offline_tip(template, context),
                )
                call.done(completion)
        except _FALLBACK_COVERS as exc:
            if not self._fallback:
                raise
            logger.warning("every LLM route failed; answering with a fallback tip: %s", exc)
            completion = _fallback_completion(template, context)
            return GenerationResult(completion, template.version, template.content_hash, True)
        logger.debug("completion", extra={"completion": completion.text})
        return GenerationResult(completion, template.version, template.content_hash, False)

    async def stream(
        self, request: GenerationRequest
    ) -> AsyncGenerator[str | GenerationResult, None]:
        """Text deltas as they arrive, then the GenerationResult with the totals. A failure
        before the first delta may still fall back; after it, the stream ends with the error
        (text already sent stays)."""
        template, context, messages, max_tokens, timeout_s = self._prepare(request)
        assert self.gateway is not None
        call = _LLMCall(self.observer, self.gateway.route_model)
        sent_any = False
        events = self.gateway.stream(
            messages,
            max_tokens=max_tokens,
            temperature=request.temperature,
            timeout_s=timeout_s,
            offline_text=compose_offline_tip(template, context),
        )
        try:
            # aclosing: if our consumer goes away, the upstream stream closes now, not at GC.
            with call:
                async with contextlib.aclosing(events):
                    async for event in events:
                        if isinstance(event, str):
                            sent_any = True
                            yield event
                        else:
                            call.done(event)
                            yield GenerationResult(
                                event, template.version, template.content_hash, False
                            )
        except _FALLBACK_COVERS as exc:
            if sent_any or not self._fallback:
                raise
            logger.warning("every LLM route failed; streaming a fallback tip: %s", exc)
            completion = _fallback_completion(template, context)
            yield completion.text
            yield GenerationResult(
                replace(completion, text=""), template.version, template.content_hash, True
            )


class LLMObserver(Protocol):
    """Told about every upstream LLM call (metrics)."""

    def llm_call(
        self,
        model: str,
        seconds: float,
        *,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        error: str | None = None,
    ) -> None: ...


class _LLMCall:
    """Times one gateway call in a child span and reports its outcome to the observer."""

    def __init__(self, observer: LLMObserver | None, model: str) -> None:
        self._observer = observer
        self._model = model
        self._completion: Completion | None = None

    def done(self, completion: Completion) -> None:
        self._completion = completion

    def __enter__(self) -> _LLMCall:
        self._started = time.perf_counter()
        self._span = tracing.child_span("llm.call", model=self._model)
        self._span.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        seconds = time.perf_counter() - self._started
        self._span.__exit__(exc_type, exc, tb)
        if self._observer is None or isinstance(exc, GeneratorExit):
            return
        if exc is not None:
            reason = exc.code.name.lower() if isinstance(exc, errors.ServingError) else "cancelled"
            self._observer.llm_call(self._model, seconds, error=reason)
        elif self._completion is not None:
            self._observer.llm_call(
                self._completion.model,
                seconds,
                prompt_tokens=self._completion.prompt_tokens,
                completion_tokens=self._completion.completion_tokens,
            )


FALLBACK_MODEL = "fallback/curated"


def _fallback_completion(template: PromptTemplate, context: PromptContext) -> Completion:
    from ml_serving.generation.llm.gateway import Completion

    text = fallback_tip(template, context)
    return Completion(text, FALLBACK_MODEL, 0, 0, "stop")


def compose_offline_tip(template: PromptTemplate, context: PromptContext) -> str:
    """The offline route's answer: a deterministic tip built from the prompt context.

    It starts from the version's curated tip for the topic and, when the user gave a goal or a
    streak, ties the tip to it, so different contexts give visibly different tips.
    """
    base = fallback_tip(template, context)
    parts = [base]
    if context.goal:
        goal = context.goal if len(context.goal) <= 80 else context.goal[:77] + "..."
        parts.append(f"It moves you toward your goal: {goal}.")
    if context.streak_days:
        parts.append(f"Keep your {context.streak_days}-day streak going.")
    return " ".join(parts)
