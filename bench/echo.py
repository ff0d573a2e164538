"""The gRPC ceiling: a bare grpc.aio server of the same flavour as ours (same options, same event
loop) whose generic handler returns every request's bytes unchanged.

`python -m bench.echo [--port 0] [--no-uvloop]` prints "PORT <n>" once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

import grpc

from ml_serving.config import Settings
from ml_serving.server import grpc_options


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


async def start_echo(host: str = "127.0.0.1", port: int = 0) -> tuple[grpc.aio.Server, int]:
    """Start the echo server with our server's channel options; return it and its port."""
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    server = grpc.aio.server(options=grpc_options(settings))
    server.add_generic_rpc_handlers((EchoHandler(),))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound


async def _serve(port: int) -> None:
    server, bound = await start_echo(port=port)
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
    args = parser.parse_args(argv)
    if args.uvloop:
        import uvloop

        uvloop.run(_serve(args.port))
    else:
        asyncio.run(_serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
