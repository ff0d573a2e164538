"""A real channel to the default in-process server (the root `app` fixture) and its stub."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from ml_serving.api import server


@pytest.fixture(scope="session")
async def channel(app: server.App) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan:
        yield chan


@pytest.fixture(scope="session")
def stub(channel: grpc.aio.Channel) -> pb_grpc.InferenceServiceAsyncStub:
    return pb_grpc.InferenceServiceStub(channel)
