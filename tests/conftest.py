"""Fixtures every layer shares: the default in-process server, extra ones, the fake LLM upstream."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from ml_serving.api import server
from tests.support.fake_openai import FakeOpenAI
from tests.support.servers import StartServer, make_settings

# Settings read the environment: a developer's own server settings or MLflow server must not
# reach the tests, which set what they need themselves. ML_SERVING_STRESS is no setting: it
# opts into the long tests (`make stress`), which read it when collected, after this.
for _name in [n for n in os.environ if n.startswith("ML_SERVING_") or n == "MLFLOW_TRACKING_URI"]:
    if _name != "ML_SERVING_STRESS":
        del os.environ[_name]


@pytest.fixture(scope="session")
async def app() -> AsyncIterator[server.App]:
    """The default server: shipped model, offline LLM route, fallback on."""
    running = await server.start(make_settings())
    await running.wait_ready()
    yield running
    await running.stop(0)


@pytest.fixture(scope="session")
async def upstream() -> AsyncIterator[FakeOpenAI]:
    """One OpenAI-compatible fake on loopback for the session (its model name picks a fault)."""
    fake = await FakeOpenAI().start()
    yield fake
    await fake.stop()


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    """Start extra servers with their own settings; all are stopped after the test."""
    started: list[server.App] = []

    async def start(**overrides: object) -> server.App:
        running = await server.start(make_settings(**overrides))
        started.append(running)
        await running.wait_ready()
        return running

    yield start
    for running in started:
        await running.stop(0)
