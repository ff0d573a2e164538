"""Entry point: `python -m ml_serving` loads Settings, sets up logging, serves until signalled."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from pydantic import ValidationError

from ml_serving.api import security, server, workers
from ml_serving.config import Settings
from ml_serving.errors import ServingError
from ml_serving.observability import logs, tracing

logger = logging.getLogger("ml_serving")


async def serve(settings: Settings) -> None:
    """Start the server, drain on SIGTERM/SIGINT, return when stopped."""
    app = await server.start(settings)
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def on_signal(signum: int) -> None:
        logger.info("signal received", extra={"signal": signal.Signals(signum).name})
        if not stopping:
            stopping.append(loop.create_task(app.stop()))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await app.wait_stopped()
    if app.failure:
        raise ValueError(app.failure)


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
    logs.configure(settings.log_level, settings.log_json)
    if settings.workers > 1:
        return workers.Supervisor(settings).run()
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
        runner(serve(settings))
    except (ServingError, ValueError, OSError) as exc:
        logger.error("cannot start: %s", exc)
        return workers.CONFIG_ERROR_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
