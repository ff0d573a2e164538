"""The feature-store scenario of `make bench`: Score by ids (every stored value from a real
Redis, a different user each call) against Score with every value in the request, same server,
same run, alternating rounds; and one user lookup's CPU against Feast's get_online_features."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pandas as pd

from bench import procs
from bench.scenarios import REPO
from ml_serving._proto.mlserving.v1 import inference_service_pb2 as pb
from ml_serving._proto.mlserving.v1 import scoring_pb2
from ml_serving.features.lookup import FeatureLookup, LookupPolicy
from ml_serving.features.repo import StoreConfig
from ml_serving.features.stores import open_store
from ml_serving.scoring import features
from ml_serving.training import feature_store, simulator
from tests.support.feature_store import RedisServer, every_value, latest, redis_yaml

SEED = 20240611
CANDIDATES = 20
HOUR = {"local_hour_sin": 0.5, "local_hour_cos": -0.866}
SCORE_PATH = "/mlserving.v1.InferenceService/Score"


def build_requests(repo: Path, n: int) -> tuple[list[bytes], list[bytes]]:
    """`n` pairs of Score requests for `n` different users and 20 tips each: by ids only, and
    with every value the store holds sent in the request (the same values, so the same scores)."""
    users = latest(pd.read_parquet(repo / "data" / "users.parquet"), "user_id")
    tips = latest(pd.read_parquet(repo / "data" / "tips.parquet"), "tip_id")
    rng = np.random.Generator(np.random.PCG64(1))
    user_ids = list(users.index[rng.permutation(len(users))[:n]])
    tip_ids = list(tips.index)
    names = list(features.CANDIDATE_FEATURE_NAMES)
    by_ids, full = [], []
    for i, user in enumerate(user_ids):
        chosen = [tip_ids[(i * 7 + k * 13) % len(tip_ids)] for k in range(CANDIDATES)]
        row = users.loc[user]
        by_ids.append(
            pb.ScoreRequest(
                user_id=user,
                context_feature_names=list(HOUR),
                context_values=list(HOUR.values()),
                candidate_ids=chosen,
                response_layout=scoring_pb2.SCORE_LAYOUT_COLUMNS,
            ).SerializeToString()
        )
        context, values = every_value(row, tips.loc[chosen], HOUR)
        full.append(
            pb.ScoreRequest(
                user_id=user,
                context_feature_names=list(context),
                context_values=list(context.values()),
                candidate_feature_names=names,
                candidate_ids=chosen,
                candidate_values=values,
                response_layout=scoring_pb2.SCORE_LAYOUT_COLUMNS,
            ).SerializeToString()
        )
    return by_ids, full


async def _round(
    port: int, requests: list[bytes], concurrency: int, duration_s: float
) -> tuple[list[float], int]:
    """Closed loop: `concurrency` callers cycling through `requests` for `duration_s`;
    (latencies of the calls that succeeded, count of failed calls)."""
    latencies: list[float] = []
    errors = 0
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        call: Any = channel.unary_unary(SCORE_PATH)  # bytes in and out: no client-side parsing
        end = time.perf_counter() + duration_s
        counter = iter(range(10**9))

        async def caller() -> None:
            nonlocal errors
            while time.perf_counter() < end:
                payload = requests[next(counter) % len(requests)]
                started = time.perf_counter()
                try:
                    await call(payload, timeout=10)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(caller() for _ in range(concurrency)))
    return latencies, errors


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) * 1000.0


def score_rows(
    server: procs.Proc,
    port: int,
    by_ids: list[bytes],
    full: list[bytes],
    *,
    concurrency: int,
    rounds: int,
    round_s: float,
) -> dict[str, Any]:
    """Alternating rounds (full, ids, full, ids...) on one server: CPU per call and latency."""
    measured: dict[str, dict[str, Any]] = {
        "full": {"cpu": 0.0, "lat": [], "errors": 0},
        "by_ids": {"cpu": 0.0, "lat": [], "errors": 0},
    }
    asyncio.run(_round(port, full[:200], concurrency, 1.0))  # warm both paths
    asyncio.run(_round(port, by_ids[:200], concurrency, 1.0))
    for _ in range(rounds):
        for kind, requests in (("full", full), ("by_ids", by_ids)):
            cpu0 = server.cpu_s()
            lat, errors = asyncio.run(_round(port, requests, concurrency, round_s))
            measured[kind]["cpu"] += server.cpu_s() - cpu0
            measured[kind]["lat"].extend(lat)
            measured[kind]["errors"] += errors
    out = {}
    for kind, m in measured.items():
        calls = len(m["lat"])
        out[kind] = {
            "calls": calls,
            "server_cpu_per_call_ms": round(m["cpu"] / calls * 1000.0, 4),
            "p50_ms": round(_percentile(m["lat"], 50), 3),
            "p99_ms": round(_percentile(m["lat"], 99), 3),
            "errors": m["errors"],
        }
    return out


def lookup_cpu(repo: Path, users: list[str], n_ours: int, n_sdk: int) -> dict[str, float]:
    """CPU microseconds of this process per user lookup: ours (FeatureLookup.user: the row
    read, decoded and placed in model order) against Feast's get_online_features for the same
    fields, a different user each call. Ours is measured with 8 lookups in flight, as a server
    under load makes them (the commands of one loop turn share a write), and one at a time;
    the SDK's call is blocking, one at a time, as a server calls it per request."""
    fs = feature_store.store(repo)
    refs = [f"{features.USER_FEATURE_VIEW}:{f}" for f in features.USER_FIELDS]
    fs.get_online_features(features=refs, entity_rows=[{"user_id": users[0]}])  # warm
    started = time.process_time()
    for i in range(n_sdk):
        fs.get_online_features(features=refs, entity_rows=[{"user_id": users[i % len(users)]}])
    sdk = (time.process_time() - started) / n_sdk

    async def ours(in_flight: int) -> float:
        lookup = FeatureLookup(open_store(StoreConfig.load(repo)), LookupPolicy(budget_s=1.0))
        await lookup.store.connect()
        for u in users[:50]:
            await lookup.user(u)
        counter = iter(range(n_ours))

        async def worker() -> None:
            for i in counter:
                assert await lookup.user(users[i % len(users)]) is not None

        began = time.process_time()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        spent = (time.process_time() - began) / n_ours
        await lookup.close()
        return spent

    one = asyncio.run(ours(1))
    eight = asyncio.run(ours(8))
    return {
        "ours_cpu_us": round(eight * 1e6, 2),
        "ours_cpu_us_one_at_a_time": round(one * 1e6, 2),
        "sdk_cpu_us": round(sdk * 1e6, 2),
        "sdk_cpu_ratio": round(sdk / eight, 2),
        "sdk_cpu_ratio_one_at_a_time": round(sdk / one, 2),
    }


def run(log: Callable[[str], None], smoke: bool = False) -> dict[str, Any]:
    """The scenario; rows in the check's format (scenario, target, concurrency, vs_baseline)."""
    config = simulator.SimulatorConfig(n_users=800, n_tips=200) if smoke else None
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-features-") as scratch:
        root = Path(scratch)
        redis = RedisServer(root).start()
        try:
            repo = feature_store.copy_definitions(feature_store.SHIPPED_REPO, root / "redis-repo")
            (repo / "feature_store.yaml").write_text(redis_yaml(redis.connection_string))
            feature_store.write_events(repo, SEED, config)
            feature_store.apply(repo)
            feature_store.materialize(repo)
            sqlite_repo = feature_store.copy_definitions(
                feature_store.SHIPPED_REPO, root / "sqlite-repo"
            )
            (sqlite_repo / "data").mkdir()
            for name in ("users.parquet", "tips.parquet", "impressions.parquet", "manifest.json"):
                (sqlite_repo / "data" / name).write_bytes((repo / "data" / name).read_bytes())
            feature_store.apply(sqlite_repo)
            feature_store.materialize(sqlite_repo)
            log("features: Redis and sqlite online stores materialized by Feast")

            users = sorted(set(pd.read_parquet(repo / "data" / "users.parquet")["user_id"]))
            for kind, where in (("redis", repo), ("sqlite", sqlite_repo)):
                cpu = lookup_cpu(where, users, 500 if smoke else 5000, 50 if smoke else 500)
                log(f"features: one user lookup on {kind}: {cpu}")
                rows.append(
                    {
                        "scenario": "features_lookup",
                        "target": kind,
                        "concurrency": 1,
                        "error_count": 0,
                        **cpu,
                        "vs_baseline": {"sdk_cpu_ratio": cpu["sdk_cpu_ratio"]},
                    }
                )

            by_ids, full = build_requests(repo, 500 if smoke else 4000)
            server, port = procs.start_server(
                {"ML_SERVING_FEATURE_REPO": str(repo)}, root / "server.log", REPO
            )
            try:
                procs.wait_ready(server, port)
                concurrency = 8
                result = score_rows(
                    server,
                    port,
                    by_ids,
                    full,
                    concurrency=concurrency,
                    rounds=1 if smoke else 3,
                    round_s=2.0 if smoke else 5.0,
                )
            finally:
                server.stop()
            ids, baseline = result["by_ids"], result["full"]
            log(f"features: Score by ids {ids}; with every value {baseline}")
            rows.append(
                {
                    "scenario": "features_score",
                    "target": "server",
                    "concurrency": concurrency,
                    "by_ids": ids,
                    "every_value_sent": baseline,
                    "error_count": ids["errors"] + baseline["errors"],
                    "vs_baseline": {
                        "cpu_per_call_ratio": round(
                            ids["server_cpu_per_call_ms"] / baseline["server_cpu_per_call_ms"], 3
                        ),
                        "p99_ratio": round(ids["p99_ms"] / baseline["p99_ms"], 3),
                        "p50_ratio": round(ids["p50_ms"] / baseline["p50_ms"], 3),
                    },
                }
            )
        finally:
            redis.stop()
    return {"rows": rows}
