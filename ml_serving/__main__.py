"""Entry point: `python -m ml_serving` loads Settings, sets up logging, serves until signalled."""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import signal
import sys

from pydantic import ValidationError

from ml_serving.api import security, server, workers
from ml_serving.config import Settings
from ml_serving.errors import ServingError
from ml_serving.observability import logs, tracing
from ml_serving.scoring.registry import RegistryError

logger = logging.getLogger("ml_serving")

# What a socket bind raises for a port that is taken, an address this host does not have, or a
# privileged port: an OSError without a file name (file errors, TLS files say, carry theirs).
_BIND_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})


class StartFailure(Exception):
    """The server could not start for a reason of configuration or environment (exit 2)."""


def start_failure(settings: Settings, exc: BaseException) -> str | None:
    """The one line saying why ``server.start`` failed, or None for an unexpected error (a bug,
    left to its traceback)."""
    if isinstance(exc, RuntimeError):
        # grpc raises a bare RuntimeError("Failed to bind to address ...") when
        # add_insecure_port cannot bind, with no errno: taken, or an address not on this host.
        if not str(exc).startswith("Failed to bind"):
            return None
        return (
            f"cannot start: gRPC port {settings.port} on {settings.host} is in use or not "
            "available (ML_SERVING_PORT, ML_SERVING_HOST)"
        )
    if isinstance(exc, OSError) and exc.filename is None and exc.errno in _BIND_ERRNOS:
        # The only socket server.start binds itself is prometheus' /metrics one.
        return (
            f"cannot start: metrics port {settings.metrics_port} on {settings.host}: "
            f"{exc.strerror} (ML_SERVING_METRICS_PORT)"
        )
    if isinstance(exc, ServingError | ValueError | OSError | RegistryError):
        return f"cannot start: {exc}"
    return None


async def serve(settings: Settings, supervisor_fd: int | None = None) -> None:
    """Start the server, drain on SIGTERM/SIGINT (or when the supervisor whose lifeline pipe is
    ``supervisor_fd`` dies), return when stopped."""
    try:
        app = await server.start(settings)
    except Exception as exc:
        message = start_failure(settings, exc)
        if message is None:
            raise
    else:
        message = None
    if message is not None:
        # server.start may fail after its gRPC server started (the metrics port is bound
        # after it); that server was held by the exception's traceback, dropped above. Collect
        # it now, while this loop runs, so that its finaliser schedules its shutdown here: once
        # the loop has closed, it prints "Exception ignored in Server.__del__" and a traceback.
        gc.collect()
        await asyncio.sleep(0)
        raise StartFailure(message)
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def stop() -> None:
        if not stopping:
            stopping.append(loop.create_task(app.stop()))

    def on_signal(signum: int) -> None:
        logger.info("signal received", extra={"signal": signal.Signals(signum).name})
        stop()

    def on_supervisor_gone() -> None:
        logger.warning("supervisor gone (its lifeline pipe closed): draining, then exiting")
        stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    if supervisor_fd is not None:
        workers.watch_supervisor(loop, supervisor_fd, on_supervisor_gone)
    await app.wait_stopped()
    if app.failure:
        raise StartFailure(f"cannot start: {app.failure}")


def _secrets(settings: Settings) -> list[str]:
    """What the log filter must never let through: the service token and any key-like
    environment value (LLM provider keys come from the environment)."""
    secrets = logs.secret_env_values(os.environ)
    if settings.auth_token is not None:
        secrets.append(settings.auth_token.get_secret_value())
    return secrets


def _supervisor_fd() -> int | None:
    value = os.environ.get(workers.SUPERVISOR_FD_ENV, "")
    return int(value) if value.isdigit() else None


def main() -> int:
    """Run the server; exit 0 after a drain, 2 on a configuration or environment error."""
    # Before anything else runs: a poisoned environment must not get to serve (or read keys).
    problems = security.supply_chain_problems()
    if problems:
        print("ml-serving: refusing to start in this environment:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return workers.CONFIG_ERROR_EXIT
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"ml-serving: invalid configuration:\n{exc}", file=sys.stderr)
        return workers.CONFIG_ERROR_EXIT
    supervise = settings.workers > 1 or bool(settings.generate_port)
    lowered: tuple[int, bool] | None = None
    if settings.generate_only and not supervise:
        # Before logs.configure starts its writer thread: threads inherit their creator's
        # priority, and every thread of a Generate-port process must run below Score's. (A
        # supervisor of Generate-only workers stays as it is: each worker lowers its own.)
        lowered = workers.lower_priority(settings.generate_nice, idle=settings.generate_sched_idle)
    logs.configure(settings.log_level, settings.log_json, secrets=_secrets(settings))
    if supervise:
        return workers.Supervisor(settings).run()
    if lowered is not None:
        logger.info(
            "serving Generate and GenerateStream only",
            extra={"nice": lowered[0], "sched_idle": lowered[1]},
        )
    tracing.configure(
        settings.otel_traces_exporter,
        settings.otel_exporter_otlp_endpoint,
        settings.otel_service_name,
    )
    runner = asyncio.run
    if settings.uvloop:
        import uvloop

        runner = uvloop.run
    try:
        runner(serve(settings, _supervisor_fd()))
    except StartFailure as exc:
        logger.error("%s", exc)
        return workers.CONFIG_ERROR_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
