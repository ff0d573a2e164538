"""The experiment machinery of one serving process: selector, decision log, shadow, snapshots."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Collection
from pathlib import Path

from ml_serving.experiments.assignment import Experiment, PromptSelector
from ml_serving.experiments.config import ExperimentConfig, load_experiments
from ml_serving.experiments.decisions import DecisionLog
from ml_serving.experiments.shadow import ShadowRunner

logger = logging.getLogger(__name__)


class Experiments:
    """What Generate needs to pick a prompt version and account for it: the selection
    precedence (request -> experiment -> default -> v1), the decision log, the shadow runner.

    With no experiments file, the selector still gives every call a decision id and how its
    version was chosen; decisions are logged only when an experiment runs or a log file is set.
    """

    def __init__(
        self,
        config: ExperimentConfig | None,
        *,
        default_version: str,
        known_versions: Collection[str],
        decision_log: Path | None = None,
        user_key: bytes | None = None,
    ) -> None:
        self.config = config
        self.experiment = Experiment(config) if config is not None else None
        self.selector = PromptSelector(
            self.experiment, default_version, known_versions=known_versions
        )
        self.decisions: DecisionLog | None = None
        if config is not None or decision_log is not None:
            if not user_key:
                # Hashes then differ across replicas and restarts: fine for a trial run, not for
                # joining rewards from several processes.
                logger.warning(
                    "ML_SERVING_DECISION_USER_KEY is not set: user hashes in the decision log "
                    "use a random per-process key"
                )
                user_key = os.urandom(32)
            self.decisions = DecisionLog(decision_log, user_key)
        self.shadow: ShadowRunner | None = None
        if config is not None and config.shadow is not None:
            self.shadow = ShadowRunner(config.shadow, self.decisions, experiment=config.name)

    @classmethod
    def load(
        cls,
        path: Path | None,
        *,
        default_version: str,
        known_versions: Collection[str],
        decision_log: Path | None = None,
        user_key: bytes | None = None,
    ) -> Experiments:
        """Read the experiments file (None: no experiment); a bad file raises ValueError naming
        the key, which stops the server at start."""
        config = load_experiments(path, known_versions) if path is not None else None
        if config is not None:
            logger.info(
                "experiment on",
                extra={
                    "experiment": config.name,
                    "policy": str(config.policy),
                    "variants": dict(config.variants),
                    "shadow": config.shadow.prompt_version if config.shadow else None,
                },
            )
        return cls(
            config,
            default_version=default_version,
            known_versions=known_versions,
            decision_log=decision_log,
            user_key=user_key,
        )

    async def watch(self, interval_s: float) -> None:
        """Pick up new reward snapshots while serving (a no-op without a thompson experiment)."""
        if self.experiment is not None:
            await self.experiment.watch(interval_s)

    async def close(self) -> None:
        """At drain: cancel the shadows in flight, then close the decision log."""
        if self.shadow is not None:
            await self.shadow.close()
        if self.decisions is not None:
            self.decisions.close()
        # Give cancelled shadow tasks their turn to finish before the loop stops.
        await asyncio.sleep(0)
