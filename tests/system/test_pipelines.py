"""The pipeline flows end to end on Prefect's temporary local API, beside a running server: the
gate refuses a worse challenger and promotes a better one (the server answers with it), a
rewards run moves the server's Thompson shares, the command line, the deployments, the images."""

from __future__ import annotations

import io
import os
import re
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from ml_serving.pipelines import flows, local
from ml_serving.scoring.registry import ModelRegistry
from ml_serving.scoring.shadow import FileShadowPointer
from ml_serving.training import simulator, train
from tests.support import REPO
from tests.support.requests import generate_request, score_request
from tests.support.server_process import ServerProcess, free_port

NAME = "tips-ranker"
WEAK = simulator.SimulatorConfig(n_users=800)
"""The champion's data: a sixth of the default population (a weaker model)."""
TINY = simulator.SimulatorConfig(n_users=100)
"""The worse challenger's data."""


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[str]:
    # The command line's own context: PREFECT_HOME in a temporary folder, telemetry off.
    with local.prefect_api() as where:
        yield where


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A registry whose champion is weak, a thompson experiment, and a server serving both."""
    root = tmp_path_factory.mktemp("pipelines")
    registry = ModelRegistry(root / "models")
    champion = train.train(11, name=NAME, version="1", config=WEAK).model
    registry.add_version(NAME, "1", champion.weights, champion.card)
    registry.promote(NAME, "1", note="test champion")
    experiments = root / "experiments.yaml"
    experiments.write_text(
        yaml.safe_dump(
            {
                "experiments": [
                    {
                        "name": "tip-prompts",
                        "variants": ["v1", "v2-mentor"],
                        "policy": "thompson",
                        "snapshot": "snapshots/tip-prompts.json",
                        "min_share": 0.05,
                    }
                ]
            }
        )
    )
    metrics_port = free_port()
    server = ServerProcess(
        ML_SERVING_MODEL_ROOT=str(root / "models"),
        ML_SERVING_MODEL_POLL_S="0.2",
        ML_SERVING_SCORE_SHADOW_SHARE="1",
        ML_SERVING_METRICS_PORT=str(metrics_port),
        ML_SERVING_EXPERIMENTS=str(experiments),
        ML_SERVING_EXPERIMENTS_POLL_S="0.2",
        ML_SERVING_DECISION_LOG=str(root / "decisions.jsonl"),
        ML_SERVING_DECISION_USER_KEY="pipelines-test-key",
    )
    try:
        server.wait_ready()
        yield {
            "root": root,
            "registry": registry,
            "experiments": experiments,
            "server": server,
            "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
        }
    finally:
        server.stop()


def _metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): float(s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _score_version(server: ServerProcess) -> str:
    with grpc.insecure_channel(server.address) as channel:
        stub: Any = pb_grpc.InferenceServiceStub(channel)
        return str(stub.Score(score_request(), timeout=10).model_version)


def _wait(predicate: Any, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_gate_refuses_a_worse_challenger_and_promotes_a_better_one(
    prefect_api: str, world: dict[str, Any], tmp_path: Path
) -> None:
    registry: ModelRegistry = world["registry"]
    server: ServerProcess = world["server"]
    worse = train.train(12, name=NAME, version="2", config=TINY).model
    registry.add_version(NAME, "2", worse.weights, worse.card)
    reports = tmp_path / "reports"

    refused = flows.promote_flow(
        challenger="2", model_root=str(registry.root), reports_dir=str(reports)
    )
    assert refused["promoted"] is False
    assert "auc" in refused["failed_checks"]
    report = Path(refused["report"]).read_text()
    assert "**Not promoted**: failed check(s) auc" in report
    assert re.search(r"\| auc \| \*\*FAIL\*\* \| challenger 0\.\d{4} vs champion", report)
    assert registry.promoted_version(NAME) == "1"
    assert _score_version(server) == "1"

    trained = flows.train_flow(seed=13, model_root=str(registry.root), reports_dir=str(reports))
    assert trained["version"] == "3" and trained["fairness_passed"] is True
    assert Path(trained["calibration_png"]).read_bytes().startswith(b"\x89PNG")
    assert "| AUC |" in Path(trained["report"]).read_text()
    # Never the champion: the new version only shadows it, and the server compares them.
    assert registry.promoted_version(NAME) == "1"
    assert FileShadowPointer(registry).shadow_version(NAME) == "3"
    comparisons = ("mlserving_shadow_model_comparisons_total", (("version", "3"),))
    # The server picks the shadow pointer up on its next poll: calls made before that are not
    # compared (under load, a fresh-clone run made all 60 first and saw too few comparisons).
    shadow_info = ("mlserving_shadow_model_info", (("name", NAME), ("version", "3")))
    _wait(lambda: _metrics(world["metrics"]).get(shadow_info, 0) == 1, "the shadow version")
    for _ in range(60):
        assert _score_version(server) == "1"
    _wait(lambda: _metrics(world["metrics"]).get(comparisons, 0) >= 50, "50 shadow comparisons")

    promoted = flows.promote_flow(
        model_root=str(registry.root),
        shadow_metrics=[world["metrics"]],
        require_shadow=True,
        reports_dir=str(reports),
    )
    report = Path(promoted["report"]).read_text()
    assert promoted["promoted"] is True, report
    assert (promoted["champion"], promoted["challenger"]) == ("1", "3")
    assert "| shadow | pass |" in report
    assert registry.promoted_version(NAME) == "3"
    assert FileShadowPointer(registry).shadow_version(NAME) is None
    history = registry.load(NAME, "3").card["rollout_history"][-1]
    assert history["event"] == "promoted" and "promotion gate passed" in history["note"]
    _wait(lambda: _score_version(server) == "3", "the server to answer with version 3")


def test_an_override_promotes_despite_failed_checks(prefect_api: str, tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    for version, seed, config in (("1", 21, WEAK), ("2", 22, TINY)):
        model = train.train(seed, name=NAME, version=version, config=config).model
        registry.add_version(NAME, version, model.weights, model.card)
    registry.promote(NAME, "1")
    result = flows.promote_flow(
        model_root=str(registry.root),
        override="alice: the tiny model is what the launch needs",
        reports_dir=str(tmp_path),
    )
    assert result["promoted"] is True and "auc" in result["failed_checks"]
    report = Path(result["report"]).read_text()
    assert "**Promoted by override**" in report and "alice: the tiny model" in report
    note = registry.load(NAME, "2").card["rollout_history"][-1]["note"]
    assert note.startswith("promoted by override (alice:") and "auc" in note


def test_a_rewards_run_moves_the_running_servers_thompson_shares(
    prefect_api: str, world: dict[str, Any]
) -> None:
    server: ServerProcess = world["server"]
    share = ("mlserving_experiment_share", (("experiment", "tip-prompts"),))

    def shares() -> dict[str, float]:
        return {
            dict(labels)["prompt_version"]: value
            for (name, labels), value in _metrics(world["metrics"]).items()
            if name == share[0]
        }

    assert shares() == {"v1": 0.5, "v2-mentor": 0.5}
    with grpc.insecure_channel(server.address) as channel:
        stub: Any = pb_grpc.InferenceServiceStub(channel)
        replies = [
            stub.Generate(generate_request(user_id=f"user-{i}"), timeout=30) for i in range(60)
        ]
    # Rewards in a SQL table: every v2-mentor decision rewarded, no v1 one; one unmatched row.
    database = world["root"] / "rewards.db"
    with sqlite3.connect(database) as db:
        db.execute("CREATE TABLE rewards (decision_id TEXT, reward REAL)")
        db.executemany(
            "INSERT INTO rewards VALUES (?, ?)",
            [(r.decision_id, 1.0 if r.prompt_version == "v2-mentor" else 0.0) for r in replies]
            + [("no-such-decision", 1.0)],
        )
    db.close()
    result = flows.rewards_flow(
        rewards_source=f"sqlite:///{database}",
        rewards_table="rewards",
        decision_logs=[str(world["root"] / "decisions.jsonl")],
        experiments=str(world["experiments"]),
        reports_dir=str(world["root"] / "reports"),
    )
    assert result["decisions"] == 60 and result["rewarded"] == 60
    assert result["unmatched_rewards"] == 1
    assert result["shares"]["v2-mentor"] > 0.9
    report = Path(result["report"]).read_text()
    assert "Unmatched rewards (no decision in the log): 1: no-such-decision" in report
    _wait(lambda: shares().get("v2-mentor", 0) > 0.9, "the server's shares to move")
    assert shares() == pytest.approx(result["shares"])


def test_the_command_line_runs_a_flow_on_a_temporary_local_api(tmp_path: Path) -> None:
    decisions = tmp_path / "decisions.jsonl"
    decisions.write_text(
        '{"decision_id": "d1", "version": "v1", "how": "experiment", "propensity": 0.5, '
        '"experiment": "tip-prompts"}\n'
    )
    rewards = tmp_path / "rewards.csv"
    rewards.write_text("decision_id,reward\nd1,1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ml_serving.pipelines",
            "--reports-dir",
            str(tmp_path),
            "rewards",
            "--rewards",
            str(rewards),
            "--decisions",
            str(decisions),
            "--out",
            str(tmp_path / "snapshot.json"),
        ],  # fmt: skip
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rewards: running on a temporary local Prefect API" in done.stderr
    assert re.search(r"rewards: flow \d+\.\d s, in all \d+\.\d s", done.stderr)
    assert '"decisions": 1' in done.stdout
    assert '"trials": 1' in (tmp_path / "snapshot.json").read_text()


def test_the_deployments_load_with_prefects_own_loader() -> None:
    from prefect.cli.deploy._config import _load_deploy_configs_and_actions
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
    from prefect.cli.deploy._triggers import _initialize_deployment_triggers
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
    from prefect.events.schemas.events import ResourceSpecification
    from prefect.flows import load_flow_from_entrypoint
    from rich.console import Console

    out = io.StringIO()
    configs, actions = _load_deploy_configs_and_actions(
        REPO / "deploy" / "pipelines" / "prefect.yaml", console=Console(file=out)
    )
    assert out.getvalue() == ""  # the loader prints validation problems instead of raising
    by_name = {c["name"]: c for c in configs}
    assert set(by_name) == {
        "features-hourly",
        "rewards-hourly",
        "train-daily",
        "promote-after-train",
    }
    crons = {}
    for config in configs:
        assert config["work_pool"]["name"] == "ml-serving-pipelines"
        assert config["work_pool"]["job_variables"]["image"].startswith("ml-serving-pipelines:")
        path, _, function = config["entrypoint"].partition(":")
        flow: Any = load_flow_from_entrypoint(f"{REPO / path}:{function}")
        # Loaded from the file as the worker loads it: the flow of that name in FLOWS.
        assert flow.fn.__name__ == flows.FLOWS[flow.name].fn.__name__ == function
        flow.validate_parameters(config.get("parameters", {}))
        crons[config["name"]] = [
            _schedule_config_to_deployment_schedule(s)["schedule"].cron
            for s in config.get("schedules") or []
        ]
        _initialize_deployment_triggers(config["name"], config.get("triggers", []))
    assert crons == {
        "features-hourly": ["0 * * * *"],
        "rewards-hourly": ["30 * * * *"],
        "train-daily": ["0 3 * * *"],
        "promote-after-train": [],
    }
    (trigger,) = _initialize_deployment_triggers(
        "promote-after-train", by_name["promote-after-train"]["triggers"]
    )
    assert isinstance(trigger, DeploymentEventTrigger)
    assert trigger.expect == {"prefect.flow-run.Completed"}
    assert isinstance(trigger.match_related, ResourceSpecification)
    assert trigger.match_related.model_dump() == {
        "prefect.resource.role": "flow",
        "prefect.resource.name": "train",
    }
    assert actions["pull"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "/app"}}
    ]


def test_the_serving_image_carries_no_prefect() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    installs = [line for line in dockerfile.splitlines() if "pip install" in line]
    assert installs and all("-r requirements.lock" in line for line in installs)
    assert "pipelines" not in dockerfile and "prefect" not in dockerfile.lower()
    pinned = {
        line.split("==")[0].lower()
        for line in (REPO / "requirements.lock").read_text().splitlines()
        if "==" in line and not line.startswith(" ")
    }
    assert pinned and not pinned & {"prefect", "feast", "sqlalchemy", "matplotlib"}
    pipelines = (REPO / "deploy" / "pipelines" / "Dockerfile").read_text()
    assert '"prefect==3.9.1"' in pipelines and "requirements.lock" in pipelines


def test_the_features_flow_writes_applies_and_materializes(
    prefect_api: str, tmp_path: Path
) -> None:
    repo = tmp_path / "feature_repo"
    repo.mkdir()
    for name in ("feature_store.yaml", "tips.py"):
        (repo / name).write_text((REPO / "feature_repo" / name).read_text())
    # A small population: the default one takes a minute more to materialize here.
    result = flows.features_flow(
        repo_path=str(repo), seed=5, n_users=120, reports_dir=str(tmp_path)
    )
    assert result["rows"]["users"] > 0 and result["rows"]["impressions"] > 0
    assert set(result["seconds"]) == {"write_event_tables", "apply", "materialize_first"}
    with sqlite3.connect(repo / "data" / "online_store.db") as db:
        (users,) = db.execute(
            "SELECT COUNT(DISTINCT entity_key) FROM tips_user_features"
        ).fetchone()
    db.close()
    assert users == 120
    report = Path(result["report"]).read_text()
    assert "# Feature refresh: feature_repo" in report and "| impressions |" in report
    # The daily train deployment's path: a version from this repository's tables.
    trained = flows.train_flow(
        repo_path=str(repo), model_root=str(tmp_path / "models"), reports_dir=str(tmp_path)
    )
    card = ModelRegistry(tmp_path / "models").load(NAME, trained["version"]).card
    assert card["training_data"]["seed"] == 5
    assert card["training_data"]["users"]["total"] <= 120
