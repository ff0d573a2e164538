"""The MLflow backend against a real `mlflow server` (SQLite store, local artifacts on loopback):
train -> register -> promote -> served within two polls, pyfunc parity, a corrupt version
refused, the tracking server killed mid-load, and a restart with it down.

One tracking server and one serving process are shared by the module, and the tests run in
file order: each one starts from the state the one before left (the versions it registered and
where the aliases point), as an operator's session would.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ml_serving._proto.mlserving.v1 import inference_service_pb2 as pb
from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from ml_serving.api.rpc import SERVICE
from ml_serving.scoring import features
from ml_serving.scoring.model import Model
from ml_serving.scoring.registry import (
    InvalidModelError,
    ModelRegistry,
    dump_card,
    write_weights,
)
from ml_serving.training.reproducibility import model_differences
from tests.support import REPO
from tests.support.mlflow_server import MlflowServer
from tests.support.requests import score_request
from tests.support.server_process import ServerProcess, free_port

pytestmark = pytest.mark.timeout(240)

NAME = "tips-ranker"
POLL_S = 1.0
MAX_BACKOFF_S = 2.0
ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True"}


def _mlflow_registry_module() -> Any:
    from ml_serving.scoring import mlflow_registry

    return mlflow_registry


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def registry(tracking: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The test's own client of the tracking server (its own cache)."""
    mod = _mlflow_registry_module()
    return mod.MlflowRegistry(tmp_path_factory.mktemp("client-cache"), tracking_uri=tracking.uri)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serving-cache")


def _serve(tracking_uri: str, cache: Path, metrics_port: int = 0) -> ServerProcess:
    return ServerProcess(
        ML_SERVING_MODEL_URI=f"models:/{NAME}@champion",
        MLFLOW_TRACKING_URI=tracking_uri,
        ML_SERVING_MODEL_CACHE_DIR=str(cache),
        ML_SERVING_MODEL_POLL_S=str(POLL_S),
        ML_SERVING_MODEL_POLL_MAX_BACKOFF_S=str(MAX_BACKOFF_S),
        ML_SERVING_METRICS_PORT=str(metrics_port),
        ML_SERVING_LOG_LEVEL="INFO",
        ML_SERVING_LOG_JSON="false",
        ML_SERVING_SHUTDOWN_GRACE_S="1",
    )


@pytest.fixture(scope="module")
def serving(
    tracking: MlflowServer, cache_dir: Path, trained: str
) -> Iterator[tuple[ServerProcess, int]]:
    metrics_port = free_port()
    server = _serve(tracking.uri, cache_dir, metrics_port)
    try:
        started = time.monotonic()
        server.wait_ready(90)
        print(f"server ready with MLflow in {time.monotonic() - started:.1f} s")
        yield server, metrics_port
    finally:
        server.stop()


def _score(address: str, request: pb.ScoreRequest | None = None) -> pb.ScoreResponse:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        reply: pb.ScoreResponse = stub.Score(request or score_request(5), timeout=5)
        return reply


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        status: int = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=2).status
        return status


def _metric(port: int, name: str, **labels: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def _wait_log(server: ServerProcess, text: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in server.log(400):
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{server.log()}"
        time.sleep(0.1)


def _wait_for_version(address: str, version: str, timeout_s: float) -> float:
    """Seconds until Score answers with ``version``; fails the test after ``timeout_s``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if _score(address).model_version == version:
                return time.monotonic() - started
        except grpc.RpcError as exc:  # nothing loaded yet is the one failure allowed here
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
        time.sleep(0.05)
    raise AssertionError(f"still not serving version {version} after {timeout_s} s")


def _shifted(model: Model, shift: float) -> Any:
    """Version ``model`` with its intercept moved, as (weights, card_for) for add_version."""
    weights = replace(model.weights, intercept=model.weights.intercept + shift)

    def card_for(version: str) -> dict[str, Any]:
        card: dict[str, Any] = json.loads(json.dumps(model.card))
        card["version"] = version
        card["rollout_history"] = [{"event": "trained", "version": version}]
        shifted = Model(NAME, version, card, weights)
        for row in card["reference_rows"]:
            ctx = features.rows_from_mappings([row["context"]], features.Group.CONTEXT)[0]
            cand = features.rows_from_mappings([row["candidate"]], features.Group.CANDIDATE)
            row["prediction"] = float(shifted.predict(ctx, cand)[0])
        return card

    return weights, card_for


# --- training ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tracking: MlflowServer) -> str:
    """`make train`'s entry point with MLFLOW_TRACKING_URI set (and --promote): version 1.

    In-process (the CLI's main with its argv) to spare a second interpreter's imports."""
    from ml_serving.training import train

    started = time.monotonic()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = train.main(["--promote", "--tracking-uri", tracking.uri])
    assert code == 0, out.getvalue()
    print(f"training + registration took {time.monotonic() - started:.1f} s")
    m = re.search(r"registered models:/tips-ranker/(\d+)", out.getvalue())
    assert m, out.getvalue()
    return m[1]


def _new_run(registry: Any) -> str:
    """A run of its own for each hand-made version (a run's model/ holds one version)."""
    experiment = registry.client.get_experiment_by_name(NAME)
    run_id: str = registry.client.create_run(experiment.experiment_id).info.run_id
    return run_id


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("ML_SERVING_", "MLFLOW_"))}


def test_training_logs_a_run_and_registers_a_version(registry: Any, trained: str) -> None:
    client = registry.client
    mv = client.get_model_version(NAME, trained)
    assert registry.version_by_alias(NAME, "challenger") == trained
    assert registry.version_by_alias(NAME, "champion") == trained  # --promote, checks passed
    run = client.get_run(mv.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["seed"] == "20240611"
    assert run.data.params["simulator.n_users"] == "5000"
    assert run.data.params["fit.l2"] == "1.0"
    for metric in ("auc", "log_loss", "calibration_error", "fairness_auc_gap"):
        assert metric in run.data.metrics
    assert mv.tags["fairness_passed"] == "true"
    assert mv.tags["auc"] == str(run.data.metrics["auc"])
    assert "Held-out AUC" in mv.description
    model = registry.load(NAME, trained)  # downloaded and validated like the server does
    assert model.card["version"] == trained
    assert model.card["metrics"]["heldout"]["auc"] == run.data.metrics["auc"]
    # The same model the file registry ships (same seed, same code), within the tolerance of
    # training/reproducibility.py: not its weights' hash, which the CPU's kernels decide.
    assert model_differences(model, ModelRegistry(REPO / "models").load(NAME, "1")) == []
    events = [e["event"] for e in model.card["rollout_history"]]
    assert events == ["trained", "promoted"]


# --- serving -------------------------------------------------------------------------------------


def test_served_version_is_the_mlflow_version(serving: tuple[ServerProcess, int], trained: str):
    server, metrics_port = serving
    reply = _score(server.address)
    assert (reply.model_name, reply.model_version) == (NAME, trained)
    assert _metric(metrics_port, "mlserving_model_info", version=trained) == 1.0


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_pyfunc_matches_the_grpc_answer(
    serving: tuple[ServerProcess, int], tracking: MlflowServer, trained: str
) -> None:
    import mlflow
    import mlflow.pyfunc
    import pandas as pd

    request = score_request(20, seed=11)
    reply = _score(serving[0].address, request)
    ctx = dict(zip(request.context_feature_names, request.context_values, strict=True))
    rows = [
        {**ctx, **dict(zip(request.candidate_feature_names, c.values, strict=True))}
        for c in request.candidates
    ]
    previous = mlflow.get_tracking_uri()
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking.uri)
    try:
        loaded = mlflow.pyfunc.load_model(f"models:/{NAME}/{trained}")
        got = np.asarray(loaded.predict(pd.DataFrame(rows)), dtype=np.float64)
    finally:
        mlflow.set_tracking_uri(previous)
        # set_tracking_uri also exports MLFLOW_TRACKING_URI: later tests (make train's file
        # path) must not inherit it.
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env
    want = np.array([s.score for s in reply.scores])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_promotion_is_served_within_two_polls(
    serving: tuple[ServerProcess, int], registry: Any, trained: str
) -> None:
    server, metrics_port = serving
    v1 = registry.load(NAME, trained)
    weights, card_for = _shifted(v1, 0.3)
    v2 = registry.add_version(NAME, weights, card_for, run_id=_new_run(registry))
    assert registry.version_by_alias(NAME, "challenger") == v2.version
    assert _score(server.address).model_version == trained  # a challenger does not serve
    started = time.monotonic()
    done = subprocess.run(
        [
            *(sys.executable, "-m", "ml_serving.scoring.mlflow_registry"),
            *("--tracking-uri", registry.tracking_uri, "--cache", str(registry.cache.root)),
            *("promote", "--name", NAME, "--version", v2.version, "--note", "test"),
        ],
        cwd=REPO,
        env={**_clean_env(), **ENV},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # The alias moved somewhere inside the command (after its imports and the validation):
    # the server must answer with v2 at most two polls after the command has finished.
    _wait_for_version(server.address, v2.version, 2 * POLL_S)
    print(f"promote command started -> v2 served: {time.monotonic() - started:.2f} s")
    _wait_log(server, f"now serving version {v2.version} ", 5)  # log lines go out in batches
    swap = re.findall(
        rf"now serving version {v2.version} .*loaded in ([0-9.]+) ms", server.log(400)
    )
    assert swap, server.log(400)
    print(f"server side: resolve -> download -> validate -> swap in {swap[-1]} ms")
    assert _metric(metrics_port, "mlserving_model_info", version=v2.version) == 1.0
    assert _metric(metrics_port, "mlserving_model_info", version=trained) is None
    card = registry.client.download_artifacts(
        registry.client.get_model_version(NAME, v2.version).run_id, "model/artifacts/card.json"
    )
    history = json.loads(Path(card).read_text())["rollout_history"]
    assert history[-1]["event"] == "promoted" and history[-1]["previous_version"] == trained
    assert history[-1]["note"] == "test"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = _mlflow_registry_module().main(
            ["--tracking-uri", registry.tracking_uri, "--cache", str(registry.cache.root), "list"]
        )
    assert code == 0
    listed = out.getvalue().splitlines()
    assert [line[:2] for line in listed] == ["  ", "* "]
    assert listed[0].split()[:2] == [NAME, trained]
    assert listed[1].split()[:3] == ["*", NAME, v2.version]  # * marks the champion


def _corrupt_version(registry: Any, base: Model) -> str:
    """A version whose card's reference predictions the weights do not reproduce."""
    weights, card_for = _shifted(base, 0.6)

    def lying_card(version: str) -> dict[str, Any]:
        card: dict[str, Any] = card_for(version)
        card["reference_rows"][0]["prediction"] += 0.01
        return card

    # add_version validates before uploading, so upload the broken files by hand.
    mod = _mlflow_registry_module()
    client = registry.client
    run_id = _new_run(registry)
    mv = client.create_model_version(NAME, f"runs:/{run_id}/model", run_id=run_id)
    with tempfile.TemporaryDirectory() as tmp:
        files = Path(tmp) / "artifacts"
        files.mkdir()
        write_weights(files / "weights.npz", weights)
        sha = hashlib.sha256((files / "weights.npz").read_bytes()).hexdigest()
        (files / "card.json").write_bytes(
            dump_card({**lying_card(str(mv.version)), "weights_sha256": sha})
        )
        client.log_artifacts(run_id, str(files), artifact_path=f"model/{mod.FILES_PATH}")
    return str(mv.version)


def test_a_corrupt_version_is_refused(serving: tuple[ServerProcess, int], registry: Any) -> None:
    server, metrics_port = serving
    serving_version = registry.version_by_alias(NAME, "champion")
    bad = _corrupt_version(registry, registry.load(NAME, serving_version))
    with pytest.raises(InvalidModelError, match="reference row 0"):
        registry.promote(NAME, bad)
    assert registry.version_by_alias(NAME, "champion") == serving_version  # alias unmoved
    # Moved by hand, around the promote command: the server refuses it and keeps serving.
    registry.client.set_registered_model_alias(NAME, "champion", bad)
    deadline = time.monotonic() + 3 * POLL_S + 2
    while time.monotonic() < deadline and f"cannot switch to version {bad}" not in server.log(200):
        assert _score(server.address).model_version == serving_version
        time.sleep(0.1)
    assert f"cannot switch to version {bad}" in server.log(200)
    assert "reference row 0" in server.log(200)
    assert _score(server.address).model_version == serving_version
    assert (
        _metric(metrics_port, "mlserving_model_poll_failures_total", reason="refused") or 0
    ) >= 1
    registry.client.set_registered_model_alias(NAME, "champion", serving_version)


@pytest.fixture(scope="module")
def down() -> Iterator[dict[str, Any]]:
    """What the MLflow-down test leaves for the MLflow-back one (the version it promoted and
    the servers it started while MLflow was down); stops those servers at the end."""
    state: dict[str, Any] = {}
    try:
        yield state
    finally:
        for value in state.values():
            if isinstance(value, ServerProcess):
                value.stop()


def test_mlflow_down_score_keeps_answering_and_restarts_serve_the_cache(
    serving: tuple[ServerProcess, int],
    registry: Any,
    tracking: MlflowServer,
    cache_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    down: dict[str, Any],
) -> None:
    server, metrics_port = serving
    serving_version = registry.version_by_alias(NAME, "champion")
    weights, card_for = _shifted(registry.load(NAME, serving_version), -0.2)
    new = registry.add_version(NAME, weights, card_for, run_id=_new_run(registry)).version
    registry.client.set_registered_model_alias(NAME, "champion", new)
    tracking.kill()  # the poll in progress (resolving the alias or downloading) fails midway
    down["new"] = new
    # A restart from the cache the running server fills, and a first start with no cache.
    restarted = down["restarted"] = _serve(tracking.uri, cache_dir)
    empty = down["empty"] = _serve(tracking.uri, tmp_path_factory.mktemp("empty-cache"))
    answered = set()
    until = time.monotonic() + 3 * POLL_S
    while time.monotonic() < until:
        answered.add(_score(server.address).model_version)  # never an error
        time.sleep(0.02)
    assert answered <= {serving_version, new}
    assert (
        _metric(metrics_port, "mlserving_model_poll_failures_total", reason="unavailable") or 0
    ) >= 1
    _wait_log(server, "registry unreachable", 5)  # the warning (log lines go out in batches)

    started = time.monotonic()
    restarted.wait_ready(90)
    print(f"restart, MLflow down, from the cache: ready in {time.monotonic() - started:.1f} s")
    cached = _score(restarted.address).model_version
    assert cached in answered  # the version the running server last served
    _wait_log(restarted, "registry unreachable", 3 * POLL_S + 2)  # the warning

    _wait_log(empty, "LLM gateway warm", 60)  # only the model holds readiness back now
    assert _health(empty.address) == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as err:
        _score(empty.address)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not loaded yet" in (err.value.details() or "")


def test_mlflow_back_the_new_version_serves_everywhere(
    serving: tuple[ServerProcess, int], tracking: MlflowServer, down: dict[str, Any]
) -> None:
    try:
        tracking.start()
        back = time.monotonic()
        for server in (serving[0], down["restarted"], down["empty"]):
            _wait_for_version(server.address, down["new"], 2 * MAX_BACKOFF_S + 5)
        print(f"MLflow back -> new version served by all three: {time.monotonic() - back:.2f} s")
        down["empty"].wait_ready(5)  # readiness follows the first loaded version
    finally:
        tracking.start()  # whatever failed above, later modules find it up
