"""Tracing: a server span per RPC, parented on incoming trace context, with child spans."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from ml_serving.observability import tracing
from tests.support.requests import generate_request, score_request

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # The module-level tracer is a proxy; point it at an in-memory provider for this test only.
    monkeypatch.setattr(tracing, "tracer", provider.get_tracer("ml_serving"))
    monkeypatch.setattr(tracing, "enabled", True)
    yield exporter
    provider.shutdown()


async def test_rpc_spans_follow_incoming_context_and_have_children(
    stub: pb_grpc.InferenceServiceAsyncStub, spans: InMemorySpanExporter
) -> None:
    await stub.Score(score_request(), metadata=(("traceparent", PARENT),))
    await stub.Generate(
        generate_request(prompt_version="v2-mentor"), metadata=(("traceparent", PARENT),)
    )
    finished = {span.name: span for span in spans.get_finished_spans()}
    score = finished["/mlserving.v1.InferenceService/Score"]
    generate = finished["/mlserving.v1.InferenceService/Generate"]
    for server_span in (score, generate):
        assert server_span.kind == trace.SpanKind.SERVER
        assert format(server_span.context.trace_id, "032x") == TRACE_ID
        assert server_span.attributes is not None
        assert server_span.attributes["rpc.grpc.status_code"] == "OK"
    assert generate.attributes is not None
    assert generate.attributes["mlserving.prompt_version"] == "v2-mentor"
    child_of = {
        span.name: span.parent.span_id for span in spans.get_finished_spans() if span.parent
    }
    assert child_of["score.model"] == score.context.span_id
    assert child_of["llm.call"] == generate.context.span_id


def test_tracing_is_off_unless_configured() -> None:
    assert tracing.configure("none", None, "ml-serving") is False
    assert tracing.enabled is False
    assert tracing.rpc_span("/s/m", ()) is None


async def test_a_call_whose_trace_is_not_sampled_records_no_span(
    stub: pb_grpc.InferenceServiceAsyncStub, spans: InMemorySpanExporter
) -> None:
    """The caller's traceparent says "not sampled" (flags 00): neither the server span nor its
    children (score.model, llm.call) are made; a sampled call beside it still gets all of them."""
    unsampled = f"00-{TRACE_ID}-00f067aa0ba902b7-00"
    await stub.Score(score_request(), metadata=(("traceparent", unsampled),))
    await stub.Generate(generate_request(), metadata=(("traceparent", unsampled),))
    assert spans.get_finished_spans() == ()
    await stub.Score(score_request(), metadata=(("traceparent", PARENT),))
    names = sorted(span.name for span in spans.get_finished_spans())
    assert names == ["/mlserving.v1.InferenceService/Score", "score.model"]


def test_a_trace_the_sampler_drops_gets_no_span(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new trace the sampler drops (ALWAYS_OFF here) is no span at all, and nothing current."""
    provider = TracerProvider(sampler=ALWAYS_OFF)
    monkeypatch.setattr(tracing, "tracer", provider.get_tracer("ml_serving"))
    monkeypatch.setattr(tracing, "enabled", True)
    assert tracing.rpc_span("/s/m", ()) is None
    assert not trace.get_current_span().is_recording()
    with tracing.child_span("child"):
        assert not trace.get_current_span().is_recording()
