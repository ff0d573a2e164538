"""Byte-compile what `python -m ml_serving` imports, into .venv, once (`make install-runtime`).

The runtime install skips byte-compiling (--no-compile: thousands of LiteLLM modules the server
never imports). Python compiles the ones it imports on the first start, but not where
PYTHONDONTWRITEBYTECODE is set (common in containers): there every start compiled them again.
This imports what a start and its warm-up import, with bytecode writing on, and nothing more.
"""

from __future__ import annotations

import asyncio
import sys
import time


async def _warm_gateway() -> None:
    from ml_serving.generation.llm import gateway

    llm = gateway.LLMGateway(gateway.offline_routes())
    try:
        await llm.warm_up()
    finally:
        await llm.aclose()


def main() -> int:
    """Import the server and warm the offline LLM route, writing .pyc files as Python goes."""
    if sys.dont_write_bytecode:
        print(
            "precompile: bytecode writing is off (unset PYTHONDONTWRITEBYTECODE)", file=sys.stderr
        )
        return 2
    started = time.perf_counter()
    import uvloop  # noqa: F401 - what __main__ runs the loop on

    import ml_serving.__main__  # noqa: F401 - the server and everything it imports at start

    asyncio.run(_warm_gateway())
    print(f"precompile: {len(sys.modules)} modules in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
