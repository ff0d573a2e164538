"""`python -m ml_serving` as a child process on loopback, for stress tests and the soak script:
readiness through gRPC health, memory through /proc, and a SIGTERM drain at the end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ml_serving.api.rpc import SERVICE
from tests.support import REPO

SERVICE_NAME = SERVICE
"""The health name the child reports SERVING for once it is ready."""


def free_port() -> int:
    """A port free on 127.0.0.1 right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """One server child process; `env` adds ML_SERVING_* settings to a clean environment.

    `cwd` picks the checkout it serves from (`python -m` imports ml_serving from there first):
    this one by default, another for before/after comparisons (scripts/score_ab.py).
    """

    def __init__(self, cwd: Path | str = REPO, **env: str) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        clean = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("ML_SERVING_") and k != "DEFAULT_PROMPT_VERSION"
        }
        clean.update(
            ML_SERVING_HOST="127.0.0.1",
            ML_SERVING_PORT=str(self.port),
            ML_SERVING_METRICS_PORT="0",
            ML_SERVING_LOG_LEVEL="WARNING",
            LITELLM_LOCAL_MODEL_COST_MAP="True",
        )
        clean.update(env)
        self._log: IO[bytes] = tempfile.TemporaryFile()
        self._text = ""
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "ml_serving"],
            env=clean,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        """Block until the InferenceService health is SERVING (LiteLLM imported and warm)."""
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as channel:
            health: Any = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.popen.poll() is not None:
                    raise RuntimeError(f"server exited {self.popen.returncode}:\n{self.log()}")
                try:
                    reply = health.Check(
                        health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout_s} s:\n{self.log()}")

    def rss_bytes(self) -> int:
        """Resident set size now, from /proc/<pid>/status (Linux)."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS line")

    def log(self, tail: int = 40) -> str:
        """The last lines the server wrote (stdout and stderr)."""
        if not self._log.closed:
            self._log.seek(0)
            self._text = self._log.read().decode(errors="replace")
        return "\n".join(self._text.splitlines()[-tail:])

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (graceful drain), then the exit code; SIGKILL if it does not stop in time."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self.log()
        self._log.close()
        return self.popen.returncode
