"""A real Prometheus on loopback scrapes a server subprocess and evaluates the shipped rules: the
series arrive, the rules evaluate cleanly, and every upstream failing puts the fallback alert up."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from tests.support import monitoring
from tests.support.fake_openai import FakeOpenAI
from tests.support.requests import generate_request, score_request
from tests.support.server_process import ServerProcess, free_port
from tests.support.servers import write_llm_config

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.skipif(PROMETHEUS is None, reason="prometheus: make system-deps"),
    pytest.mark.timeout(240),
]
ALERT = "MLServingGenerateFallbackRatioHigh"
ALERT_WITHIN_S = 60.0


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.loads(reply.read().decode())


def _start_prometheus(tmp_path: Path, target: str) -> tuple[subprocess.Popen[bytes], str]:
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(monitoring.PLAIN_RULES)],
        "scrape_configs": [{"job_name": "ml-serving", "static_configs": [{"targets": [target]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"
    assert PROMETHEUS is not None
    # The child keeps its own copy of the log's descriptor.
    with (tmp_path / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address={address}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return proc, f"http://{address}"


def _wait_ready(proc: subprocess.Popen[bytes], base: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{base}/-/ready", timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"prometheus not ready in 30 s:\n{log.read_text()}")


def _query(base: str, promql: str) -> list[dict[str, Any]]:
    reply = _get(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': promql})}")
    assert reply["status"] == "success", reply
    result: list[dict[str, Any]] = reply["data"]["result"]
    return result


async def test_prometheus_scrapes_the_server_and_the_fallback_alert_goes_up(
    upstream: FakeOpenAI, tmp_path: Path
) -> None:
    # Every upstream fails (HTTP 500, no retries): Generate answers with the fallback tip.
    config = write_llm_config(tmp_path / "llm.yaml", upstream, ["status-500"])
    metrics_port = free_port()
    server = ServerProcess(
        ML_SERVING_METRICS_PORT=str(metrics_port),
        ML_SERVING_LLM_CONFIG=str(config),
        ML_SERVING_LLM_MODEL="status-500",
    )
    prometheus: subprocess.Popen[bytes] | None = None
    try:
        # Blocking waits go to threads: the fake upstream answers on this loop.
        await asyncio.to_thread(server.wait_ready)
        prometheus, base = _start_prometheus(tmp_path, f"127.0.0.1:{metrics_port}")
        await asyncio.to_thread(_wait_ready, prometheus, base, tmp_path / "prometheus.log")

        state: dict[str, Any] = {}
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            deadline = time.monotonic() + ALERT_WITHIN_S
            while time.monotonic() < deadline and not state:
                for _ in range(5):
                    await stub.Score(score_request(), timeout=5)
                reply = await stub.Generate(generate_request(), timeout=10)
                assert reply.fallback
                alerts = (await asyncio.to_thread(_get, f"{base}/api/v1/alerts"))["data"]
                state = next((a for a in alerts["alerts"] if a["labels"]["alertname"] == ALERT), {})
                await asyncio.sleep(0.5)
        assert state, f"{ALERT} not pending or firing within {ALERT_WITHIN_S} s"
        assert state["state"] in {"pending", "firing"}
        assert state["labels"]["severity"] == "warning"
        assert state["labels"]["job"] == "ml-serving"
        assert float(state["value"]) == pytest.approx(1.0)

        # The series the rules read are in Prometheus, from this server.
        names = {
            series["metric"]["__name__"]
            for series in await asyncio.to_thread(
                _query, base, 'count by (__name__) ({job="ml-serving"})'
            )
        }
        assert {
            "grpc_server_handled_total",
            "grpc_server_handling_seconds_bucket",
            "mlserving_generate_total",
            "mlserving_llm_errors_total",
            "mlserving_shed_total",
            "mlserving_model_info",
        } <= names
        score_ok = await asyncio.to_thread(
            _query, base, 'grpc_server_handled_total{grpc_method="Score",grpc_code="OK"}'
        )
        assert score_ok and float(score_ok[0]["value"][1]) > 0
        # The latency SLO's recording rule has a value: Score calls here are far under 50 ms.
        # Polled (bounded): the rule is evaluated each second once two scrapes hold Score calls.
        misses: list[dict[str, Any]] = []
        deadline = time.monotonic() + 20
        while not misses and time.monotonic() < deadline:
            misses = await asyncio.to_thread(
                _query, base, "mlserving:score_latency_slo_misses:ratio_rate5m"
            )
            if not misses:
                await asyncio.sleep(0.5)
        assert misses and float(misses[0]["value"][1]) < 0.5
        # Every shipped rule was evaluated without an error.
        groups = (await asyncio.to_thread(_get, f"{base}/api/v1/rules"))["data"]["groups"]
        evaluated = {r["name"]: r for g in groups for r in g["rules"]}
        assert {r.get("alert") or r["record"] for r in monitoring.rules()} == set(evaluated)
        assert all(r["health"] == "ok" for r in evaluated.values()), evaluated
    finally:
        if prometheus is not None:
            prometheus.terminate()
            try:
                prometheus.wait(10)
            except subprocess.TimeoutExpired:
                prometheus.kill()
                prometheus.wait(10)
        await asyncio.to_thread(server.stop)
