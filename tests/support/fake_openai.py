"""An OpenAI-compatible chat completions server for tests and the bench, on 127.0.0.1.

The requested model name picks the behaviour, so one server covers every fault:
``ok`` (JSON or SSE), ``status-500``, ``status-429``, ``status-400``, ``slow`` (waits
``delay_s`` before answering), ``broken-stream`` (drops the connection half way),
``malformed`` (invalid JSON body / SSE data), ``huge`` (a 20 MiB answer), ``endless``
(ignores max_tokens: 200,000 tokens, streamed until the client closes), ``flood`` (a 50 MB
answer of one token, sent in 64 KiB pieces without a Content-Length, never held whole).
Streams send varied tokens, with ``ttft_s`` before the first and ``token_delay_s`` between
the others.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

WORDS = (
    "Tonight, set a phone alarm thirty minutes before bed and use it as your cue to dim "
    "the lights, put the phone on its charger outside the bedroom, and read one page."
).split(" ")


HUGE_CHARS = 20 * 1024 * 1024
"""The one token of the ``huge`` model (20 MiB), streamed or not."""
FLOOD_BYTES = 50 * 1000 * 1000
"""How long the ``flood`` model's answer is (a hostile upstream's), JSON or SSE."""
ENDLESS_TOKENS = 200_000
"""How much the ``endless`` model says, whatever max_tokens asked for (about 1.2 MB of text)."""


@dataclass
class FakeOpenAI:
    """The server's knobs and counters; start() binds it to an ephemeral loopback port."""

    ttft_s: float = 0.0
    token_delay_s: float = 0.0
    delay_s: float = 2.0
    tokens: int = len(WORDS)
    requests: int = 0
    in_progress: int = 0
    cancelled: int = 0
    completed: int = 0
    seen_auth: list[str] = field(default_factory=list)
    seen_bodies: list[dict[str, Any]] = field(default_factory=list)
    """Every request body received, in order (parity tests compare what two clients sent)."""
    seen_headers: list[dict[str, str]] = field(default_factory=list)
    """Every request's headers, lower-cased names."""
    _runner: web.AppRunner | None = None
    port: int = 0

    path = "/v1/chat/completions"
    """Where the fake answers (a class attribute: other formats' fakes serve elsewhere)."""
    auth_header = "Authorization"
    """The request header recorded in seen_auth."""

    @property
    def base_url(self) -> str:
        """The api_base to configure in a LiteLLM route."""
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> FakeOpenAI:
        app = web.Application()
        app.router.add_post(self.path, self._chat)
        # handler_cancellation: a client that hangs up cancels the handler, as real servers notice.
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, handler_cancellation=True
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.in_progress += 1
        self.seen_auth.append(request.headers.get(self.auth_header, ""))
        self.seen_headers.append({k.lower(): v for k, v in request.headers.items()})
        try:
            body = await request.json()
            self.seen_bodies.append(body)
            response = await self._answer(request, body)
            self.completed += 1
            return response
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_progress -= 1

    async def _answer(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        model = str(body.get("model", "ok"))
        if model.startswith("status-"):
            status = int(model.removeprefix("status-"))
            return web.json_response(
                {"error": {"message": f"fake {status}", "type": "fake", "code": status}},
                status=status,
            )
        if model == "slow":
            await asyncio.sleep(self.delay_s)
        if model == "flood":
            return await self._flood(request, stream=bool(body.get("stream")))
        if model == "malformed" and not body.get("stream"):
            return web.Response(text="{not json", content_type="application/json")
        max_tokens = int(body.get("max_tokens") or self.tokens)
        words = [WORDS[i % len(WORDS)] for i in range(min(self.tokens, max_tokens))]
        finish = "length" if max_tokens < self.tokens else "stop"
        if model == "huge":
            # A 200 answer far past any sane size, in one token: a broken or hostile upstream.
            words = ["x" * HUGE_CHARS]
            finish = "stop"
        if model == "endless":
            # Ignores max_tokens: a long answer, or a stream that goes on until it is closed.
            words = [WORDS[i % len(WORDS)] for i in range(ENDLESS_TOKENS)]
            finish = "stop"
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(words),
            "total_tokens": prompt_tokens + len(words),
        }
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": " ".join(words)},
                            "finish_reason": finish,
                        }
                    ],
                    "usage": usage,
                }
            )
        return await self._stream(request, model, words, finish, usage)

    async def _flood(self, request: web.Request, *, stream: bool) -> web.StreamResponse:
        """FLOOD_BYTES in one string field, chunked: the reader sees no length up front."""
        content_type = "text/event-stream" if stream else "application/json"
        response = web.StreamResponse(headers={"Content-Type": content_type})
        response.enable_chunked_encoding()
        await response.prepare(request)
        head = '{"id":"f","choices":[{"index":0,"message":{"content":"'
        if stream:
            head = 'data: {"id":"f","choices":[{"index":0,"delta":{"content":"'
        piece = b"x" * 65536
        try:
            await response.write(head.encode())
            for _ in range(FLOOD_BYTES // len(piece)):
                await response.write(piece)
            await response.write(b'"},"finish_reason":"stop"}]}' + (b"\n\n" if stream else b""))
        except ConnectionResetError:
            # The reader hung up part way (what a bounded reader does): counted as a cancel.
            self.cancelled += 1
        return response

    async def _stream(
        self,
        request: web.Request,
        model: str,
        words: list[str],
        finish: str,
        usage: dict[str, int],
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        def chunk(delta: dict[str, Any], finish_reason: str | None) -> bytes:
            payload = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            }
            return f"data: {json.dumps(payload)}\n\n".encode()

        await asyncio.sleep(self.ttft_s)
        for i, word in enumerate(words):
            if i:
                await asyncio.sleep(self.token_delay_s)
            if model == "broken-stream" and i == len(words) // 2:
                # Drop the connection mid-stream, as a crashing upstream would.
                assert request.transport is not None
                request.transport.close()
                return response
            if model == "malformed" and i == 2:
                await response.write(b"data: {not json\n\n")
                continue
            delta = {"role": "assistant", "content": word} if i == 0 else {"content": " " + word}
            await response.write(chunk(delta, None))
        await response.write(chunk({}, finish))
        tail = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "choices": [],
            "usage": usage,
        }
        await response.write(f"data: {json.dumps(tail)}\n\ndata: [DONE]\n\n".encode())
        return response
