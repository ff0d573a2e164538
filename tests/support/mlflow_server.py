"""A real `mlflow server` on loopback (SQLite backend store, local artifact root) for the tests:
started, killed and restarted on the same port and store, always bounded in time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from tests.support.server_process import free_port

START_TIMEOUT_S = 90.0
"""First start creates the SQLite schema (~15 s here with two busy cores); later ones are faster."""


class MlflowServer:
    """`python -m mlflow server --workers 1` in its own process group (it forks uvicorn)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._text = ""

    def start(self, timeout_s: float = START_TIMEOUT_S) -> MlflowServer:
        """Start (or restart on the same port and store) and wait for /health."""
        if self.popen is not None and self.popen.poll() is None:
            return self
        env = {
            **os.environ,
            # MLflow's server imports litellm, which would fetch a cost map from the internet.
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            # The job runner is one more busy process on a 2-core machine; no test uses it.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        self._log = tempfile.TemporaryFile()
        self.popen = subprocess.Popen(
            [
                *(sys.executable, "-m", "mlflow", "server"),
                *("--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"),
                *("--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}"),
                *("--artifacts-destination", str(self.root / "artifacts")),
            ],
            env=env,
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"mlflow server exited {self.popen.returncode}:\n{self.log()}")
            if self.healthy():
                return self
            time.sleep(0.25)
        self.kill()
        raise TimeoutError(f"mlflow server not up after {timeout_s} s:\n{self.log()}")

    def healthy(self) -> bool:
        """Whether /health answers now."""
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as reply:
                return bool(reply.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def kill(self) -> None:
        """SIGKILL the whole group at once: the server is gone mid-request, as in a crash."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM the group, SIGKILL what is left after 10 s."""
        self._signal(signal.SIGTERM)

    def _signal(self, sig: signal.Signals) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)
        # uvicorn, its child, shares the group: make sure none of the group outlives the test.
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + 10
        while self.healthy() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.log()
        if self._log is not None:
            self._log.close()

    def log(self, tail: int = 40) -> str:
        """The server's last output lines."""
        if self._log is not None and not self._log.closed:
            self._log.seek(0)
            self._text = self._log.read().decode(errors="replace")
        return "\n".join(self._text.splitlines()[-tail:])
