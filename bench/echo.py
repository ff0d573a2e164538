"""The gRPC ceiling: a bare grpc.aio server of the same flavour as ours (same options, same event
loop) whose generic handler returns every request's bytes unchanged.

`python -m bench.echo [--port 0] [--no-uvloop] [--workers N]` prints "PORT <n>" once listening.
With --workers N it runs N such servers on one port (SO_REUSEPORT), like ML_SERVING_WORKERS.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
from typing import Any

import grpc

from bench.procs import free_port
from ml_serving.api.server import grpc_options
from ml_serving.config import Settings


async def _echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return request


class EchoHandler(grpc.GenericRpcHandler):
    """Answers every unary method with the request bytes (no (de)serialization at all)."""

    def __init__(self) -> None:
        self._handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(
            _echo
        )

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes]:
        return self._handler


def server_uvloop_default() -> bool:
    """Whether our server runs on uvloop unless told otherwise (Settings.uvloop's default)."""
    return bool(Settings.model_fields["uvloop"].default)


async def start_echo(
    host: str = "127.0.0.1", port: int = 0, reuse_port: bool = False
) -> tuple[grpc.aio.Server, int]:
    """Start the echo server with our server's channel options; return it and its port."""
    settings = Settings(_env_file=None, reuse_port=reuse_port)  # type: ignore[call-arg]
    server = grpc.aio.server(options=grpc_options(settings))
    server.add_generic_rpc_handlers((EchoHandler(),))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound


async def _serve(port: int, reuse_port: bool) -> None:
    server, bound = await start_echo(port=port, reuse_port=reuse_port)
    print(f"PORT {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--uvloop", action=argparse.BooleanOptionalAction, default=server_uvloop_default()
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.workers > 1:
        return _supervise(args.workers, args.port, args.uvloop)
    if args.uvloop:
        import uvloop

        uvloop.run(_serve(args.port, args.reuse_port))
    else:
        asyncio.run(_serve(args.port, args.reuse_port))
    return 0


def _supervise(workers: int, port: int, use_uvloop: bool) -> int:
    """Run `workers` echo servers on one port; stop them all on SIGTERM/SIGINT."""
    port = port or free_port()
    argv = [
        sys.executable,
        "-m",
        "bench.echo",
        f"--port={port}",
        "--reuse-port",
        "--uvloop" if use_uvloop else "--no-uvloop",
    ]
    children = [subprocess.Popen(argv, stdout=subprocess.PIPE) for _ in range(workers)]
    for child in children:
        assert child.stdout is not None
        if not child.stdout.readline().startswith(b"PORT "):
            raise SystemExit("an echo worker did not start")
    print(f"PORT {port}", flush=True)

    def stop(signum: int, frame: object) -> None:
        for child in children:
            child.send_signal(signal.SIGTERM)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    for child in children:
        child.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
