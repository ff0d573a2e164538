"""LiteLLM config files: the model_list and router_settings we read, checked at start.

Free of litellm (provider.py owns that import), so the format and its rules test on their own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

OFFLINE_PROVIDER = "offline"
OFFLINE_MODEL = f"{OFFLINE_PROVIDER}/tip-composer-1"
OFFLINE_ALIAS = "offline"

_DEFAULT_ROUTER_SETTINGS: dict[str, Any] = {
    "num_retries": 2,
    "timeout": 30.0,
    # The Router's defaults (litellm.constants DEFAULT_ALLOWED_FAILS, DEFAULT_COOLDOWN_TIME_SECONDS;
    # a test holds them equal).
    "allowed_fails": 3,
    "cooldown_time": 5.0,
    "disable_cooldowns": False,
}
COOLDOWN_WINDOW_S = 60.0
"""allowed_fails counts the failures of the last minute, as the Router does."""


@dataclass(frozen=True)
class RouteConfig:
    """What a LiteLLM config file holds that we use: the model list and router settings."""

    model_list: tuple[dict[str, Any], ...]
    router_settings: Mapping[str, Any]

    @property
    def aliases(self) -> tuple[str, ...]:
        """Route aliases (model_name) in file order, without repeats."""
        return tuple(dict.fromkeys(entry["model_name"] for entry in self.model_list))


def offline_routes() -> RouteConfig:
    """The built-in route used when no config file is given: the offline provider only."""
    return RouteConfig(
        model_list=({"model_name": OFFLINE_ALIAS, "litellm_params": {"model": OFFLINE_MODEL}},),
        router_settings={},
    )


def load_routes(path: Path) -> RouteConfig:
    """Read and check a LiteLLM config (model_list, optional router_settings); raise ValueError."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read LLM config {path}: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("model_list"), list):
        raise ValueError(f"LLM config {path} needs a 'model_list' list (LiteLLM config format)")
    entries: list[dict[str, Any]] = []
    for i, entry in enumerate(raw["model_list"]):
        params = entry.get("litellm_params") if isinstance(entry, dict) else None
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("model_name"), str)
            or not isinstance(params, dict)
            or not isinstance(params.get("model"), str)
        ):
            raise ValueError(
                f"LLM config {path}: model_list[{i}] needs model_name and litellm_params.model"
            )
        entries.append(entry)
    if not entries:
        raise ValueError(f"LLM config {path}: model_list is empty")
    router_settings = raw.get("router_settings") or {}
    if not isinstance(router_settings, dict):
        raise ValueError(f"LLM config {path}: router_settings must be a mapping")
    return RouteConfig(model_list=tuple(entries), router_settings=router_settings)


@dataclass(frozen=True)
class RetryPlan:
    """router_settings as our retry and fallback loop reads them (the Router's names, meaning)."""

    num_retries: int
    timeout_s: float
    retry_after_s: float
    allowed_fails: int
    """A deployment failing more than this many times in a minute cools down..."""
    cooldown_time_s: float
    """...and is skipped for this long."""
    disable_cooldowns: bool
    fallbacks: Mapping[str, tuple[str, ...]]
    context_window_fallbacks: Mapping[str, tuple[str, ...]]
    content_policy_fallbacks: Mapping[str, tuple[str, ...]]

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], aliases: Sequence[str]) -> RetryPlan:
        """Check router_settings against what the loop implements; raise ValueError."""
        unknown = set(settings) - _SUPPORTED_ROUTER_SETTINGS
        if unknown:
            raise ValueError(
                f"router_settings {', '.join(sorted(unknown))} not supported; supported: "
                f"{', '.join(sorted(_SUPPORTED_ROUTER_SETTINGS))}"
            )
        merged = {**_DEFAULT_ROUTER_SETTINGS, **settings}
        num_retries, timeout_s = merged["num_retries"], merged["timeout"]
        retry_after_s = merged.get("retry_after", 0)
        if isinstance(num_retries, bool) or not isinstance(num_retries, int) or num_retries < 0:
            raise ValueError("router_settings.num_retries must be an integer >= 0")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or timeout_s <= 0:
            raise ValueError("router_settings.timeout must be a number > 0")
        if isinstance(retry_after_s, bool) or not isinstance(retry_after_s, int | float):
            raise ValueError("router_settings.retry_after must be a number")
        allowed_fails, cooldown_s = merged["allowed_fails"], merged["cooldown_time"]
        disable_cooldowns = merged["disable_cooldowns"]
        if (
            isinstance(allowed_fails, bool)
            or not isinstance(allowed_fails, int)
            or allowed_fails < 0
        ):
            raise ValueError("router_settings.allowed_fails must be an integer >= 0")
        if (
            isinstance(cooldown_s, bool)
            or not isinstance(cooldown_s, int | float)
            or cooldown_s < 0
        ):
            raise ValueError("router_settings.cooldown_time must be a number >= 0")
        if not isinstance(disable_cooldowns, bool):
            raise ValueError("router_settings.disable_cooldowns must be true or false")
        return cls(
            num_retries=num_retries,
            timeout_s=float(timeout_s),
            retry_after_s=float(max(retry_after_s, 0)),
            allowed_fails=allowed_fails,
            cooldown_time_s=float(cooldown_s),
            disable_cooldowns=disable_cooldowns,
            fallbacks=_fallback_map(merged.get("fallbacks"), "fallbacks", aliases),
            context_window_fallbacks=_fallback_map(
                merged.get("context_window_fallbacks"), "context_window_fallbacks", aliases
            ),
            content_policy_fallbacks=_fallback_map(
                merged.get("content_policy_fallbacks"), "content_policy_fallbacks", aliases
            ),
        )

    def fallbacks_for(self, alias: str, kind: str = "") -> tuple[str, ...]:
        """The aliases to try after `alias` failed (the Router's choice of list): `kind` is
        "context_window" or "content_policy" for those failures, "" for any other."""
        if kind == "context_window":
            table = self.context_window_fallbacks
        elif kind == "content_policy":
            table = self.content_policy_fallbacks
        else:
            table = self.fallbacks
        return table.get(alias) or table.get("*") or ()


_SUPPORTED_ROUTER_SETTINGS = frozenset(
    {
        "num_retries",
        "timeout",
        "retry_after",
        "allowed_fails",
        "cooldown_time",
        "disable_cooldowns",
        "fallbacks",
        "context_window_fallbacks",
        "content_policy_fallbacks",
    }
)
# litellm_params keys only the Router reads (load balancing); never sent to the provider.
ROUTER_ONLY_PARAMS = frozenset({"weight", "rpm", "tpm", "order", "max_parallel_requests"})


def _fallback_map(raw: object, name: str, aliases: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """`[{alias: [fallback, ...]}, ...]` (LiteLLM's format) as a dict; "*" is every alias."""
    if raw is None:
        return {}
    if not isinstance(raw, list):
        raise ValueError(f"router_settings.{name} must be a list of {{alias: [alias, ...]}}")
    table: dict[str, tuple[str, ...]] = {}
    for entry in raw:
        if not isinstance(entry, dict):
            raise ValueError(f"router_settings.{name} must be a list of {{alias: [alias, ...]}}")
        for source, targets in entry.items():
            if isinstance(targets, str):
                targets = [targets]
            if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
                raise ValueError(f"router_settings.{name}.{source} must be a list of aliases")
            unknown = [str(a) for a in (source, *targets) if a != "*" and a not in aliases]
            if unknown:
                raise ValueError(
                    f"router_settings.{name} names unknown aliases: {', '.join(unknown)}"
                )
            table[str(source)] = tuple(targets)
    return table
