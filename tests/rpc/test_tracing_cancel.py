"""Tracing on, a client cancels a stream: spans still end, and nothing is logged as an error."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
from collections.abc import Callable, Iterator

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ml_serving._proto.mlserving.v1 import inference_service_pb2 as pb
from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from ml_serving.observability import tracing
from tests.support.requests import generate_stream_request

STREAM = "/mlserving.v1.InferenceService/GenerateStream"


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


async def _eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():
            await asyncio.sleep(0.02)


async def test_cancelled_streams_end_their_spans_without_error_logs(
    stub: pb_grpc.InferenceServiceAsyncStub,
    spans: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    # The offline route streams at once: the cancel lands while a message is being sent, and
    # the event loop finalises the stream in another Context (what used to log two ERRORs).
    for _ in range(5):
        call = stub.GenerateStream(generate_stream_request(), timeout=10)
        first = await call.read()
        assert isinstance(first, pb.GenerateStreamResponse) and first.text_delta
        call.cancel()

    def finished(name: str) -> int:
        return sum(span.name == name for span in spans.get_finished_spans())

    await _eventually(lambda: finished(STREAM) == 5 and finished("llm.call") == 5)
    gc.collect()  # any stream generator not finalised yet is, now
    await asyncio.sleep(0.1)
    for span in spans.get_finished_spans():
        if span.name == STREAM:
            assert span.attributes is not None
            assert span.attributes["rpc.grpc.status_code"] == "CANCELLED"
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not problems, [f"{r.name}: {r.getMessage()}" for r in problems]


def test_a_span_ended_in_another_context_is_ended_and_the_context_left_alone(
    spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    rpc_span = contextvars.copy_context().run(tracing.rpc_span, "/s/m", ())
    assert rpc_span is not None
    before = otel_context.get_current()
    rpc_span.end("CANCELLED", {})  # here, not in the Context that attached it
    assert otel_context.get_current() == before
    assert [span.name for span in spans.get_finished_spans()] == ["/s/m"]
    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_a_span_ended_where_it_started_restores_the_context(spans: InMemorySpanExporter) -> None:
    before = trace.get_current_span()
    rpc_span = tracing.rpc_span("/s/m", ())
    assert rpc_span is not None
    assert trace.get_current_span() is rpc_span.span
    with tracing.child_span("child", n=1):
        assert trace.get_current_span() is not rpc_span.span
    assert trace.get_current_span() is rpc_span.span
    rpc_span.end("OK", {})
    assert trace.get_current_span() is before
    child = next(span for span in spans.get_finished_spans() if span.name == "child")
    assert (
        child.parent is not None
        and child.parent.span_id == rpc_span.span.get_span_context().span_id
    )
