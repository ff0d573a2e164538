"""Generate's domain flow: pick the prompt version, assemble context, call the LLM, fall back."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol

from ml_serving import errors
from ml_serving.experiments.assignment import Assignment
from ml_serving.experiments.runtime import Experiments
from ml_serving.generation.context import PromptContext, TipSignals, assemble_context
from ml_serving.generation.prompts.registry import PromptRegistry, PromptTemplate, fallback_tip
from ml_serving.observability import tracing
from ml_serving.observability.logs import request_id_var

if TYPE_CHECKING:
    from ml_serving.generation.llm.gateway import Completion, LLMGateway

logger = logging.getLogger(__name__)

MAX_CHARS_PER_TOKEN: Final = 16
"""A generation is cut at max_tokens x this many characters (English averages about 4 per
token): an upstream that ignores max_tokens, or streams forever, cannot grow a reply without
bound. The cut ends with finish reason "length"."""

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
    assignment: Assignment
    """How the version was chosen: decision id, propensity, experiment."""

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
        experiments: Experiments | None = None,
        max_call_s: float = 120.0,
    ) -> None:
        self._prompts = prompts
        self._experiments = experiments or Experiments(
            None, default_version=prompts.default_version, known_versions=prompts.known_versions()
        )
        self._default_max_tokens = default_max_tokens
        self._max_tokens_limit = max_tokens_limit
        self._margin = timeout_margin_s
        self._fallback = fallback
        self._max_call_s = max_call_s
        self.gateway: LLMGateway | None = None
        """Set by the server once LiteLLM is imported and warm; None means not ready."""
        self.observer: LLMObserver | None = None
        """Told about every upstream call (metrics); None means nobody listens."""

    def _prepare(self, request: GenerationRequest) -> _Prepared:
        assignment = self._experiments.selector.select(
            request.signals.user_id, request.prompt_version
        )
        template = self._prompts.resolve(assignment.version)
        context = assemble_context(request.signals)
        if request.max_tokens > self._max_tokens_limit:
            raise errors.InvalidArgument(
                "limits.max_tokens", f"must be at most {self._max_tokens_limit}"
            )
        max_tokens = request.max_tokens or self._default_max_tokens
        # No deadline from the caller: the server's own bound, whatever the upstream does.
        timeout_s = self._max_call_s
        if request.time_remaining_s is not None:
            timeout_s = request.time_remaining_s - self._margin
            if timeout_s <= 0:
                raise errors.DeadlineExceeded("the deadline left no time to call the LLM")
        if self.gateway is None:
            raise errors.NotReady("the LLM gateway is still starting; retry shortly")
        messages = self._prompts.render(template, context)  # logs the prompt at DEBUG
        return _Prepared(assignment, template, context, messages, max_tokens, timeout_s)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """One tip, unary."""
        prepared = self._prepare(request)
        assignment, template, context, messages, max_tokens, timeout_s = prepared
        assert self.gateway is not None
        call = _LLMCall(self.observer, self.gateway.route_model)
        try:
            with call:
                completion = await self.gateway.complete(
                    messages,
                    max_tokens=max_tokens,
                    temperature=request.temperature,
                    timeout_s=timeout_s,
                    offline_text=functools.partial(compose_offline_tip, template, context),
                    max_chars=max_tokens * MAX_CHARS_PER_TOKEN,
                )
                call.done(completion)
        except _FALLBACK_COVERS as exc:
            if not self._fallback:
                raise
            logger.warning("every LLM route failed; answering with a fallback tip: %s", exc)
            completion = _fallback_completion(template, context)
            fallback = GenerationResult(
                completion, template.version, template.content_hash, True, assignment
            )
            self._decided(request, prepared, fallback)
            return fallback
        limit = max_tokens * MAX_CHARS_PER_TOKEN
        if len(completion.text) > limit:
            # The upstream ignored max_tokens: the caller gets what it asked for, cut.
            completion = replace(completion, text=completion.text[:limit], finish_reason="length")
        logger.debug("completion", extra={"completion": completion.text})
        result = GenerationResult(
            completion, template.version, template.content_hash, False, assignment
        )
        self._decided(request, prepared, result)
        return result

    async def stream(
        self, request: GenerationRequest
    ) -> AsyncGenerator[str | GenerationResult, None]:
        """Text deltas as they arrive, then the GenerationResult with the totals. A failure
        before the first delta may still fall back; after it, the stream ends with the error
        (text already sent stays)."""
        prepared = self._prepare(request)
        assignment, template, context, messages, max_tokens, timeout_s = prepared
        assert self.gateway is not None
        call = _LLMCall(self.observer, self.gateway.route_model)
        sent_any = False
        room = max_tokens * MAX_CHARS_PER_TOKEN
        capped: Completion | None = None
        events = self.gateway.stream(
            messages,
            max_tokens=max_tokens,
            temperature=request.temperature,
            timeout_s=timeout_s,
            offline_text=functools.partial(compose_offline_tip, template, context),
            max_chars=room,
        )
        try:
            # aclosing: if our consumer goes away, the upstream stream closes now, not at GC.
            with call:
                async with contextlib.aclosing(events):
                    async for event in events:
                        if isinstance(event, str):
                            sent_any = True
                            if len(event) > room:
                                # The upstream ignored max_tokens (or never ends): cut it here;
                                # leaving the loop closes the upstream stream.
                                if room:
                                    yield event[:room]
                                capped = _capped(self.gateway.route_model)
                                break
                            room -= len(event)
                            yield event
                        else:
                            call.done(event)
                            end = GenerationResult(
                                event, template.version, template.content_hash, False, assignment
                            )
                            self._decided(request, prepared, end)
                            yield end
                if capped is not None:
                    call.done(capped)
            if capped is not None:
                end = GenerationResult(
                    capped, template.version, template.content_hash, False, assignment
                )
                self._decided(request, prepared, end)
                yield end
        except _FALLBACK_COVERS as exc:
            if sent_any or not self._fallback:
                raise
            logger.warning("every LLM route failed; streaming a fallback tip: %s", exc)
            completion = _fallback_completion(template, context)
            yield completion.text
            end = GenerationResult(
                replace(completion, text=""),
                template.version,
                template.content_hash,
                True,
                assignment,
            )
            self._decided(request, prepared, end)
            yield end

    def _decided(
        self, request: GenerationRequest, prepared: _Prepared, result: GenerationResult
    ) -> None:
        """Log the decision, then maybe start the shadow version (never waits, never raises
        into the call: the answer is already made)."""
        experiments = self._experiments
        if experiments.decisions is not None:
            experiments.decisions.record(
                result.assignment,
                user_id=request.signals.user_id,
                prompt_hash=result.prompt_hash,
                model=result.model,
                fallback=result.fallback,
                request_id=request_id_var.get(),
            )
        shadow = experiments.shadow
        if shadow is not None:  # it samples, bounds and counts; never raises
            shadow.maybe_run(
                result.assignment.decision_id,
                result.prompt_version,
                lambda: self._shadow(shadow.version, prepared, request.temperature),
            )

    async def _shadow(
        self, version: str, primary: _Prepared, temperature: float | None
    ) -> GenerationResult:
        """The shadow version on the primary's context: no selection, no decision, no fallback
        tip (a failure is the shadow runner's to count), bounded by the runner's timeout."""
        template = self._prompts.resolve(version)
        gateway = self.gateway
        if gateway is None:
            raise errors.NotReady("the LLM gateway is not ready")
        completion = await gateway.complete(
            self._prompts.render(template, primary.context),
            max_tokens=primary.max_tokens,
            temperature=temperature,
            timeout_s=None,
            offline_text=functools.partial(compose_offline_tip, template, primary.context),
            max_chars=primary.max_tokens * MAX_CHARS_PER_TOKEN,
        )
        return GenerationResult(
            completion, template.version, template.content_hash, False, primary.assignment
        )


class _Prepared(NamedTuple):
    """A call ready for the gateway: its assignment, prompt, context and limits."""

    assignment: Assignment
    template: PromptTemplate
    context: PromptContext
    messages: list[dict[str, str]]
    max_tokens: int
    timeout_s: float | None


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
            reason = "cancelled"
            if isinstance(exc, errors.ServingError):
                # A failure of our own making says which (the answer budget), not only its code.
                reason = getattr(exc, "reason", None) or exc.code.name.lower()
            self._observer.llm_call(self._model, seconds, error=reason)
        elif self._completion is not None:
            self._observer.llm_call(
                self._completion.model,
                seconds,
                prompt_tokens=self._completion.prompt_tokens,
                completion_tokens=self._completion.completion_tokens,
            )


FALLBACK_MODEL = "fallback/curated"


def _capped(model: str) -> Completion:
    """The totals of a stream cut at the character cap: the upstream's own never came."""
    from ml_serving.generation.llm.gateway import Completion

    return Completion("", model, 0, 0, "length")


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
