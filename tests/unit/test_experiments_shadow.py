"""Shadow prompt versions: sampled by decision id, bounded, background-only, logged, drained."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest

from ml_serving.experiments.assignment import Assignment, HowChosen, new_decision_id
from ml_serving.experiments.config import ShadowConfig
from ml_serving.experiments.decisions import DecisionLog, ShadowResult
from ml_serving.experiments.shadow import ShadowOutcome, ShadowRunner, sampled
from ml_serving.generation.llm.gateway import Completion
from ml_serving.generation.service import GenerationResult

SHADOW = "v3-few-shot"


def result(text: str = "Walk for ten minutes after lunch.") -> GenerationResult:
    # The Generator's own result type is what the wiring passes: it must fit ShadowResult.
    assignment = Assignment(new_decision_id(), SHADOW, HowChosen.EXPERIMENT, 0.25, "tip-prompts")
    r: ShadowResult = GenerationResult(
        Completion(text, "m", 12, 8, "stop"), SHADOW, "ef" * 32, False, assignment
    )
    assert isinstance(r, GenerationResult)
    return r


def runner(
    tmp_path: Path, *, share: float = 1.0, max_in_flight: int = 8, timeout_s: float = 30.0
) -> tuple[ShadowRunner, Path]:
    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(path, b"k")
    config = ShadowConfig(SHADOW, share, max_in_flight, timeout_s)
    return ShadowRunner(config, log, experiment="tip-prompts"), path


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_sampling_is_deterministic_and_at_the_share() -> None:
    ids = [new_decision_id() for _ in range(50_000)]
    picked = [sampled(i, 0.1) for i in ids]
    assert picked == [sampled(i, 0.1) for i in ids]
    share = sum(picked) / len(ids)
    assert abs(share - 0.1) <= 4.4 * math.sqrt(0.1 * 0.9 / len(ids))
    assert all(sampled(i, 1.0) for i in ids[:100])


async def test_a_sampled_call_runs_the_shadow_in_the_background(tmp_path: Path) -> None:
    shadow, path = runner(tmp_path)
    release = asyncio.Event()

    async def generate() -> ShadowResult:
        await release.wait()
        return result()

    assert shadow.maybe_run("a" * 32, "v1", generate)
    assert shadow.in_flight == 1  # the caller did not wait for it
    release.set()
    async with asyncio.timeout(30):
        while shadow.in_flight:
            await asyncio.sleep(0)
    assert shadow.outcomes[ShadowOutcome.RAN] == 1
    (line,) = lines(path)
    assert line["decision_id"] == "a" * 32 and line["shadow"] is True
    assert (line["version"], line["outcome"], line["text"]) == (
        SHADOW,
        "ran",
        "Walk for ten minutes after lunch.",
    )
    assert line["usage"] == {"prompt_tokens": 12, "completion_tokens": 8}
    assert line["experiment"] == "tip-prompts"


async def test_unsampled_and_same_version_calls_run_nothing(tmp_path: Path) -> None:
    shadow, _ = runner(tmp_path, share=0.5)
    calls = 0

    async def generate() -> ShadowResult:
        nonlocal calls
        calls += 1
        return result()

    unsampled = next(i for i in (new_decision_id() for _ in range(1000)) if not sampled(i, 0.5))
    assert not shadow.maybe_run(unsampled, "v1", generate)
    sampled_id = next(i for i in (new_decision_id() for _ in range(1000)) if sampled(i, 0.5))
    assert not shadow.maybe_run(sampled_id, SHADOW, generate)  # the primary is the shadow
    await asyncio.sleep(0)
    assert calls == 0 and shadow.in_flight == 0
    assert sum(shadow.outcomes.values()) == 0


async def test_beyond_max_in_flight_shadows_are_skipped_and_counted(tmp_path: Path) -> None:
    shadow, _ = runner(tmp_path, max_in_flight=3)
    release = asyncio.Event()

    async def generate() -> ShadowResult:
        await release.wait()
        return result()

    started = [shadow.maybe_run(f"{i:032x}", "v1", generate) for i in range(10)]
    assert started == [True] * 3 + [False] * 7
    assert shadow.in_flight == 3
    assert shadow.outcomes[ShadowOutcome.SKIPPED] == 7
    release.set()
    async with asyncio.timeout(30):
        while shadow.in_flight:
            await asyncio.sleep(0)
    assert shadow.outcomes[ShadowOutcome.RAN] == 3
    assert shadow.maybe_run("f" * 32, "v1", generate)  # room again
    await shadow.close()


async def test_a_failing_shadow_never_reaches_the_caller(tmp_path: Path) -> None:
    shadow, path = runner(tmp_path)

    async def boom() -> ShadowResult:
        raise RuntimeError("upstream said no")

    def not_even_a_coroutine() -> asyncio.Future[ShadowResult]:
        raise ValueError("the factory itself failed")

    assert shadow.maybe_run("a" * 32, "v1", boom)
    assert shadow.maybe_run("b" * 32, "v1", not_even_a_coroutine)
    async with asyncio.timeout(30):
        while shadow.in_flight:
            await asyncio.sleep(0)
    assert shadow.outcomes[ShadowOutcome.FAILED] == 2
    errors = sorted(str(line["error"]) for line in lines(path))
    assert errors == [
        "RuntimeError: upstream said no",
        "ValueError: the factory itself failed",
    ]


async def test_a_shadow_past_its_timeout_is_cancelled_and_failed(tmp_path: Path) -> None:
    shadow, path = runner(tmp_path, timeout_s=0.01)
    never = asyncio.Event()

    async def hang() -> ShadowResult:
        await never.wait()
        return result()

    assert shadow.maybe_run("a" * 32, "v1", hang)
    async with asyncio.timeout(30):
        while shadow.in_flight:
            await asyncio.sleep(0.005)
    assert shadow.outcomes[ShadowOutcome.FAILED] == 1
    assert "timeout_s" in str(lines(path)[0]["error"])


async def test_a_result_without_the_fields_counts_as_failed(tmp_path: Path) -> None:
    shadow, _ = runner(tmp_path)

    async def wrong() -> ShadowResult:
        return object()  # type: ignore[return-value]

    assert shadow.maybe_run("a" * 32, "v1", wrong)
    async with asyncio.timeout(30):
        while shadow.in_flight:
            await asyncio.sleep(0)
    assert shadow.outcomes[ShadowOutcome.FAILED] == 1


async def test_close_cancels_what_runs_and_refuses_more(tmp_path: Path) -> None:
    shadow, path = runner(tmp_path)
    never = asyncio.Event()
    cancelled = 0

    async def hang() -> ShadowResult:
        nonlocal cancelled
        try:
            await never.wait()
        except asyncio.CancelledError:
            cancelled += 1
            raise
        return result()

    for i in range(4):
        assert shadow.maybe_run(f"{i:032x}", "v1", hang)
    await asyncio.sleep(0)
    async with asyncio.timeout(30):
        await shadow.close()
    assert cancelled == 4 and shadow.in_flight == 0
    assert shadow.outcomes[ShadowOutcome.CANCELLED] == 4
    assert {line["outcome"] for line in lines(path)} == {"cancelled"}
    assert not shadow.maybe_run("f" * 32, "v1", hang)
    assert shadow.outcomes[ShadowOutcome.SKIPPED] == 1


def test_without_an_event_loop_maybe_run_counts_a_failure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shadow, _ = runner(tmp_path)

    async def generate() -> ShadowResult:
        return result()

    factory = generate
    assert not shadow.maybe_run("a" * 32, "v1", factory)
    assert shadow.outcomes[ShadowOutcome.FAILED] == 1
    assert "no running event loop" in caplog.text


async def test_without_a_log_outcomes_are_still_counted() -> None:
    shadow = ShadowRunner(ShadowConfig(SHADOW, 1.0), None)

    async def generate() -> ShadowResult:
        return result()

    assert shadow.maybe_run("a" * 32, "v1", generate)
    async with asyncio.timeout(30):
        while shadow.in_flight:
            await asyncio.sleep(0)
    assert shadow.outcomes[ShadowOutcome.RAN] == 1
