"""Shadow model versions for Score: re-score a share of calls after the answer, compare ranks."""

from __future__ import annotations

import asyncio
import collections
import enum
import functools
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt

from ml_serving.scoring.features import Float64Array
from ml_serving.scoring.mlflow_registry import CHALLENGER, MlflowRegistry
from ml_serving.scoring.model import AlignedRequest, Model, ScoreResult
from ml_serving.scoring.registry import (
    MAX_POLL_BACKOFF_S,
    ModelRegistry,
    ModelSource,
    PollHealth,
    RegistryError,
    RegistryUnavailable,
    _atomic_write_bytes,
)

logger = logging.getLogger(__name__)

SHADOW_FILE: Final = "SHADOW"
"""``models/<name>/SHADOW`` names the version that shadows the promoted one, as text."""
TOP_K: Final = 5
"""Top-k overlap compares the first ``min(TOP_K, n)`` candidates of each ranking."""
TAU_MAX_CANDIDATES: Final = 200
"""Kendall tau over every pair up to this many candidates; above it, over a fixed sample."""
TAU_SAMPLE_SEED: Final = 20240601
"""Seed of that sample: the same candidates positions for every request of one size."""
MAX_QUEUED: Final = 1
"""Comparisons waiting for the loop at once; more are skipped: at most one comparison's CPU is
added to a turn of the event loop, whatever the rate of Score calls."""


# --- the pointer ---------------------------------------------------------------------------------


class ShadowSource(Protocol):
    """Where the shadow version is named and loaded (the file registry or MLflow)."""

    def shadow_version(self, name: str) -> str | None:
        """The version that should shadow ``name`` now; None when no shadow is named."""
        ...

    def load(self, name: str, version: str) -> Model:
        """One fully validated version (the registry's own ``load``)."""
        ...


class FileShadowPointer:
    """``<root>/<name>/SHADOW`` of a ``ModelRegistry``; versions load through its ``load``."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    def path(self, name: str) -> Path:
        """The pointer file of ``name``."""
        return self.registry.root / name / SHADOW_FILE

    def shadow_version(self, name: str) -> str | None:
        """The version the file names; None when the file is missing or empty."""
        try:
            text = self.path(name).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        # Validated as a name by ``load`` (which refuses anything that could leave the root).
        return text or None

    def load(self, name: str, version: str) -> Model:
        """``ModelRegistry.load``: the same checks as a promoted version."""
        return self.registry.load(name, version)


class AliasShadowPointer:
    """An MLflow alias (``challenger`` by default) of an ``MlflowRegistry``."""

    def __init__(self, registry: MlflowRegistry, alias: str = CHALLENGER) -> None:
        self.registry = registry
        self.alias = alias

    def shadow_version(self, name: str) -> str | None:
        """The version the alias points at; None when it points nowhere (MLflow's 4xx)."""
        try:
            return self.registry.version_by_alias(name, self.alias)
        except RegistryUnavailable:
            raise
        except RegistryError:
            return None

    def load(self, name: str, version: str) -> Model:
        """``MlflowRegistry.load``: cached or downloaded, validated like the file registry."""
        return self.registry.load(name, version)


def pointer_for(source: ModelSource) -> ShadowSource:
    """The shadow pointer beside the serving holder's registry: ``SHADOW`` for the file
    registry, the ``challenger`` alias for MLflow."""
    if isinstance(source, ModelRegistry):
        return FileShadowPointer(source)
    if isinstance(source, MlflowRegistry):
        return AliasShadowPointer(source)
    raise TypeError(f"no shadow pointer for a {type(source).__name__}")


def set_shadow(registry: ModelRegistry, name: str, version: str) -> Model:
    """Validate ``version`` fully, then name it in ``SHADOW`` (atomically); a version that fails
    validation raises and leaves the pointer as it was."""
    model = registry.load(name, version)
    path = FileShadowPointer(registry).path(name)
    try:
        _atomic_write_bytes(path, f"{version}\n".encode())
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise
    logger.info("model %s: version %s shadows the promoted one", name, version)
    return model


def clear_shadow(registry: ModelRegistry, name: str) -> bool:
    """Remove ``SHADOW`` of ``name``; True if there was one."""
    registry.versions(name)  # checks the name before it becomes a path
    path = FileShadowPointer(registry).path(name)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    logger.info("model %s: shadow cleared", name)
    return True


# --- the comparison ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Comparison:
    """How the shadow's scores of one request compare with the served ones."""

    candidates: int
    k: int
    """``min(TOP_K, candidates)``."""
    top_k_overlap: float
    """Share of the served top k that is in the shadow's top k, in [0, 1]."""
    kendall_tau: float | None
    """Kendall tau-b of the two rankings, in [-1, 1]; None when undefined (one candidate, or
    all of them tied in one ranking)."""
    tau_sampled: bool
    """Tau was computed over a fixed sample of ``TAU_MAX_CANDIDATES`` candidates."""
    mean_abs_delta: float
    """Mean over the candidates of |served score - shadow score|."""


@functools.lru_cache(maxsize=256)
def _tau_sample(n: int) -> npt.NDArray[np.intp]:
    # One sample per request size, the same in every process: tau stays comparable over time.
    rng = np.random.default_rng(TAU_SAMPLE_SEED)
    picked = np.sort(rng.choice(n, size=TAU_MAX_CANDIDATES, replace=False)).astype(np.intp)
    picked.flags.writeable = False
    return picked


def kendall_tau(a: Float64Array, b: Float64Array) -> float | None:
    """Kendall tau-b of ``a`` and ``b`` over all pairs (n x n, vectorised); None if undefined."""
    if len(a) < 2:
        return None
    # Boolean n x n "i above j" tables: over ordered pairs, the concordant ones are above in
    # both, the discordant ones above in a and below in b (b's table transposed); a pair tied
    # in either is in neither count, as tau-b wants. Comparisons, not np.sign: 5x less CPU.
    above_a = np.greater.outer(a, a)
    above_b = np.greater.outer(b, b)
    untied_a = np.count_nonzero(above_a)
    untied_b = np.count_nonzero(above_b)
    if untied_a == 0 or untied_b == 0:
        return None
    concordant = np.count_nonzero(above_a & above_b)
    discordant = np.count_nonzero(above_a & above_b.T)
    tau = (concordant - discordant) / math.sqrt(untied_a * untied_b)
    return min(1.0, max(-1.0, tau))


def _top(scores: Float64Array, k: int) -> npt.NDArray[np.intp]:
    n = len(scores)
    return np.argpartition(scores, n - k)[n - k :]


def compare(served: Float64Array, shadow: Float64Array) -> Comparison:
    """Top-k overlap (k = min(5, n)), Kendall tau-b and mean |delta| of two score vectors of
    one request. Tau is over every pair up to ``TAU_MAX_CANDIDATES`` candidates, above that over
    a fixed-seed sample of that many (an estimate; the other two always use every candidate)."""
    n = len(served)
    if n == 0 or shadow.shape != served.shape:
        raise ValueError(f"cannot compare {served.shape} served with {shadow.shape} shadow scores")
    k = min(TOP_K, n)
    in_top = np.zeros(n, dtype=np.bool_)
    in_top[_top(served, k)] = True
    overlap = np.count_nonzero(in_top[_top(shadow, k)]) / k
    sampled = n > TAU_MAX_CANDIDATES
    if sampled:
        picked = _tau_sample(n)
        tau = kendall_tau(served[picked], shadow[picked])
    else:
        tau = kendall_tau(served, shadow)
    delta = float(np.abs(served - shadow).sum()) / n
    return Comparison(n, k, overlap, tau, sampled, delta)


# --- the scorer ----------------------------------------------------------------------------------


class SkipReason(enum.StrEnum):
    """Why a sampled Score call was not compared."""

    SAME_VERSION = "same_version"
    """The shadow is the version serving the call."""
    BUSY = "busy"
    """More RPCs were in flight than ``max_in_flight_rpcs``: shadow work is shed first."""
    QUEUED = "queued"
    """A comparison was already waiting for the event loop (``MAX_QUEUED``)."""
    ERROR = "error"
    """Scoring or comparing failed (logged once per kind of failure)."""


class ShadowObserver(Protocol):
    """Told about every comparison (metrics' histograms)."""

    def shadow_compared(self, version: str, comparison: Comparison) -> None: ...


class ShadowScorer:
    """Follows the shadow pointer and compares the shadow version's scores with the served ones.

    ``offer`` is called by Score once its result is computed: for ``share`` of the calls
    (``random() < share``) it queues the comparison with ``loop.call_soon``, so it runs after
    the handler has returned its response, on the same request arrays. Nothing here raises into
    the caller; every sampled call not compared is counted in ``skipped`` by reason.
    """

    def __init__(
        self,
        source: ShadowSource,
        name: str,
        *,
        share: float,
        max_in_flight_rpcs: int,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share must be in [0, 1], got {share}")
        self.source = source
        self.name = name
        self.share = share
        self.max_in_flight_rpcs = max_in_flight_rpcs
        self.observer: ShadowObserver | None = None
        self._random = rng
        self._model: Model | None = None
        self._queued = 0
        self._poll = PollHealth()
        self.next_delay = self._poll.next_delay
        self._warned: set[str] = set()
        self.comparisons: collections.Counter[str] = collections.Counter()
        """Comparisons made, by shadow version."""
        self.skipped: dict[SkipReason, int] = dict.fromkeys(SkipReason, 0)
        """Sampled calls not compared, by reason."""
        self.poll_failures = self._poll.failures
        """Failed polls of the pointer: ``unavailable`` (registry unreachable) or ``refused``."""
        self.last: Comparison | None = None
        """The latest comparison (logs, tests)."""

    @property
    def model(self) -> Model | None:
        """The shadow version, or None while no valid version is named."""
        return self._model

    # --- per call --------------------------------------------------------------------------------

    def offer(self, result: ScoreResult, in_flight: int) -> bool:
        """Queue the comparison of this call's result if it is sampled and there is room; True
        if queued. ``in_flight``: RPCs being handled now. Call it on the event loop; it never
        raises and never waits."""
        model = self._model
        if model is None:
            return False
        try:
            if self._random() >= self.share:
                return False
            if model.version == result.model_version:
                self.skipped[SkipReason.SAME_VERSION] += 1
                return False
            if in_flight > self.max_in_flight_rpcs:
                self.skipped[SkipReason.BUSY] += 1
                return False
            if self._queued >= MAX_QUEUED:
                self.skipped[SkipReason.QUEUED] += 1
                return False
            request = result.request
            if request is None:
                raise ValueError("the Score result carries no aligned request")
            asyncio.get_running_loop().call_soon(self._compare, model, request, result.scores)
            self._queued += 1
        except Exception as exc:  # the caller's answer must go on whatever happens here
            self.skipped[SkipReason.ERROR] += 1
            self._warn_once(exc)
            return False
        return True

    def _compare(self, model: Model, request: AlignedRequest, served: Float64Array) -> None:
        self._queued -= 1
        try:
            comparison = compare(served, model.predict(request.context, request.candidates))
            if self.observer is not None:
                self.observer.shadow_compared(model.version, comparison)
        except Exception as exc:  # a callback's exception would only reach the loop's handler
            self.skipped[SkipReason.ERROR] += 1
            self._warn_once(exc)
            return
        self.last = comparison
        self.comparisons[model.version] += 1

    def _warn_once(self, exc: Exception) -> None:
        # The same failure repeats every sampled call: warn once per kind, count the rest.
        kind = type(exc).__name__
        level = logging.DEBUG if kind in self._warned else logging.WARNING
        self._warned.add(kind)
        logger.log(level, "model %s: shadow comparison failed: %s: %s", self.name, kind, exc)

    # --- the pointer -----------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Re-read the pointer; load and validate a newly named version. True if the shadow
        changed. Cleared pointer or refused version: no shadow. Unreachable registry: the
        current shadow stays."""
        version: str | None = None
        try:
            version = self.source.shadow_version(self.name)
            current = self._model
            if version is None:
                self._ok()
                if current is None:
                    return False
                self._model = None
                logger.info("model %s: shadow version %s cleared", self.name, current.version)
                return True
            if current is not None and current.version == version:
                self._ok()
                return False
            started = time.perf_counter()
            model = self.source.load(self.name, version)
        except RegistryUnavailable as exc:
            self._warn_poll(version, f"registry unreachable: {exc}", unavailable=True)
            return False
        except Exception as exc:  # a refused version never shadows, nor does the one before it
            self._warn_poll(version, f"{type(exc).__name__}: {exc}", unavailable=False)
            changed = self._model is not None
            self._model = None
            return changed
        previous = self._model.version if self._model is not None else None
        self._model = model
        self._ok()
        logger.info(
            "model %s: version %s shadows now (was %s; loaded in %.1f ms)",
            self.name,
            version,
            previous,
            (time.perf_counter() - started) * 1000,
        )
        return True

    def _ok(self) -> None:
        if self._poll.ok():
            logger.info("model %s: shadow pointer polling recovered", self.name)

    def _warn_poll(self, version: str | None, reason: str, *, unavailable: bool) -> None:
        logger.log(
            self._poll.failed(version, reason, unavailable=unavailable),
            "model %s: cannot shadow with version %s: %s",
            self.name,
            version if version is not None else "(unresolved)",
            reason,
        )

    async def watch(self, interval_s: float, max_backoff_s: float = MAX_POLL_BACKOFF_S) -> None:
        """Poll ``refresh`` (in a thread) until cancelled: once at once, then every
        ``interval_s`` seconds, backing off while the registry is unreachable."""
        delay = 0.0
        while True:
            await asyncio.sleep(delay)
            await asyncio.to_thread(self.refresh)
            delay = self.next_delay(interval_s, max_backoff_s)
