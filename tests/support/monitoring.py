"""The shipped rules and dashboard (deploy/monitoring), the metric names their PromQL reads, and
the series names a /metrics text exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support import REPO

MONITORING = REPO / "deploy" / "monitoring"
PLAIN_RULES = MONITORING / "prometheus-rules.yaml"
OPERATOR_RULE = MONITORING / "prometheusrule.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
RULES_TEST = MONITORING / "tests" / "rules-test.yaml"

# Words of PromQL that look like names: aggregations, operators, modifiers.
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "by", "without", "inf", "nan"})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
# Not inside a number or a duration (0.05, 1e3, 5m).
_NAME = re.compile(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*")
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
    "summary": ("", "_count", "_sum", "_created"),
}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def rule_groups() -> list[dict[str, Any]]:
    """The groups of the plain rules file."""
    groups: list[dict[str, Any]] = load_yaml(PLAIN_RULES)["groups"]
    return groups


def rules() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def dashboard() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return board


def dashboard_queries() -> list[str]:
    """Every panel target's PromQL."""
    return [
        target["expr"]
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def metric_names(expr: str) -> set[str]:
    """The metric (and recording rule) names a PromQL expression selects.

    Strings, label matchers, range and grouping clauses are dropped first; what is left that
    looks like a name and is neither a function call nor a keyword is a selector's name.
    """
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\boffset\s+\S+", " ", text)
    names = set()
    for match in _NAME.finditer(text):
        if text[match.end() :].lstrip().startswith("("):
            continue
        if match.group().lower() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def variable_metric_names() -> set[str]:
    """Names the dashboard's template variables read (label_values(METRIC, label))."""
    names = set()
    for variable in dashboard()["templating"]["list"]:
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        names.update(re.findall(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", text))
    return names


def exported_names(text: str) -> set[str]:
    """Every series name a /metrics text exports, including those of labelled families that
    have no child yet (prometheus_client writes their HELP and TYPE lines only)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
    return names
