"""LLMGateway's retry and fallback loop, stream coalescing and escape hatch, over real HTTP to a
fake upstream (the provider path, unless a test asks for litellm.acompletion)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ml_serving import errors
from tests.support.fake_openai import WORDS, FakeOpenAI
from tests.support.servers import FAKE_KEY, write_llm_config

if TYPE_CHECKING:
    from ml_serving.generation.llm.gateway import Completion, LLMGateway

MESSAGES = [{"role": "user", "content": "one tip"}]

# As pyproject's filter, for the plural form: LiteLLM builds these schemas on its first call.
# litellm (generation.llm.gateway) is imported in the tests, not at collection, as the server
# does.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Items .* are using the `ReadOnly` qualifier:UserWarning"
)


def llm_module() -> Any:
    from ml_serving.generation.llm import gateway as llm

    return llm


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    up = await FakeOpenAI(tokens=6).start()
    up.delay_s = 2.0
    yield up
    await up.stop()


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Retries without LiteLLM's 0.5 s+ backoff; records what each sleep was computed from."""
    from ml_serving.generation.llm import provider

    asked: list[dict[str, Any]] = []

    def backoff(**kwargs: Any) -> float:
        asked.append(kwargs)
        return 0.01

    monkeypatch.setattr(provider, "calculate_retry_after", backoff)
    return asked


_made: list[LLMGateway] = []


@pytest.fixture(autouse=True)
async def close_gateways() -> AsyncIterator[None]:
    """Every gateway a test makes closes its pooled HTTP client afterwards."""
    yield
    while _made:
        await _made.pop().aclose()


def gateway(
    tmp_path: Path, fake: FakeOpenAI, models: list[str], alias: str, **settings: Any
) -> LLMGateway:
    llm = llm_module()
    config = llm.load_routes(write_llm_config(tmp_path / "llm.yaml", fake, models, **settings))
    return made(llm.LLMGateway(config, alias, stream_coalesce_s=0.0))


def made(gw: LLMGateway) -> LLMGateway:
    _made.append(gw)
    return gw


async def complete(gw: LLMGateway, timeout_s: float | None = 10.0) -> Completion:
    return await gw.complete(
        MESSAGES, max_tokens=16, temperature=None, timeout_s=timeout_s, offline_text=""
    )


async def stream_text(gw: LLMGateway, timeout_s: float | None = 10.0) -> tuple[str, Completion]:
    parts: list[str] = []
    async for event in gw.stream(
        MESSAGES, max_tokens=16, temperature=None, timeout_s=timeout_s, offline_text=""
    ):
        if isinstance(event, str):
            parts.append(event)
        else:
            return "".join(parts), event
    raise AssertionError("the stream ended without its Completion")


async def test_retries_a_5xx_then_gives_up_unavailable(
    tmp_path: Path, fake: FakeOpenAI, no_backoff: list[dict[str, Any]]
) -> None:
    gw = gateway(tmp_path, fake, ["status-500"], "status-500", num_retries=2)
    with pytest.raises(errors.UpstreamUnavailable):
        await complete(gw)
    assert fake.requests == 3
    assert [a["remaining_retries"] for a in no_backoff] == [2, 1]
    assert fake.seen_auth == [f"Bearer {FAKE_KEY}"] * 3  # os.environ/NAME resolved


async def test_retries_a_429_and_maps_it_to_rate_limited(
    tmp_path: Path, fake: FakeOpenAI, no_backoff: list[dict[str, Any]]
) -> None:
    gw = gateway(tmp_path, fake, ["status-429"], "status-429", num_retries=1)
    with pytest.raises(errors.UpstreamRateLimited):
        await complete(gw)
    assert fake.requests == 2


@pytest.mark.parametrize(
    ("alias", "error"),
    [
        ("status-400", errors.ProviderRejected),
        ("status-404", errors.NotReady),
        ("status-401", errors.NotReady),
    ],
)
async def test_no_retry_on_client_errors(
    tmp_path: Path,
    fake: FakeOpenAI,
    no_backoff: list[dict[str, Any]],
    alias: str,
    error: type[Exception],
) -> None:
    gw = gateway(tmp_path, fake, [alias], alias, num_retries=3)
    with pytest.raises(error):
        await complete(gw)
    assert fake.requests == 1
    assert not no_backoff


async def test_falls_back_to_the_next_alias_after_its_retries(
    tmp_path: Path, fake: FakeOpenAI, no_backoff: list[dict[str, Any]]
) -> None:
    gw = gateway(
        tmp_path, fake, ["status-500", "ok"], "status-500",
        num_retries=1, fallbacks=[{"status-500": ["ok"]}],
    )  # fmt: skip
    completion = await complete(gw)
    assert completion.model == "openai/ok"
    assert completion.text == " ".join(WORDS[:6])
    assert fake.requests == 3  # two tries on status-500, one on ok
    text, end = await stream_text(gw)
    assert (text, end.model, end.completion_tokens) == (" ".join(WORDS[:6]), "openai/ok", 6)


async def test_fallbacks_are_tried_in_order_and_the_first_error_is_raised(
    tmp_path: Path, fake: FakeOpenAI, no_backoff: list[dict[str, Any]]
) -> None:
    gw = gateway(
        tmp_path, fake, ["status-500", "status-429", "status-400"], "status-500",
        fallbacks=[{"status-500": ["status-429", "status-400"]}, {"status-429": ["status-500"]}],
    )  # fmt: skip
    with pytest.raises(errors.UpstreamUnavailable):
        await complete(gw)
    assert fake.requests == 3  # each alias once (num_retries 0); fallbacks do not chain


async def test_a_400_still_falls_back_as_the_router_did(
    tmp_path: Path, fake: FakeOpenAI, no_backoff: list[dict[str, Any]]
) -> None:
    gw = gateway(
        tmp_path, fake, ["status-400", "ok"], "status-400",
        num_retries=2, fallbacks=[{"*": ["ok"]}],
    )  # fmt: skip
    assert (await complete(gw)).model == "openai/ok"
    assert fake.requests == 2


async def test_an_alias_with_several_deployments_retries_on_another_one(
    tmp_path: Path, fake: FakeOpenAI, no_backoff: list[dict[str, Any]]
) -> None:
    llm = llm_module()
    config = llm.load_routes(write_llm_config(tmp_path / "llm.yaml", fake, ["status-500", "ok"]))
    entries = tuple({**e, "model_name": "pool"} for e in config.model_list)
    gw = made(llm.LLMGateway(llm.RouteConfig(entries, {"num_retries": 1}), "pool"))
    for _ in range(6):
        assert (await complete(gw)).model == "openai/ok"
    assert not no_backoff  # the next deployment is tried at once


async def test_a_stream_failing_before_its_first_chunk_fails_its_try(
    tmp_path: Path, fake: FakeOpenAI, no_backoff: list[dict[str, Any]]
) -> None:
    gw = gateway(
        tmp_path, fake, ["status-500", "ok"], "status-500", fallbacks=[{"status-500": ["ok"]}]
    )
    text, end = await stream_text(gw)
    assert text == " ".join(WORDS[:6]) and end.model == "openai/ok"


async def test_backoff_never_sleeps_past_the_deadline(
    tmp_path: Path, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ml_serving.generation.llm import provider

    monkeypatch.setattr(provider, "calculate_retry_after", lambda **_: 5.0)
    gw = gateway(
        tmp_path, fake, ["status-500", "ok"], "status-500",
        num_retries=3, fallbacks=[{"status-500": ["ok"]}],
    )  # fmt: skip
    started = time.perf_counter()
    assert (await complete(gw, timeout_s=2.0)).model == "openai/ok"
    assert time.perf_counter() - started < 1.0  # straight to the fallback, no 5 s sleep
    assert fake.requests == 2
    gw = gateway(tmp_path, fake, ["status-500"], "status-500", num_retries=3)
    with pytest.raises(errors.UpstreamUnavailable):  # not DEADLINE_EXCEEDED: the upstream failed
        await complete(gw, timeout_s=2.0)


async def test_each_try_is_bounded_by_its_deployment_timeout(
    tmp_path: Path, fake: FakeOpenAI, no_backoff: list[dict[str, Any]]
) -> None:
    path = write_llm_config(tmp_path / "llm.yaml", fake, ["slow", "ok"])
    llm = llm_module()
    config = llm.load_routes(path)
    entries = tuple(
        {**e, "litellm_params": {**e["litellm_params"], "timeout": 0.5}} for e in config.model_list
    )
    gw = made(
        llm.LLMGateway(
            llm.RouteConfig(entries, {"num_retries": 1, "fallbacks": [{"slow": ["ok"]}]}), "slow"
        )
    )
    started = time.perf_counter()
    assert (await complete(gw, timeout_s=10.0)).model == "openai/ok"
    assert time.perf_counter() - started < 1.9  # two 0.5 s tries on slow (2 s), then ok
    assert fake.requests == 3


async def test_the_deadline_bounds_every_try_and_cancels_the_upstream(
    tmp_path: Path, fake: FakeOpenAI, no_backoff: list[dict[str, Any]]
) -> None:
    gw = gateway(tmp_path, fake, ["slow"], "slow", num_retries=2)
    with pytest.raises(errors.DeadlineExceeded):
        await complete(gw, timeout_s=0.3)
    async with asyncio.timeout(5):
        while not (fake.cancelled and fake.in_progress == 0):
            await asyncio.sleep(0.02)
    assert fake.requests == 1


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"routing_strategy": "least-busy"}, "routing_strategy"),
        ({"fallbacks": [{"status-500": ["nope"]}]}, "unknown aliases: nope"),
        ({"fallbacks": {"status-500": ["ok"]}}, "must be a list"),
        ({"num_retries": -1}, "num_retries"),
        ({"timeout": 0}, "timeout"),
        ({"allowed_fails": -1}, "allowed_fails"),
        ({"cooldown_time": "5s"}, "cooldown_time"),
        ({"disable_cooldowns": "yes"}, "disable_cooldowns"),
    ],
)
def test_router_settings_the_loop_cannot_honour_are_refused(
    tmp_path: Path, fake: FakeOpenAI, settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        gateway(tmp_path, fake, ["status-500", "ok"], "status-500", **settings)


async def deltas_of(gw: LLMGateway) -> tuple[list[str], Completion]:
    parts: list[str] = []
    async for event in gw.stream(
        MESSAGES, max_tokens=16, temperature=None, timeout_s=10, offline_text=""
    ):
        if isinstance(event, str):
            parts.append(event)
        else:
            return parts, event
    raise AssertionError("the stream ended without its Completion")


async def test_without_a_coalescing_window_each_delta_is_its_own_message(
    tmp_path: Path, fake: FakeOpenAI
) -> None:
    gw = gateway(tmp_path, fake, ["ok"], "ok")  # stream_coalesce_s=0
    parts, end = await deltas_of(gw)
    assert parts == [WORDS[0], *(" " + w for w in WORDS[1:6])]
    assert end.completion_tokens == 6


async def test_coalescing_sends_the_first_delta_at_once_and_merges_what_follows(
    tmp_path: Path, fake: FakeOpenAI
) -> None:
    llm = llm_module()
    config = llm.load_routes(write_llm_config(tmp_path / "llm.yaml", fake, ["ok"]))
    # A window longer than the stream: everything after the first delta waits for the end.
    gw = made(llm.LLMGateway(config, "ok", stream_coalesce_s=3600.0))
    parts, end = await deltas_of(gw)
    assert parts == [WORDS[0], "".join(" " + w for w in WORDS[1:6])]
    assert (end.completion_tokens, end.finish_reason) == (6, "stop")


async def test_a_route_can_be_forced_through_acompletion(
    tmp_path: Path, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    llm = llm_module()
    config = llm.load_routes(write_llm_config(tmp_path / "llm.yaml", fake, ["ok", "status-500"]))
    with caplog.at_level(logging.INFO, logger="ml_serving.generation.llm.gateway"):
        gw = made(llm.LLMGateway(config, "ok", acompletion_routes=["ok"]))
    assert gw.path_of("ok") == ["acompletion"] and gw.path_of("status-500") == ["provider"]
    logged = [
        r for r in caplog.records if r.getMessage() == "LLM route through litellm.acompletion"
    ]
    assert [getattr(r, "llm_deployment", None) for r in logged] == ["ok#0"]  # once, at start
    assert (await complete(gw)).text == " ".join(WORDS[:6])
    assert fake.seen_headers[-1]["user-agent"].startswith("AsyncOpenAI")  # LiteLLM's own path
    everything = made(llm.LLMGateway(config, "ok", acompletion_routes=["*"]))
    assert everything.path_of("status-500") == ["acompletion"]
    with pytest.raises(ValueError, match="unknown aliases: nope"):
        llm.LLMGateway(config, "ok", acompletion_routes=["nope"])


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"api_version": "2024-06-01"}, "route params the provider path does not cover"),
        ({"model": "bedrock/anthropic.claude-v2"}, "no parity test"),
    ],
)
def test_routes_the_provider_path_cannot_serve_use_acompletion(
    tmp_path: Path, fake: FakeOpenAI, extra: dict[str, Any], reason: str
) -> None:
    llm = llm_module()
    config = llm.load_routes(write_llm_config(tmp_path / "llm.yaml", fake, ["ok"]))
    entry = config.model_list[0]
    entries = ({**entry, "litellm_params": {**entry["litellm_params"], **extra}},)
    gw = made(llm.LLMGateway(llm.RouteConfig(entries, {}), "ok"))
    assert gw.path_of("ok") == ["acompletion"]
    assert reason in getattr(gw.deployments()[0].route, "reason", "")


async def test_the_offline_route_needs_no_network() -> None:
    llm = llm_module()
    gw = made(llm.LLMGateway(llm.offline_routes()))
    assert gw.path_of(llm.OFFLINE_ALIAS) == ["acompletion"]
    await gw.warm_up()
    reply = await gw.complete(
        MESSAGES, max_tokens=16, temperature=None, timeout_s=None, offline_text="Rest well."
    )
    assert (reply.text, reply.model, reply.finish_reason) == (
        "Rest well.",
        llm.OFFLINE_MODEL,
        "stop",
    )


async def test_the_offline_text_is_made_only_for_the_route_that_answers_with_it(
    tmp_path: Path, fake: FakeOpenAI
) -> None:
    """Passed unmade (a callable), the offline route's answer is made by the offline route's
    call alone: a call on the provider path never makes it."""
    llm = llm_module()
    made_for: list[str] = []

    def offline_text() -> str:
        made_for.append("call")
        return "Rest well."

    provider = gateway(tmp_path, fake, ["ok"], "ok")
    assert provider.path_of("ok") == ["provider"]
    reply = await provider.complete(
        MESSAGES, max_tokens=16, temperature=None, timeout_s=10, offline_text=offline_text
    )
    assert reply.text and made_for == []
    offline = made(llm.LLMGateway(llm.offline_routes()))
    await offline.warm_up()
    reply = await offline.complete(
        MESSAGES, max_tokens=16, temperature=None, timeout_s=10, offline_text=offline_text
    )
    assert reply.text == "Rest well." and made_for == ["call"]


async def test_an_abandoned_stream_closes_its_upstream_request_at_once(
    tmp_path: Path, fake: FakeOpenAI
) -> None:
    fake.token_delay_s = 0.2
    gw = gateway(tmp_path, fake, ["ok"], "ok")
    events = gw.stream(MESSAGES, max_tokens=16, temperature=None, timeout_s=10, offline_text="")
    assert isinstance(await anext(events), str)
    await events.aclose()  # the RPC went away
    async with asyncio.timeout(5):
        while not (fake.cancelled == 1 and fake.in_progress == 0):
            await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    ("model", "api_base"),
    [("openai/gpt-4o-mini", "http://127.0.0.1:9/v1"), ("anthropic/claude-x", "http://127.0.0.1:9")],
)
async def test_warm_up_runs_the_provider_path_without_network(model: str, api_base: str) -> None:
    llm = llm_module()
    route = {"model": model, "api_base": api_base, "api_key": "sk-warm"}
    gw = made(
        llm.LLMGateway(llm.RouteConfig(({"model_name": "r", "litellm_params": route},), {}), "r")
    )
    assert gw.path_of("r") == ["provider"]
    await gw.warm_up()  # nothing listens on port 9: a request would fail
