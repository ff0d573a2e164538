"""tuning.py, pinned to the locked litellm: each documented knob still has the effect we rely on,
and nothing third-party is patched."""

from __future__ import annotations

import json
import logging
import os
import sys
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from ml_serving.generation.llm import tuning

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.filterwarnings(
    "ignore:Items .* are using the `ReadOnly` qualifier:UserWarning"
)


def provider() -> Any:
    from ml_serving.generation.llm import provider

    return provider


def test_the_tuning_was_measured_on_the_locked_litellm() -> None:
    assert metadata.version("litellm") == tuning.LOCKED_LITELLM
    for lock in ("requirements.lock", "requirements-dev.lock"):
        assert f"litellm=={tuning.LOCKED_LITELLM} " in (ROOT / lock).read_text()


def test_the_price_map_is_read_locally() -> None:
    litellm = provider().litellm
    from litellm.litellm_core_utils import get_model_cost_map

    assert os.environ["LITELLM_LOCAL_MODEL_COST_MAP"]
    assert "LITELLM_LOCAL_MODEL_COST_MAP" in Path(get_model_cost_map.__file__).read_text()
    assert "gpt-4o-mini" in litellm.model_cost  # the bundled map, read at import


def test_litellm_keeps_its_handlers_which_print_nothing_below_critical() -> None:
    provider()
    from litellm import _logging

    for name in tuning.LITELLM_LOGGERS:
        logger = logging.getLogger(name)
        assert _logging.handler in logger.handlers  # left in place: we remove nothing
        assert logger.level >= logging.WARNING  # its per-call INFO lines never made
        assert logger.propagate  # what it does log reaches our JSON handler
    if "LITELLM_LOG" not in os.environ or os.environ["LITELLM_LOG"] == "CRITICAL":
        assert _logging.handler.level == logging.CRITICAL


def test_no_third_party_private_name_is_patched() -> None:
    provider()
    from openai import _models

    from ml_serving.generation.llm import gateway  # noqa: F401

    protocol = getattr(_models, "_ConfigProtocol")  # noqa: B009
    assert protocol.__module__ == "openai._models"
    assert provider().litellm.suppress_debug_info is True  # a documented module flag


def _python_calls(fn: Any) -> int:
    count = 0

    def profile(frame: FrameType, event: str, arg: object) -> None:
        nonlocal count
        if event == "call":
            count += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


def test_pricing_an_unknown_model_once_saves_work_on_every_call() -> None:
    """Measured here for a self-hosted-style name: the provider path 581 -> 545 Python calls per
    request built and answer parsed (its headers are built once per set of parameters), and
    litellm.acompletion 9,162 -> 5,543 per call."""
    p = provider()
    model = "anthropic/my-self-hosted-model"
    route = p.resolve({"model": model, "api_base": "http://127.0.0.1:9", "api_key": "k"})
    assert isinstance(route, p.ProviderRoute)
    body = json.dumps(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "my-self-hosted-model",
            "content": [{"type": "text", "text": "ok"}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 3, "output_tokens": 1},
        }
    ).encode()
    headers = {"content-type": "application/json"}

    def call() -> None:
        built = route.prepare(
            [{"role": "user", "content": "hi"}], max_tokens=8, temperature=None, stream=False
        )
        route.parse(built, 200, headers, body)

    call()  # lazy imports out of the way
    unpriced = _python_calls(call)
    assert p.price_unknown_models([model]) == [model]
    priced = _python_calls(call)
    assert p.price_unknown_models([model]) == []  # once: known now
    assert priced < unpriced, (unpriced, priced)
