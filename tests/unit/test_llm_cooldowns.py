"""Cooldowns: the Router's allowed_fails / cooldown_time / disable_cooldowns, over real HTTP faults.

Time is a fake clock handed to the gateway: nothing here waits for a cooldown to pass.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ml_serving import errors
from tests.support.fake_openai import FakeOpenAI
from tests.support.servers import write_llm_config

if TYPE_CHECKING:
    from ml_serving.generation.llm.gateway import LLMGateway

MESSAGES = [{"role": "user", "content": "one tip"}]

pytestmark = pytest.mark.filterwarnings(
    "ignore:Items .* are using the `ReadOnly` qualifier:UserWarning"
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    up = await FakeOpenAI(tokens=4).start()
    yield up
    await up.stop()


@pytest.fixture
async def make(tmp_path: Path, fake: FakeOpenAI) -> AsyncIterator[Any]:
    """make(models, alias, pool=False, **router_settings) -> (gateway, clock, benched models)."""
    from ml_serving.generation.llm import gateway as llm

    made: list[LLMGateway] = []

    def build(models: list[str], alias: str, pool: bool = False, **settings: Any) -> Any:
        settings = {"num_retries": 0, "disable_cooldowns": False, **settings}
        config = llm.load_routes(write_llm_config(tmp_path / "llm.yaml", fake, models, **settings))
        if pool:  # one alias, one deployment per model
            config = llm.RouteConfig(
                tuple({**e, "model_name": alias} for e in config.model_list),
                config.router_settings,
            )
        clock, benched = Clock(), []
        gw = llm.LLMGateway(
            config, alias, clock=clock, on_cooldown=lambda model, s: benched.append((model, s))
        )
        made.append(gw)
        return gw, clock, benched

    yield build
    for gw in made:
        await gw.aclose()


async def complete(gw: LLMGateway) -> str:
    reply = await gw.complete(
        MESSAGES, max_tokens=8, temperature=None, timeout_s=10, offline_text=""
    )
    return reply.model


def sent_to(fake: FakeOpenAI, model: str) -> int:
    return sum(1 for body in fake.seen_bodies if body["model"] == model)


async def test_a_deployment_over_allowed_fails_is_skipped_for_cooldown_time(
    make: Any, fake: FakeOpenAI
) -> None:
    gw, clock, benched = make(["status-500", "ok"], "pool", pool=True, allowed_fails=2,
                              cooldown_time=30)  # fmt: skip
    for _ in range(40):  # the weighted pick lands on each deployment often enough
        try:
            await complete(gw)
        except errors.UpstreamUnavailable:
            pass
    assert sent_to(fake, "status-500") == 3  # more than 2 failures: benched at the third
    assert benched == [("openai/status-500", 30.0)]
    assert gw.cooldowns.benched() == ["pool#0"]
    for _ in range(10):  # while it cools down every call goes to the healthy one
        assert await complete(gw) == "openai/ok"
    assert sent_to(fake, "status-500") == 3
    clock.now += 30  # cooldown_time later it is tried again, with a clean count
    assert gw.cooldowns.benched() == []
    for _ in range(40):
        try:
            await complete(gw)
        except errors.UpstreamUnavailable:
            pass
    assert sent_to(fake, "status-500") == 6
    assert len(benched) == 2


async def test_failures_count_within_a_minute_only(make: Any, fake: FakeOpenAI) -> None:
    gw, clock, benched = make(["status-500"], "status-500", allowed_fails=1)
    for _ in range(5):
        with pytest.raises(errors.UpstreamUnavailable):
            await complete(gw)
        clock.now += 61  # each failure alone in its minute
    assert sent_to(fake, "status-500") == 5 and not benched


async def test_an_alias_all_cooling_down_goes_to_its_fallbacks_without_a_request(
    make: Any, fake: FakeOpenAI
) -> None:
    gw, clock, benched = make(
        ["status-429", "ok"], "status-429", allowed_fails=0, cooldown_time=5,
        fallbacks=[{"status-429": ["ok"]}],
    )  # fmt: skip
    assert await complete(gw) == "openai/ok"  # the 429 benched it (0 allowed), then the fallback
    assert sent_to(fake, "status-429") == 1
    for _ in range(5):
        assert await complete(gw) == "openai/ok"
    assert sent_to(fake, "status-429") == 1  # skipped while it cools down
    clock.now += 5
    assert await complete(gw) == "openai/ok"
    assert sent_to(fake, "status-429") == 2  # tried again once the cooldown passed


async def test_with_every_route_cooling_down_the_call_is_unavailable_at_once(
    make: Any, fake: FakeOpenAI
) -> None:
    gw, _, _ = make(["status-503"], "status-503", allowed_fails=0, cooldown_time=60)
    with pytest.raises(errors.UpstreamUnavailable):
        await complete(gw)
    with pytest.raises(errors.UpstreamUnavailable, match="no LLM route is available"):
        await complete(gw)
    assert sent_to(fake, "status-503") == 1


@pytest.mark.parametrize("model", ["status-400", "status-403", "status-422"])
async def test_client_errors_other_than_401_404_429_do_not_count(
    make: Any, fake: FakeOpenAI, model: str
) -> None:
    gw, _, benched = make([model], model, allowed_fails=0)
    for _ in range(3):
        with pytest.raises(errors.ServingError):
            await complete(gw)
    assert sent_to(fake, model) == 3 and not benched


@pytest.mark.parametrize("model", ["status-401", "status-404"])
async def test_credentials_and_missing_models_count(
    make: Any, fake: FakeOpenAI, model: str
) -> None:
    gw, _, benched = make([model], model, allowed_fails=0)
    for _ in range(3):
        with pytest.raises(errors.ServingError):
            await complete(gw)
    assert sent_to(fake, model) == 1 and len(benched) == 1


async def test_a_refused_connection_counts_as_the_500_litellm_makes_of_it(
    tmp_path: Path, make: Any
) -> None:
    from ml_serving.generation.llm import gateway as llm

    closed = FakeOpenAI()
    closed.port = 9  # discard: nothing listens
    config = llm.load_routes(
        write_llm_config(
            tmp_path / "r.yaml", closed, ["ok"], allowed_fails=0, disable_cooldowns=False
        )  # fmt: skip
    )
    gw = llm.LLMGateway(config, "ok")
    try:
        with pytest.raises(errors.UpstreamUnavailable, match="provider is unavailable"):
            await complete(gw)
        assert gw.cooldowns.benched() == ["ok#0"]
        with pytest.raises(errors.UpstreamUnavailable, match="no LLM route is available"):
            await complete(gw)
    finally:
        await gw.aclose()


async def test_disable_cooldowns_never_benches(make: Any, fake: FakeOpenAI) -> None:
    gw, _, benched = make(["status-500"], "status-500", allowed_fails=0, disable_cooldowns=True)
    for _ in range(4):
        with pytest.raises(errors.UpstreamUnavailable):
            await complete(gw)
    assert sent_to(fake, "status-500") == 4 and not benched


async def test_retries_skip_a_deployment_benched_by_the_previous_try(
    make: Any, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ml_serving.generation.llm import provider

    monkeypatch.setattr(provider, "calculate_retry_after", lambda **_: 0.0)
    gw, _, benched = make(["status-500"], "status-500", allowed_fails=0, num_retries=3)
    with pytest.raises(errors.UpstreamUnavailable, match="provider is unavailable"):
        await complete(gw)  # the first failure benches it: no more tries on it
    assert sent_to(fake, "status-500") == 1 and len(benched) == 1


def test_the_defaults_are_the_routers() -> None:
    from litellm.constants import DEFAULT_ALLOWED_FAILS, DEFAULT_COOLDOWN_TIME_SECONDS

    from ml_serving.generation.llm.routes import RetryPlan

    plan = RetryPlan.from_settings({}, ["a"])
    assert (plan.allowed_fails, plan.cooldown_time_s, plan.disable_cooldowns) == (
        DEFAULT_ALLOWED_FAILS, DEFAULT_COOLDOWN_TIME_SECONDS, False,
    )  # fmt: skip
