"""The measured LiteLLM tuning we keep: documented settings only, applied at start, version-pinned.

Nothing here patches a private name. Each knob is a setting LiteLLM documents (an environment
variable it reads, a module-level flag, a public function, the standard logging API), and
tests/unit/test_llm_tuning.py pins each one's effect to the locked litellm version, so an
upgrade that changes one fails CI rather than production.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

LOCKED_LITELLM = "1.110.2"
"""The litellm version these settings were measured on (requirements.lock pins it)."""

LITELLM_LOGGERS = ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy")
"""The loggers LiteLLM logs through (litellm/_logging.py)."""

_ENV_DEFAULTS = {
    # Read at import: otherwise litellm fetches its price map over the network, and retries from
    # a background thread when there is none (a fresh machine, a locked-down pod).
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    # The level of the stderr handler litellm installs on its loggers at import. Its records
    # still reach our JSON handler through the root logger; without this each one would also be
    # printed a second time, in plain text.
    "LITELLM_LOG": "CRITICAL",
}


def before_import() -> None:
    """Environment defaults litellm reads at import; an operator's own values win."""
    for name, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


def after_import(litellm: Any) -> None:
    """Module-level flags and logger levels, once litellm is imported."""
    # Set, litellm prints "Give Feedback / Get Help" banners to stdout on every mapped error.
    litellm.suppress_debug_info = True
    # LiteLLM logs each acompletion call at INFO: operators get our one line per RPC instead.
    level = max(logging.WARNING, logging.getLogger().getEffectiveLevel())
    for name in LITELLM_LOGGERS:
        logging.getLogger(name).setLevel(level)


def price_unknown_models(litellm: Any, models: Iterable[str]) -> list[str]:
    """Register a zero price for route models missing from LiteLLM's price map; return them.

    LiteLLM looks every route model up in that map (acompletion to price each response, the
    provider configs while building a request), and a model the map lacks pays for failed
    lookups on every call. Measured here for anthropic/my-self-hosted-model: acompletion 9,162
    -> 5,543 Python calls a call, the provider path 581 -> 545 per request built and answer
    parsed (its headers are built once per set of parameters). We never read
    LiteLLM's cost, so a zero price changes nothing we report. litellm.register_model is its
    documented way to add a model; done once, at start.
    """
    added = []
    for model in sorted(set(models)):
        provider, _, name = model.partition("/")
        if not name:
            continue
        try:
            litellm.get_model_info(model)
        except Exception:
            added.append(model)
            litellm.register_model(
                {
                    model: {
                        "litellm_provider": provider,
                        "mode": "chat",
                        "input_cost_per_token": 0.0,
                        "output_cost_per_token": 0.0,
                        "cache_creation_input_token_cost": 0.0,
                        "cache_read_input_token_cost": 0.0,
                    }
                }
            )
    return added


@contextlib.contextmanager
def schema_warnings_quiet() -> Iterator[None]:
    """Around litellm's first acompletion (the warm-up): pydantic warns, once per class, that
    LiteLLM's own TypedDicts use `ReadOnly`, when LiteLLM first builds their schemas. Not ours
    to fix and harmless at run time (pyproject's pytest filter says the same)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", r"Items? .* (is|are) using the `ReadOnly` qualifier", UserWarning
        )
        yield


def freeze_import_heap() -> None:
    """Move every object alive now (litellm's import: ~380,000 of them) out of the cyclic
    GC's reach, once the gateway is warm.

    Measured here: a full collection after importing litellm takes 225-257 ms, and Generate's
    allocations trigger one every so often; Score calls caught behind it waited that long (Score
    p99 38-208 ms with Generate running vs 4.8-7.4 ms alone, at 0.36 of a core). Frozen, a
    full collection scans only what was made since: 0.003 ms for the same heap.
    """
    gc.freeze()
