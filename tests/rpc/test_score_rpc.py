"""Score over a real channel: parity with offline predictions, validation, promotion."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import json_format

from ml_serving._proto.mlserving.v1 import inference_service_pb2 as pb
from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from ml_serving.api import server
from ml_serving.config import REPO_MODELS
from ml_serving.scoring.registry import ModelRegistry
from tests.support import REPO
from tests.support.requests import score_request
from tests.support.scores import offline_scores
from tests.support.servers import StartServer

GHZ = REPO / "bench" / "ghz"


async def test_served_scores_equal_offline_predictions(
    stub: pb_grpc.InferenceServiceAsyncStub,
) -> None:
    request = score_request(candidates=50)
    reply = await stub.Score(request)
    assert [s.id for s in reply.scores] == [c.id for c in request.candidates]
    assert reply.model_name == "tips-ranker" and reply.model_version
    served = np.array([s.score for s in reply.scores], dtype=np.float64)
    # The wire carries float32: parity is checked within 1e-6 of the float64 offline result.
    np.testing.assert_allclose(served, offline_scores(request), atol=1e-6, rtol=0)
    assert ((served > 0) & (served < 1)).all()


async def test_feature_order_is_by_name_not_position(
    stub: pb_grpc.InferenceServiceAsyncStub,
) -> None:
    request = score_request()
    shuffled = pb.ScoreRequest()
    shuffled.CopyFrom(request)
    perm = np.random.default_rng(1).permutation(len(request.candidate_feature_names))
    del shuffled.candidate_feature_names[:]
    shuffled.candidate_feature_names.extend(request.candidate_feature_names[i] for i in perm)
    for original, copy in zip(request.candidates, shuffled.candidates, strict=True):
        del copy.values[:]
        copy.values.extend(original.values[i] for i in perm)
    a, b = await stub.Score(request), await stub.Score(shuffled)
    assert [s.score for s in a.scores] == [s.score for s in b.scores]


async def test_ghz_score_config_request_is_scored(stub: pb_grpc.InferenceServiceAsyncStub) -> None:
    config = json.loads((GHZ / "score.json").read_text())
    assert config["call"] == "mlserving.v1.InferenceService.Score"
    request = json_format.ParseDict(config["data"], pb.ScoreRequest())
    # The columnar form, asking for the columnar response (what the bench and ghz send).
    assert len(request.candidate_ids) == 20 and not request.candidates
    reply = await stub.Score(request)
    assert list(reply.candidate_ids) == list(request.candidate_ids)
    assert len(reply.candidate_scores) == 20


def _drop_context(r: pb.ScoreRequest, name: str) -> None:
    i = list(r.context_feature_names).index(name)
    del r.context_feature_names[i]
    del r.context_values[i]


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r.context_feature_names.__setitem__(0, "shoe_size"), "context_feature_names[0]"),
        (lambda r: _drop_context(r, "tenure_days"), "context_feature_names"),
        (lambda r: r.context_values.append(1.0), "context_values"),
        (lambda r: r.context_values.__setitem__(2, float("nan")), "context_values[2]"),
        (lambda r: r.candidates[3].values.__setitem__(1, float("inf")), "candidates[3].values[1]"),
        (lambda r: r.candidates[4].values.pop(), "candidates[4].values"),
        (lambda r: r.candidates[5].__setattr__("id", r.candidates[0].id), "candidates[5].id"),
        (lambda r: r.candidates[6].__setattr__("id", ""), "candidates[6].id"),
        (
            lambda r: r.candidate_feature_names.__setitem__(2, "colour"),
            "candidate_feature_names[2]",
        ),
        (lambda r: r.ClearField("candidates"), "candidates"),
    ],
)
async def test_bad_score_inputs_name_the_field(
    stub: pb_grpc.InferenceServiceAsyncStub,
    mutate: Any,
    field: str,
) -> None:
    request = score_request()
    mutate(request)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Score(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith(f"{field}:")


async def test_optional_features_take_the_card_default(
    stub: pb_grpc.InferenceServiceAsyncStub,
) -> None:
    request = score_request()
    _drop_context(request, "like_rate_30d")
    reply = await stub.Score(request)
    assert len(reply.scores) == 20


async def test_too_many_candidates(start_server: StartServer) -> None:
    app = await start_server(max_candidates=10)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan:
        stub = pb_grpc.InferenceServiceStub(chan)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Score(score_request(candidates=11))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith("candidates:")


async def test_promotion_without_restart(start_server: StartServer, tmp_path: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(REPO_MODELS, root)
    shipped = (root / "tips-ranker" / "PROMOTED").read_text().strip()
    shutil.copytree(root / "tips-ranker" / shipped, root / "tips-ranker" / "99")
    card_path = root / "tips-ranker" / "99" / "card.json"
    card = json.loads(card_path.read_text())
    card["version"] = "99"
    card_path.write_text(json.dumps(card))
    app: server.App = await start_server(model_root=root, model_poll_s=0.05)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan:
        stub = pb_grpc.InferenceServiceStub(chan)
        assert (await stub.Score(score_request())).model_version == shipped
        in_flight_model = app.models.current
        ModelRegistry(root).promote("tips-ranker", "99")
        async with asyncio.timeout(5):
            while (await stub.Score(score_request())).model_version != "99":
                await asyncio.sleep(0.02)
        assert in_flight_model.version == shipped  # a request holding the old one keeps it


async def test_broken_version_is_refused_and_old_keeps_serving(
    start_server: StartServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "models"
    shutil.copytree(REPO_MODELS, root)
    shipped = (root / "tips-ranker" / "PROMOTED").read_text().strip()
    broken = root / "tips-ranker" / "98"
    shutil.copytree(root / "tips-ranker" / shipped, broken)
    for weights in broken.glob("*.npz"):
        weights.write_bytes(b"not a numpy archive")
    app: server.App = await start_server(model_root=root, model_poll_s=0.05)
    # Bypass promote()'s own validation, as a hand edit or a bad sync would.
    (root / "tips-ranker" / "PROMOTED").write_text("98\n")
    async with asyncio.timeout(5):
        while "98" not in caplog.text:
            await asyncio.sleep(0.05)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan:
        reply = await pb_grpc.InferenceServiceStub(chan).Score(score_request())
    assert reply.model_version == shipped
