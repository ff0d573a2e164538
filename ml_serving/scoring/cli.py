"""The file registry's command line: list, promote and shadow (``python -m ml_serving.scoring``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from ml_serving.scoring import shadow
from ml_serving.scoring.registry import ModelRegistry, RegistryError

PROG: Final = "python -m ml_serving.scoring"
DESCRIPTION: Final = (
    "The file-based model registry (models/<name>/<version>/): list, promote, shadow."
)


def _cmd_list(registry: ModelRegistry, names: Sequence[str]) -> int:
    for name in names:
        try:
            promoted: str | None = registry.promoted_version(name)
        except RegistryError:
            promoted = None
        for version in registry.versions(name):
            mark = "*" if version == promoted else " "
            try:
                model = registry.load(name, version)
            except RegistryError as exc:
                print(f"{mark} {name} {version}  INVALID: {exc}")
                continue
            m = model.card.get("metrics", {}).get("heldout", {})
            print(
                f"{mark} {name} {version}  {model.card.get('model_type', '?')}  "
                f"auc={m.get('auc')} log_loss={m.get('log_loss')} ece={m.get('ece')}"
            )
    return 0


def _cmd_shadow(registry: ModelRegistry, name: str, version: str | None) -> int:
    if version is None:
        cleared = shadow.clear_shadow(registry, name)
        print(f"{name}: shadow cleared" if cleared else f"{name}: no shadow was set")
        return 0
    shadow.set_shadow(registry, name, version)
    print(f"{name} version {version} shadows the promoted one")
    return 0


ENVIRONMENT_ERROR_EXIT: Final = 2
"""The CLI's exit code when registry files cannot be read or written (1: a refused version)."""


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``list`` versions (``*`` marks the promoted one), ``promote`` one, or set or clear
    the ``shadow`` (``SHADOW``); exit 1 when the registry refuses (unknown or invalid version),
    2 when its files cannot be read or written."""
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list versions; * marks the promoted one")
    p_list.add_argument("--root", type=Path, default=Path("models"))
    p_list.add_argument("--name", help="only this model")
    p_prom = sub.add_parser("promote", help="validate a version and make it the served one")
    p_prom.add_argument("--root", type=Path, default=Path("models"))
    p_prom.add_argument("--name", required=True)
    p_prom.add_argument("--version", required=True)
    p_prom.add_argument("--note", default="", help="recorded in the card's rollout history")
    p_shadow = sub.add_parser("shadow", help="validate a version and name it in SHADOW, or clear")
    p_shadow.add_argument("--root", type=Path, default=Path("models"))
    p_shadow.add_argument("--name", required=True)
    which = p_shadow.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", help="the version Score's shadow compares with the served")
    which.add_argument("--clear", action="store_true", help="remove SHADOW: no shadow")
    args = parser.parse_args(argv)
    registry = ModelRegistry(args.root)
    try:
        if args.command == "list":
            return _cmd_list(registry, [args.name] if args.name else registry.model_names())
        if args.command == "shadow":
            return _cmd_shadow(registry, args.name, args.version)
        registry.promote(args.name, args.version, note=args.note)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # The registry's files cannot be read or written (read-only, full, a directory where a
        # file belongs): an environment error, exit 2 as for `python -m ml_serving`.
        where = f": {exc.filename}" if exc.filename else f" under {args.root}"
        print(f"error: cannot {args.command}: {exc.strerror or exc}{where}", file=sys.stderr)
        return ENVIRONMENT_ERROR_EXIT
    print(f"promoted {args.name} version {args.version}")
    return 0
