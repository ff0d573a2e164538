"""The fake LLM upstream for the bench: tests.fake_openai with its ttft / per-token delays, plus
a whole-generation delay for non-streaming calls (a real LLM answers those only when done) and
a control channel on stdin: each line ("stats", "reset" the peak, "pace TTFT DELAY") is
answered with one line of counters (peak concurrent requests among them).

`python -m bench.upstream [--ttft 0.1] [--token-delay 0.01]` prints "PORT <n>" once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.support.fake_openai import FakeOpenAI


@dataclass
class BenchUpstream(FakeOpenAI):
    """FakeOpenAI whose non-streaming answers take as long as its streams would."""

    peak_in_progress: int = 0
    backlog: int = 4096
    """Listen backlog: aiohttp's default (128) drops SYNs when 1,000 clients connect at once,
    and the retried connects (1 s, 3 s, 7 s later) would be billed to the server under test."""

    async def start(self) -> BenchUpstream:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=self.backlog)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def _answer(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        self.peak_in_progress = max(self.peak_in_progress, self.in_progress)
        if not body.get("stream") and str(body.get("model", "ok")) == "ok":
            tokens = min(self.tokens, int(body.get("max_tokens") or self.tokens))
            await asyncio.sleep(self.ttft_s + self.token_delay_s * max(tokens - 1, 0))
        return await super()._answer(request, body)

    def stats(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "completed": self.completed,
            "cancelled": self.cancelled,
            "in_progress": self.in_progress,
            "peak_in_progress": self.peak_in_progress,
        }


async def _serve(ttft_s: float, token_delay_s: float) -> None:
    fake = await BenchUpstream(ttft_s=ttft_s, token_delay_s=token_delay_s).start()
    print(f"PORT {fake.port}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    # Stats on request: one line of "key=value" pairs per line read on stdin.
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def answer_stats() -> None:
        while line := await reader.readline():
            stats = fake.stats()
            command, *args = line.decode().split()
            if command == "reset":
                fake.peak_in_progress = fake.in_progress
            elif command == "pace":
                fake.ttft_s, fake.token_delay_s = float(args[0]), float(args[1])
            print(" ".join(f"{k}={v}" for k, v in stats.items()), flush=True)
        stop.set()  # stdin closed: the bench that started us is gone

    task = asyncio.create_task(answer_stats())
    await stop.wait()
    task.cancel()
    await fake.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__)
    parser.add_argument("--ttft", type=float, default=0.1, help="seconds before the first token")
    parser.add_argument("--token-delay", type=float, default=0.01, help="seconds between tokens")
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(_serve(args.ttft, args.token_delay))
    return 0


if __name__ == "__main__":
    sys.exit(main())
