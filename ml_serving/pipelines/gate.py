"""The promotion gate: a challenger against the champion, then promote only if every check passes.

The checks (each passes, fails, or is skipped with a reason; the gate promotes only when none
failed, or when a person overrides it):

- ``same_heldout_set``: both are measured on one held-out set. Their model cards are compared
  directly when both were trained on the same data and split (same simulator seed and
  configuration, same split rule: the same held-out users); otherwise both are re-evaluated
  on one fresh evaluation set drawn from the simulator with a seed neither was trained on.
- ``auc``: the challenger's AUC is at least the champion's minus ``Margins.auc``.
- ``calibration``: the challenger's expected calibration error is at most the champion's plus
  ``Margins.ece``.
- ``fairness``: the challenger passes the training policy's segment checks (new vs
  established users: calibration in the large, segment ECE, AUC gap; ``training.train``), and
  its |AUC gap| is at most the champion's plus ``Margins.fairness_auc_gap``.
- ``shadow``: when the challenger ran as Score's shadow model (``mlserving_shadow_model_*``
  from the servers' ``/metrics``, or a comparison file), at least
  ``Margins.min_shadow_comparisons`` calls were compared, the mean Kendall tau and top-k
  overlap reach their minimums and the mean |score change| stays under its maximum. Without
  comparisons it is skipped, or failed when ``require_shadow``.

The override: a person who decides otherwise passes a reason (who and why); the challenger is
then promoted with the failed checks listed in the report and the reason in the card's rollout
history. Promotion is the registry's own (``ModelRegistry.promote`` rewrites ``PROMOTED``,
``MlflowRegistry.promote`` moves ``champion``): a running server swaps the version in on its
next poll.
"""

from __future__ import annotations

import json
import logging
import math
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt
from prometheus_client.parser import text_string_to_metric_families

from ml_serving.scoring import features
from ml_serving.scoring.features import Group
from ml_serving.scoring.mlflow_registry import CHALLENGER, CHAMPION, MlflowRegistry
from ml_serving.scoring.model import Model
from ml_serving.scoring.registry import ModelRegistry, RegistryError
from ml_serving.scoring.shadow import FileShadowPointer, clear_shadow
from ml_serving.training import simulator, train

logger = logging.getLogger(__name__)

EVALUATION_SEED: Final = 777_000_001
"""Seed of the re-evaluation set (moved on while either model was trained on it)."""
METRICS_TIMEOUT_S: Final = 10.0
"""How long one ``/metrics`` scrape may take."""


@dataclass(frozen=True, slots=True)
class Margins:
    """How much worse than the champion a challenger may be, and the shadow's bounds."""

    auc: float = 0.005
    """The challenger's AUC may be this much below the champion's."""
    ece: float = 0.005
    """The challenger's expected calibration error may be this much above the champion's."""
    fairness_auc_gap: float = 0.01
    """The challenger's |AUC gap| between segments may be this much above the champion's."""
    min_shadow_comparisons: int = 50
    """Shadow comparisons needed before the serving comparison counts."""
    min_kendall_tau: float = 0.5
    """Lowest mean Kendall tau-b of the shadow's ranking against the served one."""
    min_top_k_overlap: float = 0.5
    """Lowest mean top-k overlap of the shadow's ranking with the served one."""
    max_mean_abs_delta: float = 0.05
    """Highest mean |served score - shadow score|."""


DEFAULT_MARGINS: Final = Margins()
"""The gate's stated margins (a run may pass others)."""


@dataclass(frozen=True, slots=True)
class Quality:
    """One model's figures on the gate's held-out set."""

    auc: float
    log_loss: float
    ece: float
    fairness_passed: bool
    fairness_checks: Mapping[str, bool]
    auc_gap: float
    """Established minus new users' AUC."""
    rows: int


@dataclass(frozen=True, slots=True)
class ShadowStats:
    """The serving comparison of one shadow version, summed over the sources read."""

    version: str
    comparisons: int
    mean_top_k_overlap: float | None
    mean_kendall_tau: float | None
    mean_abs_delta: float | None
    sources: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Check:
    """One gate check: ``passed`` is None when skipped."""

    name: str
    passed: bool | None
    detail: str


@dataclass
class GateResult:
    """What the gate measured and decided."""

    model: str
    champion: str
    challenger: str
    evaluation: str
    """Which held-out set both were measured on."""
    champion_quality: Quality
    challenger_quality: Quality
    shadow: ShadowStats | None
    checks: list[Check]
    promoted: bool = False
    override: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[Check]:
        """The checks that failed."""
        return [c for c in self.checks if c.passed is False]


# --- the registries -----------------------------------------------------------------------------


class GateRegistry(Protocol):
    """Where the champion and the challenger are found, and how promotion is done."""

    where: str

    def champion(self, name: str) -> str:
        """The version that serves now."""
        ...

    def challenger(self, name: str) -> str:
        """The version to judge when none is named."""
        ...

    def load(self, name: str, version: str) -> Model:
        """One fully validated version."""
        ...

    def promote(self, name: str, version: str, note: str) -> None:
        """Make ``version`` the served one."""
        ...


class FileGate:
    """The file registry: the champion is ``PROMOTED``; the challenger is ``SHADOW`` when it
    names another version, else the newest version."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self.where = f"file registry {registry.root}"

    def champion(self, name: str) -> str:
        return self.registry.promoted_version(name)

    def challenger(self, name: str) -> str:
        champion = self.champion(name)
        shadow = FileShadowPointer(self.registry).shadow_version(name)
        if shadow is not None and shadow != champion:
            return shadow
        versions = self.registry.versions(name)
        if not versions:
            raise RegistryError(f"model {name!r} has no versions under {self.registry.root}")
        return versions[-1]

    def load(self, name: str, version: str) -> Model:
        return self.registry.load(name, version)

    def promote(self, name: str, version: str, note: str) -> None:
        self.registry.promote(name, version, note=note)
        # The new champion no longer has anything to shadow: stop comparing it with itself.
        if FileShadowPointer(self.registry).shadow_version(name) == version:
            clear_shadow(self.registry, name)


class MlflowGate:
    """MLflow: the champion and the challenger are the ``champion`` and ``challenger``
    aliases; promotion moves ``champion``."""

    def __init__(self, registry: MlflowRegistry) -> None:
        self.registry = registry
        self.where = "MLflow registry"

    def champion(self, name: str) -> str:
        return self.registry.version_by_alias(name, CHAMPION)

    def challenger(self, name: str) -> str:
        return self.registry.version_by_alias(name, CHALLENGER)

    def load(self, name: str, version: str) -> Model:
        return self.registry.load(name, version)

    def promote(self, name: str, version: str, note: str) -> None:
        self.registry.promote(name, version, note=note)


def open_gate_registry(
    model_root: Path, *, tracking_uri: str | None, cache_dir: Path
) -> GateRegistry:
    """MLflow when ``tracking_uri`` is set, else the file registry under ``model_root``."""
    if tracking_uri:
        return MlflowGate(MlflowRegistry(cache_dir, tracking_uri=tracking_uri))
    return FileGate(ModelRegistry(model_root))


# --- quality on one held-out set -----------------------------------------------------------------


def _data_key(card: Mapping[str, Any]) -> tuple[Any, ...]:
    data = card.get("training_data", {})
    return (
        data.get("source"),
        data.get("seed"),
        json.dumps(data.get("simulator_config"), sort_keys=True),
        data.get("split"),
        json.dumps(data.get("rows"), sort_keys=True),
    )


def same_heldout_set(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two cards' held-out metrics were measured on the same rows (same data source,
    seed, simulator configuration, split rule and row counts)."""
    key = _data_key(a)
    return key[1] is not None and key == _data_key(b)


def card_quality(card: Mapping[str, Any]) -> Quality:
    """A model's figures as its card states them (its own held-out set)."""
    m, fair = card["metrics"]["heldout"], card["fairness"]
    return Quality(
        auc=float(m["auc"]),
        log_loss=float(m["log_loss"]),
        ece=float(m["ece"]),
        fairness_passed=bool(fair["passed"]),
        fairness_checks=dict(fair["checks"]),
        auc_gap=float(fair["auc_gap_established_minus_new"]),
        rows=int(m["n_rows"]),
    )


@dataclass(frozen=True, slots=True)
class EvaluationSet:
    """Rows both models are scored on: raw features with defaults filled, labels, segment."""

    seed: int
    context: npt.NDArray[np.float32]
    candidates: npt.NDArray[np.float32]
    labels: npt.NDArray[np.int8]
    segment: npt.NDArray[np.bool_]


def evaluation_set(
    cards: Iterable[Mapping[str, Any]],
    *,
    seed: int = EVALUATION_SEED,
    config: simulator.SimulatorConfig | None = None,
) -> EvaluationSet:
    """A fresh simulated population, drawn with a seed none of ``cards`` was trained on."""
    trained_on = {card.get("training_data", {}).get("seed") for card in cards}
    while seed in trained_on:
        seed += 1
    data = simulator.simulate(seed, config or simulator.SimulatorConfig())
    return EvaluationSet(
        seed=seed,
        context=features.fill_defaults(data.context, Group.CONTEXT),
        candidates=features.fill_defaults(data.candidates, Group.CANDIDATE),
        labels=data.labels,
        segment=data.segment,
    )


def measure(model: Model, data: EvaluationSet) -> Quality:
    """The model's figures on ``data`` (the metrics and fairness policy of training)."""
    probs = model.predict_rows(data.context, data.candidates)
    m = train.evaluate(data.labels, probs)
    fair = train.fairness(data.labels, probs, data.segment)
    return Quality(
        auc=float(m["auc"]),
        log_loss=float(m["log_loss"]),
        ece=float(m["ece"]),
        fairness_passed=bool(fair["passed"]),
        fairness_checks=dict(fair["checks"]),
        auc_gap=float(fair["auc_gap_established_minus_new"]),
        rows=len(data.labels),
    )


# --- the serving comparison ----------------------------------------------------------------------


def _sums(text: str, version: str) -> dict[str, float]:
    """Each ``mlserving_shadow_model_*`` sample of ``version`` summed by name; histogram
    buckets summed by ``<name>@<le>``."""
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("mlserving_shadow_model_"):
            continue
        for sample in family.samples:
            if sample.labels.get("version") != version:
                continue
            key = sample.name
            if key.endswith("_bucket"):
                key = f"{key}@{sample.labels['le']}"
            sums[key] = sums.get(key, 0.0) + float(sample.value)
    return sums


def _histogram_mean(sums: Mapping[str, float], metric: str, low: float) -> tuple[float, float]:
    """(sum, count) of a histogram: its own ``_sum`` when exported, else estimated from its
    buckets' midpoints (prometheus_client exports no ``_sum`` for a histogram with negative
    buckets, Kendall tau's); ``low`` is the lower end of the first bucket."""
    count = sums.get(f"{metric}_count", 0.0)
    if f"{metric}_sum" in sums or not count:
        return sums.get(f"{metric}_sum", 0.0), count
    prefix = f"{metric}_bucket@"
    bounds = sorted(
        (float(key[len(prefix) :]), value) for key, value in sums.items() if key.startswith(prefix)
    )
    total, below, last = 0.0, 0.0, low
    for le, cumulative in bounds:
        upper = last if math.isinf(le) else le
        total += (cumulative - below) * (last + upper) / 2
        below, last = cumulative, upper
    return total, count


def _read_source(source: str) -> str:
    if source.startswith(("http://", "https://")):
        with urllib.request.urlopen(source, timeout=METRICS_TIMEOUT_S) as reply:
            text: str = reply.read().decode("utf-8")
            return text
    return Path(source).read_text(encoding="utf-8")


def _mean(total: float, count: float) -> float | None:
    return total / count if count else None


def shadow_stats(sources: Sequence[str], version: str) -> ShadowStats:
    """The shadow comparison of ``version`` summed over ``sources``: ``/metrics`` URLs of the
    serving pods (or files of that text), or JSON comparison files (``{"version",
    "comparisons", "mean_top_k_overlap", "mean_kendall_tau", "mean_abs_delta"}``, e.g.
    exported from Prometheus). The servers' mean Kendall tau is estimated from its histogram's
    buckets (within half a bucket: 0.05 near 0.85). ValueError or OSError naming a source that
    cannot be read."""
    totals: dict[str, float] = {}

    def add(key: str, value: float) -> None:
        totals[key] = totals.get(key, 0.0) + value

    for source in sources:
        try:
            text = _read_source(source)
        except OSError as exc:
            raise OSError(f"shadow comparison {source}: {exc}") from exc
        if source.endswith(".json"):
            data = json.loads(text)
            if str(data.get("version")) != version:
                continue
            n = int(data.get("comparisons", 0))
            add("count", n)
            for key in ("mean_top_k_overlap", "mean_kendall_tau", "mean_abs_delta"):
                value = data.get(key)
                if value is not None and math.isfinite(float(value)):
                    add(f"{key}_sum", float(value) * n)
                    add(f"{key}_count", n)
            continue
        try:
            sums = _sums(text, version)
        except ValueError as exc:
            raise ValueError(f"shadow comparison {source}: not Prometheus text: {exc}") from exc
        add("count", sums.get("mlserving_shadow_model_comparisons_total", 0.0))
        for key, metric, low in (
            ("mean_top_k_overlap", "mlserving_shadow_model_top_k_overlap", 0.0),
            ("mean_kendall_tau", "mlserving_shadow_model_kendall_tau", -1.0),
            ("mean_abs_delta", "mlserving_shadow_model_mean_abs_delta", 0.0),
        ):
            total, count = _histogram_mean(sums, metric, low)
            add(f"{key}_sum", total)
            add(f"{key}_count", count)
    return ShadowStats(
        version=version,
        comparisons=int(totals.get("count", 0)),
        mean_top_k_overlap=_mean(
            totals.get("mean_top_k_overlap_sum", 0), totals.get("mean_top_k_overlap_count", 0)
        ),
        mean_kendall_tau=_mean(
            totals.get("mean_kendall_tau_sum", 0), totals.get("mean_kendall_tau_count", 0)
        ),
        mean_abs_delta=_mean(
            totals.get("mean_abs_delta_sum", 0), totals.get("mean_abs_delta_count", 0)
        ),
        sources=tuple(sources),
    )


# --- the checks ----------------------------------------------------------------------------------


def checks(
    champion: Quality,
    challenger: Quality,
    shadow: ShadowStats | None,
    *,
    same_set: bool,
    evaluation: str,
    margins: Margins = DEFAULT_MARGINS,
    require_shadow: bool = False,
) -> list[Check]:
    """Every check of the gate (see the module docstring), in report order."""
    out = [
        Check("same_heldout_set", same_set, evaluation),
        Check(
            "auc",
            challenger.auc >= champion.auc - margins.auc,
            f"challenger {challenger.auc:.4f} vs champion {champion.auc:.4f} "
            f"(may be at most {margins.auc} lower)",
        ),
        Check(
            "calibration",
            challenger.ece <= champion.ece + margins.ece,
            f"expected calibration error: challenger {challenger.ece:.4f} vs champion "
            f"{champion.ece:.4f} (may be at most {margins.ece} higher)",
        ),
    ]
    failing = sorted(k for k, ok in challenger.fairness_checks.items() if not ok)
    gap_ok = abs(challenger.auc_gap) <= abs(champion.auc_gap) + margins.fairness_auc_gap
    out.append(
        Check(
            "fairness",
            challenger.fairness_passed and gap_ok,
            f"AUC gap established - new: challenger {challenger.auc_gap:+.4f} vs champion "
            f"{champion.auc_gap:+.4f} (|gap| may be at most {margins.fairness_auc_gap} wider); "
            + (
                "segment checks passed"
                if challenger.fairness_passed
                else "segment checks failed: " + ", ".join(failing)
            ),
        )
    )
    if shadow is None or shadow.comparisons == 0:
        detail = (
            "no shadow comparison source given"
            if shadow is None
            else f"the challenger was not compared as the shadow model in {len(shadow.sources)} "
            "source(s)"
        )
        out.append(Check("shadow", False if require_shadow else None, detail))
        return out
    problems = []
    if shadow.comparisons < margins.min_shadow_comparisons:
        problems.append(
            f"only {shadow.comparisons} comparisons (needs {margins.min_shadow_comparisons})"
        )
    tau, overlap, delta = shadow.mean_kendall_tau, shadow.mean_top_k_overlap, shadow.mean_abs_delta
    if tau is not None and tau < margins.min_kendall_tau:
        problems.append(f"mean Kendall tau {tau:.3f} < {margins.min_kendall_tau}")
    if overlap is not None and overlap < margins.min_top_k_overlap:
        problems.append(f"mean top-k overlap {overlap:.3f} < {margins.min_top_k_overlap}")
    if delta is not None and delta > margins.max_mean_abs_delta:
        problems.append(f"mean |score change| {delta:.4f} > {margins.max_mean_abs_delta}")
    figures = (
        f"{shadow.comparisons} comparisons, mean Kendall tau {_fmt(tau)}, top-k overlap "
        f"{_fmt(overlap)}, mean |score change| {_fmt(delta, 4)}"
    )
    out.append(Check("shadow", not problems, "; ".join([figures, *problems])))
    return out


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def judge(
    registry: GateRegistry,
    name: str,
    *,
    challenger: str | None = None,
    shadow_sources: Sequence[str] = (),
    margins: Margins = DEFAULT_MARGINS,
    require_shadow: bool = False,
    reevaluate: bool | None = None,
    override: str | None = None,
    evaluation_config: simulator.SimulatorConfig | None = None,
) -> GateResult:
    """Measure ``challenger`` (default: the registry's) against the champion and run every
    check; nothing is promoted here (``promote_if_passed`` does that).

    ``reevaluate`` None compares the cards when both share a held-out set and re-evaluates
    otherwise; True always re-evaluates; False insists on the cards (the ``same_heldout_set``
    check fails when they differ). ``override`` is a person's reason to promote anyway.
    """
    champion_v = registry.champion(name)
    challenger_v = challenger or registry.challenger(name)
    if challenger_v == champion_v:
        raise RegistryError(f"model {name!r}: version {challenger_v} is already the champion")
    champ, chall = registry.load(name, champion_v), registry.load(name, challenger_v)
    shared = same_heldout_set(champ.card, chall.card)
    if reevaluate or (reevaluate is None and not shared):
        data = evaluation_set([champ.card, chall.card], config=evaluation_config)
        champ_q, chall_q = measure(champ, data), measure(chall, data)
        evaluation = (
            f"both re-evaluated on one simulated set (seed {data.seed}, {len(data.labels)} rows)"
        )
        same_set = True
    else:
        champ_q, chall_q = card_quality(champ.card), card_quality(chall.card)
        evaluation = (
            f"model cards, one held-out set ({chall_q.rows} rows, seed "
            f"{chall.card['training_data']['seed']})"
            if shared
            else "model cards of different held-out sets (re-evaluation was turned off)"
        )
        same_set = shared
    shadow = shadow_stats(shadow_sources, challenger_v) if shadow_sources else None
    return GateResult(
        model=name,
        champion=champion_v,
        challenger=challenger_v,
        evaluation=evaluation,
        champion_quality=champ_q,
        challenger_quality=chall_q,
        shadow=shadow,
        checks=checks(
            champ_q,
            chall_q,
            shadow,
            same_set=same_set,
            evaluation=evaluation,
            margins=margins,
            require_shadow=require_shadow,
        ),
        override=override or None,
    )


def promote_if_passed(registry: GateRegistry, result: GateResult) -> GateResult:
    """Promote the challenger when every check passed (or a person overrode the gate); else
    leave the champion. Safe to repeat: a challenger that is already the champion is left."""
    if result.failed and not result.override:
        result.notes.append(f"the champion stays version {result.champion}")
        return result
    if registry.champion(result.model) != result.challenger:
        passed = ", ".join(c.name for c in result.checks if c.passed)
        note = f"promotion gate passed ({passed}) against version {result.champion}"
        if result.failed:
            failed = ", ".join(c.name for c in result.failed)
            note = f"promoted by override ({result.override}) with failed checks: {failed}"
        registry.promote(result.model, result.challenger, note)
    result.promoted = True
    return result


# --- the report ----------------------------------------------------------------------------------


def report_markdown(result: GateResult, *, where: str = "") -> str:
    """The gate's report: the decision first, then each check and the figures."""
    if result.promoted and result.override:
        decision = (
            f"**Promoted by override**: version {result.challenger} replaces "
            f"{result.champion} although {', '.join(c.name for c in result.failed)} failed. "
            f"Reason given: {result.override}"
        )
    elif result.promoted:
        decision = (
            f"**Promoted**: version {result.challenger} replaces {result.champion}; every check "
            "passed."
        )
    elif result.failed:
        decision = (
            f"**Not promoted**: failed check(s) {', '.join(c.name for c in result.failed)}; "
            f"the champion stays version {result.champion}."
        )
    else:
        decision = f"**Not promoted**: every check passed, but {'; '.join(result.notes)}."
    mark = {True: "pass", False: "**FAIL**", None: "skipped"}
    lines = [
        f"# Promotion gate: {result.model} {result.challenger} vs {result.champion}",
        "",
        decision,
        "",
        f"Registry: {where or 'not named'}. Held-out set: {result.evaluation}.",
        "",
        "| check | result | detail |",
        "| --- | --- | --- |",
        # A cell's own pipes (|gap|) would split it: escaped as Markdown tables want.
        *(
            f"| {c.name} | {mark[c.passed]} | {c.detail.replace('|', chr(92) + '|')} |"
            for c in result.checks
        ),
        "",
        "| figure | champion | challenger |",
        "| --- | --- | --- |",
    ]
    a, b = result.champion_quality, result.challenger_quality
    for label, x, y in (
        ("AUC", a.auc, b.auc),
        ("log loss", a.log_loss, b.log_loss),
        ("calibration error (ECE)", a.ece, b.ece),
        ("AUC gap established - new", a.auc_gap, b.auc_gap),
    ):
        lines.append(f"| {label} | {x:.4f} | {y:.4f} |")
    lines.append(f"| fairness checks | {_passed(a)} | {_passed(b)} |")
    lines.append(f"| rows | {a.rows} | {b.rows} |")
    if result.shadow is not None:
        s = result.shadow
        lines += [
            "",
            f"Shadow comparison of version {s.version} ({len(s.sources)} source(s)): "
            f"{s.comparisons} comparisons, mean Kendall tau {_fmt(s.mean_kendall_tau)}, mean "
            f"top-k overlap {_fmt(s.mean_top_k_overlap)}, mean |score change| "
            f"{_fmt(s.mean_abs_delta, 4)}.",
        ]
    if result.notes:
        lines += ["", *result.notes]
    return "\n".join(lines) + "\n"


def _passed(q: Quality) -> str:
    return "passed" if q.fairness_passed else "failed"
