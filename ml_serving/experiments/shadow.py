"""Shadow prompt versions: generated in the background beside a call, logged, never returned.

``ShadowRunner.maybe_run(decision_id, primary_version, factory)`` decides per call and returns
at once: the shadow runs when ``sampled(decision_id, share)`` holds (``u`` from
``blake2b(UTF-8(decision_id), key=b"shadow", digest_size=8)`` as in the assignment hash, below
``share``: the same call decides the same everywhere) and the primary version is not the shadow
version. Beyond ``max_in_flight`` running shadows it is skipped. Otherwise ``factory()`` (a
coroutine function generating with the shadow version) runs in its own task under
``timeout_s``; its result, or its failure, becomes a shadow line in the decision log under the
same decision id. Nothing from the shadow ever raises into the caller, and the caller never
waits for it. ``outcomes`` counts ran / skipped / failed / cancelled for metrics; ``close()``
cancels what is still running (at drain).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

from ml_serving.experiments.config import ShadowConfig
from ml_serving.experiments.decisions import DecisionLog, ShadowResult

logger = logging.getLogger(__name__)

__all__ = ["ShadowOutcome", "ShadowResult", "ShadowRunner", "sampled"]

_SHADOW_KEY: Final = b"shadow"


class ShadowOutcome(enum.StrEnum):
    """What became of a sampled shadow."""

    RAN = "ran"
    """Generated and logged."""
    SKIPPED = "skipped"
    """Not started: ``max_in_flight`` shadows were running (or the runner was closed)."""
    FAILED = "failed"
    """Raised or ran past ``timeout_s`` (logged with the error)."""
    CANCELLED = "cancelled"
    """Still running at ``close()``."""


def sampled(decision_id: str, share: float) -> bool:
    """Whether the decision runs the shadow: a keyed hash of its id, below ``share``."""
    digest = hashlib.blake2b(decision_id.encode("utf-8"), key=_SHADOW_KEY, digest_size=8).digest()
    return ((int.from_bytes(digest, "big") >> 11) + 0.5) * 2.0**-53 < share


class ShadowRunner:
    """Runs one experiment's shadow prompt version in the background, bounded."""

    def __init__(
        self,
        config: ShadowConfig,
        log: DecisionLog | None,
        *,
        experiment: str | None = None,
    ) -> None:
        self.config = config
        self.version = config.prompt_version
        self._log = log
        self._experiment = experiment
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._warned: set[str] = set()
        self.outcomes: dict[ShadowOutcome, int] = dict.fromkeys(ShadowOutcome, 0)
        """Counts by outcome, for metrics."""

    @property
    def in_flight(self) -> int:
        """Shadows running now."""
        return len(self._tasks)

    def wants(self, decision_id: str, primary_version: str) -> bool:
        """Whether this call should run the shadow (before the in-flight limit)."""
        return primary_version != self.version and sampled(decision_id, self.config.share)

    def maybe_run(
        self,
        decision_id: str,
        primary_version: str,
        factory: Callable[[], Awaitable[ShadowResult]],
    ) -> bool:
        """Start the shadow for this call if it is sampled and there is room; True if started.

        Call it from the event loop; it never raises and never waits."""
        try:
            if not self.wants(decision_id, primary_version):
                return False
            if self._closed or len(self._tasks) >= self.config.max_in_flight:
                self.outcomes[ShadowOutcome.SKIPPED] += 1
                return False
            task = asyncio.get_running_loop().create_task(
                self._run(decision_id, factory), name=f"shadow-{decision_id}"
            )
        except Exception as exc:  # the caller's call must go on whatever happens here
            self.outcomes[ShadowOutcome.FAILED] += 1
            self._warn(exc)
            return False
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _run(self, decision_id: str, factory: Callable[[], Awaitable[ShadowResult]]) -> None:
        started = time.perf_counter()
        result: ShadowResult | None = None
        try:
            async with asyncio.timeout(self.config.timeout_s):
                result = await factory()
        except asyncio.CancelledError:
            self.outcomes[ShadowOutcome.CANCELLED] += 1
            self._record(decision_id, ShadowOutcome.CANCELLED, started, None, "cancelled")
            raise
        except Exception as exc:  # TimeoutError included: a shadow's failure is only counted
            self.outcomes[ShadowOutcome.FAILED] += 1
            self._warn(exc)
            self._record(decision_id, ShadowOutcome.FAILED, started, None, _describe(exc))
            return
        try:
            self._record(decision_id, ShadowOutcome.RAN, started, result, None)
        except Exception as exc:  # a result without the expected fields
            self.outcomes[ShadowOutcome.FAILED] += 1
            self._warn(exc)
            return
        self.outcomes[ShadowOutcome.RAN] += 1

    def _record(
        self,
        decision_id: str,
        outcome: ShadowOutcome,
        started: float,
        result: ShadowResult | None,
        error: str | None,
    ) -> None:
        if self._log is not None:
            self._log.record_shadow(
                decision_id,
                experiment=self._experiment,
                version=self.version,
                outcome=outcome.value,
                seconds=time.perf_counter() - started,
                result=result,
                error=error,
            )

    def _warn(self, exc: BaseException) -> None:
        # A failing shadow fails the same way every call: warn once per kind, count the rest.
        kind = type(exc).__name__
        level = logging.DEBUG if kind in self._warned else logging.WARNING
        self._warned.add(kind)
        logger.log(level, "shadow prompt version %s failed: %s", self.version, _describe(exc))

    async def close(self) -> None:
        """Refuse new shadows and cancel the running ones (waits for them to finish)."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "TimeoutError: the shadow ran past its timeout_s"
    return f"{type(exc).__name__}: {exc}"[:300]
