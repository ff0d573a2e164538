"""Score with a shadow model version: answers unchanged, comparisons counted and exposed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from ml_serving.api import server
from ml_serving.scoring.shadow import SkipReason, clear_shadow, set_shadow
from tests.support.model_versions import NAME, add_derived_version, copy_shipped
from tests.support.requests import score_request
from tests.support.scores import offline_scores
from tests.support.servers import StartServer


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.01)


async def start_with_shadow(
    start_server: StartServer, root: Path, **overrides: Any
) -> tuple[server.App, Any]:
    """A server on a registry where version 2 (version 1's ranking reversed) shadows 1."""
    registry = copy_shipped(root)
    add_derived_version(registry, "2", flip=True)
    set_shadow(registry, NAME, "2")
    settings: dict[str, Any] = {"model_root": root, "model_poll_s": 0.05}
    app = await start_server(**{**settings, "score_shadow_share": 1.0, **overrides})
    await until(lambda: app.shadow is not None and app.shadow.model is not None)
    return app, registry


def samples(app: server.App) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(app.metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_off_by_default(app: server.App) -> None:
    assert app.shadow is None
    assert not any(name.startswith("mlserving_shadow_model") for name, _ in samples(app))


async def test_shadow_compares_without_changing_the_answer(
    start_server: StartServer, tmp_path: Path
) -> None:
    app, _ = await start_with_shadow(start_server, tmp_path)
    shadow = app.shadow
    assert shadow is not None
    request = score_request(candidates=20)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan:
        stub = pb_grpc.InferenceServiceStub(chan)
        for _ in range(3):
            reply = await stub.Score(request)
            assert reply.model_version == "1"
            served = np.array([s.score for s in reply.scores])
            np.testing.assert_allclose(served, offline_scores(request), atol=1e-6, rtol=0)
    await until(lambda: shadow.comparisons["2"] == 3)
    assert shadow.last is not None
    assert shadow.last.kendall_tau is not None and shadow.last.kendall_tau < -0.999
    assert shadow.last.top_k_overlap == 0.0
    assert not any(shadow.skipped.values())
    got = samples(app)
    assert got["mlserving_shadow_model_comparisons_total", (("version", "2"),)] == 3
    assert got["mlserving_shadow_model_info", (("name", NAME), ("version", "2"))] == 1
    for metric in ("top_k_overlap", "kendall_tau", "mean_abs_delta"):
        assert got[f"mlserving_shadow_model_{metric}_count", (("version", "2"),)] == 3
    tau_low = ("mlserving_shadow_model_kendall_tau_bucket", (("le", "-0.5"), ("version", "2")))
    assert got[tau_low] == 3
    busy = ("mlserving_shadow_model_skipped_total", (("reason", "busy"),))
    assert got[busy] == 0


async def test_busy_server_sheds_shadow_work(start_server: StartServer, tmp_path: Path) -> None:
    # Limit 0: the Score call itself is in flight, so every sampled call is shed.
    app, _ = await start_with_shadow(start_server, tmp_path, score_shadow_max_in_flight_rpcs=0)
    shadow = app.shadow
    assert shadow is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan:
        stub = pb_grpc.InferenceServiceStub(chan)
        for _ in range(4):
            await stub.Score(score_request())
    assert shadow.skipped[SkipReason.BUSY] == 4 and not shadow.comparisons
    got = samples(app)
    assert got["mlserving_shadow_model_skipped_total", (("reason", "busy"),)] == 4


async def test_clearing_the_pointer_stops_the_shadow(
    start_server: StartServer, tmp_path: Path
) -> None:
    app, registry = await start_with_shadow(start_server, tmp_path)
    shadow = app.shadow
    assert shadow is not None
    clear_shadow(registry, NAME)
    await until(lambda: shadow.model is None)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan:
        reply = await pb_grpc.InferenceServiceStub(chan).Score(score_request())
    assert reply.model_version == "1"
    await asyncio.sleep(0)  # a queued comparison would run here
    assert not shadow.comparisons and not any(shadow.skipped.values())
