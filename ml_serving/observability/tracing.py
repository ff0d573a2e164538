"""OpenTelemetry tracing: off unless the standard OTEL_* variables ask for an exporter."""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

logger = logging.getLogger(__name__)

tracer = trace.get_tracer("ml_serving")
"""The service's tracer; a no-op until a TracerProvider is installed."""

enabled = False
"""Whether spans are recorded. When off, the hot path skips span work entirely: even no-op
spans and context propagation cost tens of microseconds per RPC."""


def configure(exporter: str, otlp_endpoint: str | None, service_name: str) -> bool:
    """Install an OTLP exporter when OTEL_TRACES_EXPORTER=otlp or an OTLP endpoint is set.

    Returns whether tracing is on. The exporter reads its other OTEL_* settings itself.
    """
    if exporter.lower() == "none" and not otlp_endpoint:
        return False
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    global enabled
    enabled = True
    logger.info("tracing on", extra={"otlp_endpoint": otlp_endpoint or "default"})
    return True


_attached: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "ml_serving_span_attached", default=False
)
"""Set beside each OpenTelemetry attach: resetting it tells whether we are still in the
Context that attached (contextvars allows a reset only there)."""


class _Attachment:
    """A span made current in this Context, undone only in the Context that made it current.

    A stream that a client cancels is finalised by the event loop in another Context (a new
    task's), and so is whatever ends its spans. There the attach cannot be undone (the Context
    it changed is gone with the stream's task, so nothing needs undoing), and OpenTelemetry's
    ``detach`` would log an ERROR with a traceback per cancelled stream. Our own context
    variable, set right after the attach, answers "same Context?" with the public contextvars
    API; OpenTelemetry's ``detach`` runs only when it will succeed.
    """

    __slots__ = ("_otel_token", "_token")

    def __init__(self, span: Span, parent: otel_context.Context | None = None) -> None:
        self._otel_token = otel_context.attach(trace.set_span_in_context(span, parent))
        self._token = _attached.set(True)

    def detach(self) -> None:
        """Restore the current span as it was, if still in the Context that changed it."""
        try:
            _attached.reset(self._token)
        except ValueError:  # "created in a different Context": nothing here to restore
            return
        otel_context.detach(self._otel_token)


class RpcSpan:
    """The server span of one RPC, made current for the call; see :func:`rpc_span`."""

    def __init__(self, span: Span, parent: otel_context.Context) -> None:
        self.span = span
        self._attachment = _Attachment(span, parent)

    def end(self, code: str, notes: dict[str, Any]) -> None:
        """Close the span with the RPC's status code and access-log annotations."""
        self.span.set_attribute("rpc.grpc.status_code", code)
        for key, value in notes.items():
            if isinstance(value, str | bool | int | float):
                self.span.set_attribute(f"mlserving.{key}", value)
        if code != "OK":
            self.span.set_status(Status(StatusCode.ERROR, code))
        self.span.end()
        self._attachment.detach()


def _unsampled(traceparent: str) -> bool:
    """Whether a W3C traceparent ("00-<trace id>-<span id>-<flags>") has its sampled flag off."""
    try:
        return not int(traceparent[-2:], 16) & 1
    except ValueError:
        return False  # malformed: left to the propagator, which ignores it


def rpc_span(full_method: str, metadata: Iterable[tuple[str, Any]]) -> RpcSpan | None:
    """The RPC's server span, parented on the trace context in its metadata; None when tracing
    is off or the call is not sampled (the caller's traceparent says so, or the sampler drops
    the new trace). Then nothing is recorded or made current, and the call's child spans are
    skipped as well (`child_span`): an unsampled call costs no span work.
    """
    if not enabled:
        return None
    carrier = {key: value for key, value in metadata if isinstance(value, str)}
    traceparent = carrier.get("traceparent")
    if traceparent is not None and _unsampled(traceparent):
        return None  # decided upstream: no need to parse it or to ask the sampler
    parent = propagate.extract(carrier)
    service, _, method = full_method.rpartition("/")
    span = tracer.start_span(
        full_method,
        context=parent,
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
    )
    if not span.is_recording():
        return None  # the sampler dropped it: a non-recording span has nothing to end
    return RpcSpan(span, parent)


@contextmanager
def _child_span(name: str, attributes: dict[str, Any]) -> Iterator[None]:
    # tracer.start_as_current_span, but detached through _Attachment: the LLM call's span is
    # left by a cancelled stream's finaliser, in another Context.
    span = tracer.start_span(name, attributes=attributes)
    attachment = _Attachment(span)
    try:
        yield
    except Exception as exc:
        # As start_as_current_span records them; BaseExceptions (GeneratorExit, a cancel) are
        # no errors of the span's work.
        if span.is_recording():
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        span.end()
        attachment.detach()


def child_span(name: str, **attributes: str | int | float | bool) -> AbstractContextManager[None]:
    """A child span of the current one (scoring, the LLM call); nothing when tracing is off or
    no recording span is current (the RPC was not sampled: its parts are not either)."""
    if enabled and trace.get_current_span().is_recording():
        return _child_span(name, attributes)
    return _NOTHING


_NOTHING: AbstractContextManager[None] = nullcontext()
"""One shared no-op context manager (nullcontext holds no state: it can be re-entered)."""
