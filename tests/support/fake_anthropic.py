"""An Anthropic Messages API server for tests and scripts, on 127.0.0.1 (POST /v1/messages).

The same conventions as tests.support.fake_openai, in Anthropic's format: the requested model
picks the behaviour (``ok``, ``status-<code>`` with Anthropic's error body, 529 = overloaded,
``slow``, ``broken-stream``, ``malformed``), and streams are Anthropic's named SSE events
(message_start, content_block_start/delta/stop, message_delta with the output tokens,
message_stop), with ``ttft_s`` before the first delta and ``token_delay_s`` between the others.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.support.fake_openai import WORDS, FakeOpenAI

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


@dataclass
class FakeAnthropic(FakeOpenAI):
    """FakeOpenAI's knobs and counters, answering in Anthropic's Messages format."""

    path = "/v1/messages"
    auth_header = "x-api-key"

    @property
    def base_url(self) -> str:
        """The api_base to configure in a LiteLLM anthropic/ route (LiteLLM adds /v1/messages)."""
        return f"http://127.0.0.1:{self.port}"

    async def _answer(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        model = str(body.get("model", "ok"))
        if model.startswith("status-"):
            status = int(model.removeprefix("status-"))
            kind = _ERROR_TYPES.get(status, "api_error")
            return web.json_response(
                {"type": "error", "error": {"type": kind, "message": f"fake {status}"}},
                status=status,
            )
        if model == "slow":
            await asyncio.sleep(self.delay_s)
        if model == "malformed" and not body.get("stream"):
            return web.Response(text="{not json", content_type="application/json")
        max_tokens = int(body.get("max_tokens") or self.tokens)
        words = [WORDS[i % len(WORDS)] for i in range(min(self.tokens, max_tokens))]
        stop = "max_tokens" if max_tokens < self.tokens else "end_turn"
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
        system = body.get("system")
        if isinstance(system, str):
            prompt_tokens += len(system.split())
        elif isinstance(system, list):
            prompt_tokens += sum(len(str(part.get("text", "")).split()) for part in system)
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "msg_fake",
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [{"type": "text", "text": " ".join(words)}],
                    "stop_reason": stop,
                    "stop_sequence": None,
                    "usage": {"input_tokens": prompt_tokens, "output_tokens": len(words)},
                }
            )
        return await self._anthropic_stream(request, model, words, stop, prompt_tokens)

    async def _anthropic_stream(
        self, request: web.Request, model: str, words: list[str], stop: str, prompt_tokens: int
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        def event(name: str, data: dict[str, Any]) -> bytes:
            return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

        start: dict[str, Any] = {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": 1},
        }
        await response.write(event("message_start", {"type": "message_start", "message": start}))
        await response.write(
            event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            )
        )
        await response.write(event("ping", {"type": "ping"}))
        await asyncio.sleep(self.ttft_s)
        for i, word in enumerate(words):
            if i:
                await asyncio.sleep(self.token_delay_s)
            if model == "broken-stream" and i == len(words) // 2:
                assert request.transport is not None
                request.transport.close()
                return response
            if model == "malformed" and i == 2:
                await response.write(b"event: content_block_delta\ndata: {not json\n\n")
                continue
            delta = {"type": "text_delta", "text": word if i == 0 else " " + word}
            await response.write(
                event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 0, "delta": delta},
                )
            )
        await response.write(
            event("content_block_stop", {"type": "content_block_stop", "index": 0})
        )
        await response.write(
            event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop, "stop_sequence": None},
                    "usage": {"output_tokens": len(words)},
                },
            )
        )
        await response.write(event("message_stop", {"type": "message_stop"}))
        return response
