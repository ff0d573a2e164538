"""The prompt experiment over a real channel: sticky shares, decision ids, the decision log,
snapshots picked up while serving, the shadow version."""

from __future__ import annotations

import asyncio
import collections
import json
from pathlib import Path

import grpc
import pytest
import yaml
from prometheus_client import generate_latest

from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from ml_serving._proto.mlserving.v1 import prompt_pb2
from ml_serving.api import server
from ml_serving.experiments.assignment import Shares
from ml_serving.experiments.shadow import ShadowOutcome
from tests.support.requests import generate_request, generate_stream_request
from tests.support.servers import StartServer, make_settings
from tests.support.streams import collect

VARIANTS = {"v1": 50, "v2-mentor": 25, "v3-few-shot": 25}


def _experiments_file(tmp_path: Path, **experiment: object) -> Path:
    path = tmp_path / "experiments.yaml"
    entry = {"name": "tip-prompts", "variants": VARIANTS, **experiment}
    path.write_text(yaml.safe_dump({"experiments": [entry]}))
    return path


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def _stub(app: server.App) -> tuple[grpc.aio.Channel, pb_grpc.InferenceServiceAsyncStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    return channel, pb_grpc.InferenceServiceStub(channel)


async def test_sticky_assignment_in_the_configured_shares(
    start_server: StartServer, tmp_path: Path
) -> None:
    log = tmp_path / "decisions.jsonl"
    app = await start_server(
        experiments=_experiments_file(tmp_path),
        decision_log=log,
        decision_user_key="test-key",
    )
    channel, stub = await _stub(app)
    async with channel:
        seen: dict[str, str] = {}
        counts: collections.Counter[str] = collections.Counter()
        users = [f"user-{i}" for i in range(400)]
        replies = await asyncio.gather(
            *(stub.Generate(generate_request(user_id=u), timeout=30) for u in users)
        )
        for user, reply in zip(users, replies, strict=True):
            assignment = reply.assignment
            assert assignment.chosen == prompt_pb2.PROMPT_CHOICE_EXPERIMENT
            assert assignment.experiment == "tip-prompts"
            assert assignment.propensity == VARIANTS[reply.prompt_version] / 100
            assert len(reply.decision_id) == 32
            seen[user] = reply.prompt_version
            counts[reply.prompt_version] += 1
        # The documented function the recommender could recompute gives the same answers.
        shares = Shares("tip-prompts", VARIANTS)
        assert all(shares.choose(u)[0] == v for u, v in seen.items())
        # Binomial bounds: 400 draws at p = 0.5 / 0.25 lie within +-4 sigma.
        for version, weight in VARIANTS.items():
            p = weight / 100
            assert abs(counts[version] / 400 - p) <= 4 * (p * (1 - p) / 400) ** 0.5, counts
        # Sticky: the same users get the same versions again, each with a new decision id.
        again = [await stub.Generate(generate_request(user_id=u), timeout=30) for u in users[:20]]
        assert [r.prompt_version for r in again] == [seen[u] for u in users[:20]]
        assert len({r.decision_id for r in again} | {r.decision_id for r in replies}) == 420
    lines = _lines(log)
    assert len(lines) == 420
    first = next(line for line in lines if line["decision_id"] == replies[0].decision_id)
    assert first["version"] == replies[0].prompt_version
    assert first["how"] == "experiment" and first["experiment"] == "tip-prompts"
    assert first["propensity"] == replies[0].assignment.propensity
    assert first["prompt_hash"] == replies[0].prompt_hash and first["model"] == replies[0].model
    assert first["fallback"] is False and first["shadow"] is False
    assert "user-0" not in log.read_text()  # a keyed hash, never the raw id
    assert isinstance(first["user"], str) and len(first["user"]) == 32


async def test_the_request_and_the_default_come_before_and_after_the_experiment(
    start_server: StartServer, tmp_path: Path
) -> None:
    app = await start_server(experiments=_experiments_file(tmp_path))
    channel, stub = await _stub(app)
    async with channel:
        chosen = await stub.Generate(generate_request(prompt_version="v2-mentor"), timeout=30)
        assert chosen.prompt_version == "v2-mentor"
        assert chosen.assignment.chosen == prompt_pb2.PROMPT_CHOICE_REQUEST
        assert (chosen.assignment.propensity, chosen.assignment.experiment) == (1.0, "")
        call = stub.GenerateStream(generate_stream_request(user_id="user-9"), timeout=30)
        _, end = await collect(call)
        assert end.assignment.chosen == prompt_pb2.PROMPT_CHOICE_EXPERIMENT
        assert len(end.decision_id) == 32
        assert dict(await call.trailing_metadata())["x-decision-id"] == end.decision_id


async def test_without_an_experiment_the_default_is_chosen(
    stub: pb_grpc.InferenceServiceAsyncStub,
) -> None:
    call = stub.Generate(generate_request(), timeout=30)
    reply = await call
    assert reply.prompt_version == "v1"
    assert reply.assignment.chosen == prompt_pb2.PROMPT_CHOICE_DEFAULT
    assert reply.assignment.propensity == 1.0
    assert dict(await call.trailing_metadata())["x-decision-id"] == reply.decision_id


async def test_a_new_snapshot_moves_the_shares_without_a_restart(
    start_server: StartServer, tmp_path: Path
) -> None:
    snapshot = tmp_path / "rewards.json"
    app = await start_server(
        experiments=_experiments_file(
            tmp_path, policy="thompson", snapshot="rewards.json", min_share=0.05
        ),
        experiments_poll_s=0.05,
    )
    assert app.experiments is not None and app.experiments.experiment is not None
    channel, stub = await _stub(app)
    async with channel:
        before = await stub.Generate(generate_request(user_id="user-1"), timeout=30)
        assert before.assignment.propensity == VARIANTS[before.prompt_version] / 100
        arms = {
            "v1": {"trials": 5000, "successes": 400},
            "v2-mentor": {"trials": 5000, "successes": 450},
            "v3-few-shot": {"trials": 5000, "successes": 900},
        }
        snapshot.write_text(
            json.dumps({"experiment": "tip-prompts", "as_of": "2026-12-01T00:00:00Z", "arms": arms})
        )
        experiment = app.experiments.experiment
        async with asyncio.timeout(10):
            while experiment.snapshot is None:
                await asyncio.sleep(0.05)
        shares = experiment.shares.shares
        assert shares["v3-few-shot"] == pytest.approx(0.9, abs=0.01)
        assert shares["v1"] == pytest.approx(0.05, abs=0.01)
        replies = [
            await stub.Generate(generate_request(user_id=f"user-{i}"), timeout=30)
            for i in range(40)
        ]
        for reply in replies:
            assert reply.assignment.propensity == pytest.approx(shares[reply.prompt_version])
        # A stale snapshot (older as_of) is refused and the shares stay.
        snapshot.write_text(
            json.dumps({"experiment": "tip-prompts", "as_of": "2026-01-01T00:00:00Z", "arms": arms})
        )
        async with asyncio.timeout(10):
            while experiment.refused == 0:
                await asyncio.sleep(0.05)
        assert experiment.shares.shares == shares


async def test_the_shadow_runs_beside_the_primary_and_never_changes_it(
    start_server: StartServer, tmp_path: Path
) -> None:
    log = tmp_path / "decisions.jsonl"
    plain = await start_server()
    shadowed = await start_server(
        experiments=_experiments_file(
            tmp_path,
            variants={"v1": 100, "v2-mentor": 0},
            shadow={"prompt_version": "v2-mentor", "share": 1.0, "max_in_flight": 4},
        ),
        decision_log=log,
    )
    request = generate_request(user_id="user-3")
    channel_a, stub_a = await _stub(plain)
    channel_b, stub_b = await _stub(shadowed)
    async with channel_a, channel_b:
        want = await stub_a.Generate(request, timeout=30)
        got = await stub_b.Generate(request, timeout=30)
    assert (got.text, got.prompt_version) == (want.text, want.prompt_version) == (got.text, "v1")
    assert shadowed.experiments is not None and shadowed.experiments.shadow is not None
    shadow = shadowed.experiments.shadow
    async with asyncio.timeout(10):
        while shadow.outcomes[ShadowOutcome.RAN] == 0:
            await asyncio.sleep(0.05)
    lines = [line for line in _lines(log) if line["decision_id"] == got.decision_id]
    assert [line["shadow"] for line in lines] == [False, True]
    assert lines[1]["version"] == "v2-mentor" and lines[1]["outcome"] == "ran"


async def test_a_bad_experiments_file_stops_the_server_naming_the_key(tmp_path: Path) -> None:
    path = _experiments_file(tmp_path, variants={"v1": 50, "v9": 50})
    with pytest.raises(ValueError, match=r"experiments\[0\]\.variants\.v9: unknown prompt"):
        await server.start(make_settings(experiments=path))


async def test_metrics_show_assignments_shares_and_shadows(
    start_server: StartServer, tmp_path: Path
) -> None:
    app = await start_server(
        experiments=_experiments_file(
            tmp_path, shadow={"prompt_version": "v3-few-shot", "share": 0.5, "max_in_flight": 2}
        )
    )
    channel, stub = await _stub(app)
    async with channel:
        for i in range(10):
            await stub.Generate(generate_request(user_id=f"user-{i}"), timeout=30)
    text = generate_latest(app.metrics.registry).decode()
    assigned = [
        line for line in text.splitlines() if line.startswith("mlserving_prompt_assignments_total{")
    ]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in assigned) == 10
    assert 'mlserving_experiment_share{experiment="tip-prompts",prompt_version="v1"} 0.5' in text
    assert 'mlserving_shadow_total{outcome="skipped",prompt_version="v3-few-shot"}' in text
