"""The experiments file (``ML_SERVING_EXPERIMENTS``): its YAML shape, checks and dataclasses.

Shape (every key but ``name`` and ``variants`` is optional)::

    experiments:
      - name: tip-prompts          # slug; also the hashing salt unless `salt` is given
        salt: tip-prompts-2024     # 1..64 UTF-8 bytes: the blake2b key of the assignment hash
        variants: {v1: 50, v2-mentor: 25, v3-few-shot: 25}   # prompt_version: weight (>= 0)
        # or a list, for equal weights:  variants: [v1, v2-mentor, v3-few-shot]
        policy: fixed              # fixed (default) or thompson
        snapshot: rewards/tip-prompts.json   # thompson: reward counts (relative paths are
                                             # taken from the experiments file's folder)
        min_share: 0.05            # thompson: exploration floor per variant (default 0)
        draws: 20000               # thompson: Monte Carlo draws per snapshot (default 20000)
        shadow: {prompt_version: v3-few-shot, share: 0.1, max_in_flight: 8, timeout_s: 30}

``load_experiments(path, known_versions)`` returns the one ``ExperimentConfig`` (or None when
the path is unset or the list is empty) and raises ``ExperimentConfigError`` (a ValueError)
naming the file and the key, e.g. ``experiments[0].variants.v9: unknown prompt version``.
Unknown keys are refused too (a typo must not silently drop a setting). With a thompson policy
the weights are the shares served until the first good snapshot loads; a fixed policy ignores
``snapshot``, ``min_share`` and ``draws``. One experiment over Generate's prompt versions is
supported: a second entry is refused.
"""

from __future__ import annotations

import enum
import math
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

DEFAULT_DRAWS: Final = 20_000
"""Monte Carlo draws behind each Thompson share computation."""
MAX_SALT_BYTES: Final = 64
"""blake2b's key limit: the salt is the assignment hash's key."""

_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TOP_KEYS: Final = frozenset({"experiments"})
_EXPERIMENT_KEYS: Final = frozenset(
    {"name", "salt", "variants", "policy", "snapshot", "min_share", "draws", "shadow"}
)
_SHADOW_KEYS: Final = frozenset({"prompt_version", "share", "max_in_flight", "timeout_s"})


class Policy(enum.StrEnum):
    """How an experiment's shares are set."""

    FIXED = "fixed"
    """The weights in the file, as they are."""
    THOMPSON = "thompson"
    """Each variant's probability of being best, from the reward snapshot (floored)."""


class ExperimentConfigError(ValueError):
    """The experiments file is unreadable or wrong; ``key`` names the offending key."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        super().__init__(f"{source}: {key}: {problem}")
        self.source = source
        self.key = key
        self.problem = problem


@dataclass(frozen=True, slots=True)
class ShadowConfig:
    """A prompt version generated beside the primary one, logged and never returned."""

    prompt_version: str
    share: float
    """Fraction of decisions that also run the shadow, picked from the decision id."""
    max_in_flight: int = 8
    """Shadows running at once; a call beyond it skips its shadow (counted)."""
    timeout_s: float = 30.0
    """A shadow still running after this is cancelled and counted as failed."""


@dataclass(frozen=True, slots=True)
class ExperimentConfig:
    """One experiment over Generate's prompt versions, as the file states it."""

    name: str
    salt: str
    """The assignment hash's key; the name unless the file gives one."""
    variants: Mapping[str, float]
    """prompt_version -> weight, in file order; at least one weight is positive."""
    policy: Policy = Policy.FIXED
    snapshot: Path | None = None
    """Thompson's reward snapshot, resolved against the experiments file's folder."""
    min_share: float = 0.0
    """Thompson's exploration floor per variant."""
    draws: int = DEFAULT_DRAWS
    shadow: ShadowConfig | None = None


def load_experiments(
    path: str | os.PathLike[str] | None, known_versions: Collection[str] | None
) -> ExperimentConfig | None:
    """The experiment in the YAML file at ``path``; None when ``path`` is unset or empty or the
    file lists no experiment. ``known_versions`` are the prompt versions the server can render
    (None skips that check, for offline tools). Raises ``ExperimentConfigError``."""
    if path is None or str(path) == "":
        return None
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ExperimentConfigError(source, "(file)", f"cannot read it: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ExperimentConfigError(source, "(file)", f"not valid YAML: {exc}") from exc
    return parse_experiments(
        data, known_versions, source=source, base_dir=Path(path).resolve().parent
    )


def parse_experiments(
    data: Any,
    known_versions: Collection[str] | None,
    *,
    source: str = "experiments",
    base_dir: Path | None = None,
) -> ExperimentConfig | None:
    """``load_experiments`` on already-parsed YAML; relative snapshot paths join ``base_dir``
    (the working directory when None)."""
    check = _Checker(source, known_versions, base_dir or Path.cwd())
    if data is None:
        return None
    top = check.mapping(data, "(top level)", _TOP_KEYS)
    entries = top.get("experiments")
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise check.error("experiments", "must be a list of experiments")
    if not entries:
        return None
    if len(entries) > 1:
        raise check.error(
            "experiments",
            f"lists {len(entries)} experiments; one over Generate's prompt versions is supported",
        )
    return check.experiment(entries[0], "experiments[0]")


class _Checker:
    """Turns parsed YAML into an ExperimentConfig, naming the key of the first problem."""

    def __init__(self, source: str, known: Collection[str] | None, base_dir: Path) -> None:
        self.source = source
        self.known = None if known is None else frozenset(known)
        self.base_dir = base_dir

    def error(self, key: str, problem: str) -> ExperimentConfigError:
        return ExperimentConfigError(self.source, key, problem)

    def mapping(self, value: Any, key: str, allowed: frozenset[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(key, "must be a mapping")
        for k in value:
            if not isinstance(k, str) or k not in allowed:
                where = f"{key}.{k}" if key != "(top level)" else str(k)
                expected = ", ".join(sorted(allowed))
                raise self.error(where, f"unknown key; expected one of {expected}")
        return value

    def version(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.error(key, "must be a prompt version string")
        if self.known is not None and value not in self.known:
            raise self.error(
                key, f"unknown prompt version {value!r}; known: {', '.join(sorted(self.known))}"
            )
        return value

    def number(
        self, value: Any, key: str, *, low: float, high: float = math.inf, low_open: bool = False
    ) -> float:
        # bool is an int to Python, never a weight or share to a reader of the file.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"must be a number, not {value!r}")
        number = float(value)
        if (
            not math.isfinite(number)
            or number < low
            or number > high
            or (low_open and number == low)
        ):
            bound = f"{'>' if low_open else '>='} {low:g}" + (
                f" and <= {high:g}" if high != math.inf else ""
            )
            raise self.error(key, f"must be {bound}, not {value!r}")
        return number

    def integer(self, value: Any, key: str, *, low: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise self.error(key, f"must be an integer >= {low}, not {value!r}")
        return value

    def experiment(self, value: Any, key: str) -> ExperimentConfig:
        entry = self.mapping(value, key, _EXPERIMENT_KEYS)
        name = entry.get("name")
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise self.error(f"{key}.name", "required: letters, digits, '.', '_' or '-' (<= 64)")
        salt = entry.get("salt", name)
        if not isinstance(salt, str) or not 1 <= len(salt.encode("utf-8")) <= MAX_SALT_BYTES:
            raise self.error(f"{key}.salt", f"must be a string of 1..{MAX_SALT_BYTES} bytes")
        policy_value = entry.get("policy", Policy.FIXED.value)
        try:
            policy = Policy(policy_value)
        except ValueError:
            raise self.error(
                f"{key}.policy", f"must be one of {', '.join(p.value for p in Policy)}"
            ) from None
        variants = self.variants(entry.get("variants"), f"{key}.variants")
        if policy is Policy.THOMPSON and len(variants) < 2:
            raise self.error(f"{key}.variants", "thompson needs at least two variants")

        snapshot: Path | None = None
        if "snapshot" in entry:
            raw = entry["snapshot"]
            if not isinstance(raw, str) or not raw:
                raise self.error(f"{key}.snapshot", "must be a file path")
            snapshot = self.base_dir / raw
        if policy is Policy.THOMPSON and snapshot is None:
            raise self.error(f"{key}.snapshot", "required with policy thompson")
        min_share = self.number(entry.get("min_share", 0.0), f"{key}.min_share", low=0.0)
        if min_share * len(variants) > 1.0 + 1e-12:
            raise self.error(
                f"{key}.min_share",
                f"{min_share:g} x {len(variants)} variants exceeds 1",
            )
        draws = self.integer(entry.get("draws", DEFAULT_DRAWS), f"{key}.draws", low=100)
        shadow = None
        if entry.get("shadow") is not None:
            shadow = self.shadow(entry["shadow"], f"{key}.shadow")
        return ExperimentConfig(
            name=name,
            salt=salt,
            variants=variants,
            policy=policy,
            snapshot=snapshot,
            min_share=min_share,
            draws=draws,
            shadow=shadow,
        )

    def variants(self, value: Any, key: str) -> dict[str, float]:
        if isinstance(value, list):
            value = dict.fromkeys(value, 1)
            if len(value) == 0:
                raise self.error(key, "required: at least one prompt version")
        if not isinstance(value, dict) or not value:
            raise self.error(key, "required: a mapping prompt_version: weight, or a list")
        variants = {}
        for version, weight in value.items():
            where = f"{key}.{version}"
            variants[self.version(version, where)] = self.number(weight, where, low=0.0)
        if not any(w > 0 for w in variants.values()):
            raise self.error(key, "at least one weight must be positive")
        return variants

    def shadow(self, value: Any, key: str) -> ShadowConfig:
        entry = self.mapping(value, key, _SHADOW_KEYS)
        if "prompt_version" not in entry:
            raise self.error(f"{key}.prompt_version", "required")
        if "share" not in entry:
            raise self.error(f"{key}.share", "required")
        return ShadowConfig(
            prompt_version=self.version(entry["prompt_version"], f"{key}.prompt_version"),
            share=self.number(entry["share"], f"{key}.share", low=0.0, high=1.0, low_open=True),
            max_in_flight=self.integer(
                entry.get("max_in_flight", 8), f"{key}.max_in_flight", low=1
            ),
            timeout_s=self.number(
                entry.get("timeout_s", 30.0), f"{key}.timeout_s", low=0.0, low_open=True
            ),
        )
