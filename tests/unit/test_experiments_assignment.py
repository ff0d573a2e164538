"""Sticky assignment: the documented hash, shares over 100k users, who moves, the precedence."""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Mapping

import pytest

from ml_serving.experiments.assignment import (
    FALLBACK_VERSION,
    Assignment,
    Experiment,
    HowChosen,
    PromptSelector,
    Shares,
    new_decision_id,
    unit_hash,
)
from ml_serving.experiments.config import ExperimentConfig

SALT = "tip-prompts"
WEIGHTS = {"v1": 50.0, "v2-mentor": 25.0, "v3-few-shot": 25.0}
USERS = [f"user-{i}" for i in range(100_000)]


def recompute(salt: str, user_id: str, weights: Mapping[str, float]) -> str:
    """The module docstring's algorithm written out from scratch, as the recommender would."""
    total = sum(weights.values())
    best, best_score = "", math.inf
    for version in sorted(weights):
        share = weights[version] / total
        if share <= 0:
            continue
        message = version.encode() + b"\x00" + user_id.encode()
        x = int.from_bytes(
            hashlib.blake2b(message, key=salt.encode(), digest_size=8).digest(), "big"
        )
        u = ((x >> 11) + 0.5) / 2**53
        score = -math.log(u) / share
        if score < best_score:
            best, best_score = version, score
    return best


def assign_all(weights: Mapping[str, float], salt: str = SALT) -> list[str]:
    shares = Shares(salt, weights)
    return [shares.choose(u)[0] for u in USERS]


@pytest.fixture(scope="module")
def baseline() -> list[str]:
    return assign_all(WEIGHTS)


def test_the_documented_algorithm_is_the_one_that_runs() -> None:
    shares = Shares(SALT, WEIGHTS)
    for user in USERS[:2000]:
        assert shares.choose(user)[0] == recompute(SALT, user, WEIGHTS)


def test_pinned_outputs() -> None:
    # Anyone recomputing assignments depends on these: a change here moves every user.
    shares = Shares(SALT, WEIGHTS)
    assert [shares.choose(f"user-{i}")[0] for i in range(12)] == [
        "v3-few-shot", "v1", "v3-few-shot", "v3-few-shot", "v1", "v3-few-shot",
        "v2-mentor", "v1", "v2-mentor", "v1", "v1", "v3-few-shot",
    ]  # fmt: skip
    assert unit_hash(SALT, "v1", "user-1") == 0.18501287249216208


def test_sticky_across_instances_and_weight_scale() -> None:
    a, b = Shares(SALT, WEIGHTS), Shares(SALT, {v: w / 25 for v, w in WEIGHTS.items()})
    for user in USERS[:1000]:
        assert a.choose(user) == a.choose(user) == b.choose(user)


def test_the_salt_reshuffles_users(baseline: list[str]) -> None:
    other = assign_all(WEIGHTS, salt="another-experiment")
    same = sum(x == y for x, y in zip(baseline[:20_000], other[:20_000], strict=False))
    # Independent assignments agree with probability sum(s^2) = 0.375.
    assert abs(same / 20_000 - 0.375) < 4 * math.sqrt(0.375 * 0.625 / 20_000)


def test_shares_over_100k_users_match_the_weights(baseline: list[str]) -> None:
    counts = Counter(baseline)
    n = len(USERS)
    for version, weight in WEIGHTS.items():
        p = weight / 100
        observed = counts[version] / n
        # 4.4 sigma: a 1-in-100,000 binomial bound per variant.
        assert abs(observed - p) <= 4.4 * math.sqrt(p * (1 - p) / n), (version, observed)
    print(f"\nshares over {n} ids: " + ", ".join(f"{v} {counts[v] / n:.4f}" for v in WEIGHTS))


def test_the_propensity_is_the_share() -> None:
    shares = Shares(SALT, WEIGHTS)
    for user in USERS[:100]:
        version, share = shares.choose(user)
        assert share == WEIGHTS[version] / 100


def test_a_zero_weight_variant_gets_nobody() -> None:
    shares = Shares(SALT, {"v1": 1, "v2-mentor": 0, "v3-few-shot": 1})
    assert {shares.choose(u)[0] for u in USERS[:5000]} == {"v1", "v3-few-shot"}


@pytest.mark.parametrize("weights", [{}, {"v1": 0}, {"v1": -1, "v2": 2}, {"v1": math.nan}])
def test_bad_weights_are_refused(weights: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Shares(SALT, weights)


def jaccard(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """The probability Jaccard index: the chance rendezvous keeps a user on a change a -> b."""
    keys = [k for k in a if a[k] > 0 and b[k] > 0]
    return sum(1 / sum(max(a[j] / a[i], b[j] / b[i]) for j in a) for i in keys)


def test_moving_weight_from_one_variant_moves_exactly_its_users(baseline: list[str]) -> None:
    new = {"v1": 40.0, "v2-mentor": 30.0, "v3-few-shot": 30.0}
    after = assign_all(new)
    moved = sum(x != y for x, y in zip(baseline, after, strict=True))
    before_counts, after_counts = Counter(baseline), Counter(after)
    # Only v1 shrank: exactly the users it lost moved, the fewest any scheme could move.
    assert moved == sum(max(0, before_counts[v] - after_counts[v]) for v in WEIGHTS)
    assert all(y == x for x, y in zip(baseline, after, strict=True) if x != "v1")
    n = len(USERS)
    assert moved / n <= 0.10 + 4.4 * math.sqrt(0.1 * 0.9 / n)
    print(f"\n50/25/25 -> 40/30/30: {moved / n:.4f} of {n} ids moved (total share moved 0.10)")


@pytest.mark.parametrize(
    "new",
    [
        {"v1": 25.0, "v2-mentor": 50.0, "v3-few-shot": 25.0},
        {"v1": 60.0, "v2-mentor": 10.0, "v3-few-shot": 30.0},
        {"v1": 5.0, "v2-mentor": 5.0, "v3-few-shot": 90.0},
    ],
)
def test_moves_in_several_directions_follow_the_jaccard_bound(
    baseline: list[str], new: dict[str, float]
) -> None:
    after = assign_all(new)
    n = len(USERS)
    moved = sum(x != y for x, y in zip(baseline, after, strict=True)) / n
    total_variation = sum(max(0.0, WEIGHTS[v] - new[v]) for v in WEIGHTS) / 100
    expected = 1 - jaccard(WEIGHTS, new)
    tolerance = 4.4 * math.sqrt(expected * (1 - expected) / n)
    assert abs(moved - expected) <= tolerance
    assert moved >= total_variation - tolerance
    print(f"\n50/25/25 -> {new}: moved {moved:.4f} (share moved {total_variation:.2f})")


def test_decision_ids_are_32_hex_and_unique() -> None:
    ids = [new_decision_id() for _ in range(100_000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids[:1000])
    assert len(set(ids)) == len(ids)


def experiment(weights: Mapping[str, float] = WEIGHTS) -> Experiment:
    return Experiment(ExperimentConfig(name=SALT, salt=SALT, variants=dict(weights)))


def test_precedence_request_first() -> None:
    selector = PromptSelector(experiment(), "v2-mentor")
    a = selector.select("user-1", "v3-few-shot")
    assert (a.version, a.how, a.propensity, a.experiment) == (
        "v3-few-shot",
        HowChosen.REQUEST,
        1.0,
        None,
    )


def test_precedence_then_the_experiment() -> None:
    selector = PromptSelector(experiment(), "v2-mentor")
    shares = Shares(SALT, WEIGHTS)
    for user in USERS[:50]:
        a = selector.select(user)
        version, share = shares.choose(user)
        assert (a.version, a.how, a.propensity, a.experiment) == (
            version,
            HowChosen.EXPERIMENT,
            share,
            SALT,
        )


def test_precedence_then_the_default_then_v1() -> None:
    a = PromptSelector(None, "v2-mentor").select("user-1")
    assert (a.version, a.how, a.propensity, a.experiment) == (
        "v2-mentor",
        HowChosen.DEFAULT,
        1.0,
        None,
    )
    for default in (None, ""):
        assert PromptSelector(None, default).select("user-1").version == FALLBACK_VERSION == "v1"


def test_a_call_without_a_user_id_is_not_in_the_experiment() -> None:
    a = PromptSelector(experiment(), "v2-mentor").select("")
    assert (a.version, a.how) == ("v2-mentor", HowChosen.DEFAULT)


def test_every_selection_has_its_own_decision_id() -> None:
    selector = PromptSelector(experiment())
    picks = [selector.select("user-1") for _ in range(100)]
    assert len({a.decision_id for a in picks}) == 100
    assert len({a.version for a in picks}) == 1
    assert isinstance(picks[0], Assignment)


def test_counts_by_experiment_version_and_how() -> None:
    selector = PromptSelector(experiment(), known_versions=WEIGHTS)
    for user in USERS[:300]:
        selector.select(user)
    selector.select("user-1", "v1")
    selector.select("user-1", "no-such-version-" + "x" * 50)
    selector.select("")
    counts = selector.counts
    assert sum(n for (e, _, h), n in counts.items() if h is HowChosen.EXPERIMENT) == 300
    assert {v for (e, v, h) in counts if h is HowChosen.EXPERIMENT} == set(WEIGHTS)
    assert all(e == SALT for (e, _, h) in counts if h is HowChosen.EXPERIMENT)
    assert counts[("", "v1", HowChosen.REQUEST)] == 1
    assert counts[("", "unknown", HowChosen.REQUEST)] == 1
    assert counts[("", "v1", HowChosen.DEFAULT)] == 1
    # A str enum: usable as a metrics label or log field as is.
    assert isinstance(HowChosen.EXPERIMENT, str) and f"{HowChosen.EXPERIMENT}" == "experiment"
