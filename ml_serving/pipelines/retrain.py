"""Training a new version: fit, evaluate, register with its card, report with a calibration plot.

The new version never becomes the champion here: in the file registry it is added (and named
in ``SHADOW``, so that Score's shadow compares it with the served one before the gate runs); on
MLflow it is registered with the ``challenger`` alias (which is also the shadow's pointer). The
promotion gate (``gate``) decides the rest.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml_serving.scoring.model import Model
from ml_serving.scoring.registry import ModelRegistry
from ml_serving.scoring.shadow import set_shadow
from ml_serving.training import simulator, train


def daily_seed(today: dt.date | None = None) -> int:
    """The simulator seed of a day's training data (YYYYMMDD), so that each daily run trains
    on new data and a rerun of the same day reproduces it."""
    day = today or dt.datetime.now(dt.UTC).date()
    return day.year * 10_000 + day.month * 100 + day.day


@dataclass(frozen=True)
class TrainOutcome:
    """The version a training run registered, and where."""

    model: Model
    where: str
    shadow: bool
    """Whether the version was named as Score's shadow."""


def next_version(registry: ModelRegistry, name: str) -> str:
    """The next integer version of ``name``."""
    numeric = [int(v) for v in registry.versions(name) if v.isdigit()]
    return str(max(numeric, default=0) + 1)


def train_version(
    *,
    model_root: Path,
    name: str,
    seed: int,
    tracking_uri: str | None = None,
    shadow: bool = True,
    config: simulator.SimulatorConfig | None = None,
    repo: Path | None = None,
) -> TrainOutcome:
    """Train and register the result as a new version (never the champion): MLflow with the
    ``challenger`` alias when ``tracking_uri`` is set, else the file registry under
    ``model_root`` (named in ``SHADOW`` when ``shadow``). The training set is Feast's
    point-in-time join on the model's feature service (``training.train``): from ``repo``'s
    event tables (the features flow's repository; its manifest's seed), or without one from
    the simulator's tables of ``seed`` in a temporary repository."""
    if tracking_uri:
        # MLflow numbers the version: train under a placeholder, restamped once registered.
        result = train.train(seed, name=name, version="0", config=config, repo=repo)
        model = train.log_to_mlflow(result, tracking_uri, promote=False)
        return TrainOutcome(model, "MLflow registry (alias challenger)", shadow=True)
    registry = ModelRegistry(model_root)
    version = next_version(registry, name)
    result = train.train(seed, name=name, version=version, config=config, repo=repo)
    registry.add_version(name, version, result.model.weights, result.model.card)
    if shadow:
        set_shadow(registry, name, version)
    return TrainOutcome(result.model, f"file registry {model_root}", shadow=shadow)


def calibration_png(card: Mapping[str, Any]) -> bytes:
    """The card's calibration bins as a reliability diagram (PNG bytes)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a worker
    from matplotlib.figure import Figure

    bins = [b for b in card["calibration"]["bins"] if b["count"]]
    predicted = [b["mean_predicted"] for b in bins]
    observed = [b["observed_rate"] for b in bins]
    top = max([*predicted, *observed, 0.05]) * 1.1
    fig = Figure(figsize=(4.5, 4.0), dpi=100)
    ax = fig.add_subplot()
    ax.plot([0, top], [0, top], linestyle="--", color="grey", label="perfect calibration")
    ax.plot(predicted, observed, marker="o", label=f"version {card['version']}")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed positive rate")
    ax.set_title(f"{card['model_name']} {card['version']}: ECE {card['calibration']['ece']:.4f}")
    ax.legend(loc="upper left")
    fig.tight_layout()
    out = io.BytesIO()
    # Fixed metadata: the same card gives the same bytes.
    fig.savefig(out, format="png", metadata={"Software": None})
    return out.getvalue()


def report_markdown(outcome: TrainOutcome, *, plot: str | None = None) -> str:
    """The training run's report: the held-out figures, fairness, calibration, and where the
    version went; ``plot`` is the calibration plot's address (a file path or a data URI)."""
    card = outcome.model.card
    m, b = card["metrics"]["heldout"], card["metrics"]["baseline_main_effects"]
    fair = card["fairness"]
    data = card["training_data"]
    lines = [
        f"# Training: {card['model_name']} version {outcome.model.version}",
        "",
        f"Registered in the {outcome.where}; not promoted (the promotion gate decides)"
        + (", named as Score's shadow model." if outcome.shadow else "."),
        f"Data: {data['source']}, seed {data['seed']}, {data['rows']['train']} training and "
        f"{data['rows']['heldout']} held-out rows ({data['split']}).",
        "",
        "| held-out figure | model | main-effects baseline |",
        "| --- | --- | --- |",
        f"| AUC | {m['auc']:.4f} | {b['auc']:.4f} |",
        f"| log loss | {m['log_loss']:.4f} | {b['log_loss']:.4f} |",
        f"| calibration error (ECE) | {m['ece']:.4f} | {b['ece']:.4f} |",
        f"| Brier score | {m['brier']:.4f} | {b['brier']:.4f} |",
        "",
        f"Fairness (segment {fair['segment_feature']}): "
        f"{'passed' if fair['passed'] else 'FAILED'}; AUC gap established - new "
        f"{fair['auc_gap_established_minus_new']:+.4f}; mean predicted - observed "
        + ", ".join(f"{k} {v:+.4f}" for k, v in fair["mean_predicted_minus_observed"].items())
        + "; checks "
        + ", ".join(f"{k} {'ok' if ok else 'FAILED'}" for k, ok in fair["checks"].items())
        + ".",
        "",
        "| bin | rows | mean predicted | observed rate |",
        "| --- | --- | --- | --- |",
        *(
            f"| {i} | {row['count']} | {row['mean_predicted']:.4f} | {row['observed_rate']:.4f} |"
            for i, row in enumerate(card["calibration"]["bins"])
            if row["count"]
        ),
    ]
    if plot:
        lines += ["", f"![calibration plot]({plot})"]
    return "\n".join(lines) + "\n"
