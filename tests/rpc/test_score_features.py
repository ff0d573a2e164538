"""Score and Generate with the online feature store on: a request may send only ids and the
request-time values; a value sent wins; the store may fail (missing, down, silent, killed under
load) and Score still answers, counting what it defaulted."""

from __future__ import annotations

import asyncio
import math
import socket
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pandas as pd
import pytest

from ml_serving._proto.mlserving.v1 import generation_pb2, scoring_pb2
from ml_serving._proto.mlserving.v1 import inference_service_pb2 as pb
from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from ml_serving.api import server
from ml_serving.features.repo import RedisAddress
from ml_serving.features.stores import RedisStore, StoreError
from ml_serving.scoring import features
from tests.support.feature_store import (
    RedisServer,
    every_value,
    latest,
    redis_yaml,
    small_repo,
)
from tests.support.requests import score_request
from tests.support.servers import StartServer

HOUR = {"local_hour_sin": 0.5, "local_hour_cos": -0.866}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_repo(tmp_path_factory.mktemp("sqlite-repo"))


@pytest.fixture(scope="module")
def online(repo: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """What materialize put online: each user's and tip's latest snapshot."""
    users = pd.read_parquet(repo / "data" / "users.parquet")
    tips = pd.read_parquet(repo / "data" / "tips.parquet")
    return latest(users, "user_id"), latest(tips, "tip_id")


def _by_ids(user: str, tips: list[str], **extra: Any) -> pb.ScoreRequest:
    names = list(HOUR) + list(extra)
    return pb.ScoreRequest(
        user_id=user,
        context_feature_names=names,
        context_values=[*HOUR.values(), *extra.values()],
        candidate_ids=tips,
        response_layout=scoring_pb2.SCORE_LAYOUT_COLUMNS,
    )


def _full(user_row: pd.Series, tip_rows: pd.DataFrame, **override: float) -> pb.ScoreRequest:
    """Every model input sent explicitly, from the snapshots the store holds."""
    context, values = every_value(user_row, tip_rows, HOUR)
    context.update(override)
    return pb.ScoreRequest(
        user_id=str(user_row.name),
        context_feature_names=list(context),
        context_values=list(context.values()),
        candidate_feature_names=list(features.CANDIDATE_FEATURE_NAMES),
        candidate_ids=list(tip_rows.index),
        candidate_values=values,
        response_layout=scoring_pb2.SCORE_LAYOUT_COLUMNS,
    )


@pytest.fixture
async def stub(start_server: StartServer, repo: Path) -> AsyncIterator[Any]:
    app = await start_server(feature_repo=repo)
    await _tips_loaded(app)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield pb_grpc.InferenceServiceStub(channel), app


async def _tips_loaded(app: server.App) -> None:
    assert app.features is not None
    for _ in range(200):
        if app.features.tips.index:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the tip view never loaded")


async def test_a_request_with_ids_and_request_time_values_is_scored_from_the_store(
    stub: Any, online: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    client, app = stub
    users, tips = online
    user = str(users.index[3])
    chosen = tips.iloc[:6]
    by_ids = await client.Score(_by_ids(user, list(chosen.index)))
    full = await client.Score(_full(users.loc[user], chosen))
    assert by_ids.defaulted_features == 0
    assert list(by_ids.candidate_ids) == list(chosen.index)
    np.testing.assert_allclose(by_ids.candidate_scores, full.candidate_scores, rtol=1e-6)
    assert app.features.lookups[(features.USER_FEATURE_VIEW, "hit")] >= 1


async def test_a_value_the_request_sends_wins_over_the_store(
    stub: Any, online: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    client, _ = stub
    users, tips = online
    user = str(users.index[5])
    chosen = tips.iloc[:4]
    stored = await client.Score(_by_ids(user, list(chosen.index)))
    sent = await client.Score(_by_ids(user, list(chosen.index), tenure_days=3000.0))
    full = await client.Score(_full(users.loc[user], chosen, tenure_days=3000.0))
    np.testing.assert_allclose(sent.candidate_scores, full.candidate_scores, rtol=1e-6)
    assert not np.allclose(sent.candidate_scores, stored.candidate_scores)


async def test_the_row_form_is_served_from_the_store_too(
    stub: Any, online: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    client, _ = stub
    users, tips = online
    ids = list(tips.index[:3])
    reply = await client.Score(
        pb.ScoreRequest(
            user_id=str(users.index[0]),
            context_feature_names=list(HOUR),
            context_values=list(HOUR.values()),
            candidates=[scoring_pb2.Candidate(id=i) for i in ids],
        )
    )
    assert [s.id for s in reply.scores] == ids
    assert reply.defaulted_features == 0


async def test_unknown_users_and_tips_take_training_means_and_are_counted(
    stub: Any, online: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    client, app = stub
    _, tips = online
    known = list(tips.index[:2])
    reply = await client.Score(_by_ids("user-never-seen", [*known, "tip-never-seen"]))
    user_context = sum(s is features.Source.USER for s in features.SOURCES.values())
    # The user's stored context, each candidate's topic_affinity, every value of the new tip.
    assert reply.defaulted_features == user_context + 2 + features.N_CANDIDATE
    assert all(0.0 < s < 1.0 for s in reply.candidate_scores)
    assert app.features.defaults["context"] == user_context


async def test_request_time_features_must_still_be_sent(stub: Any) -> None:
    client, _ = stub
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.Score(pb.ScoreRequest(user_id="user-1", candidate_ids=["tip-1"]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith("context_feature_names: missing request-time")


async def test_generate_fills_an_empty_prompt_context_from_the_profile_view(
    stub: Any, online: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    client, app = stub
    users, _ = online
    streaky = users[users["streak_days"] > 1]
    user = str(streaky.index[0])
    reply = await client.Generate(pb.GenerateRequest(user_id=user))
    assert f"{int(streaky.iloc[0]['streak_days'])}-day streak" in reply.text
    tip = generation_pb2.TipContext(streak_days=4321)
    sent = await client.Generate(pb.GenerateRequest(user_id=user, context=tip))
    assert "4321-day streak" in sent.text
    assert app.features.lookups[(features.USER_PROFILE_VIEW, "hit")] >= 2


async def test_a_missing_store_defaults_every_stored_value_and_never_fails(
    start_server: StartServer, repo: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "repo"
    empty.mkdir()
    (empty / "feature_store.yaml").write_text((repo / "feature_store.yaml").read_text())
    app = await start_server(feature_repo=empty)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        client = pb_grpc.InferenceServiceStub(channel)
        for _ in range(8):
            reply = await client.Score(_by_ids("user-1", ["tip-1", "tip-2"]))
            assert reply.defaulted_features > 0
    assert app.features is not None
    assert app.features.errors["unavailable"] >= 1
    assert app.features.lookups[(features.USER_FEATURE_VIEW, "skipped")] >= 1  # breaker open


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A TCP port that accepts connections and never answers (a hung Redis)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


async def test_a_store_that_never_answers_costs_the_budget_then_defaults(
    start_server: StartServer, repo: Path, tmp_path: Path, silent_port: int
) -> None:
    hung = tmp_path / "hung"
    hung.mkdir()
    (hung / "feature_store.yaml").write_text(redis_yaml(f"127.0.0.1:{silent_port}"))
    app = await start_server(feature_repo=hung, feature_budget_ms=20.0)
    assert app.features is not None
    await app.features.store.connect()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        client = pb_grpc.InferenceServiceStub(channel)
        replies = await asyncio.gather(
            *(client.Score(_by_ids(f"user-{i}", ["tip-1"]), timeout=10) for i in range(3))
        )
    assert all(r.defaulted_features > 0 for r in replies)
    assert app.features.errors["timeout"] == 3


async def test_a_request_that_sends_every_value_never_waits_for_the_store(
    start_server: StartServer, tmp_path: Path, silent_port: int
) -> None:
    """Every model input sent: nothing is left to fill, so the store is not asked (a store that
    never answers costs such a call nothing, and nothing is defaulted)."""
    hung = tmp_path / "hung"
    hung.mkdir()
    (hung / "feature_store.yaml").write_text(redis_yaml(f"127.0.0.1:{silent_port}"))
    app = await start_server(feature_repo=hung, feature_budget_ms=5000.0)
    assert app.features is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        client = pb_grpc.InferenceServiceStub(channel)
        reply = await client.Score(score_request(), timeout=2)
    assert len(reply.scores) == 20 and reply.defaulted_features == 0
    assert dict(app.features.errors) == {k: 0 for k in app.features.errors}


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server_ = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server_
    finally:
        server_.stop()


async def test_stopping_redis_under_score_load_fails_no_call(
    start_server: StartServer, redis: RedisServer, tmp_path: Path
) -> None:
    repo = small_repo(tmp_path / "redis-repo", redis=redis)
    app = await start_server(feature_repo=repo)
    await _tips_loaded(app)
    assert app.features is not None
    users = [f"user-{i}" for i in range(40)]
    codes: list[Any] = []
    defaulted: list[int] = []

    async def caller(client: Any, k: int) -> None:
        for i in range(60):  # bounded: 4 callers x 60 calls
            try:
                reply = await client.Score(_by_ids(users[(k + i) % 40], ["tip-1", "tip-2"]))
                defaulted.append(reply.defaulted_features)
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
            await asyncio.sleep(0.002)

    async def kill_midway() -> None:
        await asyncio.sleep(0.15)
        redis.stop()

    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        client = pb_grpc.InferenceServiceStub(channel)
        await asyncio.gather(kill_midway(), *(caller(client, k) for k in range(4)))
    assert codes == [grpc.StatusCode.OK] * 240
    assert defaulted[0] == 0, "before the kill the store answered"
    assert defaulted[-1] > 0, "after the kill every stored value was defaulted"
    assert app.features.errors["unavailable"] >= 1
    assert not any(math.isnan(d) for d in defaulted)


async def test_a_hung_redis_connection_is_dropped_before_its_queue_grows_unbounded(
    silent_port: int,
) -> None:
    store = RedisStore("tips", RedisAddress("127.0.0.1", silent_port))
    await store.connect()
    causes: Counter[str] = Counter()
    for i in range(1100):  # each times out at once; their commands stay unanswered
        try:
            await store.read("user_features", "user_id", f"user-{i}", ("tenure_days",), 0.0001)
        except StoreError as exc:
            causes[exc.cause] += 1
    await store.close()
    assert causes["timeout"] >= 1000
    assert causes["unavailable"] >= 1  # the connection given up at 1,024 pending, then reopened
