"""How processes end: workers outlive no supervisor (kill -9 included), and a port that is taken
or a registry that cannot be written is one clear line and exit 2, never a traceback."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.procs import descendants
from ml_serving.api import workers
from tests.support import REPO
from tests.support.server_process import ServerProcess


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie (an orphan's exit waits for PID 1 to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _listening(port: int) -> bool:
    """Whether anything listens on 127.0.0.1:port (SO_REUSEADDR, as a restarted server binds)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def test_workers_drain_and_exit_when_the_supervisor_is_killed() -> None:
    proc = ServerProcess(ML_SERVING_WORKERS="2", ML_SERVING_LOG_LEVEL="INFO")
    worker_pids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(descendants(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        worker_pids = descendants(proc.pid)
        assert len(worker_pids) == 2, proc.log()
        proc.wait_ready()

        os.kill(proc.pid, signal.SIGKILL)  # no chance to forward anything to its workers
        proc.popen.wait(10)
        deadline = time.monotonic() + 15
        while any(map(_alive, worker_pids)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in worker_pids if _alive(pid)], proc.log(50)
        assert not _listening(proc.port), "the port is still taken: a restart would fail"
        assert proc.log(50).count("supervisor gone") == 2
    finally:
        for pid in worker_pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.stop()


def test_a_worker_started_after_its_supervisor_died_exits_at_once(tmp_path: Path) -> None:
    # The race a parent-death signal set after fork has: the supervisor is gone before the
    # worker watches. The lifeline's write end closed first, so the worker sees EOF at once.
    read_end, write_end = os.pipe()
    os.close(write_end)
    env = _clean_env(ML_SERVING_PORT="0", ML_SERVING_METRICS_PORT="0")
    env[workers.SUPERVISOR_FD_ENV] = str(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ml_serving"],
            env=env,
            cwd=REPO,
            pass_fds=(read_end,),
            capture_output=True,
            text=True,
            timeout=90,
        )
    finally:
        os.close(read_end)
    assert done.returncode == 0, done.stderr
    assert "supervisor gone" in done.stderr


# --- taken ports ------------------------------------------------------------------------------


def _clean_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_SERVING_")}
    env.pop(workers.SUPERVISOR_FD_ENV, None)
    env.update(
        ML_SERVING_HOST="127.0.0.1",
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        ML_SERVING_LOG_LEVEL="INFO",
        **settings,
    )
    return env


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else listens on (SO_REUSEADDR off: nobody may share it)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def _run_server(**settings: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ml_serving"],
        env=_clean_env(**settings),
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=90,
    )


def _our_error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if '"level": "ERROR"' in line]


def test_a_taken_grpc_port_is_one_line_naming_it_and_exit_2(taken_port: int) -> None:
    done = _run_server(ML_SERVING_PORT=str(taken_port), ML_SERVING_METRICS_PORT="0")
    assert done.returncode == workers.CONFIG_ERROR_EXIT, done.stderr
    assert "Traceback" not in done.stderr
    errors = _our_error_lines(done.stderr)
    assert len(errors) == 1, done.stderr
    assert f"gRPC port {taken_port}" in errors[0] and "ML_SERVING_PORT" in errors[0]


def test_a_taken_metrics_port_is_one_line_naming_it_and_exit_2(taken_port: int) -> None:
    done = _run_server(ML_SERVING_PORT="0", ML_SERVING_METRICS_PORT=str(taken_port))
    assert done.returncode == workers.CONFIG_ERROR_EXIT, done.stderr
    # Nor the "Exception ignored in Server.__del__" of the gRPC server started before it.
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr
    errors = _our_error_lines(done.stderr)
    assert len(errors) == 1, done.stderr
    assert f"metrics port {taken_port}" in errors[0] and "ML_SERVING_METRICS_PORT" in errors[0]


# --- promote on a registry that cannot be written ---------------------------------------------


@pytest.fixture
def registry_copy(tmp_path: Path) -> Path:
    """A copy of the shipped registry, to break without touching the repository's."""
    root = tmp_path / "models"
    shutil.copytree(REPO / "models", root)
    return root


def _promoted(root: Path) -> tuple[Path, str, str]:
    """The PROMOTED file of the one shipped model, its model name and its version."""
    (promoted,) = root.glob("*/PROMOTED")
    return promoted, promoted.parent.name, promoted.read_text().strip()


# Files may not grow past 0 bytes, so every write fails (EFBIG), root's too: a read-only mode
# does not stop root, and mounting a read-only file system needs privileges. Set in the child
# itself (preexec_fn is unsafe in a process with threads, as pytest's may be).
_NO_WRITES = (
    "import resource, runpy, signal, sys; "
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0)); "
    "sys.argv[0] = 'scoring'; "
    "runpy.run_module('ml_serving.scoring', run_name='__main__')"
)


def _promote(
    root: Path, name: str, version: str, *, no_writes: bool = False
) -> subprocess.CompletedProcess[str]:
    python = [sys.executable, "-c", _NO_WRITES] if no_writes else [sys.executable, "-m"]
    module = [] if no_writes else ["ml_serving.scoring"]
    return subprocess.run(
        [*python, *module, "promote", "--root", str(root), "--name", name, "--version", version],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_promote_that_cannot_write_is_one_line_naming_the_file_and_exit_2(
    registry_copy: Path,
) -> None:
    promoted, name, version = _promoted(registry_copy)
    done = _promote(registry_copy, name, version, no_writes=True)
    assert done.returncode == workers.CONFIG_ERROR_EXIT, done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert str(promoted.parent) in done.stderr
    assert promoted.read_text().strip() == version  # untouched


def test_promote_with_a_directory_for_promoted_is_one_line_naming_it_and_exit_2(
    registry_copy: Path,
) -> None:
    promoted, name, version = _promoted(registry_copy)
    promoted.unlink()
    promoted.mkdir()  # a directory where the file should be: reading it fails (EISDIR)
    done = _promote(registry_copy, name, version)
    assert done.returncode == workers.CONFIG_ERROR_EXIT, done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert str(promoted) in done.stderr


def test_the_old_registry_command_says_where_the_command_went() -> None:
    # `python -m ml_serving.scoring.registry` was the CLI before it moved (an import circle):
    # an old script that runs it fails loudly instead of exiting 0 having done nothing.
    done = subprocess.run(
        [sys.executable, "-m", "ml_serving.scoring.registry", "list"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "run `python -m ml_serving.scoring` (list, promote, shadow)" in done.stderr
