"""Shared fixtures: a real grpc.aio server on 127.0.0.1:0, its stub, and a fake LLM upstream."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2_grpc

from ml_serving import server
from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from ml_serving.config import Settings
from tests.fake_openai import FakeOpenAI

FAKE_KEY = "sk-test-fake-key-0123456789"
"""The API key the LLM config names via os.environ/FAKE_OPENAI_KEY; must never reach a log."""
os.environ["FAKE_OPENAI_KEY"] = FAKE_KEY

BASE_SETTINGS: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "metrics_port": 0}


def make_settings(**overrides: Any) -> Settings:
    """Settings for an in-process test server; environment variables do not leak in."""
    return Settings(_env_file=None, **{**BASE_SETTINGS, **overrides})  # type: ignore[call-arg]


@pytest.fixture(scope="session")
async def app() -> AsyncIterator[server.App]:
    """The default server: shipped model, offline LLM route, fallback on."""
    running = await server.start(make_settings())
    await running.wait_ready()
    yield running
    await running.stop(0)


@pytest.fixture(scope="session")
async def channel(app: server.App) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan:
        yield chan


@pytest.fixture(scope="session")
def stub(channel: grpc.aio.Channel) -> pb_grpc.InferenceServiceAsyncStub:
    return pb_grpc.InferenceServiceStub(channel)


@pytest.fixture(scope="session")
async def upstream() -> AsyncIterator[FakeOpenAI]:
    fake = await FakeOpenAI().start()
    yield fake
    await fake.stop()


def write_llm_config(
    path: Path, upstream: FakeOpenAI, models: list[str], **router_settings: Any
) -> Path:
    """A LiteLLM model_list YAML with one alias per fake-upstream behaviour (alias = model)."""
    config = {
        "model_list": [
            {
                "model_name": name,
                "litellm_params": {
                    "model": f"openai/{name}",
                    "api_base": upstream.base_url,
                    "api_key": "os.environ/FAKE_OPENAI_KEY",
                    "timeout": 10,
                },
            }
            for name in models
        ],
        "router_settings": {"num_retries": 0, "disable_cooldowns": True, **router_settings},
    }
    path.write_text(yaml.safe_dump(config))
    return path


StartServer = Callable[..., Coroutine[Any, Any, server.App]]


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    """Start extra servers with their own settings; all are stopped after the test."""
    started: list[server.App] = []

    async def start(**overrides: Any) -> server.App:
        running = await server.start(make_settings(**overrides))
        started.append(running)
        await running.wait_ready()
        return running

    yield start
    for running in started:
        await running.stop(0)


def health_stub(channel: grpc.aio.Channel) -> Any:
    """The Health stub on an aio channel (its type stubs only describe sync channels)."""
    return health_pb2_grpc.HealthStub(channel)
