"""The processes the bench starts: our server (`python -m ml_serving`), the echo server and the
fake LLM upstream (with the LiteLLM route to it); each on loopback, watched through /proc."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.scenarios import REPO
from ml_serving.api.rpc import SERVICE

SERVICE_NAME = SERVICE
UPSTREAM_KEY = "sk-bench-not-a-secret"
"""The fake upstream's API key: our server sends it from BENCH_UPSTREAM_KEY, as from a real key."""
LLM_ALIAS = "bench-upstream"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (not idle or waiting on I/O) since boot."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / _CLK_TCK


def free_port() -> int:
    """A port free on 127.0.0.1 right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """The parent's environment without ML_SERVING_* / DEFAULT_PROMPT_VERSION, plus `extra`:
    the bench decides every server setting it does not leave at its default."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ML_SERVING_") and k != "DEFAULT_PROMPT_VERSION"
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    env.update(extra)
    return env


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the bench process dies (Linux), so no
    server outlives an interrupted run."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def stat_fields(path: str) -> list[str]:
    """The fields of a /proc/<pid>/stat (or .../task/<tid>/stat) file after the command name:
    [0] state, [1] parent pid, [11] user and [12] system CPU ticks. Raises OSError once gone."""
    with open(path) as f:
        return f.read().rpartition(")")[2].split()


def cpu_s(fields: list[str]) -> float:
    """User + system CPU seconds from `stat_fields`."""
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _proc_table() -> dict[int, tuple[int, float]]:
    """Every live process: pid -> (parent pid, user + system CPU seconds), one pass of /proc."""
    table: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = stat_fields(f"/proc/{entry}/stat")
        except OSError:
            continue  # exited meanwhile
        table[int(entry)] = (int(fields[1]), cpu_s(fields))
    return table


def descendants(pid: int, table: dict[int, tuple[int, float]] | None = None) -> list[int]:
    """Every live descendant of pid (children, their children, ...), from /proc."""
    table = _proc_table() if table is None else table
    found: list[int] = []
    frontier = [pid]
    while frontier:
        current = frontier.pop()
        children = [p for p, (ppid, _) in table.items() if ppid == current]
        found.extend(children)
        frontier.extend(children)
    return found


class Proc:
    """A child process with its log file; stats from /proc/<pid>."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path, cwd: Path):
        self.name = name
        self.log = log
        self._log_file: IO[bytes] = log.open("wb")
        self.popen = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE if name != "server" else self._log_file,
            stderr=self._log_file,
            preexec_fn=_die_with_parent,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def read_port(self, timeout_s: float = 60.0) -> int:
        """Wait for the child's "PORT <n>" line (echo server, upstream)."""
        assert self.popen.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.popen.stdout.readline().decode()
            if line.startswith("PORT "):
                return int(line.split()[1])
            if not line and self.popen.poll() is not None:
                break
        raise RuntimeError(f"{self.name} did not start:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        self._log_file.flush()
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def alive(self) -> bool:
        return self.popen.poll() is None

    def pids(self) -> list[int]:
        """This process and its descendants (a supervisor's workers); [] once it has exited."""
        if not self.alive():
            return []
        return [self.pid, *descendants(self.pid)]

    def status_kb(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS) in KiB, summed over the process tree; {} once exited.

        With workers the peak is the sum of each process's own peak (an upper bound: they need
        not peak at the same moment)."""
        out: dict[str, int] = {}
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        key, _, value = line.partition(":")
                        if key in ("VmRSS", "VmHWM"):
                            out[key] = out.get(key, 0) + int(value.split()[0])
            except OSError:
                continue  # exited meanwhile
        return out

    def reset_peak(self) -> bool:
        """Reset VmHWM to the current RSS (Linux clear_refs 5); False when not allowed."""
        try:
            for pid in self.pids():
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")
            return True
        except OSError:
            return False

    def cpu_s(self) -> float:
        """User + system CPU seconds of the process tree (all threads) so far; 0 once exited."""
        if not self.alive():
            return 0.0
        table = _proc_table()
        tree = [self.pid, *descendants(self.pid, table)]
        return sum(table[pid][1] for pid in tree if pid in table)

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                stream.close()
        self._log_file.close()


def start_server(
    env_extra: dict[str, str], log: Path, cwd: Path, workers: int = 1
) -> tuple[Proc, int]:
    """`python -m ml_serving` on a free loopback port, metrics off; returns once the process
    listens (see wait_ready for readiness)."""
    port = free_port()
    env = clean_env(
        ML_SERVING_HOST="127.0.0.1",
        ML_SERVING_PORT=str(port),
        ML_SERVING_METRICS_PORT="0",
        ML_SERVING_SHUTDOWN_GRACE_S="5",
        ML_SERVING_WORKERS=str(workers),
        **env_extra,
    )
    proc = Proc("server", [sys.executable, "-m", "ml_serving"], env, log, cwd)
    return proc, port


def wait_ready(proc: Proc, port: int, timeout_s: float = 120.0, workers: int = 1) -> float:
    """Poll health for mlserving.v1.InferenceService until SERVING; return seconds waited.

    With workers, each poll opens a new connection (the kernel hands it to any worker), and
    readiness needs 8 SERVING answers in a row per worker: the chance that one not-ready worker
    is missed that often is below 1 in 250 even with 2 workers."""
    started = time.monotonic()
    deadline = started + timeout_s
    needed = 1 if workers == 1 else 8 * workers
    streak = 0
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"server exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        if _serving(port):
            streak += 1
            if streak >= needed:
                return time.monotonic() - started
            continue
        streak = 0
        time.sleep(0.2)
    raise RuntimeError(f"server not SERVING after {timeout_s:.0f}s:\n{proc.log_tail()}")


def _serving(port: int) -> bool:
    options = [("grpc.use_local_subchannel_pool", 1)]  # a new connection every time
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1)
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def health(port: int, timeout_s: float = 5.0) -> dict[str, Any]:
    """One readiness check: {"status": SERVING | NOT_SERVING | <gRPC code>, "ms": latency}."""
    started = time.monotonic()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout_s
            )
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as exc:
            status = exc.code().name
    return {"status": status, "ms": round((time.monotonic() - started) * 1e3, 1)}


def start_echo(uvloop: bool, log: Path, cwd: Path, workers: int = 1) -> tuple[Proc, int]:
    argv = [
        sys.executable,
        "-m",
        "bench.echo",
        "--uvloop" if uvloop else "--no-uvloop",
        f"--workers={workers}",
    ]
    proc = Proc("echo", argv, clean_env(), log, cwd)
    return proc, proc.read_port()


def start_upstream(ttft_s: float, token_delay_s: float, log: Path, cwd: Path) -> tuple[Proc, int]:
    argv = [
        sys.executable,
        "-m",
        "bench.upstream",
        f"--ttft={ttft_s}",
        f"--token-delay={token_delay_s}",
    ]
    proc = Proc("upstream", argv, clean_env(), log, cwd)
    return proc, proc.read_port()


def write_llm_config(path: Path, upstream_port: int) -> Path:
    """A LiteLLM model_list with one route to the fake upstream (model "ok" = normal answers)."""
    config = {
        "model_list": [
            {
                "model_name": LLM_ALIAS,
                "litellm_params": {
                    "model": "openai/ok",
                    "api_base": f"http://127.0.0.1:{upstream_port}/v1",
                    "api_key": "os.environ/BENCH_UPSTREAM_KEY",
                    "timeout": 60,
                },
            }
        ],
        # No retries and no cooldowns: an upstream failure must show up as an error here.
        "router_settings": {"num_retries": 0, "disable_cooldowns": True},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def upstream_stats(proc: Proc, reset: bool = False) -> dict[str, Any]:
    """The upstream's counters; with reset, the peak restarts from now (after this reading)."""
    return _upstream_command(proc, "reset" if reset else "stats")


def upstream_pace(proc: Proc, ttft_s: float, token_delay_s: float) -> None:
    """Change the upstream's TTFT and delay between tokens for the calls that follow."""
    _upstream_command(proc, f"pace {ttft_s} {token_delay_s}")


def _upstream_command(proc: Proc, command: str) -> dict[str, Any]:
    assert proc.popen.stdin is not None and proc.popen.stdout is not None
    proc.popen.stdin.write(command.encode() + b"\n")
    proc.popen.stdin.flush()
    line = proc.popen.stdout.readline().decode()
    return {k: int(v) for k, v in (pair.split("=") for pair in line.split())}
