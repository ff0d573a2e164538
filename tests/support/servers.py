"""In-process server helpers: test settings, LiteLLM configs over the fake upstream, stubs."""

from __future__ import annotations

import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2_grpc

from ml_serving.api import server
from ml_serving.config import Settings
from tests.support.fake_openai import FakeOpenAI

FAKE_KEY = "sk-test-fake-key-0123456789"
"""The API key the LLM config names via os.environ/FAKE_OPENAI_KEY; must never reach a log."""
os.environ["FAKE_OPENAI_KEY"] = FAKE_KEY

BASE_SETTINGS: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 0,
    "metrics_port": 0,
    # Every model input comes with the request unless a test turns the feature store on.
    "feature_repo": None,
}

StartServer = Callable[..., Coroutine[Any, Any, server.App]]
"""The `start_server` fixture: start an extra in-process server with its own settings."""


def make_settings(**overrides: Any) -> Settings:
    """Settings for an in-process test server; environment variables do not leak in."""
    return Settings(_env_file=None, **{**BASE_SETTINGS, **overrides})  # type: ignore[call-arg]


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


def health_stub(channel: grpc.aio.Channel) -> Any:
    """The Health stub on an aio channel (its type stubs only describe sync channels)."""
    return health_pb2_grpc.HealthStub(channel)
