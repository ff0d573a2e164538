"""Cooldowns: the Router's allowed_fails / cooldown_time / disable_cooldowns, per deployment.

A deployment that fails more than `allowed_fails` times within a minute (failures that count:
see exceptions.Outcome.cooldown) is skipped for `cooldown_time` seconds; once that has passed it
is tried again with a clean count. Per process and in memory, as the Router's in-memory cache is
without Redis: each replica benches what it sees failing.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from ml_serving.generation.llm.routes import COOLDOWN_WINDOW_S

logger = logging.getLogger(__name__)

OnCooldown = Callable[[str, float], None]
"""Told (model, seconds) each time a deployment is benched (a metric)."""


class Cooldowns:
    """Failure counts and benched-until times, keyed by deployment id."""

    def __init__(
        self,
        *,
        allowed_fails: int,
        cooldown_time_s: float,
        disabled: bool,
        on_cooldown: OnCooldown | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._allowed = allowed_fails
        self._cooldown_s = cooldown_time_s
        self._disabled = disabled or cooldown_time_s <= 0
        self._on_cooldown = on_cooldown
        self._clock = clock
        self._fails: dict[str, deque[float]] = {}
        self._until: dict[str, float] = {}

    def available(self, key: str) -> bool:
        """Whether the deployment may be tried now (not cooling down)."""
        until = self._until.get(key)
        if until is None:
            return True
        if self._clock() >= until:
            del self._until[key]
            return True
        return False

    def benched(self) -> list[str]:
        """The deployments cooling down now."""
        return [key for key in list(self._until) if not self.available(key)]

    def failed(self, key: str, model: str) -> bool:
        """Count a failure that counts; bench the deployment if it is over allowed_fails in the
        last minute. Returns whether it was benched now."""
        if self._disabled:
            return False
        now = self._clock()
        fails = self._fails.setdefault(key, deque())
        fails.append(now)
        while fails and fails[0] <= now - COOLDOWN_WINDOW_S:
            fails.popleft()
        if len(fails) <= self._allowed:
            return False
        fails.clear()
        self._until[key] = now + self._cooldown_s
        logger.warning(
            "LLM deployment cooling down",
            extra={
                "llm_deployment": key,
                "llm_model": model,
                "cooldown_s": self._cooldown_s,
                "allowed_fails": self._allowed,
            },
        )
        if self._on_cooldown is not None:
            self._on_cooldown(model, self._cooldown_s)
        return True
