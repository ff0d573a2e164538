"""GenerateStream helpers: read a whole stream, and the locked prompt hashes to compare with."""

from __future__ import annotations

import json
from importlib import resources

import grpc

from ml_serving._proto.mlserving.v1 import generation_pb2

LOCK = json.loads(
    resources.files("ml_serving.generation.prompts").joinpath("prompts.lock.json").read_text()
)
"""{prompt version: content hash} as shipped."""


async def collect(stream: grpc.aio.UnaryStreamCall) -> tuple[str, generation_pb2.GenerateStreamEnd]:  # type: ignore[type-arg]
    text, end = [], None
    async for message in stream:
        assert end is None, "nothing may follow the end message"
        if message.WhichOneof("event") == "text_delta":
            text.append(message.text_delta)
        else:
            end = message.end
    assert end is not None, "a stream always ends with the totals"
    return "".join(text), end
