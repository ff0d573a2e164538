"""Sticky, storage-free assignment of users to prompt versions, and the selection precedence.

The algorithm (weighted rendezvous hashing; anyone with the salt, the user id and the shares
can recompute it, e.g. the recommender)::

    key     = salt encoded as UTF-8                (1..64 bytes; the name unless `salt` is set)
    for each variant i with share s_i > 0          (s_i = w_i / sum(w): the current shares)
        m_i = UTF-8(version_i) + 0x00 + UTF-8(user_id)
        x_i = blake2b(m_i, key=key, digest_size=8) read as a big-endian unsigned 64-bit int
        u_i = ((x_i >> 11) + 0.5) / 2**53          (53 bits: exact in a double, in (0, 1))
        score_i = -ln(u_i) / s_i                   (IEEE double, natural log)
    variant = the i with the lowest score_i        (on a tie, the version first in sorted order)

``-ln(u_i)`` is an Exp(1) draw, so ``score_i ~ Exp(s_i)`` and the lowest is variant i with
probability ``s_i``: over many users the shares match the weights. The same user always gets
the same variant while the shares stay (in every process, replica and restart: no storage, no
Python ``hash()``). When the shares change, a user moves only if the change reorders their
scores: when one share shrinks and the others grow in proportion (50/25/25 -> 40/30/30) exactly
the shrunk share's excess moves (0.10 there), the minimum possible; in general the moved share
is ``1 - sum_i 1 / sum_j max(s_j / s_i, s'_j / s'_i)`` (one minus the probability Jaccard
index of the two share vectors), which can exceed the total share that moved when shares move
in several directions at once (50/25/25 -> 25/50/25 moves 0.30 of users for a 0.25 change);
no storage-free scheme beats it on every change (Moulton and Jiang, "Maximally consistent
sampling and the Jaccard index of probability distributions", 2018).

Selection precedence (``PromptSelector.select``): the request's ``prompt_version`` (REQUEST,
propensity 1) -> the experiment's assignment (EXPERIMENT, propensity = the variant's share) ->
the server's default version (DEFAULT, propensity 1; the caller passes
``DEFAULT_PROMPT_VERSION`` or ``v1``). A call without a user id is not in the experiment.
Every selection gets a ``decision_id``: 32 hex digits from a per-process generator seeded from
the OS at start and again after a fork (no system call per call).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import math
import os
import random
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Final

from ml_serving.experiments import bandit
from ml_serving.experiments.config import ExperimentConfig, Policy

logger = logging.getLogger(__name__)

FALLBACK_VERSION: Final = "v1"
"""The version when neither the request, an experiment nor the server's default names one."""

_TWO_POW_MINUS_53: Final = 2.0**-53

# A private generator: module-level random may be seeded by anyone (tests do), and decision ids
# must stay unique. Reseeded from os.urandom in a forked child, so workers never share ids.
_ids = random.Random()
os.register_at_fork(after_in_child=_ids.seed)
_getrandbits = _ids.getrandbits


def new_decision_id() -> str:
    """A fresh decision id: 128 random bits as 32 lower-case hex digits."""
    return _getrandbits(128).to_bytes(16, "big").hex()


class HowChosen(enum.StrEnum):
    """Which step of the selection precedence picked the version."""

    REQUEST = "request"
    EXPERIMENT = "experiment"
    DEFAULT = "default"


@dataclass(frozen=True, slots=True)
class Assignment:
    """The version one call uses, and how it was picked (returned to the caller, logged)."""

    decision_id: str
    version: str
    how: HowChosen
    propensity: float
    """The probability this version had for this call: its share under EXPERIMENT, else 1."""
    experiment: str | None
    """The experiment's name under EXPERIMENT, else None."""


def unit_hash(salt: str, version: str, user_id: str) -> float:
    """``u_i`` of the module docstring: the reference, unoptimised form."""
    message = version.encode("utf-8") + b"\x00" + user_id.encode("utf-8")
    digest = hashlib.blake2b(message, key=salt.encode("utf-8"), digest_size=8).digest()
    return ((int.from_bytes(digest, "big") >> 11) + 0.5) * _TWO_POW_MINUS_53


class Shares:
    """The current shares of an experiment, ready to assign users (immutable once built)."""

    __slots__ = ("salt", "shares", "_arms")

    def __init__(self, salt: str, weights: Mapping[str, float]) -> None:
        total = math.fsum(weights.values())
        if not total > 0 or any(not w >= 0 for w in weights.values()):
            raise ValueError(f"weights must be >= 0 with a positive sum: {dict(weights)}")
        key = salt.encode("utf-8")
        self.salt = salt
        self.shares: Mapping[str, float] = {v: weights[v] / total for v in sorted(weights)}
        """version -> share (sums to 1), versions sorted."""
        # The keyed hash of each variant's prefix is computed once; a call copies it and adds
        # the user id (a third of the cost of hashing from scratch with the key each time).
        self._arms = tuple(
            (v, s, hashlib.blake2b(v.encode("utf-8") + b"\x00", key=key, digest_size=8))
            for v, s in self.shares.items()
            if s > 0
        )

    def choose(self, user_id: str) -> tuple[str, float]:
        """The user's variant and its share (the module docstring's algorithm)."""
        user = user_id.encode("utf-8")
        best_score = math.inf
        best: tuple[str, float] = ("", 0.0)
        log = math.log
        for version, share, prefix in self._arms:
            h = prefix.copy()
            h.update(user)
            x = int.from_bytes(h.digest(), "big") >> 11
            score = -log((x + 0.5) * _TWO_POW_MINUS_53) / share
            if score < best_score:
                best_score = score
                best = (version, share)
        return best

    def __repr__(self) -> str:
        inner = ", ".join(f"{v}={s:.4f}" for v, s in self.shares.items())
        return f"Shares({inner})"


class Experiment:
    """An experiment while it serves: its config and current shares, refreshed from snapshots.

    ``shares`` is a plain attribute swapped whole: a call reads it once. A fixed policy keeps
    the file's weights. A thompson policy starts from them and replaces them when a snapshot
    loads (at construction if the file is there, then on ``reload_if_changed``); a missing,
    malformed, foreign or stale snapshot is logged (WARNING once per distinct problem) and the
    shares stay.
    """

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.name = config.name
        self.shares: Shares = Shares(config.salt, config.variants)
        self.snapshot: bandit.Snapshot | None = None
        """The snapshot the shares come from; None until one loads (and for fixed)."""
        self.loaded_at: float | None = None
        """``time.time()`` when that snapshot loaded."""
        self.refused: int = 0
        """Snapshots refused so far (malformed, another experiment's, or stale)."""
        self._stat_key: tuple[int, int, int] | None = None
        self._last_problem: str | None = None
        if config.policy is Policy.THOMPSON:
            self.reload_if_changed()

    def assign(self, user_id: str) -> tuple[str, float]:
        """The user's variant under the current shares, and its share."""
        return self.shares.choose(user_id)

    def snapshot_age_s(self, now: float | None = None) -> float | None:
        """Seconds since the loaded snapshot's ``as_of``; None without one."""
        if self.snapshot is None:
            return None
        return (time.time() if now is None else now) - self.snapshot.as_of.timestamp()

    def reload_if_changed(self) -> bool:
        """Load the snapshot file if it changed since the last look; True when shares changed.

        Cheap enough to call every few seconds: one ``stat``, and the file is read and parsed
        only when its inode, mtime or size changed (writers replace it atomically, which gives
        a new inode). Never raises; problems are logged and the shares stay.
        """
        path = self.config.snapshot
        if self.config.policy is not Policy.THOMPSON or path is None:
            return False
        try:
            st = os.stat(path)
        except OSError as exc:
            self._problem(f"cannot read snapshot {path}: {exc.strerror or exc}", refused=False)
            return False
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key == self._stat_key:
            return False
        # Remembered before parsing: a bad file is refused once, not re-read every poll.
        self._stat_key = key
        try:
            snapshot = bandit.read_snapshot(path)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            self._problem(f"snapshot {path} refused: {exc}")
            return False
        if snapshot.experiment != self.name:
            self._problem(f"snapshot {path} refused: it is for experiment {snapshot.experiment!r}")
            return False
        current = self.snapshot
        if current is not None and snapshot.as_of < current.as_of:
            self._problem(
                f"snapshot {path} refused: stale, as_of {bandit.format_time(snapshot.as_of)} "
                f"is older than the loaded {bandit.format_time(current.as_of)}"
            )
            return False
        if current is not None and snapshot.arms == current.arms:
            self.snapshot, self.loaded_at = snapshot, time.time()
            self._last_problem = None
            return False
        versions = sorted(self.config.variants)
        shares = bandit.thompson_shares(
            snapshot, versions, min_share=self.config.min_share, draws=self.config.draws
        )
        self.shares = Shares(self.config.salt, shares)
        self.snapshot, self.loaded_at = snapshot, time.time()
        self._last_problem = None
        ignored = sorted(set(snapshot.arms) - set(versions))
        logger.info(
            "experiment %s: shares from the snapshot as of %s: %s%s",
            self.name,
            bandit.format_time(snapshot.as_of),
            ", ".join(f"{v}={s:.4f}" for v, s in self.shares.shares.items()),
            f" (arms of other versions ignored: {', '.join(ignored)})" if ignored else "",
        )
        return True

    def _problem(self, text: str, *, refused: bool = True) -> None:
        # Polling repeats the same problem every interval: warn once per distinct problem.
        if refused:
            self.refused += 1
        level = logging.DEBUG if text == self._last_problem else logging.WARNING
        self._last_problem = text
        logger.log(level, "experiment %s: %s; the shares stay %s", self.name, text, self.shares)

    async def watch(self, interval_s: float) -> None:
        """Call ``reload_if_changed`` every ``interval_s`` seconds (in a thread) until
        cancelled; a no-op loop for a fixed policy."""
        if self.config.policy is not Policy.THOMPSON:
            return
        while True:
            await asyncio.sleep(interval_s)
            await asyncio.to_thread(self.reload_if_changed)


class PromptSelector:
    """The selection precedence: request -> experiment -> default (see the module docstring).

    ``counts`` holds (experiment or "", version, how) -> selections so far, for metrics; a
    requested version outside ``known_versions`` (when given) is counted as ``"unknown"``, so a
    caller cannot grow the table without bound.
    """

    def __init__(
        self,
        experiment: Experiment | None,
        default_version: str | None = None,
        *,
        known_versions: Collection[str] | None = None,
    ) -> None:
        self.experiment = experiment
        self.default_version = default_version or FALLBACK_VERSION
        self._known = None if known_versions is None else frozenset(known_versions)
        self.counts: dict[tuple[str, str, HowChosen], int] = {}

    def select(self, user_id: str, requested: str = "") -> Assignment:
        """The version for one call; ``requested`` is the request's prompt_version ("" = unset).

        Does not check that a requested version exists: resolving it stays the prompt
        registry's job (and its error)."""
        decision_id = _getrandbits(128).to_bytes(16, "big").hex()
        if requested:
            counted = requested if self._known is None or requested in self._known else "unknown"
            self._count("", counted, HowChosen.REQUEST)
            return Assignment(decision_id, requested, HowChosen.REQUEST, 1.0, None)
        experiment = self.experiment
        if experiment is not None and user_id:
            version, share = experiment.shares.choose(user_id)
            self._count(experiment.name, version, HowChosen.EXPERIMENT)
            return Assignment(decision_id, version, HowChosen.EXPERIMENT, share, experiment.name)
        self._count("", self.default_version, HowChosen.DEFAULT)
        return Assignment(decision_id, self.default_version, HowChosen.DEFAULT, 1.0, None)

    def _count(self, experiment: str, version: str, how: HowChosen) -> None:
        key = (experiment, version, how)
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
