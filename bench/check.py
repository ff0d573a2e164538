"""`python -m bench check`: results.json against bench/thresholds.json (ratios to the baselines
measured in the same run, plus absolute floors); non-zero exit on any violation."""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.scenarios import BENCH_DIR

THRESHOLDS = BENCH_DIR / "thresholds.json"
RESULTS = BENCH_DIR / "results.json"

OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
}


@dataclass(frozen=True)
class Rule:
    """`metric` (a dotted path into a results row) `op` `value`, for the matching rows."""

    name: str
    metric: str
    op: str
    value: float
    scenario: str = "*"
    target: str = "server"
    concurrency: int | None = None

    def matches(self, row: dict[str, Any]) -> bool:
        return (
            self.scenario in ("*", row["scenario"])
            and self.target in ("*", row["target"])
            and (self.concurrency is None or self.concurrency == row["concurrency"])
        )


@dataclass(frozen=True)
class Verdict:
    rule: Rule
    ok: bool
    detail: str

    def describe(self) -> str:
        return f"{self.rule.name}: {self.detail}"


def load_thresholds(path: Path = THRESHOLDS) -> list[Rule]:
    raw = json.loads(path.read_text())
    rules = []
    for entry in raw["rules"]:
        rule = Rule(**entry)
        if rule.op not in OPS:
            raise ValueError(f"{path}: rule {rule.name!r}: unknown op {rule.op!r}")
        rules.append(rule)
    return rules


def _lookup(row: dict[str, Any], path: str) -> Any:
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


SECTIONS = ("features", "generate_overhead")
"""The scenarios run apart from the plan: results.json keeps their rows under their own key."""


def measured_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every row of a run: the plan's, then each separate scenario's that ran."""
    rows = list(results.get("rows", []))
    for section in SECTIONS:
        rows += (results.get(section) or {}).get("rows", [])
    return rows


def evaluate(results: dict[str, Any], rules: list[Rule]) -> list[Verdict]:
    """One verdict per rule; a rule with no measured row to judge fails (not measured)."""
    verdicts = []
    measured = measured_rows(results)
    for rule in rules:
        rows = [r for r in measured if rule.matches(r)]
        where = f"{rule.scenario} {rule.target}" + (
            f" c={rule.concurrency}" if rule.concurrency is not None else ""
        )
        if not rows:
            verdicts.append(Verdict(rule, False, f"not measured ({where})"))
            continue
        bad, seen = [], []
        for row in rows:
            value = _lookup(row, rule.metric)
            label = f"{row['scenario']}/{row['target']} c={row['concurrency']}"
            if value is None or not OPS[rule.op](value, rule.value):
                bad.append(f"{label}: {rule.metric} = {value}")
            else:
                seen.append(value)
        if bad:
            shown = "; ".join(bad[:5]) + (f"; +{len(bad) - 5} more" if len(bad) > 5 else "")
            verdicts.append(Verdict(rule, False, f"needs {rule.op} {rule.value}; {shown}"))
        else:
            shown = f"{rule.metric} = {seen[0]}" if len(seen) == 1 else f"{len(seen)} rows"
            verdicts.append(Verdict(rule, True, f"{shown} ({rule.op} {rule.value}, {where})"))
    return verdicts


def main(results: Path = RESULTS, thresholds: Path = THRESHOLDS) -> int:
    if not results.exists():
        print(f"bench check: {results} does not exist; run `python -m bench` first")
        return 2
    doc = json.loads(results.read_text())
    verdicts = evaluate(doc, load_thresholds(thresholds))
    print(f"bench check: {results} ({doc['machine']['date']}) against {thresholds}")
    for v in verdicts:
        print(f"  {'PASS' if v.ok else 'FAIL'}  {v.describe()}")
    failed = sum(not v.ok for v in verdicts)
    print(f"bench check: {len(verdicts) - failed} passed, {failed} failed")
    return 1 if failed else 0
