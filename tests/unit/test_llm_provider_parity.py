"""The provider path against litellm.acompletion, family by family, over real HTTP to fakes.

For the same upstream answer, a route on LiteLLM's provider layer (our pooled client) and the
same route forced through litellm.acompletion must give the same text, stream deltas, usage,
finish reason, and for the same failure the same LiteLLM exception class (and so the same
gRPC status). A LiteLLM upgrade that changes one of them fails here, not in production.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pytest

from ml_serving import errors
from tests.support.fake_anthropic import FakeAnthropic
from tests.support.fake_openai import WORDS, FakeOpenAI

if TYPE_CHECKING:
    from ml_serving.generation.llm.gateway import Completion, LLMGateway

MESSAGES = [
    {"role": "system", "content": "You write one short tip."},
    {"role": "user", "content": "about sleep, please"},
]
KEY = "sk-parity-not-a-real-key"
FAULTS = ["status-400", "status-401", "status-404", "status-429", "status-500", "status-503"]
FAMILIES = [
    # (model prefix, fake, faults beyond the common ones)
    ("openai", FakeOpenAI, []),
    ("hosted_vllm", FakeOpenAI, []),
    ("anthropic", FakeAnthropic, ["status-529"]),
]

pytestmark = pytest.mark.filterwarnings(
    "ignore:Items .* are using the `ReadOnly` qualifier:UserWarning"
)


@pytest.fixture(params=FAMILIES, ids=[f[0] for f in FAMILIES])
async def family(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, FakeOpenAI]]:
    prefix, cls, _ = request.param
    fake = await cls(tokens=7).start()
    yield prefix, fake
    await fake.stop()


@pytest.fixture
async def pair() -> AsyncIterator[Any]:
    """make(prefix, api_base, name) -> (provider-path gateway, acompletion gateway)."""
    from ml_serving.generation.llm import gateway as llm

    made: list[LLMGateway] = []

    def make(prefix: str, api_base: str, name: str) -> tuple[LLMGateway, LLMGateway]:
        route = {"model": f"{prefix}/{name}", "api_base": api_base, "api_key": KEY}
        config = llm.RouteConfig(
            ({"model_name": "r", "litellm_params": route},), {"num_retries": 0}
        )
        ours = llm.LLMGateway(config, "r", stream_coalesce_s=0.0)
        theirs = llm.LLMGateway(config, "r", acompletion_routes=["r"], stream_coalesce_s=0.0)
        assert ours.path_of("r") == ["provider"] and theirs.path_of("r") == ["acompletion"]
        made.extend((ours, theirs))
        return ours, theirs

    yield make
    for gw in made:
        await gw.aclose()


async def unary(gw: LLMGateway) -> Completion | BaseException:
    try:
        return await gw.complete(
            MESSAGES, max_tokens=16, temperature=None, timeout_s=10, offline_text=""
        )
    except errors.ServingError as exc:
        return exc


async def streamed(gw: LLMGateway) -> tuple[list[str], Completion | BaseException]:
    deltas: list[str] = []
    try:
        async for event in gw.stream(
            MESSAGES, max_tokens=16, temperature=None, timeout_s=10, offline_text=""
        ):
            if isinstance(event, str):
                deltas.append(event)
            else:
                return deltas, event
    except errors.ServingError as exc:
        return deltas, exc
    raise AssertionError("no Completion at the stream's end")


def litellm_class(exc: BaseException) -> str:
    """The LiteLLM exception class behind a gateway error (its __cause__)."""
    assert isinstance(exc, errors.ServingError), exc
    assert exc.__cause__ is not None
    return type(exc.__cause__).__name__


async def test_answers_match(family: tuple[str, FakeOpenAI], pair: Any) -> None:
    prefix, fake = family
    ours, theirs = pair(prefix, fake.base_url, "ok")
    mine, reference = await unary(ours), await unary(theirs)
    assert mine == reference  # text, model, usage, finish reason
    assert mine.text == " ".join(WORDS[:7])  # type: ignore[union-attr]
    mine_stream, reference_stream = await streamed(ours), await streamed(theirs)
    assert mine_stream == reference_stream  # every delta, then the same totals
    assert len(mine_stream[0]) == 7


async def test_a_cut_short_answer_says_length(family: tuple[str, FakeOpenAI], pair: Any) -> None:
    prefix, fake = family
    ours, theirs = pair(prefix, fake.base_url, "ok")
    fake.tokens = 40  # more than max_tokens=16
    mine, reference = await unary(ours), await unary(theirs)
    assert mine == reference and mine.finish_reason == "length"  # type: ignore[union-attr]
    assert await streamed(ours) == await streamed(theirs)


async def test_requests_carry_the_same_body_and_credentials(
    family: tuple[str, FakeOpenAI], pair: Any
) -> None:
    prefix, fake = family
    ours, theirs = pair(prefix, fake.base_url, "ok")
    for gw in (ours, theirs):
        await unary(gw)
        await streamed(gw)
    mine_unary, mine_stream, their_unary, their_stream = fake.seen_bodies
    assert mine_unary == their_unary
    assert mine_stream == their_stream
    assert fake.seen_auth == [f"Bearer {KEY}" if fake.auth_header == "Authorization" else KEY] * 4
    if isinstance(fake, FakeAnthropic):
        versions = {h.get("anthropic-version") for h in fake.seen_headers}
        assert len(versions) == 1 and None not in versions


@pytest.mark.parametrize("fault", [*FAULTS, "status-529", "malformed", "broken-stream"])
async def test_failures_map_to_the_same_litellm_exception(
    family: tuple[str, FakeOpenAI], pair: Any, fault: str
) -> None:
    prefix, fake = family
    if fault == "status-529" and prefix != "anthropic":
        pytest.skip("529 is Anthropic's overloaded status")
    ours, theirs = pair(prefix, fake.base_url, fault)
    mine, reference = await unary(ours), await unary(theirs)
    if fault == "broken-stream":  # only streams break half way
        assert mine == reference
    elif fault == "malformed":
        # A 200 whose body is not JSON: LiteLLM's own handlers differ between families (the
        # OpenAI SDK says InternalServerError, LiteLLM's transform APIError); both UNAVAILABLE.
        assert isinstance(mine, errors.UpstreamUnavailable), mine
        assert isinstance(reference, errors.UpstreamUnavailable), reference
    else:
        assert litellm_class(mine) == litellm_class(reference)  # type: ignore[arg-type]
        assert type(mine) is type(reference)
    (mine_deltas, mine_end), (their_deltas, their_end) = (
        await streamed(ours),
        await streamed(theirs),
    )
    assert mine_deltas == their_deltas
    if isinstance(their_end, BaseException):
        assert isinstance(mine_end, BaseException), mine_end
        assert litellm_class(mine_end) == litellm_class(their_end)
        assert type(mine_end) is type(their_end)
    else:
        # hosted_vllm: LiteLLM's OpenAI-compatible iterator skips a malformed chunk.
        assert mine_end == their_end


async def test_connection_refused_maps_to_the_same_litellm_exception(
    family: tuple[str, FakeOpenAI], pair: Any
) -> None:
    prefix, fake = family
    closed = fake.base_url.replace(f":{fake.port}", ":9")  # discard port: nothing listens
    ours, theirs = pair(prefix, closed, "ok")
    mine, reference = await unary(ours), await unary(theirs)
    assert litellm_class(mine) == litellm_class(reference)  # type: ignore[arg-type]
    assert isinstance(mine, errors.UpstreamUnavailable)
    (_, mine_end), (_, their_end) = await streamed(ours), await streamed(theirs)
    assert litellm_class(mine_end) == litellm_class(their_end)  # type: ignore[arg-type]
