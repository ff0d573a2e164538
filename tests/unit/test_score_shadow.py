"""Shadow model versions: the SHADOW pointer, the rank comparison, sampling and shedding."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest

from ml_serving.scoring import cli as registry_cli
from ml_serving.scoring import registry as model_registry
from ml_serving.scoring import shadow
from ml_serving.scoring.model import Model, ScoreResult, score
from ml_serving.scoring.registry import ModelRegistry, RegistryError, RegistryUnavailable
from ml_serving.scoring.shadow import (
    AliasShadowPointer,
    Comparison,
    FileShadowPointer,
    ShadowScorer,
    SkipReason,
    compare,
    kendall_tau,
)
from tests.support.model_versions import NAME, add_derived_version, copy_shipped
from tests.support.requests import score_request


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    """The shipped registry plus version 2 (ranking reversed) and 3 (same ranking, shifted)."""
    reg = copy_shipped(tmp_path)
    add_derived_version(reg, "2", flip=True)
    add_derived_version(reg, "3", shift=0.5)
    return reg


def served(model: Model, candidates: int = 20) -> ScoreResult:
    request = score_request(candidates=candidates)
    return score(
        model,
        context_feature_names=request.context_feature_names,
        context_values=request.context_values,
        candidate_feature_names=request.candidate_feature_names,
        candidate_ids=[c.id for c in request.candidates],
        candidate_values=[c.values for c in request.candidates],
        max_candidates=1000,
    )


def tau_b_reference(a: list[float], b: list[float]) -> float:
    """Kendall tau-b by its definition, pair by pair."""
    concordant = discordant = ties_a = ties_b = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        da, db = a[i] - a[j], b[i] - b[j]
        if da == 0 and db == 0:
            continue
        if da == 0:
            ties_a += 1
        elif db == 0:
            ties_b += 1
        elif (da > 0) == (db > 0):
            concordant += 1
        else:
            discordant += 1
    n0 = concordant + discordant
    return (concordant - discordant) / math.sqrt((n0 + ties_a) * (n0 + ties_b))


# --- the comparison ------------------------------------------------------------------------------


def test_identical_scores_agree_fully() -> None:
    a = np.random.default_rng(0).random(20)
    c = compare(a, a.copy())
    assert c == Comparison(20, 5, 1.0, 1.0, False, 0.0)


def test_reversed_ranking() -> None:
    a = np.random.default_rng(1).random(20)
    c = compare(a, 1.0 - a)
    assert c.kendall_tau == pytest.approx(-1.0)
    assert c.top_k_overlap == 0.0  # the top 5 of one is the bottom 5 of the other
    assert c.mean_abs_delta == pytest.approx(float(np.mean(np.abs(2 * a - 1))))


@pytest.mark.parametrize("seed", range(5))
def test_kendall_tau_matches_the_definition_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 6, 40).astype(np.float64)  # many ties
    b = a + rng.integers(-2, 3, 40)
    got = kendall_tau(a, b)
    assert got is not None
    assert got == pytest.approx(tau_b_reference(a.tolist(), b.tolist()), abs=1e-12)


def test_tau_undefined_for_one_candidate_or_all_tied() -> None:
    assert kendall_tau(np.array([0.3]), np.array([0.4])) is None
    assert kendall_tau(np.full(4, 0.5), np.arange(4.0)) is None
    c = compare(np.array([0.3]), np.array([0.4]))
    assert (c.k, c.top_k_overlap, c.kendall_tau) == (1, 1.0, None)
    assert c.mean_abs_delta == pytest.approx(0.1)


def test_top_k_is_at_most_the_candidates() -> None:
    a = np.array([0.1, 0.9, 0.5])
    c = compare(a, np.array([0.9, 0.1, 0.5]))
    assert c.k == 3 and c.top_k_overlap == 1.0  # all three are in both "top 3"
    # Top 5 of 6: the served best (index 5) is the shadow's worst, the rest agree.
    a6 = np.arange(6.0)
    b6 = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 0.0])
    assert compare(a6, b6).top_k_overlap == pytest.approx(4 / 5)


def test_tau_over_a_fixed_sample_above_the_limit() -> None:
    rng = np.random.default_rng(3)
    a = rng.random(500)
    b = a + rng.normal(0, 0.1, 500)
    first, again = compare(a, b), compare(a, b)
    assert first.tau_sampled and first == again  # the same sample every time
    picked = shadow._tau_sample(500)
    assert len(picked) == shadow.TAU_MAX_CANDIDATES == len(set(picked.tolist()))
    assert first.kendall_tau == kendall_tau(a[picked], b[picked])
    # An estimate of the full tau; the other two figures use every candidate.
    full = kendall_tau(a, b)
    assert full is not None and first.kendall_tau is not None
    assert abs(first.kendall_tau - full) < 0.1
    assert first.mean_abs_delta == pytest.approx(float(np.mean(np.abs(a - b))))
    assert not compare(a[:200], b[:200]).tau_sampled


def test_compare_refuses_mismatched_scores() -> None:
    with pytest.raises(ValueError, match="cannot compare"):
        compare(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="cannot compare"):
        compare(np.ones(0), np.ones(0))


# --- the pointer ---------------------------------------------------------------------------------


def test_file_pointer_set_and_clear(registry: ModelRegistry) -> None:
    pointer = FileShadowPointer(registry)
    assert pointer.shadow_version(NAME) is None
    model = shadow.set_shadow(registry, NAME, "2")
    assert model.version == "2"
    assert (registry.root / NAME / "SHADOW").read_text() == "2\n"
    assert pointer.shadow_version(NAME) == "2"
    assert registry.promoted_version(NAME) == "1"  # promotion untouched
    assert shadow.clear_shadow(registry, NAME) is True
    assert pointer.shadow_version(NAME) is None
    assert shadow.clear_shadow(registry, NAME) is False


def test_set_shadow_refuses_an_invalid_version(registry: ModelRegistry) -> None:
    shadow.set_shadow(registry, NAME, "2")
    (registry.root / NAME / "3" / "weights.npz").write_bytes(b"not an npz")
    with pytest.raises(model_registry.InvalidModelError, match="sha256"):
        shadow.set_shadow(registry, NAME, "3")
    with pytest.raises(RegistryError, match="no version"):
        shadow.set_shadow(registry, NAME, "9")
    assert FileShadowPointer(registry).shadow_version(NAME) == "2"


def test_pointer_for_picks_the_backend(registry: ModelRegistry, tmp_path: Path) -> None:
    from ml_serving.scoring.mlflow_registry import MlflowRegistry

    assert isinstance(shadow.pointer_for(registry), FileShadowPointer)
    mlflow = MlflowRegistry(tmp_path / "cache", tracking_uri="http://127.0.0.1:1", client=object())
    pointer = shadow.pointer_for(mlflow)
    assert isinstance(pointer, AliasShadowPointer) and pointer.alias == "challenger"


class _AliasClient:
    """The one MlflowClient call the alias pointer makes."""

    def __init__(self) -> None:
        self.version: str | None = "2"
        self.down = False

    def get_model_version_by_alias(self, name: str, alias: str) -> object:
        assert (name, alias) == (NAME, "challenger")
        if self.down:
            raise ConnectionError("connection refused")
        if self.version is None:
            exc = RuntimeError("alias not found")
            exc.get_http_status_code = lambda: 404  # type: ignore[attr-defined]
            raise exc
        return type("ModelVersion", (), {"version": self.version})()


def test_alias_pointer(tmp_path: Path) -> None:
    from ml_serving.scoring.mlflow_registry import MlflowRegistry

    client = _AliasClient()
    pointer = AliasShadowPointer(
        MlflowRegistry(tmp_path, tracking_uri="http://127.0.0.1:1", client=client)
    )
    assert pointer.shadow_version(NAME) == "2"
    client.version = None
    assert pointer.shadow_version(NAME) is None  # no challenger: no shadow
    client.down = True
    with pytest.raises(RegistryUnavailable):
        pointer.shadow_version(NAME)


def test_cli_shadow_sets_and_clears(
    registry: ModelRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    root = str(registry.root)
    assert registry_cli.main(["shadow", "--root", root, "--name", NAME, "--version", "2"]) == 0
    assert FileShadowPointer(registry).shadow_version(NAME) == "2"
    assert "version 2 shadows" in capsys.readouterr().out
    assert registry_cli.main(["shadow", "--root", root, "--name", NAME, "--version", "9"]) == 1
    assert "no version '9'" in capsys.readouterr().err
    assert registry_cli.main(["shadow", "--root", root, "--name", NAME, "--clear"]) == 0
    assert FileShadowPointer(registry).shadow_version(NAME) is None
    assert "cleared" in capsys.readouterr().out


# --- polling -------------------------------------------------------------------------------------


def test_refresh_follows_the_pointer(registry: ModelRegistry) -> None:
    scorer = ShadowScorer(FileShadowPointer(registry), NAME, share=1.0, max_in_flight_rpcs=8)
    assert scorer.refresh() is False and scorer.model is None
    shadow.set_shadow(registry, NAME, "2")
    assert scorer.refresh() is True and scorer.model is not None
    first = scorer.model
    assert scorer.refresh() is False and scorer.model is first  # not loaded again
    shadow.set_shadow(registry, NAME, "3")
    assert scorer.refresh() is True and scorer.model.version == "3"
    shadow.clear_shadow(registry, NAME)
    assert scorer.refresh() is True and scorer.model is None


def test_a_refused_version_stops_the_shadow(
    registry: ModelRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    scorer = ShadowScorer(FileShadowPointer(registry), NAME, share=1.0, max_in_flight_rpcs=8)
    shadow.set_shadow(registry, NAME, "2")
    scorer.refresh()
    (registry.root / NAME / "SHADOW").write_text("9\n")
    with caplog.at_level(logging.WARNING, logger="ml_serving.scoring.shadow"):
        assert scorer.refresh() is True
        assert scorer.refresh() is False
    assert scorer.model is None
    assert scorer.poll_failures["refused"] == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "version 9" in warnings[0].getMessage()  # once, not per poll


class _FlakySource:
    """A pointer whose registry can be made unreachable."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.down = False

    def shadow_version(self, name: str) -> str | None:
        if self.down:
            raise RegistryUnavailable("connection refused")
        return self.model.version

    def load(self, name: str, version: str) -> Model:
        return self.model


def test_unreachable_registry_keeps_the_shadow_and_backs_off(registry: ModelRegistry) -> None:
    source = _FlakySource(registry.load(NAME, "2"))
    scorer = ShadowScorer(source, NAME, share=1.0, max_in_flight_rpcs=8)
    scorer.refresh()
    source.down = True
    assert scorer.refresh() is False and scorer.refresh() is False
    assert scorer.model is source.model
    assert scorer.poll_failures["unavailable"] == 2
    assert 0.8 * 8.0 <= scorer.next_delay(2.0, 30.0) <= 8.0
    source.down = False
    scorer.refresh()
    assert scorer.next_delay(2.0, 30.0) == 2.0


async def test_watch_polls_at_once_then_every_interval(registry: ModelRegistry) -> None:
    shadow.set_shadow(registry, NAME, "2")
    scorer = ShadowScorer(FileShadowPointer(registry), NAME, share=1.0, max_in_flight_rpcs=8)
    task = asyncio.create_task(scorer.watch(0.01))
    try:
        async with asyncio.timeout(10):
            while scorer.model is None:
                await asyncio.sleep(0.005)
            shadow.clear_shadow(registry, NAME)
            while scorer.model is not None:
                await asyncio.sleep(0.005)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# --- per call ------------------------------------------------------------------------------------


class _Observer:
    def __init__(self) -> None:
        self.seen: list[tuple[str, Comparison]] = []
        self.fail = False

    def shadow_compared(self, version: str, comparison: Comparison) -> None:
        if self.fail:
            raise RuntimeError("metrics broke")
        self.seen.append((version, comparison))


def scorer_with(
    registry: ModelRegistry, version: str = "2", *, share: float = 1.0, rng: Iterable[float] = ()
) -> ShadowScorer:
    values = iter(rng)
    scorer = ShadowScorer(
        FileShadowPointer(registry),
        NAME,
        share=share,
        max_in_flight_rpcs=4,
        rng=lambda: next(values, 0.0),
    )
    shadow.set_shadow(registry, NAME, version)
    scorer.refresh()
    return scorer


async def next_turn() -> None:
    """Let the callbacks queued with call_soon run."""
    await asyncio.sleep(0)


async def test_offer_compares_after_the_caller_returns(registry: ModelRegistry) -> None:
    scorer = scorer_with(registry)
    observer = scorer.observer = _Observer()
    result = served(registry.load(NAME, "1"))
    assert scorer.offer(result, in_flight=1) is True
    assert not observer.seen  # nothing ran inside the call
    await next_turn()
    ((version, comparison),) = observer.seen
    assert version == "2" and scorer.comparisons == {"2": 1} and scorer.last == comparison
    # Version 2 is version 1 with every score s turned into 1 - s.
    assert comparison.kendall_tau == pytest.approx(-1.0)
    assert comparison.top_k_overlap == 0.0 and comparison.candidates == 20
    assert comparison.mean_abs_delta == pytest.approx(float(np.mean(np.abs(2 * result.scores - 1))))


async def test_same_ranking_shifted_version(registry: ModelRegistry) -> None:
    scorer = scorer_with(registry, "3")
    scorer.offer(served(registry.load(NAME, "1")), in_flight=1)
    await next_turn()
    assert scorer.last is not None
    assert (scorer.last.kendall_tau, scorer.last.top_k_overlap) == (1.0, 1.0)
    assert scorer.last.mean_abs_delta > 0.01


async def test_sampling_at_share(registry: ModelRegistry) -> None:
    # share 0.1: the draws below 0.1 are compared, the others not even counted.
    draws = [0.05, 0.5, 0.0999, 0.1, 0.99]
    scorer = scorer_with(registry, share=0.1, rng=iter(draws))
    result = served(registry.load(NAME, "1"))
    offered = []
    for _ in draws:
        offered.append(scorer.offer(result, in_flight=1))
        await next_turn()
    assert offered == [True, False, True, False, False]
    assert scorer.comparisons["2"] == 2 and not any(scorer.skipped.values())


async def test_no_shadow_named_costs_nothing(registry: ModelRegistry) -> None:
    scorer = ShadowScorer(
        FileShadowPointer(registry), NAME, share=1.0, max_in_flight_rpcs=4, rng=lambda: 1 / 0
    )
    assert scorer.offer(served(registry.load(NAME, "1")), in_flight=1) is False  # rng not drawn


async def test_shed_when_busy_or_queued_and_same_version(registry: ModelRegistry) -> None:
    scorer = scorer_with(registry)
    result = served(registry.load(NAME, "1"))
    assert scorer.offer(result, in_flight=5) is False  # over max_in_flight_rpcs=4
    assert scorer.offer(result, in_flight=4) is True
    assert scorer.offer(result, in_flight=1) is False  # one is already queued
    await next_turn()
    assert scorer.offer(result, in_flight=1) is True  # the queue drained
    await next_turn()
    assert scorer.offer(served(registry.load(NAME, "2")), in_flight=1) is False
    assert scorer.comparisons["2"] == 2
    assert scorer.skipped == {
        SkipReason.BUSY: 1,
        SkipReason.QUEUED: 1,
        SkipReason.SAME_VERSION: 1,
        SkipReason.ERROR: 0,
    }


async def test_failures_are_counted_never_raised(
    registry: ModelRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    scorer = scorer_with(registry)
    observer = scorer.observer = _Observer()
    observer.fail = True
    result = served(registry.load(NAME, "1"))
    with caplog.at_level(logging.WARNING, logger="ml_serving.scoring.shadow"):
        for _ in range(3):
            assert scorer.offer(result, in_flight=1) is True
            await next_turn()
        # A result without its request (built elsewhere) and a broken random source.
        bare = ScoreResult(result.scores, result.model_name, result.model_version)
        assert scorer.offer(bare, in_flight=1) is False
        scorer._random = lambda: 1 / 0
        assert scorer.offer(result, in_flight=1) is False
    assert scorer.skipped[SkipReason.ERROR] == 5 and not scorer.comparisons
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3  # RuntimeError, ValueError, ZeroDivisionError: once each


async def test_offer_outside_a_loop_does_not_raise(registry: ModelRegistry) -> None:
    scorer = scorer_with(registry)
    result = served(registry.load(NAME, "1"))
    # No running loop in a thread: get_running_loop raises, offer counts it.
    assert await asyncio.to_thread(scorer.offer, result, 1) is False
    assert scorer.skipped[SkipReason.ERROR] == 1


def test_share_out_of_range(registry: ModelRegistry) -> None:
    with pytest.raises(ValueError, match="share"):
        ShadowScorer(FileShadowPointer(registry), NAME, share=1.5, max_in_flight_rpcs=1)
