"""Worker-process mode: N servers on one port, metrics per worker, restart, drain, bad config."""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from bench.procs import descendants
from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from ml_serving.api import workers
from ml_serving.config import Settings
from tests.support.requests import score_request
from tests.support.server_process import ServerProcess


def _two_free_ports() -> list[socket.socket]:
    """Sockets bound to two consecutive free ports: hold them while the server picks its own
    gRPC port (ports handed out one after another are often consecutive), then close them."""
    for _ in range(100):
        first = socket.socket()
        first.bind(("127.0.0.1", 0))
        second = socket.socket()
        try:
            second.bind(("127.0.0.1", first.getsockname()[1] + 1))
        except OSError:
            first.close()
            second.close()
            continue
        return [first, second]
    raise RuntimeError("no two consecutive free ports")


def _scraped_score_calls(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("grpc_server_handled_total{") and 'grpc_method="Score"' in line
    )


def test_worker_env_gives_each_worker_its_metrics_port_and_port_reuse() -> None:
    settings = Settings(_env_file=None, workers=3, port=50051, metrics_port=9090)  # type: ignore[call-arg]
    env = workers.worker_env(settings, 2, {"PATH": "/bin", "ML_SERVING_WORKERS": "3"})
    assert env["PATH"] == "/bin"
    assert env["ML_SERVING_WORKERS"] == "1"
    assert env["ML_SERVING_REUSE_PORT"] == "true"
    assert env["ML_SERVING_METRICS_PORT"] == "9092"
    off = Settings(_env_file=None, workers=2, port=50051, metrics_port=0)  # type: ignore[call-arg]
    assert workers.worker_env(off, 1, {})["ML_SERVING_METRICS_PORT"] == "0"


def test_workers_need_a_fixed_port() -> None:
    with pytest.raises(ValueError, match="needs a fixed ML_SERVING_PORT"):
        Settings(_env_file=None, workers=2, port=0)  # type: ignore[call-arg]


def test_two_workers_share_the_port_restart_after_a_crash_and_drain_on_sigterm() -> None:
    held = _two_free_ports()  # worker k serves metrics on base + k
    metrics_port = held[0].getsockname()[1]
    proc = ServerProcess(ML_SERVING_WORKERS="2", ML_SERVING_METRICS_PORT=str(metrics_port))
    for sock in held:
        sock.close()
    try:
        deadline = time.monotonic() + 60
        while len(descendants(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        first = sorted(descendants(proc.pid))
        assert len(first) == 2, proc.log()
        proc.wait_ready()
        # Each call on its own connection: the kernel spreads connections over the workers.
        for _ in range(40):
            options = [("grpc.use_local_subchannel_pool", 1)]
            with grpc.insecure_channel(proc.address, options=options) as channel:
                grpc.channel_ready_future(channel).result(timeout=30)
                reply = pb_grpc.InferenceServiceStub(channel).Score(score_request(), timeout=30)
                assert len(reply.scores) > 0
        counts = [_scraped_score_calls(metrics_port + k) for k in (0, 1)]
        assert sum(counts) == 40
        assert min(counts) > 0, counts  # both workers answered (chance of a miss: 2 in 2^40)

        os.kill(first[0], signal.SIGKILL)  # a worker dies while serving: it is replaced
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = descendants(proc.pid)
            if len(now) == 2 and first[0] not in now:
                break
            time.sleep(0.2)
        assert len(descendants(proc.pid)) == 2 and first[0] not in descendants(proc.pid)
        assert "worker exited while serving" in proc.log(200)
    finally:
        code = proc.stop()
    assert code == 0, proc.log()


def test_a_worker_config_error_stops_the_supervisor_with_exit_2(tmp_path: Path) -> None:
    proc = ServerProcess(
        ML_SERVING_WORKERS="2", ML_SERVING_LLM_CONFIG=str(tmp_path / "missing.yaml")
    )
    code = proc.popen.wait(120)
    log = proc.log(200)
    proc.stop()
    assert code == workers.CONFIG_ERROR_EXIT, log
    assert "cannot read LLM config" in log
