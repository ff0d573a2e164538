"""Worker-process mode: a supervisor runs N servers that share the gRPC port (SO_REUSEPORT).

One grpc.aio server runs its Python on one core at a time (the GIL), so one process cannot use
a host's other cores. With ML_SERVING_WORKERS=N, `python -m ml_serving` becomes this supervisor:
it starts N ordinary server processes with ML_SERVING_REUSE_PORT=true, and the kernel spreads
incoming *connections* across them (a single client connection stays on one worker, so a client
that wants all of them opens several). Worker k serves /metrics on ML_SERVING_METRICS_PORT + k.

With ML_SERVING_GENERATE_PORT set, the supervisor also runs ML_SERVING_GENERATE_WORKERS
processes on that port (the split topology): ordinary servers with ML_SERVING_GENERATE_ONLY,
which serve Generate and GenerateStream only, at a lower CPU priority (ML_SERVING_GENERATE_NICE
and, by default, SCHED_IDLE, set by each of them on every one of its threads), so that Score's
processes never run an LLM relay on their event loop and get the cores first. The main port
keeps serving every method. Worker k of either kind serves /metrics on
ML_SERVING_METRICS_PORT + k, the Generate port's after the main port's.

The supervisor forwards SIGTERM/SIGINT (each worker drains as usual), restarts a worker that
dies while serving, and gives up (exit 1) when one keeps dying right after start, or at once
(exit 2) when a worker reports a configuration error. Workers drain and exit when the supervisor
dies, however it dies (kill -9 included): each holds the read end of a pipe whose write end only
the supervisor has, and the kernel closes that when the supervisor's process ends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import FrameType

from ml_serving.config import Settings

logger = logging.getLogger(__name__)

CONFIG_ERROR_EXIT = 2
"""What `python -m ml_serving` exits with on a configuration or environment error."""
_POLL_S = 0.2
_QUICK_DEATH_S = 10.0
"""A worker that dies sooner than this after starting counts towards giving up."""
_MAX_QUICK_DEATHS = 5
"""Quick deaths in a row (no worker lasting longer in between) before the supervisor gives up."""
_KILL_MARGIN_S = 10.0
"""Beyond the drain grace, how long workers get before they are killed."""
SUPERVISOR_FD_ENV = "ML_SERVING_SUPERVISOR_FD"
"""Set in a worker's environment by the supervisor (not an operator setting): the worker's file
descriptor for the read end of the supervisor's lifeline pipe."""


def worker_count(settings: Settings) -> int:
    """Processes the supervisor runs: the main port's, then the Generate port's (if set)."""
    return settings.workers + (settings.generate_workers if settings.generate_port else 0)


def serves_generate_port(settings: Settings, index: int) -> bool:
    """Whether worker `index` is one of the Generate port's (they come after the main port's)."""
    return bool(settings.generate_port) and index >= settings.workers


def worker_env(
    settings: Settings, index: int, base: Mapping[str, str], lifeline_fd: int | None = None
) -> dict[str, str]:
    """The environment of worker `index`: the supervisor's, as one server on the main port or
    the Generate port (watching `lifeline_fd` for the supervisor's end, when given). Port reuse
    is on where more than one process shares a port."""
    env = dict(base)
    generate = serves_generate_port(settings, index)
    sharing = settings.generate_workers if generate else settings.workers
    env["ML_SERVING_WORKERS"] = "1"
    env["ML_SERVING_REUSE_PORT"] = "true" if sharing > 1 else "false"
    # A worker never supervises: it serves one port, in one role.
    env["ML_SERVING_GENERATE_PORT"] = "0"
    # Generate-only workers under this supervisor (ML_SERVING_GENERATE_ONLY with several
    # ML_SERVING_WORKERS, no Generate port) stay Generate-only.
    env["ML_SERVING_GENERATE_ONLY"] = "true" if generate or settings.generate_only else "false"
    if generate:
        env["ML_SERVING_PORT"] = str(settings.generate_port)
    metrics_port = settings.metrics_port + index if settings.metrics_port else 0
    env["ML_SERVING_METRICS_PORT"] = str(metrics_port)
    env.pop(SUPERVISOR_FD_ENV, None)
    if lifeline_fd is not None:
        env[SUPERVISOR_FD_ENV] = str(lifeline_fd)
    return env


def lower_priority(increment: int, idle: bool = False) -> tuple[int, bool]:
    """Lower this process's CPU priority by `increment` (nice) on every thread it has, and with
    `idle` put every thread under Linux's SCHED_IDLE policy; return the new niceness and
    whether SCHED_IDLE took.

    Linux keeps a niceness and a policy per thread: os.nice would change the calling thread
    only, and the threads started at import (OpenBLAS's, one per core) would keep the old ones.
    Threads started later inherit their creator's, so call this before starting any (the
    server's, the log writer's). Why SCHED_IDLE: at nice +10 a busy Generate thread still holds
    a core until the scheduler's next tick decides, so a Score call that wakes meanwhile waits;
    a SCHED_IDLE thread is preempted the moment a normal one wakes (measured by `python -m
    bench.isolation`, 2 cores: Score's p99 beside saturating Generate 1.6-2.0x alone at nice
    +10, 1.08-1.16x under SCHED_IDLE, Generate's calls/s unchanged). Lowering is always allowed,
    so neither needs a capability.
    """
    target = min(19, os.getpriority(os.PRIO_PROCESS, 0) + increment)
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:  # no /proc (not Linux): the process's niceness is all there is
        threads = [0]
    sched_idle = idle and hasattr(os, "SCHED_IDLE")
    for tid in threads:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, target)
            if sched_idle:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        except ProcessLookupError:
            continue  # ended meanwhile
    return target, sched_idle


def watch_supervisor(loop: asyncio.AbstractEventLoop, fd: int, on_gone: Callable[[], None]) -> None:
    """Call `on_gone` once when the supervisor's lifeline pipe `fd` reaches end of file.

    Nothing is ever written to the pipe: end of file means every write end is closed, which
    happens when the supervisor's process ends. Had it ended before this call (while the worker
    was starting), the end of file is already there and `on_gone` runs at the loop's next turn.
    """
    os.set_blocking(fd, False)

    def readable() -> None:
        try:
            data = os.read(fd, 64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            return  # never sent; tolerate it rather than treat it as the end
        loop.remove_reader(fd)
        os.close(fd)
        on_gone()

    loop.add_reader(fd, readable)


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)


class Supervisor:
    """Starts, watches and stops the worker processes (see the module docstring)."""

    def __init__(self, settings: Settings, command: list[str] | None = None) -> None:
        self.settings = settings
        self.command = command or [sys.executable, "-m", "ml_serving"]
        self.workers: dict[int, _Worker] = {}
        self.stopping = False
        self.quick_deaths = 0
        self._kill_after = float("inf")
        self._lifeline: tuple[int, int] | None = None
        """(read end, write end): every worker inherits the read end; only we hold the write
        end, so the kernel closing it at our exit is the workers' signal to drain and exit."""

    def run(self) -> int:
        """Serve until signalled or a worker fails for good; return the exit code."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        if self._lifeline is None:
            self._lifeline = os.pipe()  # not inheritable: only pass_fds hands the read end on
        settings = self.settings
        logger.info(
            "supervisor starting workers",
            extra={
                "workers": settings.workers,
                "port": settings.port,
                "generate_workers": settings.generate_workers if settings.generate_port else 0,
                "generate_port": settings.generate_port or None,
            },
        )
        for index in range(worker_count(settings)):
            self._start(index)
        code = 0
        while self.workers:
            time.sleep(_POLL_S)
            if self.stopping and time.monotonic() > self._kill_after:
                for worker in self.workers.values():
                    _signal(worker.process, signal.SIGKILL)
            for worker in list(self.workers.values()):
                status = worker.process.poll()
                if status is None:
                    continue
                del self.workers[worker.index]
                if self.stopping:
                    code = max(code, status)
                    continue
                code = self._on_unexpected_exit(worker, status)
                if code:
                    self.stop()
        logger.info("supervisor stopped", extra={"exit_code": code})
        return code

    def stop(self) -> None:
        """Ask every worker to drain (SIGTERM); run() kills any left after the grace period."""
        if self.stopping:
            return
        self.stopping = True
        self._kill_after = time.monotonic() + self.settings.shutdown_grace_s + _KILL_MARGIN_S
        for worker in self.workers.values():
            _signal(worker.process, signal.SIGTERM)

    def _start(self, index: int) -> None:
        assert self._lifeline is not None, "run() creates the lifeline before any worker"
        read_end = self._lifeline[0]
        env = worker_env(self.settings, index, os.environ, lifeline_fd=read_end)
        process = subprocess.Popen(self.command, env=env, pass_fds=(read_end,))
        self.workers[index] = _Worker(index, process)
        generate = serves_generate_port(self.settings, index)
        logger.info(
            "worker started",
            extra={
                "worker": index,
                "pid": process.pid,
                "role": "generate" if generate else "main",
                "port": self.settings.generate_port if generate else self.settings.port,
            },
        )

    def _on_unexpected_exit(self, worker: _Worker, status: int) -> int:
        """Restart the worker, or return a non-zero exit code to give up with."""
        logger.error(
            "worker exited while serving", extra={"worker": worker.index, "exit_code": status}
        )
        if status == CONFIG_ERROR_EXIT:
            return CONFIG_ERROR_EXIT
        if time.monotonic() - worker.started < _QUICK_DEATH_S:
            self.quick_deaths += 1
            if self.quick_deaths >= _MAX_QUICK_DEATHS:
                logger.error("workers keep dying at start; giving up")
                return 1
        else:
            self.quick_deaths = 0  # a worker that served for a while: start counting afresh
        self._start(worker.index)
        return 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        logger.info("signal received", extra={"signal": signal.Signals(signum).name})
        self.stop()


def _signal(process: subprocess.Popen[bytes], signum: int) -> None:
    if process.poll() is None:
        process.send_signal(signum)
