"""Prometheus metrics move as they should after real calls, read from the /metrics endpoint."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from ml_serving.api import metrics as metrics_module
from ml_serving.api.rpc import Gate
from tests.support.fake_openai import FakeOpenAI
from tests.support.requests import generate_request, generate_stream_request, score_request
from tests.support.server_process import free_port
from tests.support.servers import StartServer, write_llm_config

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(port: int) -> Samples:
    """Every sample on /metrics, keyed by name and sorted labels."""

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return str(reply.read().decode())

    text = await asyncio.to_thread(get)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, metric: str, **labels: str) -> float:
    return samples.get((metric, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_rpcs_generate_and_llm_calls(
    start_server: StartServer, upstream: FakeOpenAI, tmp_path: Path
) -> None:
    port = free_port()
    config = write_llm_config(tmp_path / "llm.yaml", upstream, ["ok", "status-500"])
    app = await start_server(metrics_port=port, llm_config=config, llm_model="ok")
    assert app.metrics_port == port
    before = await scrape(port)
    assert (
        value(
            before, "mlserving_model_info", name="tips-ranker", version=app.models.current.version
        )
        == 1
    )

    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan:
        stub = pb_grpc.InferenceServiceStub(chan)
        for _ in range(3):
            await stub.Score(score_request())
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Score(score_request(candidates=0))
        await stub.Generate(generate_request(prompt_version="v2-mentor"), timeout=10)
        async for _ in stub.GenerateStream(generate_stream_request(), timeout=10):
            pass

    after = await scrape(port)
    score = {
        "grpc_service": "mlserving.v1.InferenceService",
        "grpc_method": "Score",
        "grpc_type": "unary",
    }
    assert value(after, "grpc_server_started_total", **score) == 4
    assert value(after, "grpc_server_handled_total", grpc_code="OK", **score) == 3
    assert value(after, "grpc_server_handled_total", grpc_code="INVALID_ARGUMENT", **score) == 1
    assert value(after, "grpc_server_handling_seconds_count", **score) == 4
    assert (
        value(
            after,
            "mlserving_generate_total",
            grpc_method="Generate",
            prompt_version="v2-mentor",
            fallback="false",
        )
        == 1
    )
    assert (
        value(
            after,
            "mlserving_generate_total",
            grpc_method="GenerateStream",
            prompt_version="v1",
            fallback="false",
        )
        == 1
    )
    assert value(after, "mlserving_llm_latency_seconds_count", model="openai/ok") == 2
    assert (
        value(after, "mlserving_llm_tokens_total", model="openai/ok", kind="completion")
        == 2 * upstream.tokens
    )
    assert value(after, "mlserving_llm_tokens_total", model="openai/ok", kind="prompt") > 0
    assert value(after, "mlserving_inflight_rpcs") == 0


async def test_metrics_count_llm_errors_fallbacks_and_shed(
    start_server: StartServer, upstream: FakeOpenAI, tmp_path: Path
) -> None:
    port = free_port()
    config = write_llm_config(tmp_path / "llm.yaml", upstream, ["status-500"])
    app = await start_server(metrics_port=port, llm_config=config)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan:
        stub = pb_grpc.InferenceServiceStub(chan)
        reply = await stub.Generate(generate_request(), timeout=10)
        assert reply.fallback
        app.gate.limit = 0  # every next call is over the limit
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Score(score_request())
    after = await scrape(port)
    assert (
        value(after, "mlserving_llm_errors_total", model="openai/status-500", reason="unavailable")
        == 1
    )
    assert (
        value(
            after,
            "mlserving_generate_total",
            grpc_method="Generate",
            prompt_version="v1",
            fallback="true",
        )
        == 1
    )
    assert value(after, "mlserving_shed_total") == 1
    assert (
        value(
            after,
            "grpc_server_handled_total",
            grpc_service="mlserving.v1.InferenceService",
            grpc_method="Score",
            grpc_type="unary",
            grpc_code="RESOURCE_EXHAUSTED",
        )
        == 1
    )


def test_the_rpc_series_read_as_prometheus_client_would_write_them() -> None:
    # grpc_server_* are counted in plain ints (metrics._RpcCounts) instead of prometheus_client's
    # Counter and Histogram: the same observations must expose the same samples, `le` labels
    # and +Inf bucket included.
    ours = metrics_module.Metrics(Gate(limit=10))
    reference = CollectorRegistry()
    labels = ["grpc_type", "grpc_service", "grpc_method"]
    started = Counter("grpc_server_started", "s", labels, registry=reference)
    handled = Counter("grpc_server_handled", "h", [*labels, "grpc_code"], registry=reference)
    handling = Histogram(
        "grpc_server_handling_seconds",
        "t",
        labels,
        buckets=metrics_module.RPC_BUCKETS,
        registry=reference,
    )
    calls = [
        ("Score", "OK", 0.0004),
        ("Score", "OK", 0.0005),  # on a bound: counted in that bucket (le)
        ("Score", "INVALID_ARGUMENT", 0.003),
        ("Generate", "OK", 0.4),
        ("GenerateStream", "CANCELLED", 500.0),  # past every bound: +Inf only
    ]
    for method, code, seconds in calls:
        ours.rpc_started(method)
        ours.rpc_finished(method, code, seconds, {})
        kind = "server_stream" if method == "GenerateStream" else "unary"
        started.labels(kind, "mlserving.v1.InferenceService", method).inc()
        handled.labels(kind, "mlserving.v1.InferenceService", method, code).inc()
        handling.labels(kind, "mlserving.v1.InferenceService", method).observe(seconds)

    def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode())
            for s in family.samples
            if s.name.startswith("grpc_server_") and not s.name.endswith("_created")
        }

    got = samples(generate_latest(ours.registry))
    assert got and got == samples(generate_latest(reference))
