"""Thompson sampling from reward snapshots: the snapshot file, probability-best shares, the floor.

The snapshot file, written by ``python -m ml_serving.experiments snapshot`` (or any batch job)::

    {"experiment": "tip-prompts", "as_of": "2024-05-01T12:00:00Z",
     "arms": {"v1": {"trials": 1200, "successes": 131}, "v2-mentor": {...}}}

``as_of`` is RFC 3339 with an offset; ``trials >= successes >= 0`` are integers. Unknown keys
are ignored; an arm missing from the file has no data yet (Beta(1, 1)).

Shares (computed once per snapshot load, never per request): variant i's share is the
probability that its reaction rate is the highest when each rate ~ Beta(1 + successes_i,
1 + trials_i - successes_i), estimated from ``draws`` joint draws of
``numpy.random.Generator(PCG64(seed)).beta`` (numpy's beta sampler is scalar C code on the C
library's log/exp, so one build gives the same draws on every replica); ``seed`` is the first 8
bytes (big-endian) of ``blake2b(canonical JSON of {"arms", "experiment"}, digest_size=8)``, so
the same counts give the same shares whatever ``as_of`` says. Then the floor: every share becomes
``max(min_share, c * p_i)`` with ``c`` chosen so they sum to 1 (water-filling), so a variant that
is almost surely worse still gets ``min_share`` of the users and can recover.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class Arm:
    """Reward counts of one variant."""

    trials: int
    successes: int

    @property
    def failures(self) -> int:
        return self.trials - self.successes


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Reward counts per variant of one experiment, as of a time."""

    experiment: str
    as_of: dt.datetime
    """Time-zone aware."""
    arms: Mapping[str, Arm]

    def to_json(self) -> str:
        """The snapshot file's text (keys sorted, one line, a trailing newline)."""
        return (
            json.dumps(
                {
                    "experiment": self.experiment,
                    "as_of": format_time(self.as_of),
                    "arms": {
                        v: {"trials": a.trials, "successes": a.successes}
                        for v, a in sorted(self.arms.items())
                    },
                },
                sort_keys=True,
            )
            + "\n"
        )

    def seed(self) -> int:
        """The Monte Carlo seed: a hash of the experiment and the counts (not of ``as_of``)."""
        canonical = json.dumps(
            {
                "experiment": self.experiment,
                "arms": {
                    v: {"trials": a.trials, "successes": a.successes}
                    for v, a in sorted(self.arms.items())
                },
            },
            sort_keys=True,
            separators=(",", ":"),
        )
        digest = hashlib.blake2b(canonical.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "big")


def format_time(when: dt.datetime) -> str:
    """RFC 3339 in UTC with a ``Z`` (microseconds only when there are some)."""
    text = when.astimezone(dt.UTC).isoformat()
    return text.removesuffix("+00:00") + "Z"


def parse_time(value: Any, key: str) -> dt.datetime:
    """An RFC 3339 time with an offset; ValueError naming ``key`` otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"{key}: must be an RFC 3339 time string")
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{key}: {value!r} is not an RFC 3339 time") from None
    if when.tzinfo is None:
        raise ValueError(f"{key}: {value!r} has no time zone offset")
    return when


def parse_snapshot(text: str) -> Snapshot:
    """The snapshot in ``text``; ValueError naming the key of the first problem."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("(top level): must be a JSON object")
    experiment = data.get("experiment")
    if not isinstance(experiment, str) or not experiment:
        raise ValueError("experiment: required, a string")
    as_of = parse_time(data.get("as_of"), "as_of")
    raw_arms = data.get("arms")
    if not isinstance(raw_arms, dict):
        raise ValueError("arms: required, an object of version: {trials, successes}")
    arms = {}
    for version, counts in raw_arms.items():
        if not isinstance(counts, dict):
            raise ValueError(f"arms.{version}: must be an object with trials and successes")
        trials, successes = counts.get("trials"), counts.get("successes")
        for name, value in (("trials", trials), ("successes", successes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"arms.{version}.{name}: must be an integer >= 0")
        assert isinstance(trials, int) and isinstance(successes, int)
        if successes > trials:
            raise ValueError(f"arms.{version}.successes: {successes} exceeds trials {trials}")
        arms[version] = Arm(trials, successes)
    return Snapshot(experiment, as_of, arms)


def read_snapshot(path: Path) -> Snapshot:
    """``parse_snapshot`` of a file."""
    return parse_snapshot(path.read_text(encoding="utf-8"))


def write_snapshot(path: Path, snapshot: Snapshot) -> None:
    """Write ``snapshot`` to ``path`` atomically (a temporary file beside it, then a rename), so
    a server polling the path never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(snapshot.to_json())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def probability_best(arms: Sequence[Arm], draws: int, seed: int) -> list[float]:
    """Each arm's probability of having the highest rate under its Beta(1 + s, 1 + f)
    posterior, by ``draws`` seeded joint draws (ties go to the earlier arm)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    a = np.array([1.0 + arm.successes for arm in arms])
    b = np.array([1.0 + arm.failures for arm in arms])
    samples = rng.beta(a, b, size=(draws, len(arms)))
    wins = np.bincount(np.argmax(samples, axis=1), minlength=len(arms))
    return [int(w) / draws for w in wins]


def floor_shares(shares: Sequence[float], min_share: float) -> list[float]:
    """``max(min_share, c * p_i)`` with ``c`` such that the result sums to 1 (water-filling).

    Requires ``len(shares) * min_share <= 1``; all-zero shares become equal ones.
    """
    n = len(shares)
    total = math.fsum(shares)
    if total <= 0:
        return [1.0 / n] * n
    p = [s / total for s in shares]
    floored = [False] * n
    while True:
        free_mass = 1.0 - min_share * sum(floored)
        rest = math.fsum(p[i] for i in range(n) if not floored[i])
        if rest <= 0:
            # Everything left is at zero: it shares the free mass equally.
            left = n - sum(floored)
            result = [min_share if floored[i] else free_mass / left for i in range(n)]
        else:
            result = [min_share if floored[i] else free_mass * p[i] / rest for i in range(n)]
        newly = [i for i in range(n) if not floored[i] and result[i] < min_share]
        if not newly:
            return result
        for i in newly:
            floored[i] = True


def thompson_shares(
    snapshot: Snapshot, versions: Sequence[str], *, min_share: float, draws: int
) -> dict[str, float]:
    """The shares of ``versions`` from ``snapshot`` (arms of other versions are ignored)."""
    arms = [snapshot.arms.get(v, Arm(0, 0)) for v in versions]
    best = probability_best(arms, draws, snapshot.seed())
    return dict(zip(versions, floor_shares(best, min_share), strict=True))
