"""The offline provider: a LiteLLM custom provider that answers with no network and no keys."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

from ml_serving.generation.llm.provider import (
    CustomLLM,
    GenericStreamingChunk,
    ModelResponse,
    register_custom_provider,
)
from ml_serving.generation.llm.routes import OFFLINE_MODEL, OFFLINE_PROVIDER

METADATA_KEY = "mlserving_offline_tip"
"""Metadata key carrying the offline provider's pre-composed tip (set by the caller)."""


class OfflineTipComposer(CustomLLM):  # type: ignore[misc]
    """A LiteLLM custom provider that needs no network: it returns the tip the caller composed
    deterministically from the prompt context (metadata), so every RPC works on a fresh machine.
    """

    async def acompletion(self, *args: Any, **kwargs: Any) -> ModelResponse:
        text = _offline_text(kwargs)
        prompt_tokens, completion_tokens = _offline_usage(kwargs, text)
        return ModelResponse(
            model=OFFLINE_MODEL,
            choices=[
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": text},
                }
            ],
            usage={
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        )

    async def astreaming(self, *args: Any, **kwargs: Any) -> AsyncIterator[GenericStreamingChunk]:
        text = _offline_text(kwargs)
        prompt_tokens, completion_tokens = _offline_usage(kwargs, text)
        words = text.split(" ")
        for i, word in enumerate(words):
            last = i == len(words) - 1
            yield GenericStreamingChunk(
                text=word if i == 0 else " " + word,
                is_finished=last,
                finish_reason="stop" if last else "",
                usage={
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                }
                if last
                else None,
                index=0,
                tool_use=None,
            )


def _offline_text(kwargs: Mapping[str, Any]) -> str:
    metadata = (kwargs.get("litellm_params") or {}).get("metadata") or {}
    text = metadata.get(METADATA_KEY)
    if not isinstance(text, str) or not text:
        # Called without our metadata (e.g. a warm-up): still deterministic, from the prompt.
        digest = hashlib.sha256(repr(kwargs.get("messages")).encode()).hexdigest()[:8]
        text = f"Pick one small step you can finish in five minutes today ({digest})."
    max_tokens = (kwargs.get("optional_params") or {}).get("max_tokens")
    if isinstance(max_tokens, int) and max_tokens > 0:
        text = " ".join(text.split(" ")[:max_tokens])
    return text


def _offline_usage(kwargs: Mapping[str, Any], text: str) -> tuple[int, int]:
    """Word counts stand in for tokens: the offline route has no tokenizer, and says so."""
    messages = kwargs.get("messages") or []
    prompt_words = sum(len(str(m.get("content", "")).split()) for m in messages)
    return prompt_words, len(text.split())


_handler = OfflineTipComposer()


def register() -> None:
    """Make `offline/` models resolve to the composer (idempotent)."""
    register_custom_provider(OFFLINE_PROVIDER, _handler)
