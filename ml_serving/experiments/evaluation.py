"""Offline evaluation: a candidate policy's reward estimated from a decision log (IPS, SNIPS).

The candidate is an experiments file; its shares are its weights (fixed) or the shares its
snapshot gives (thompson, as ``Experiment`` computes them). Assignment is a hash of the user id
that ignores everything else about the call, so under the candidate a call gets version ``a``
with probability ``pi(a)`` = its share, and for each logged decision ``i`` of the experiment
(``how`` "experiment": version ``a_i``, logged propensity ``p_i``, reward ``r_i``, 0 without a
reward row) with weight ``w_i = pi(a_i) / p_i``::

    IPS   = sum_i w_i r_i / n              (unbiased)
    SNIPS = sum_i w_i r_i / sum_i w_i      (self-normalised: a little bias, less variance)

Their 95% intervals are ``estimate +- 1.96 * se``, ``se`` from the sandwich variance clustered
by the logged user hash (a user keeps their version, so their calls are not independent):
``var(IPS) = G / (G - 1) * sum_g (sum_{i in g} (w_i r_i - IPS))**2 / n**2`` and
``var(SNIPS) = G / (G - 1) * sum_g (sum_{i in g} w_i (r_i - SNIPS))**2 / (sum_i w_i)**2`` over
``G`` users (a decision without a user hash is its own cluster). A candidate share on a version
the log never chose for the experiment cannot be estimated: it is reported as ``unsupported``
and that version's reward counts as 0 in the estimates (a lower bound).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from ml_serving.experiments.decisions import DecisionRead, RewardRead, experiment_decisions

Z_95: Final = 1.959963984540054
"""The standard normal's 97.5% quantile."""


@dataclass(frozen=True, slots=True)
class Interval:
    """An estimate with its standard error and 95% interval."""

    estimate: float
    std_error: float
    low: float
    high: float

    def covers(self, value: float) -> bool:
        return self.low <= value <= self.high


@dataclass(frozen=True, slots=True)
class Evaluation:
    """A candidate policy's estimated reward per decision."""

    experiment: str
    decisions: int
    users: int
    """Clusters: distinct user hashes (plus decisions without one)."""
    ips: Interval
    snips: Interval
    logged: Interval
    """The mean reward the logging policy got (for comparison)."""
    effective_sample_size: float
    """``(sum w)**2 / sum w**2``: how many decisions the estimate is worth."""
    max_weight: float
    candidate_shares: Mapping[str, float]
    unsupported: Mapping[str, float]
    """Candidate versions the log never chose, with their shares (estimated as reward 0)."""


def _interval(estimate: float, variance: float) -> Interval:
    se = math.sqrt(max(variance, 0.0))
    return Interval(estimate, se, estimate - Z_95 * se, estimate + Z_95 * se)


def estimate(
    versions: Sequence[str],
    propensities: Sequence[float],
    rewards: Sequence[float],
    clusters: Sequence[str | None],
    candidate: Mapping[str, float],
    *,
    experiment: str = "",
) -> Evaluation:
    """IPS and SNIPS of ``candidate`` (version -> share, normalised here) from logged arrays."""
    n = len(versions)
    if n == 0:
        raise ValueError("no logged decisions to evaluate")
    total = math.fsum(candidate.values())
    if not total > 0:
        raise ValueError("the candidate's shares must have a positive sum")
    shares = {v: s / total for v, s in candidate.items()}
    logged_versions = set(versions)
    unsupported = {v: s for v, s in sorted(shares.items()) if s > 0 and v not in logged_versions}

    p = np.asarray(propensities, dtype=np.float64)
    r = np.asarray(rewards, dtype=np.float64)
    w = np.array([shares.get(v, 0.0) for v in versions], dtype=np.float64) / p
    # Cluster index per decision: the user hash, or a cluster of its own.
    index: dict[str, int] = {}
    groups = np.empty(n, dtype=np.int64)
    for i, c in enumerate(clusters):
        key = c if c is not None else f"\x00{i}"
        groups[i] = index.setdefault(key, len(index))
    g = len(index)
    correction = g / (g - 1) if g > 1 else math.inf

    def clustered(values: npt.NDArray[np.float64]) -> float:
        return float(np.sum(np.bincount(groups, weights=values, minlength=g) ** 2))

    ips = float(np.sum(w * r) / n)
    ips_var = correction * clustered(w * r - ips) / n**2
    w_sum = float(np.sum(w))
    if w_sum > 0:
        snips = float(np.sum(w * r) / w_sum)
        snips_var = correction * clustered(w * (r - snips)) / w_sum**2
    else:
        snips, snips_var = 0.0, math.inf
    mean = float(np.mean(r))
    logged_var = correction * clustered(r - mean) / n**2
    w_sq = float(np.sum(w**2))
    return Evaluation(
        experiment=experiment,
        decisions=n,
        users=g,
        ips=_interval(ips, ips_var),
        snips=_interval(snips, snips_var),
        logged=_interval(mean, logged_var),
        effective_sample_size=w_sum**2 / w_sq if w_sq > 0 else 0.0,
        max_weight=float(np.max(w)),
        candidate_shares=shares,
        unsupported=unsupported,
    )


def evaluate(
    read: DecisionRead,
    rewards: RewardRead,
    candidate: Mapping[str, float],
    *,
    experiment: str | None,
) -> Evaluation:
    """``estimate`` over the logged decisions of one experiment (the log's only one when
    ``experiment`` is None); a decision without a reward row has reward 0."""
    name, chosen = experiment_decisions(read, experiment)
    return estimate(
        [d.version for d in chosen],
        [d.propensity for d in chosen],
        [rewards.rewards.get(d.decision_id, 0.0) for d in chosen],
        [d.user for d in chosen],
        candidate,
        experiment=name,
    )
