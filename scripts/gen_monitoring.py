"""Generates deploy/monitoring/: the rules (plain and PrometheusRule) and the Grafana dashboard.

    .venv/bin/python -m scripts.gen_monitoring          # rewrite the generated files
    .venv/bin/python -m scripts.gen_monitoring --check  # exit 1 when they are stale

The rules are defined once, below; the plain file and the PrometheusRule carry the same groups
(tests/system/test_monitoring.py fails when a committed file differs from this output).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

OUT = Path(__file__).resolve().parent.parent / "deploy" / "monitoring"
PLAIN = "prometheus-rules.yaml"
OPERATOR = "prometheusrule.yaml"
DASHBOARD = "grafana-dashboard.json"

SERVICE = "mlserving.v1.InferenceService"
RPC = f'grpc_service="{SERVICE}"'
# Server-side failures only: INVALID_ARGUMENT is the caller's bug, RESOURCE_EXHAUSTED has its own
# alert (shedding), FAILED_PRECONDITION means not loaded yet (the readiness probe covers it).
SERVER_ERRORS = "UNAVAILABLE|INTERNAL|UNKNOWN|DEADLINE_EXCEEDED"
# Each pod's series are summed per deployment; namespace and job identify one.
BY = "namespace, job"

AVAILABILITY_SLO = 0.999
"""Share of each RPC's calls answered without a server-side error."""
SCORE_LATENCY_SLO = 0.99
"""Share of Score calls answered within SCORE_LATENCY_S."""
SCORE_LATENCY_S = "0.05"
"""The design's 50 ms, as the `le` label of a bucket of grpc_server_handling_seconds."""
# The Google SRE workbook's page-worthy pairs: (long window, short window, burn rate, for).
BURNS = (("1h", "5m", 14.4, "2m"), ("6h", "30m", 6.0, "15m"))
WINDOWS = ("5m", "30m", "1h", "6h")

FALLBACK_RATIO = 0.05
COOLDOWN_FOR = "15m"
STALLED_STREAMS_15M = 10
SNAPSHOT_MAX_AGE_S = 36 * 3600
SHADOW_MIN_TAU = 0.8
SHADOW_MIN_COMPARISONS_30M = 100
# A failing poll repeats at least every ML_SERVING_MODEL_POLL_MAX_BACKOFF_S (30 s): failures in
# every 3-minute window for 10 minutes mean the registry has been failing for about that long,
# while a one-minute blip (true for 3 minutes at most) stays silent.
POLL_WINDOW = "3m"
FEATURE_ERROR_RATIO = 0.05
"""Share of user lookups that fail or are skipped by the open breaker (Score then defaults)."""
FEATURE_MISS_RATIO = 0.5
"""Share of user lookups that find no row (or a stale one): materialization has stopped."""
TIP_VIEW_MAX_AGE_S = 900
"""Age of the in-memory tip view past which its reloads are failing (default refresh: 60 s)."""


def _availability_records() -> list[dict[str, Any]]:
    rules = []
    for w in WINDOWS:
        errors = f'grpc_server_handled_total{{{RPC},grpc_code=~"{SERVER_ERRORS}"}}'
        expr = (
            f"sum by ({BY}, grpc_method) (rate({errors}[{w}]))\n/\n"
            f"sum by ({BY}, grpc_method) (rate(grpc_server_handled_total{{{RPC}}}[{w}]))"
        )
        rules.append({"record": f"mlserving:grpc_server_errors:ratio_rate{w}", "expr": expr})
    return rules


def _latency_records() -> list[dict[str, Any]]:
    rules = []
    for w in WINDOWS:
        score = f'{RPC},grpc_method="Score"'
        expr = (
            f"1 - (\n"
            f"  sum by ({BY}) (rate(grpc_server_handling_seconds_bucket"
            f'{{{score},le="{SCORE_LATENCY_S}"}}[{w}]))\n'
            f"  /\n"
            f"  sum by ({BY}) (rate(grpc_server_handling_seconds_count{{{score}}}[{w}]))\n"
            f")"
        )
        rules.append({"record": f"mlserving:score_latency_slo_misses:ratio_rate{w}", "expr": expr})
    return rules


def _burn_alerts(
    name: str, record: str, budget: float, summary: str, calls: str, action: str
) -> list[dict[str, Any]]:
    alerts = []
    for (long, short, rate, for_), speed in zip(BURNS, ("Fast", "Slow"), strict=True):
        threshold = rate * budget
        bound = f"({rate:g} * {budget:g})"
        expr = f"{record}{long} > {bound}\nand\n{record}{short} > {bound}"
        alerts.append(
            {
                "alert": f"{name}{speed}",
                "expr": expr,
                "for": for_,
                "labels": {"severity": "critical", "slo": name},
                "annotations": {
                    "summary": f"{summary} burns its error budget {rate:g}x too fast.",
                    "description": (
                        f"{calls}: {{{{ $value | humanizePercentage }}}} over {long}, and over "
                        f"{threshold:.2%} over {short} too ({rate:g}x the budget of "
                        f"{budget:.1%}): the 30-day budget is gone in {30 * 24 / rate:.0f} hours "
                        f"at this rate. {action}"
                    ),
                },
            }
        )
    return alerts


def groups() -> list[dict[str, Any]]:
    """The rule groups, in the order both files list them."""
    availability = _burn_alerts(
        "MLServingRPCErrorBudgetBurn",
        "mlserving:grpc_server_errors:ratio_rate",
        round(1 - AVAILABILITY_SLO, 6),
        "{{ $labels.grpc_method }} (availability SLO 99.9%)",
        "Share of {{ $labels.job }}'s {{ $labels.grpc_method }} calls that ended UNAVAILABLE, "
        "INTERNAL, UNKNOWN or DEADLINE_EXCEEDED",
        "Read the server's ERROR log lines and mlserving_llm_errors_total (UNAVAILABLE from "
        "the LLM routes), check recent rollouts and roll back if one matches.",
    )
    latency = _burn_alerts(
        "MLServingScoreLatencyBudgetBurn",
        "mlserving:score_latency_slo_misses:ratio_rate",
        round(1 - SCORE_LATENCY_SLO, 6),
        "Score's latency SLO (99% within 50 ms)",
        "Share of {{ $labels.job }}'s Score calls slower than 50 ms",
        "Look at CPU throttling and mlserving_inflight_rpcs per pod, scale out (HPA "
        "minReplicas) or move Generate to its own process (ML_SERVING_GENERATE_PORT).",
    )
    generate_total = "sum by ({by}) (rate(mlserving_generate_total{sel}[5m]))"
    return [
        {
            "name": "mlserving-slo-recording",
            "rules": [*_availability_records(), *_latency_records()],
        },
        {"name": "mlserving-slo", "rules": [*availability, *latency]},
        {
            "name": "mlserving",
            "rules": [
                {
                    "alert": "MLServingGenerateFallbackRatioHigh",
                    "expr": (
                        generate_total.format(by=BY, sel='{fallback="true"}')
                        + "\n/\n"
                        + generate_total.format(by=BY, sel="")
                        + f"\n> {FALLBACK_RATIO:g}"
                    ),
                    "for": "10m",
                    "labels": {"severity": "warning"},
                    "annotations": {
                        "summary": "Generate answers with the curated fallback tip.",
                        "description": (
                            f"{{{{ $value | humanizePercentage }}}} of {{{{ $labels.job }}}}'s "
                            f"Generate answers over 5m were the fallback tip (bound "
                            f"{FALLBACK_RATIO:.0%}): every LLM route failed. Check "
                            "mlserving_llm_errors_total by reason (auth: the key Secret; "
                            "resource_exhausted: quota; unavailable: the provider) and the "
                            "provider's status page; add a fallback route to the LLM config."
                        ),
                    },
                },
                {
                    "alert": "MLServingLLMRouteCoolingDown",
                    "expr": (
                        f"sum by ({BY}, model) "
                        f"(increase(mlserving_llm_cooldowns_total[{COOLDOWN_FOR}])) > 0"
                    ),
                    "for": COOLDOWN_FOR,
                    "labels": {"severity": "warning"},
                    "annotations": {
                        "summary": "LLM route {{ $labels.model }} keeps being benched.",
                        "description": (
                            "{{ $labels.model }} was put in cooldown again and again for "
                            f"{COOLDOWN_FOR} (too many failures a minute): Generate runs on its "
                            "other routes or the fallback tip. Check mlserving_llm_errors_total"
                            '{model="{{ $labels.model }}"} by reason and the provider.'
                        ),
                    },
                },
                {
                    "alert": "MLServingShedding",
                    "expr": f"sum by ({BY}) (rate(mlserving_shed_total[5m])) > 0",
                    "for": "10m",
                    "labels": {"severity": "warning"},
                    "annotations": {
                        "summary": "Calls are refused with RESOURCE_EXHAUSTED.",
                        "description": (
                            "{{ $labels.job }} has shed {{ $value | humanize }} calls/s for 10m "
                            "(more RPCs in flight than ML_SERVING_MAX_CONCURRENT_RPCS). Raise "
                            "the HPA's maxReplicas or minReplicas; if CPU is low the load is "
                            "slow Generate calls: give Generate its own pods."
                        ),
                    },
                },
                {
                    "alert": "MLServingStalledStreams",
                    "expr": (
                        f"sum by ({BY}) (increase(mlserving_stalled_streams_total[15m]))"
                        f" > {STALLED_STREAMS_15M}"
                    ),
                    "for": "5m",
                    "labels": {"severity": "warning"},
                    "annotations": {
                        "summary": "GenerateStream callers stop reading their streams.",
                        "description": (
                            f"{{{{ $value | humanize }}}} streams in 15m (bound "
                            f"{STALLED_STREAMS_15M}) were ended because their client took no "
                            "message for ML_SERVING_STREAM_STALL_TIMEOUT_S; each held a "
                            "concurrency slot meanwhile. Find the caller in the access log "
                            "(GenerateStream lines with code CANCELLED and stalled_s) and fix its "
                            "reading loop."
                        ),
                    },
                },
                {
                    "alert": "MLServingModelRegistryUnreachable",
                    "expr": (
                        "increase(mlserving_model_poll_failures_total"
                        f'{{reason="unavailable"}}[{POLL_WINDOW}]) > 0'
                    ),
                    "for": "10m",
                    "labels": {"severity": "warning"},
                    "annotations": {
                        "summary": "{{ $labels.instance }} cannot reach the model registry.",
                        "description": (
                            "Model registry polls fail for 10m (MLflow or the models volume "
                            "unreachable). Score keeps serving its current version, but a new "
                            "pod with an empty cache will not become ready: fix MLflow or the "
                            "network path before the next rollout or scale-up."
                        ),
                    },
                },
                {
                    "alert": "MLServingModelVersionRefused",
                    "expr": (
                        "increase(mlserving_model_poll_failures_total"
                        f'{{reason="refused"}}[{POLL_WINDOW}]) > 0'
                    ),
                    "for": "2m",
                    "labels": {"severity": "warning"},
                    "annotations": {
                        "summary": "The promoted model version fails validation.",
                        "description": (
                            "{{ $labels.instance }} refuses the promoted "
                            "version (weights, card or reference predictions) and keeps "
                            "serving the old one. Promote a valid version with the promote "
                            "command (it validates first), or move PROMOTED / the champion "
                            "alias back."
                        ),
                    },
                },
                {
                    "alert": "MLServingShadowModelPollFailing",
                    "expr": (
                        f"increase(mlserving_shadow_model_poll_failures_total[{POLL_WINDOW}]) > 0"
                    ),
                    "for": "10m",
                    "labels": {"severity": "warning"},
                    "annotations": {
                        "summary": "Score's shadow model cannot be polled ({{ $labels.reason }}).",
                        "description": (
                            "The SHADOW pointer (the challenger alias on MLflow) fails to load "
                            "for 10m: {{ $labels.reason }}. No shadow comparisons are made. "
                            "unavailable: fix the registry path; refused: name a valid "
                            "version with `python -m ml_serving.scoring.registry shadow`."
                        ),
                    },
                },
                {
                    "alert": "MLServingThompsonSnapshotStale",
                    "expr": f"mlserving_experiment_snapshot_age_seconds > {SNAPSHOT_MAX_AGE_S}",
                    "for": "10m",
                    "labels": {"severity": "warning"},
                    "annotations": {
                        "summary": "Experiment {{ $labels.experiment }} runs on old rewards.",
                        "description": (
                            "The reward snapshot the shares come from is "
                            "{{ $value | humanizeDuration }} old (bound "
                            f"{SNAPSHOT_MAX_AGE_S // 3600} h): the batch job that writes it "
                            "(`python -m ml_serving.experiments snapshot`) has stopped, or its "
                            "snapshots are refused (mlserving_experiment_snapshots_refused_total)."
                        ),
                    },
                },
                {
                    "alert": "MLServingShadowModelDisagrees",
                    "expr": (
                        f"sum by ({BY}, version) "
                        f"(rate(mlserving_shadow_model_kendall_tau_sum[30m]))\n/\n"
                        f"sum by ({BY}, version) "
                        f"(rate(mlserving_shadow_model_kendall_tau_count[30m]))\n"
                        f"< {SHADOW_MIN_TAU:g}\nand\n"
                        f"sum by ({BY}, version) "
                        f"(increase(mlserving_shadow_model_kendall_tau_count[30m]))\n"
                        f">= {SHADOW_MIN_COMPARISONS_30M}"
                    ),
                    "for": "15m",
                    "labels": {"severity": "warning"},
                    "annotations": {
                        "summary": "Shadow model {{ $labels.version }} ranks unlike the "
                        "served one.",
                        "description": (
                            "Mean Kendall tau between the served and the shadow ranking is "
                            '{{ $value | printf "%.2f" }} over 30m '
                            f"(bound {SHADOW_MIN_TAU:g}). "
                            "Do not promote this version before its offline metrics explain the "
                            "difference; see the dashboard's shadow-model row."
                        ),
                    },
                },
                {
                    "alert": "MLServingFeatureStoreFailing",
                    "expr": (
                        f"sum by ({BY}) "
                        '(rate(mlserving_feature_lookups_total{result=~"error|skipped"}[5m]))\n/\n'
                        f"sum by ({BY}) (rate(mlserving_feature_lookups_total[5m]))\n"
                        f"> {FEATURE_ERROR_RATIO:g}"
                    ),
                    "for": "5m",
                    "labels": {"severity": "warning"},
                    "annotations": {
                        "summary": "The online feature store fails: Score answers from "
                        "training means.",
                        "description": (
                            "{{ $value | humanizePercentage }} of feature lookups fail or are "
                            f"skipped by the open breaker (bound {FEATURE_ERROR_RATIO:.0%}) for "
                            "5m. Score still answers, with each missing value's training mean "
                            "(ScoreResponse.defaulted_features): rankings are worse. Check "
                            "mlserving_feature_store_errors_total by cause (timeout: raise "
                            "ML_SERVING_FEATURE_BUDGET_MS or fix Redis latency; unavailable: "
                            "Redis down or the connection string secret)."
                        ),
                    },
                },
                {
                    "alert": "MLServingFeatureRowsMissing",
                    "expr": (
                        f"sum by ({BY}) (rate(mlserving_feature_lookups_total"
                        '{view="user_features",result=~"miss|stale"}[30m]))\n/\n'
                        f"sum by ({BY}) (rate(mlserving_feature_lookups_total"
                        '{view="user_features"}[30m]))\n'
                        f"> {FEATURE_MISS_RATIO:g}"
                    ),
                    "for": "30m",
                    "labels": {"severity": "warning"},
                    "annotations": {
                        "summary": "Most users have no (fresh) row in the online store.",
                        "description": (
                            "{{ $value | humanizePercentage }} of user lookups find no row or "
                            f"a stale one (bound {FEATURE_MISS_RATIO:.0%}) for 30m: the "
                            "pipelines' features flow (materialization) has stopped or writes "
                            "another project. Score defaults those users' features to "
                            "training means. Run the features flow and check its last report."
                        ),
                    },
                },
                {
                    "alert": "MLServingFeatureTipViewStale",
                    "expr": (
                        "time() - mlserving_feature_tips_loaded_timestamp_seconds "
                        f"> {TIP_VIEW_MAX_AGE_S}"
                    ),
                    "for": "10m",
                    "labels": {"severity": "warning"},
                    "annotations": {
                        "summary": "A pod's tip view has not been reloaded for a while.",
                        "description": (
                            "The tip features {{ $labels.instance }} holds in memory are "
                            "{{ $value | humanizeDuration }} old (bound "
                            f"{TIP_VIEW_MAX_AGE_S // 60} min; never loaded counts too): its "
                            "reloads from the online store fail, so new tips are scored from "
                            "training means. Check mlserving_feature_store_errors_total and the "
                            "pod's log."
                        ),
                    },
                },
                {
                    "alert": "MLServingModelVersionsDiffer",
                    "expr": (
                        f"count by ({BY}, name) "
                        f"(count by ({BY}, name, version) (mlserving_model_info)) > 1"
                    ),
                    "for": "10m",
                    "labels": {"severity": "warning"},
                    "annotations": {
                        "summary": "Pods serve different versions of {{ $labels.name }}.",
                        "description": (
                            "{{ $value }} versions of {{ $labels.name }} are served at once for "
                            "10m: a promotion refused on some pods, or a stuck rollout. Compare "
                            "mlserving_model_info by pod and see MLServingModelVersionRefused."
                        ),
                    },
                },
            ],
        },
    ]


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (PromQL stays readable in the files)."""


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def _yaml(doc: Any) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)


HEADER = "# Generated by `python -m scripts.gen_monitoring`: edit that script, not this file.\n"


def plain_rules() -> str:
    """The plain Prometheus rules file (rule_files: in prometheus.yml)."""
    return HEADER + _yaml({"groups": groups()})


def prometheus_rule() -> str:
    """The same groups as a Prometheus Operator PrometheusRule."""
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "ml-serving",
            "labels": {"app.kubernetes.io/name": "ml-serving", "prometheus": "ml-serving"},
        },
        "spec": {"groups": groups()},
    }
    return HEADER + _yaml(doc)


# --- the Grafana dashboard ---------------------------------------------------------------------

DS = {"type": "prometheus", "uid": "${datasource}"}
JOB = 'job=~"$job"'
RATE = "$__rate_interval"


class _Layout:
    """Panels placed left to right in rows of 24 grid units, with ids in order."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.x = 0
        self.y = 0

    def row(self, title: str) -> None:
        self.y += 8 if self.x else 0
        self.x = 0
        self.panels.append(
            {
                "type": "row",
                "id": len(self.panels) + 1,
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.y += 1

    def panel(
        self,
        title: str,
        description: str,
        targets: list[tuple[str, str]],
        unit: str = "short",
        kind: str = "timeseries",
        width: int = 8,
    ) -> None:
        if self.x + width > 24:
            self.x = 0
            self.y += 8
        self.panels.append(
            {
                "type": kind,
                "id": len(self.panels) + 1,
                "title": title,
                "description": description,
                "datasource": DS,
                "gridPos": {"h": 8, "w": width, "x": self.x, "y": self.y},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}}
                if kind == "timeseries"
                else {},
                "targets": [
                    {
                        "refId": chr(ord("A") + i),
                        "datasource": DS,
                        "expr": expr,
                        "legendFormat": legend,
                    }
                    for i, (expr, legend) in enumerate(targets)
                ],
            }
        )
        self.x += width


def _rpc(sel: str = "") -> str:
    return f"{{{JOB},{RPC}{sel}}}"


def dashboard() -> dict[str, Any]:
    """The Grafana dashboard (classic JSON model)."""
    d = _Layout()
    d.row("Score")
    score = ',grpc_method="Score"'
    score_slo = f'{score},le="{SCORE_LATENCY_S}"'
    d.panel(
        "Score calls by status",
        "Completed Score calls a second, by gRPC status.",
        [
            (
                f"sum by (grpc_code) (rate(grpc_server_handled_total{_rpc(score)}[{RATE}]))",
                "{{grpc_code}}",
            )
        ],
        "reqps",
    )
    d.panel(
        "Score latency",
        "p50 and p99 server-side latency; the SLO is 99% under 50 ms.",
        [
            (
                f"histogram_quantile({q}, sum by (le) "
                f"(rate(grpc_server_handling_seconds_bucket{_rpc(score)}[{RATE}])))",
                f"p{int(q * 100)}",
            )
            for q in (0.5, 0.99)
        ],
        "s",
    )
    d.panel(
        "Score calls within 50 ms",
        "Share of Score calls answered within 50 ms (objective 99%).",
        [
            (
                f"sum(rate(grpc_server_handling_seconds_bucket{_rpc(score_slo)}[{RATE}]))\n/\n"
                f"sum(rate(grpc_server_handling_seconds_count{_rpc(score)}[{RATE}]))",
                "within 50 ms",
            )
        ],
        "percentunit",
    )
    d.row("All RPCs")
    errors = f',grpc_code=~"{SERVER_ERRORS}"'
    d.panel(
        "Server-side error ratio by RPC",
        "UNAVAILABLE, INTERNAL, UNKNOWN and DEADLINE_EXCEEDED over all completed calls "
        "(INVALID_ARGUMENT is the caller's).",
        [
            (
                f"sum by (grpc_method) (rate(grpc_server_handled_total{_rpc(errors)}[{RATE}]))"
                "\n/\n"
                f"sum by (grpc_method) (rate(grpc_server_handled_total{_rpc()}[{RATE}]))",
                "{{grpc_method}}",
            )
        ],
        "percentunit",
    )
    d.panel(
        "Calls started by RPC",
        "RPCs received a second.",
        [
            (
                f"sum by (grpc_method) (rate(grpc_server_started_total{_rpc()}[{RATE}]))",
                "{{grpc_method}}",
            )
        ],
        "reqps",
    )
    d.panel(
        "In flight, shed and stalled",
        "RPCs in flight now; shed (RESOURCE_EXHAUSTED at the concurrency limit) and stalled "
        "streams a second.",
        [
            (f"sum(mlserving_inflight_rpcs{{{JOB}}})", "in flight"),
            (f"sum(rate(mlserving_shed_total{{{JOB}}}[{RATE}]))", "shed/s"),
            (f"sum(rate(mlserving_stalled_streams_total{{{JOB}}}[{RATE}]))", "stalled/s"),
        ],
    )
    d.row("Generate")
    gen = ',grpc_method=~"Generate|GenerateStream"'
    d.panel(
        "Generate calls by status",
        "Generate and GenerateStream calls a second, by method and status.",
        [
            (
                f"sum by (grpc_method, grpc_code) "
                f"(rate(grpc_server_handled_total{_rpc(gen)}[{RATE}]))",
                "{{grpc_method}} {{grpc_code}}",
            )
        ],
        "reqps",
    )
    d.panel(
        "Generate latency",
        "p50 and p95 to the last message.",
        [
            (
                f"histogram_quantile({q}, sum by (le, grpc_method) "
                f"(rate(grpc_server_handling_seconds_bucket{_rpc(gen)}[{RATE}])))",
                f"{{{{grpc_method}}}} p{int(q * 100)}",
            )
            for q in (0.5, 0.95)
        ],
        "s",
    )
    d.panel(
        "Fallback ratio",
        f"Share of Generate answers that were the curated fallback tip (alert above "
        f"{FALLBACK_RATIO:.0%}).",
        [
            (
                f'sum(rate(mlserving_generate_total{{{JOB},fallback="true"}}[{RATE}]))\n/\n'
                f"sum(rate(mlserving_generate_total{{{JOB}}}[{RATE}]))",
                "fallback",
            )
        ],
        "percentunit",
    )
    d.row("LLM routes")
    d.panel(
        "LLM latency by route",
        "p95 of one upstream call, retries and fallbacks included.",
        [
            (
                f"histogram_quantile(0.95, sum by (le, model) "
                f"(rate(mlserving_llm_latency_seconds_bucket{{{JOB}}}[{RATE}])))",
                "{{model}}",
            )
        ],
        "s",
    )
    d.panel(
        "LLM errors by route and reason",
        "Failed upstream calls a second.",
        [
            (
                f"sum by (model, reason) (rate(mlserving_llm_errors_total{{{JOB}}}[{RATE}]))",
                "{{model}} {{reason}}",
            )
        ],
        "reqps",
    )
    d.panel(
        "Tokens and cooldowns",
        "Tokens a second by route and kind; cooldowns (a route benched) in the range.",
        [
            (
                f"sum by (model, kind) (rate(mlserving_llm_tokens_total{{{JOB}}}[{RATE}]))",
                "{{model}} {{kind}}",
            ),
            (
                f"sum by (model) (increase(mlserving_llm_cooldowns_total{{{JOB}}}[$__range]))",
                "{{model}} cooldowns",
            ),
        ],
    )
    d.row("Experiments")
    d.panel(
        "Prompt versions served",
        "Successful Generate answers a second by prompt version.",
        [
            (
                f"sum by (prompt_version) (rate(mlserving_generate_total{{{JOB}}}[{RATE}]))",
                "{{prompt_version}}",
            )
        ],
        "reqps",
    )
    d.panel(
        "Experiment shares and assignments",
        "Each variant's current share, and assignments a second by how they were chosen.",
        [
            (
                f"avg by (experiment, prompt_version) (mlserving_experiment_share{{{JOB}}})",
                "share {{prompt_version}}",
            ),
            (
                f"sum by (prompt_version, chosen) "
                f"(rate(mlserving_prompt_assignments_total{{{JOB}}}[{RATE}]))",
                "{{prompt_version}} by {{chosen}}",
            ),
        ],
    )
    d.panel(
        "Snapshot age, shadow prompts, decision log",
        "Age of the reward snapshot (-1: none); shadow prompt runs and decision log lines a "
        "second; refused snapshots.",
        [
            (f"max by (experiment) (mlserving_experiment_snapshot_age_seconds{{{JOB}}})", "age s"),
            (
                f"sum by (outcome) (rate(mlserving_shadow_total{{{JOB}}}[{RATE}]))",
                "shadow {{outcome}}",
            ),
            (
                f"sum by (result) (rate(mlserving_decision_log_lines_total{{{JOB}}}[{RATE}]))",
                "decisions {{result}}",
            ),
            (
                f"sum(increase(mlserving_experiment_snapshots_refused_total{{{JOB}}}[$__range]))",
                "snapshots refused",
            ),
        ],
    )
    d.row("Models")
    d.panel(
        "Model versions served",
        "Pods per served and shadow model version.",
        [
            (f"count by (name, version) (mlserving_model_info{{{JOB}}})", "{{name}} {{version}}"),
            (
                f"count by (name, version) (mlserving_shadow_model_info{{{JOB}}})",
                "shadow {{name}} {{version}}",
            ),
        ],
        kind="stat",
    )
    d.panel(
        "Shadow rank agreement",
        f"Mean Kendall tau and top-k overlap of the shadow against the served ranking (alert "
        f"below tau {SHADOW_MIN_TAU:g}), and the mean |score delta|.",
        [
            (
                f"sum by (version) (rate(mlserving_shadow_model_{m}_sum{{{JOB}}}[{RATE}]))\n/\n"
                f"sum by (version) (rate(mlserving_shadow_model_{m}_count{{{JOB}}}[{RATE}]))",
                f"{m} {{{{version}}}}",
            )
            for m in ("kendall_tau", "top_k_overlap", "mean_abs_delta")
        ],
    )
    d.panel(
        "Shadow comparisons, skips and poll failures",
        "Comparisons and skips a second; registry poll failures (served and shadow) in the range.",
        [
            (
                f"sum by (version) "
                f"(rate(mlserving_shadow_model_comparisons_total{{{JOB}}}[{RATE}]))",
                "compared {{version}}",
            ),
            (
                f"sum by (reason) (rate(mlserving_shadow_model_skipped_total{{{JOB}}}[{RATE}]))",
                "skipped {{reason}}",
            ),
            (
                f"sum by (reason) "
                f"(increase(mlserving_model_poll_failures_total{{{JOB}}}[$__range]))",
                "model poll {{reason}}",
            ),
            (
                f"sum by (reason) "
                f"(increase(mlserving_shadow_model_poll_failures_total{{{JOB}}}[$__range]))",
                "shadow poll {{reason}}",
            ),
        ],
    )
    d.row("Feature store")
    d.panel(
        "Feature lookups",
        "User and profile lookups a second by result (hit, miss, stale, error, skipped by the "
        "open breaker).",
        [
            (
                f"sum by (view, result) (rate(mlserving_feature_lookups_total{{{JOB}}}[{RATE}]))",
                "{{view}} {{result}}",
            ),
        ],
    )
    d.panel(
        "Store errors and defaulted values",
        "Store faults a second by cause, and feature values a second that took a training "
        "mean (by group).",
        [
            (
                f"sum by (cause) (rate(mlserving_feature_store_errors_total{{{JOB}}}[{RATE}]))",
                "error {{cause}}",
            ),
            (
                f"sum by (group) (rate(mlserving_feature_defaults_total{{{JOB}}}[{RATE}]))",
                "defaulted {{group}}",
            ),
            (f"max(mlserving_feature_breaker_open{{{JOB}}})", "breaker open"),
        ],
    )
    d.panel(
        "Tip view",
        "Tips held in memory and the age of the last reload.",
        [
            (f"min(mlserving_feature_tips_loaded{{{JOB}}})", "tips loaded (min over pods)"),
            (
                f"max(time() - mlserving_feature_tips_loaded_timestamp_seconds{{{JOB}}})",
                "seconds since reload (max)",
            ),
        ],
    )
    return {
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "description": "ml-serving: Score, Generate, the LLM routes, experiments and the shadow "
        "model. Generated by scripts/gen_monitoring.py.",
        "editable": True,
        "graphTooltip": 1,
        "links": [],
        "panels": d.panels,
        "refresh": "30s",
        "schemaVersion": 41,
        "tags": ["ml-serving", "grpc"],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                },
                {
                    "name": "job",
                    "label": "Job",
                    "type": "query",
                    "datasource": DS,
                    "definition": "label_values(grpc_server_started_total, job)",
                    "query": {
                        "query": "label_values(grpc_server_started_total, job)",
                        "refId": "PrometheusVariableQueryEditor-VariableQuery",
                    },
                    "current": {},
                    "includeAll": True,
                    "multi": True,
                    "refresh": 2,
                    "sort": 1,
                    "hide": 0,
                },
            ]
        },
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "title": "ml-serving",
        "uid": "ml-serving",
        "version": 1,
    }


def outputs() -> dict[str, str]:
    """Each generated file's name under deploy/monitoring/ and its text."""
    return {
        PLAIN: plain_rules(),
        OPERATOR: prometheus_rule(),
        DASHBOARD: json.dumps(dashboard(), indent=2) + "\n",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 when a file is stale")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    stale = []
    for name, text in outputs().items():
        path = args.out / name
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    for name in stale:
        print(f"stale: {args.out / name} (run python -m scripts.gen_monitoring)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
