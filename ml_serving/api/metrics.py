"""Prometheus metrics: gRPC server series, admission, Generate per prompt version, LLM, model."""

from __future__ import annotations

import bisect
import itertools
import logging
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from ml_serving.api.rpc import METHOD_TYPES, SERVICE, Gate
from ml_serving.experiments.runtime import Experiments
from ml_serving.features.lookup import FeatureLookup
from ml_serving.scoring.features import USER_FEATURE_VIEW, USER_PROFILE_VIEW
from ml_serving.scoring.registry import ModelHolder
from ml_serving.scoring.shadow import Comparison, ShadowScorer

logger = logging.getLogger(__name__)

# Score answers in well under a millisecond; Generate takes seconds: one set of buckets covers both.
# Every documented threshold is a boundary, so the rules count calls on either side of it exactly
# instead of interpolating: Score's 50 ms SLO (deploy/monitoring), and the mesh's per-RPC timeouts
# (deploy/base/istio-virtualservice.yaml: Score 2 s, ListPromptVersions 5 s, Generate 30 s, other
# methods 60 s, GenerateStream 120 s).
RPC_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120
)  # fmt: skip
_LLM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Shadow model comparisons: the top-5 overlap moves in steps of 1/5; tau spans [-1, 1] but a
# useful shadow sits near 1; scores are probabilities, so their mean |delta| is at most 1.
_OVERLAP_BUCKETS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
_TAU_BUCKETS = (-0.5, 0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
_DELTA_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


_RPC_LABELS = ["grpc_type", "grpc_service", "grpc_method"]


class _RpcCounts(Collector):
    """The standard gRPC server series (grpc_server_started_total, _handled_total,
    _handling_seconds), counted in plain ints by the event loop and turned into samples at
    scrape time.

    Why not prometheus_client's Counter and Histogram: each inc or observe takes a lock and
    checks its labels, about 4 µs of every Score call for three series; here an RPC costs two
    dict updates and one bisect. Only the loop's thread writes; a scrape (another thread) reads
    copies taken under the GIL, so it sees each count whole.
    """

    def __init__(self) -> None:
        self.started: dict[str, int] = {}
        self.handled: dict[tuple[str, str], int] = {}
        self.buckets: dict[str, list[int]] = {}
        """Per method, the calls per RPC_BUCKETS interval (the last: past every bound)."""
        self.sums: dict[str, float] = {}
        # The `le` labels as prometheus_client writes them (0.0005, 1.0, 120.0).
        self._bounds = [repr(float(b)) for b in RPC_BUCKETS]

    def observe(self, method: str, seconds: float) -> None:
        counts = self.buckets.get(method)
        if counts is None:
            counts = self.buckets[method] = [0] * (len(RPC_BUCKETS) + 1)
            self.sums[method] = 0.0
        counts[bisect.bisect_left(RPC_BUCKETS, seconds)] += 1  # le: the first bound >= seconds
        self.sums[method] += seconds

    def collect(self) -> Iterator[Any]:
        started = CounterMetricFamily(
            "grpc_server_started", "RPCs started on the server.", labels=_RPC_LABELS
        )
        for method, count in list(self.started.items()):
            started.add_metric([METHOD_TYPES[method], SERVICE, method], count)
        yield started
        handled = CounterMetricFamily(
            "grpc_server_handled",
            "RPCs completed on the server, by status code.",
            labels=[*_RPC_LABELS, "grpc_code"],
        )
        for (method, code), count in list(self.handled.items()):
            handled.add_metric([METHOD_TYPES[method], SERVICE, method, code], count)
        yield handled
        handling = HistogramMetricFamily(
            "grpc_server_handling_seconds",
            "Time to handle an RPC, to its last message.",
            labels=_RPC_LABELS,
        )
        sums = dict(self.sums)
        for method, counts in list(self.buckets.items()):
            cumulative = list(itertools.accumulate(counts[:]))
            handling.add_metric(
                [METHOD_TYPES[method], SERVICE, method],
                [*zip(self._bounds, cumulative, strict=False), ("+Inf", cumulative[-1])],
                sums.get(method, 0.0),
            )
        yield handling


class _LiveState(Collector):
    """Values read at scrape time: in-flight RPCs, shed count, and the model being served."""

    def __init__(self, gate: Gate, models: ModelHolder | None) -> None:
        self._gate = gate
        self._models = models

    def collect(self) -> Iterator[Any]:
        inflight = GaugeMetricFamily(
            "mlserving_inflight_rpcs", "InferenceService RPCs being handled now."
        )
        inflight.add_metric([], self._gate.in_flight)
        yield inflight
        shed = CounterMetricFamily(
            "mlserving_shed", "RPCs refused with RESOURCE_EXHAUSTED by the concurrency limit."
        )
        shed.add_metric([], self._gate.shed)
        yield shed
        stalled = CounterMetricFamily(
            "mlserving_stalled_streams",
            "Streams ended because their client took no message for the stall timeout.",
        )
        stalled.add_metric([], self._gate.stalled)
        yield stalled
        if self._models is not None:
            model = self._models.loaded
            info = GaugeMetricFamily(
                "mlserving_model_info",
                "The model version Score serves (value is always 1; none before one loads).",
                labels=["name", "version"],
            )
            if model is not None:
                info.add_metric([model.name, model.version], 1)
            yield info
            polls = CounterMetricFamily(
                "mlserving_model_poll_failures",
                "Failed model registry polls, by reason: unavailable (registry unreachable) or "
                "refused (the promoted version failed validation).",
                labels=["reason"],
            )
            for reason in ("unavailable", "refused"):
                polls.add_metric([reason], self._models.poll_failures[reason])
            yield polls


class _ExperimentState(Collector):
    """The prompt experiment, read at scrape time: assignments, shares, snapshot, shadows."""

    def __init__(self, experiments: Experiments) -> None:
        self._experiments = experiments

    def collect(self) -> Iterator[Any]:
        experiments = self._experiments
        assignments = CounterMetricFamily(
            "mlserving_prompt_assignments",
            "Generate prompt versions chosen, by experiment, version and how chosen "
            "(request, experiment, default).",
            labels=["experiment", "prompt_version", "chosen"],
        )
        for (name, version, how), count in list(experiments.selector.counts.items()):
            assignments.add_metric([name, version, how.value], count)
        yield assignments
        experiment = experiments.experiment
        if experiment is not None:
            shares = GaugeMetricFamily(
                "mlserving_experiment_share",
                "Current share of each variant in the experiment.",
                labels=["experiment", "prompt_version"],
            )
            for version, share in experiment.shares.shares.items():
                shares.add_metric([experiment.name, version], share)
            yield shares
            age = experiment.snapshot_age_s()
            snapshot = GaugeMetricFamily(
                "mlserving_experiment_snapshot_age_seconds",
                "Age (from its as_of) of the reward snapshot the shares come from; -1 without one.",
                labels=["experiment"],
            )
            snapshot.add_metric([experiment.name], -1.0 if age is None else age)
            yield snapshot
            refused = CounterMetricFamily(
                "mlserving_experiment_snapshots_refused",
                "Reward snapshots refused (malformed, another experiment's, or stale).",
                labels=["experiment"],
            )
            refused.add_metric([experiment.name], experiment.refused)
            yield refused
        if experiments.shadow is not None:
            outcomes = CounterMetricFamily(
                "mlserving_shadow",
                "Shadow prompt-version runs by outcome (ran, skipped, failed, cancelled).",
                labels=["prompt_version", "outcome"],
            )
            for outcome, count in experiments.shadow.outcomes.items():
                outcomes.add_metric([experiments.shadow.version, outcome.value], count)
            yield outcomes
        if experiments.decisions is not None:
            lines = CounterMetricFamily(
                "mlserving_decision_log_lines",
                "Decision log lines written, and lost to a failed write.",
                labels=["result"],
            )
            lines.add_metric(["written"], experiments.decisions.lines)
            lines.add_metric(["lost"], experiments.decisions.write_errors)
            yield lines


class _ShadowModelState(Collector):
    """Score's shadow model version, read at scrape time: version, comparisons, skips, polls."""

    def __init__(self, shadow: ShadowScorer) -> None:
        self._shadow = shadow

    def collect(self) -> Iterator[Any]:
        shadow = self._shadow
        info = GaugeMetricFamily(
            "mlserving_shadow_model_info",
            "The model version shadowing Score (value is always 1; none while none is named).",
            labels=["name", "version"],
        )
        model = shadow.model
        if model is not None:
            info.add_metric([model.name, model.version], 1)
        yield info
        comparisons = CounterMetricFamily(
            "mlserving_shadow_model_comparisons",
            "Score calls re-scored by the shadow model version and compared, by its version.",
            labels=["version"],
        )
        for version, count in list(shadow.comparisons.items()):
            comparisons.add_metric([version], count)
        yield comparisons
        skipped = CounterMetricFamily(
            "mlserving_shadow_model_skipped",
            "Sampled Score calls not compared, by reason: same_version, busy (more RPCs in "
            "flight than the limit), queued (a comparison already waiting), error.",
            labels=["reason"],
        )
        for reason, count in list(shadow.skipped.items()):
            skipped.add_metric([reason.value], count)
        yield skipped
        polls = CounterMetricFamily(
            "mlserving_shadow_model_poll_failures",
            "Failed polls of the shadow pointer, by reason: unavailable or refused.",
            labels=["reason"],
        )
        for kind in ("unavailable", "refused"):
            polls.add_metric([kind], shadow.poll_failures[kind])
        yield polls


class _FeatureStoreState(Collector):
    """The online feature store's lookups, errors and defaults, read at scrape time."""

    def __init__(self, lookup: FeatureLookup) -> None:
        self._lookup = lookup

    def collect(self) -> Iterator[Any]:
        lookup = self._lookup
        lookups = CounterMetricFamily(
            "mlserving_feature_lookups",
            "Online feature store lookups by view and result: hit, miss (no row), stale (older "
            "than ML_SERVING_FEATURE_MAX_AGE_S), error, skipped (breaker open).",
            labels=["view", "result"],
        )
        for view in (USER_FEATURE_VIEW, USER_PROFILE_VIEW):
            for result in ("hit", "miss", "stale", "error", "skipped"):
                lookups.add_metric([view, result], lookup.lookups[(view, result)])
        yield lookups
        errors = CounterMetricFamily(
            "mlserving_feature_store_errors",
            "Online feature store faults by cause: timeout (over the budget), unavailable, "
            "malformed (a stored value that does not decode), internal.",
            labels=["cause"],
        )
        for cause in ("timeout", "unavailable", "malformed", "internal"):
            errors.add_metric([cause], lookup.errors[cause])
        yield errors
        defaults = CounterMetricFamily(
            "mlserving_feature_defaults",
            "Score feature values that neither the request nor the store had (training mean "
            "used), by group: context, candidate.",
            labels=["group"],
        )
        for group in ("context", "candidate"):
            defaults.add_metric([group], lookup.defaults[group])
        yield defaults
        breaker = GaugeMetricFamily(
            "mlserving_feature_breaker_open",
            "1 while the feature store's breaker skips lookups, else 0.",
        )
        breaker.add_metric([], 1.0 if lookup.breaker.is_open else 0.0)
        yield breaker
        tips = GaugeMetricFamily(
            "mlserving_feature_tips_loaded",
            "Tips held in memory from the tip view (the last successful reload).",
        )
        tips.add_metric([], len(lookup.tips.index))
        yield tips
        age = GaugeMetricFamily(
            "mlserving_feature_tips_loaded_timestamp_seconds",
            "Unix time of the last successful reload of the tip view (0: none yet).",
        )
        age.add_metric([], lookup.tips.loaded_at)
        yield age


class Metrics:
    """Owns one registry; observes RPCs (rpc.Gate observers) and LLM calls (Generator)."""

    def __init__(self, gate: Gate, models: ModelHolder | None = None) -> None:
        self.registry = CollectorRegistry()
        self.rpcs = _RpcCounts()
        self.registry.register(self.rpcs)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.generate = Counter(
            "mlserving_generate",
            "Successful Generate and GenerateStream calls by prompt version and fallback.",
            ["grpc_method", "prompt_version", "fallback"],
            registry=self.registry,
        )
        self.llm_latency = Histogram(
            "mlserving_llm_latency_seconds",
            "Duration of one upstream LLM call (all retries and fallbacks included).",
            ["model"],
            buckets=_LLM_BUCKETS,
            registry=self.registry,
        )
        self.llm_tokens = Counter(
            "mlserving_llm_tokens",
            "Tokens reported by the LLM, by kind (prompt or completion).",
            ["model", "kind"],
            registry=self.registry,
        )
        self.llm_errors = Counter(
            "mlserving_llm_errors",
            "Failed LLM calls by reason (the gRPC status they map to).",
            ["model", "reason"],
            registry=self.registry,
        )
        self.llm_cooldowns = Counter(
            "mlserving_llm_cooldowns",
            "LLM deployments benched for cooldown_time after more than allowed_fails failures "
            "in a minute.",
            ["model"],
            registry=self.registry,
        )
        self.registry.register(_LiveState(gate, models))
        gate.observers.append(self)

    def rpc_started(self, method: str) -> None:
        """Count an RPC that passed the door (admitted or not)."""
        started = self.rpcs.started
        started[method] = started.get(method, 0) + 1

    def rpc_finished(
        self, method: str, code: str, seconds: float, notes: Mapping[str, Any]
    ) -> None:
        """Count an RPC's outcome and its latency."""
        rpcs = self.rpcs
        key = (method, code)
        rpcs.handled[key] = rpcs.handled.get(key, 0) + 1
        rpcs.observe(method, seconds)
        if code == "OK" and "prompt_version" in notes:
            self._child(
                self.generate,
                method,
                notes["prompt_version"],
                "true" if notes.get("fallback") else "false",
            ).inc()

    def llm_call(
        self,
        model: str,
        seconds: float,
        *,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        error: str | None = None,
    ) -> None:
        """Record one upstream LLM call: its latency, tokens, or the reason it failed."""
        self._child(self.llm_latency, model).observe(seconds)
        if error is not None:
            self._child(self.llm_errors, model, error).inc()
            return
        self._child(self.llm_tokens, model, "prompt").inc(prompt_tokens)
        self._child(self.llm_tokens, model, "completion").inc(completion_tokens)

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, kept: labels() checks and hashes its arguments under a
        lock (microseconds), and every Generate call asks for the same few children."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def llm_cooldown(self, model: str, seconds: float) -> None:
        """Count an LLM deployment benched for `seconds` (LLMGateway's on_cooldown)."""
        self.llm_cooldowns.labels(model).inc()

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics on host:port in a background thread; returns the bound port."""
        http_server, _thread = start_http_server(port, addr=host, registry=self.registry)
        bound = int(http_server.server_port)
        logger.info("metrics listening", extra={"metrics_port": bound})
        self._http_server = http_server
        return bound

    def watch_experiments(self, experiments: Experiments) -> None:
        """Expose the prompt experiment's state (read at scrape time)."""
        self.registry.register(_ExperimentState(experiments))

    def watch_shadow(self, shadow: ShadowScorer) -> None:
        """Expose Score's shadow model version: counters read at scrape time, histograms fed by
        every comparison (this object becomes the shadow's observer)."""
        self.shadow_overlap = Histogram(
            "mlserving_shadow_model_top_k_overlap",
            "Share of the served top k (k = min(5, candidates)) also in the shadow's top k.",
            ["version"],
            buckets=_OVERLAP_BUCKETS,
            registry=self.registry,
        )
        self.shadow_tau = Histogram(
            "mlserving_shadow_model_kendall_tau",
            "Kendall tau-b of the served and the shadow ranking (over a fixed sample of 200 "
            "candidates above 200; undefined ones, e.g. one candidate, not observed).",
            ["version"],
            buckets=_TAU_BUCKETS,
            registry=self.registry,
        )
        self.shadow_delta = Histogram(
            "mlserving_shadow_model_mean_abs_delta",
            "Mean |served score - shadow score| over a compared call's candidates.",
            ["version"],
            buckets=_DELTA_BUCKETS,
            registry=self.registry,
        )
        self._shadow_children: dict[str, tuple[Any, Any, Any]] = {}
        self.registry.register(_ShadowModelState(shadow))
        shadow.observer = self

    def watch_features(self, lookup: FeatureLookup) -> None:
        """Export the online feature store's counters at scrape time."""
        self.registry.register(_FeatureStoreState(lookup))

    def shadow_compared(self, version: str, comparison: Comparison) -> None:
        """Observe one shadow comparison (the ShadowScorer's observer)."""
        children = self._shadow_children.get(version)
        if children is None:
            children = self._shadow_children[version] = (
                self.shadow_overlap.labels(version),
                self.shadow_tau.labels(version),
                self.shadow_delta.labels(version),
            )
        overlap, tau, delta = children
        overlap.observe(comparison.top_k_overlap)
        if comparison.kendall_tau is not None:
            tau.observe(comparison.kendall_tau)
        delta.observe(comparison.mean_abs_delta)

    def close(self) -> None:
        """Stop the /metrics endpoint, if serving."""
        http_server = getattr(self, "_http_server", None)
        if http_server is not None:
            http_server.shutdown()
            http_server.server_close()
