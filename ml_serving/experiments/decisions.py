"""The decision log: one JSON line per decision (and per shadow), read back to join rewards.

A primary line (``DecisionLog.record``)::

    {"decision_id": "<32 hex>", "ts": "2024-05-01T12:00:00.123Z", "experiment": "tip-prompts",
     "version": "v2-mentor", "propensity": 0.25, "how": "experiment", "prompt_hash": "<sha256>",
     "model": "gpt-4o-mini", "fallback": false, "user": "<32 hex>", "shadow": false,
     "request_id": "..."}

``experiment`` is null unless ``how`` is "experiment". ``user`` is
``blake2b(UTF-8(user_id), key=user_key, digest_size=16)`` in hex: joinable across lines and
restarts with the same key, never the raw id. A shadow line (``record_shadow``) carries the same
``decision_id`` with ``"shadow": true``, ``outcome`` ("ran", "failed" or "cancelled"), the shadow's
``version``, ``prompt_hash``, ``model``, ``fallback``, ``usage`` ({"prompt_tokens",
"completion_tokens"}), ``finish_reason``, ``seconds``, ``error`` and ``text`` (cut to
``max_text_chars``).

Where lines go: with a path, appended to that file, one ``write(2)`` per line on a descriptor
opened with ``O_APPEND`` (line at a time, nothing buffered to lose, no fsync; concurrent
writers append whole lines; ``reopen()`` after a rotation renamed the file; a record, JSON
encoding included, measured 7-23 us on a loaded 2-core machine). Without a path, to the logger
``ml_serving.decisions`` at INFO as a record whose fields are the line's: the JSON log format
puts them at the top level of the log line (``{"ts": ..., "level": "INFO", "logger":
"ml_serving.decisions", "msg": "decision", "decision_id": ..., "version": ...}``, the record's
own ``ts`` and ``request_id``), so a log shipper parses each line once; the text format appends
them as one JSON object after the message. The shadow's text, a completion, goes to the logger
only when it is enabled for DEBUG (completions are logged at DEBUG only); the file always has
it. A failed write is counted (``write_errors``) and logged, never raised into the call.

Reading (``read_decisions``) takes files of raw lines or of log output: a JSON log line whose
``logger`` is ``ml_serving.decisions`` (its top-level fields; a line from before they moved
there, its ``msg`` parsed), a text log line (parsed from its first ``{``), or a raw line;
anything else is skipped. Each ``decision_id`` counts once (the first primary line).
``build_snapshot`` joins rewards (``RewardRead``: a CSV of ``decision_id,reward``, header
optional, or rows from anywhere through ``add``) to the decisions of one experiment chosen by it
(``how`` "experiment"): each such decision is one trial of its version, a success when its
reward is positive; a decision without a reward row is a trial without success; reward rows
that match no decision are reported.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

from ml_serving.experiments.assignment import Assignment, HowChosen
from ml_serving.experiments.bandit import Arm, Snapshot
from ml_serving.observability.logs import TEXT_FIELDS_ATTR

logger = logging.getLogger(__name__)

DECISIONS_LOGGER: Final = "ml_serving.decisions"
"""The logger decision lines go to when the log has no file."""
decisions_logger = logging.getLogger(DECISIONS_LOGGER)

_ENCODER = json.JSONEncoder(separators=(",", ":"))


class ShadowUsage(Protocol):
    """What a shadow's completion reports (``llm.gateway.Completion`` has these)."""

    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def finish_reason(self) -> str: ...


class ShadowResult(Protocol):
    """What a shadow generation returns (``generation.service.GenerationResult`` has these)."""

    @property
    def text(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def prompt_version(self) -> str: ...
    @property
    def prompt_hash(self) -> str: ...
    @property
    def fallback(self) -> bool: ...
    @property
    def completion(self) -> ShadowUsage: ...


class DecisionLog:
    """Writes decision lines to ``path`` (appended) or, when None, to ``ml_serving.decisions``.

    ``user_key`` keys the user-id hash (1 byte or more; longer than 64 bytes is hashed down to
    64): the same key gives the same hashes across restarts and replicas.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        user_key: bytes,
        *,
        max_text_chars: int = 8192,
    ) -> None:
        if not user_key:
            raise ValueError("the decision log's user-id hash key must not be empty")
        self.path = Path(path) if path is not None and str(path) else None
        self._key = user_key if len(user_key) <= 64 else hashlib.blake2b(user_key).digest()
        self._max_text = max_text_chars
        self._fd: int | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = self._open(self.path)
        self.lines = 0
        """Lines written."""
        self.write_errors = 0
        """Lines lost to a failed write."""
        self._second = -1
        self._stamp = ""

    def user_hash(self, user_id: str) -> str:
        """The keyed hash of a user id that the log carries instead of it."""
        return hashlib.blake2b(user_id.encode("utf-8"), key=self._key, digest_size=16).hexdigest()

    def record(
        self,
        assignment: Assignment,
        *,
        user_id: str,
        prompt_hash: str,
        model: str,
        fallback: bool,
        request_id: str | None = None,
    ) -> None:
        """One primary decision, once the call knows its model and whether it fell back."""
        self._write(
            {
                "decision_id": assignment.decision_id,
                "ts": self._now(),
                "experiment": assignment.experiment,
                "version": assignment.version,
                "propensity": assignment.propensity,
                "how": assignment.how.value,
                "prompt_hash": prompt_hash,
                "model": model,
                "fallback": fallback,
                "user": self.user_hash(user_id) if user_id else None,
                "shadow": False,
                "request_id": request_id,
            },
            with_text=False,
        )

    def record_shadow(
        self,
        decision_id: str,
        *,
        experiment: str | None,
        version: str,
        outcome: str,
        seconds: float,
        result: ShadowResult | None = None,
        error: str | None = None,
    ) -> None:
        """One shadow generation under the primary's ``decision_id``."""
        line: dict[str, Any] = {
            "decision_id": decision_id,
            "ts": self._now(),
            "experiment": experiment,
            "version": version,
            "shadow": True,
            "outcome": outcome,
            "seconds": round(seconds, 6),
            "error": error,
        }
        if result is not None:
            usage = result.completion
            line.update(
                prompt_hash=result.prompt_hash,
                model=result.model,
                fallback=result.fallback,
                usage={
                    "prompt_tokens": usage.prompt_tokens,
                    "completion_tokens": usage.completion_tokens,
                },
                finish_reason=usage.finish_reason,
                text=result.text[: self._max_text],
            )
        self._write(line, with_text=True)

    @staticmethod
    def _open(path: Path) -> int:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def reopen(self) -> None:
        """Open the path afresh (after a log rotation renamed the file); no-op for the logger."""
        if self.path is None:
            return
        fd, old = self._open(self.path), self._fd
        self._fd = fd
        if old is not None:
            os.close(old)

    def close(self) -> None:
        """Close the file (no-op for the logger)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _now(self) -> str:
        # A line per call: the per-second part of the timestamp is formatted once a second.
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((now - second) * 1000):03d}Z"

    def _write(self, line: dict[str, Any], *, with_text: bool) -> None:
        fd = self._fd
        if fd is None:
            if not decisions_logger.isEnabledFor(logging.INFO):
                return
            if with_text and "text" in line and not decisions_logger.isEnabledFor(logging.DEBUG):
                line = {k: v for k, v in line.items() if k != "text"}
            # The fields ride on the record, so the JSON formatter puts them at the top level of
            # the log line (not a JSON string inside msg that every shipper must parse again).
            decisions_logger.info(
                "shadow decision" if line["shadow"] else "decision",
                extra={**line, TEXT_FIELDS_ATTR: True},
            )
            self.lines += 1
            return
        data = (_ENCODER.encode(line) + "\n").encode("utf-8")
        try:
            # os.write may write less than asked (a full disk, a signal): finish the line.
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except OSError as exc:
            self.write_errors += 1
            logger.warning("decision log %s: a line was lost: %s", self.path, exc)
            return
        self.lines += 1


@dataclass(frozen=True, slots=True)
class Decision:
    """One primary decision read back from a log."""

    decision_id: str
    version: str
    how: str
    propensity: float
    experiment: str | None
    user: str | None
    ts: str | None


@dataclass
class DecisionRead:
    """The decisions in some log files and what else the files held."""

    decisions: dict[str, Decision] = field(default_factory=dict)
    """By decision id, the first primary line of each."""
    duplicates: int = 0
    """Primary lines whose decision id was already read (ignored)."""
    shadow_lines: int = 0
    skipped_lines: int = 0
    """Lines that are not decision lines (other log output)."""
    malformed: int = 0
    """Decision lines with a missing or wrongly typed field (ignored)."""


def _line_object(line: str) -> dict[str, Any] | None:
    start = line.find("{")
    if start < 0:
        return None
    try:
        obj = json.loads(line[start:])
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    if "logger" in obj:
        # A JSON log line: only the decisions logger's, whose fields are the decision line's.
        if obj.get("logger") != DECISIONS_LOGGER:
            return None
        if "decision_id" in obj:
            return obj
        # Written before the fields moved to the top level: the line was the message.
        return _line_object(obj["msg"]) if isinstance(obj.get("msg"), str) else None
    return obj if "decision_id" in obj else None


def _decision(obj: dict[str, Any]) -> Decision | None:
    did, version, how, propensity = (
        obj.get("decision_id"),
        obj.get("version"),
        obj.get("how"),
        obj.get("propensity"),
    )
    experiment, user, ts = obj.get("experiment"), obj.get("user"), obj.get("ts")
    if not (isinstance(did, str) and did and isinstance(version, str) and isinstance(how, str)):
        return None
    if isinstance(propensity, bool) or not isinstance(propensity, int | float):
        return None
    if not 0 < propensity <= 1:
        return None
    if experiment is not None and not isinstance(experiment, str):
        return None
    return Decision(
        did,
        version,
        how,
        float(propensity),
        experiment,
        user if isinstance(user, str) else None,
        ts if isinstance(ts, str) else None,
    )


def read_decisions(paths: Iterable[str | os.PathLike[str]]) -> DecisionRead:
    """The primary decisions in ``paths`` (each id once), skipping other lines."""
    read = DecisionRead()
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                obj = _line_object(line)
                if obj is None:
                    read.skipped_lines += 1
                    continue
                if obj.get("shadow") is True:
                    read.shadow_lines += 1
                    continue
                decision = _decision(obj)
                if decision is None:
                    read.malformed += 1
                elif decision.decision_id in read.decisions:
                    read.duplicates += 1
                else:
                    read.decisions[decision.decision_id] = decision
    return read


@dataclass
class RewardRead:
    """Rewards by decision id (from CSV files, a SQL table, any rows given to ``add``)."""

    rewards: dict[str, float] = field(default_factory=dict)
    """The highest reward given to each decision id."""
    duplicates: int = 0
    """Rows for a decision id already seen (the highest reward counts)."""

    def add(self, decision_id: object, reward: object, where: str) -> None:
        """One reward row; ValueError naming ``where`` (file and line, table and row) when its
        decision id is empty or its reward is not a finite number."""
        did = str(decision_id).strip() if decision_id is not None else ""
        if not did:
            raise ValueError(f"{where}: expected decision_id,reward")
        if isinstance(reward, bool) or not isinstance(reward, str | int | float):
            raise ValueError(f"{where}: reward {reward!r} is not a number")
        try:
            value = float(reward)
        except ValueError:
            raise ValueError(f"{where}: reward {reward!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{where}: reward {reward!r} is not finite")
        if did in self.rewards:
            self.duplicates += 1
            value = max(value, self.rewards[did])
        self.rewards[did] = value


def read_rewards(paths: Iterable[str | os.PathLike[str]]) -> RewardRead:
    """``decision_id,reward`` rows (a ``decision_id,reward`` header is optional; blank lines
    are skipped). ValueError naming the file and line of a bad row."""
    read = RewardRead()
    for path in paths:
        with open(path, encoding="utf-8", newline="") as f:
            for number, row in enumerate(csv.reader(f), start=1):
                if not row or all(not cell.strip() for cell in row):
                    continue
                if number == 1 and [c.strip().lower() for c in row[:2]] == [
                    "decision_id",
                    "reward",
                ]:
                    continue
                if len(row) < 2:
                    raise ValueError(f"{path}:{number}: expected decision_id,reward")
                read.add(row[0], row[1], f"{path}:{number}")
    return read


def experiment_decisions(read: DecisionRead, experiment: str | None) -> tuple[str, list[Decision]]:
    """The decisions an experiment's policy made (``how`` "experiment"), and its name; with
    ``experiment`` None, the log must hold exactly one experiment. ValueError otherwise."""
    chosen = [d for d in read.decisions.values() if d.how == HowChosen.EXPERIMENT.value]
    names = sorted({d.experiment for d in chosen if d.experiment})
    if experiment is None:
        if len(names) != 1:
            found = ", ".join(names) if names else "none"
            raise ValueError(f"name the experiment: the log holds experiments {found}")
        experiment = names[0]
    return experiment, [d for d in chosen if d.experiment == experiment]


@dataclass(frozen=True)
class SnapshotReport:
    """What ``build_snapshot`` counted and what it could not match."""

    experiment: str
    decisions: int
    """Decisions counted as trials (each once)."""
    rewarded: int
    """Of those, decisions with a reward row."""
    duplicate_decisions: int
    duplicate_rewards: int
    unmatched_rewards: tuple[str, ...]
    """Reward rows' decision ids found in no decision line (sorted)."""
    uncounted_rewards: int
    """Reward rows for decisions of another experiment or not chosen by one."""


def build_snapshot(
    read: DecisionRead,
    rewards: RewardRead,
    *,
    experiment: str | None,
    as_of: dt.datetime,
) -> tuple[Snapshot, SnapshotReport]:
    """Reward counts per version for one experiment (see the module docstring)."""
    name, chosen = experiment_decisions(read, experiment)
    trials: dict[str, int] = {}
    successes: dict[str, int] = {}
    rewarded = 0
    for d in chosen:
        trials[d.version] = trials.get(d.version, 0) + 1
        reward = rewards.rewards.get(d.decision_id)
        if reward is not None:
            rewarded += 1
            if reward > 0:
                successes[d.version] = successes.get(d.version, 0) + 1
    unmatched = tuple(sorted(did for did in rewards.rewards if did not in read.decisions))
    report = SnapshotReport(
        experiment=name,
        decisions=len(chosen),
        rewarded=rewarded,
        duplicate_decisions=read.duplicates,
        duplicate_rewards=rewards.duplicates,
        unmatched_rewards=unmatched,
        uncounted_rewards=len(rewards.rewards) - len(unmatched) - rewarded,
    )
    arms: Mapping[str, Arm] = {v: Arm(n, successes.get(v, 0)) for v, n in sorted(trials.items())}
    return Snapshot(name, as_of, arms), report
