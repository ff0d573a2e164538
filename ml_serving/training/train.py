"""Reproducible training: simulate, fit, evaluate, write a registry version with its model card."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ml_serving.scoring import features
from ml_serving.scoring.features import Float64Array, Group
from ml_serving.scoring.model import Model, ModelWeights, sigmoid
from ml_serving.scoring.registry import CARD_SCHEMA, ModelRegistry, RegistryError
from ml_serving.training import simulator

logger = logging.getLogger(__name__)

MODEL_NAME: Final = "tips-ranker"
"""Name of the shipped model."""
SHIPPED_SEED: Final = simulator.SHIPPED_SEED
"""Seed of the shipped model (models/tips-ranker/1); the reproducibility test reuses it."""
MODEL_TYPE: Final = "logistic_regression_with_crosses"
"""What the shipped model is: L2-regularised logistic regression over ``features.design_matrix``."""
HELDOUT_USER_SHARE: Final = 0.2
"""Share of users (all their rows) kept out of training for evaluation."""
L2: Final = 1.0
"""L2 penalty on the coefficients (not the intercept), on the summed log loss."""
N_BINS: Final = 10
"""Equal-width probability bins for calibration and ECE."""
METRIC_DECIMALS: Final = 6
"""Card metrics are rounded to this many decimals: machines whose kernels differ in the last
bits then agree on them, except where a value sits on a rounding boundary, which is why
training/reproducibility.py allows one unit of the last decimal; on one machine the values
are bit-for-bit identical."""
N_REFERENCE_ROWS: Final = 8

# Fairness policy: the checks the shipped model must pass before ``--promote`` promotes it.
MAX_SEGMENT_CALIBRATION_GAP: Final = 0.01
"""|mean predicted - observed rate| allowed per segment (calibration in the large)."""
MAX_SEGMENT_ECE: Final = 0.02
"""Expected calibration error allowed per segment."""
MAX_SEGMENT_AUC_GAP: Final = 0.05
"""Largest AUC difference allowed between the segments."""


# --- metrics -------------------------------------------------------------------------------------


def auc(labels: npt.NDArray[Any], scores: Float64Array) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); NaN with one class only."""
    y = np.asarray(labels, dtype=bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # Average rank (1-based) of each distinct score, then the rank sum of the positives.
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0
    rank_sum = float(avg_rank[inverse][y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def log_loss(labels: npt.NDArray[Any], probs: Float64Array) -> float:
    """Mean binary cross-entropy (natural log), probabilities clipped to [1e-15, 1 - 1e-15]."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(probs, 1e-15, 1.0 - 1e-15)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def calibration_bins(
    labels: npt.NDArray[Any], probs: Float64Array, n_bins: int = N_BINS
) -> list[dict[str, Any]]:
    """Reliability table over ``n_bins`` equal-width bins of [0, 1] (empty bins have None)."""
    y = np.asarray(labels, dtype=np.float64)
    idx = np.minimum((probs * n_bins).astype(np.intp), n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    sum_p = np.bincount(idx, weights=probs, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y, minlength=n_bins)
    return [
        {
            "lo": b / n_bins,
            "hi": (b + 1) / n_bins,
            "count": int(count[b]),
            "mean_predicted": float(sum_p[b] / count[b]) if count[b] else None,
            "observed_rate": float(sum_y[b] / count[b]) if count[b] else None,
        }
        for b in range(n_bins)
    ]


def expected_calibration_error(
    labels: npt.NDArray[Any], probs: Float64Array, n_bins: int = N_BINS
) -> float:
    """ECE: count-weighted mean |mean predicted - observed rate| over equal-width bins."""
    total = len(probs)
    return float(
        sum(
            b["count"] / total * abs(b["mean_predicted"] - b["observed_rate"])
            for b in calibration_bins(labels, probs, n_bins)
            if b["count"]
        )
    )


def _r(x: float | np.floating[Any]) -> float:
    return round(float(x), METRIC_DECIMALS)


def evaluate(labels: npt.NDArray[Any], probs: Float64Array) -> dict[str, Any]:
    """The card's metric block for one set of predictions (values rounded for the card)."""
    return {
        "n_rows": len(labels),
        "auc": _r(auc(labels, probs)),
        "log_loss": _r(log_loss(labels, probs)),
        "ece": _r(expected_calibration_error(labels, probs)),
        "brier": _r(np.mean((probs - labels) ** 2)),
        "observed_rate": _r(np.mean(labels)),
        "mean_predicted": _r(np.mean(probs)),
    }


def fairness(
    labels: npt.NDArray[Any], probs: Float64Array, segment: npt.NDArray[np.bool_]
) -> dict[str, Any]:
    """Per-segment metrics (new vs established users), their gaps and the policy checks."""
    groups = {
        "new": evaluate(labels[segment], probs[segment]),
        "established": evaluate(labels[~segment], probs[~segment]),
    }
    cal_gap = {k: _r(g["mean_predicted"] - g["observed_rate"]) for k, g in groups.items()}
    auc_gap = _r(groups["established"]["auc"] - groups["new"]["auc"])
    checks = {
        "calibration_in_the_large": all(
            abs(v) <= MAX_SEGMENT_CALIBRATION_GAP for v in cal_gap.values()
        ),
        "segment_ece": all(g["ece"] <= MAX_SEGMENT_ECE for g in groups.values()),
        "auc_gap": abs(auc_gap) <= MAX_SEGMENT_AUC_GAP,
    }
    return {
        "segment_feature": "is_new_user",
        "groups": groups,
        "mean_predicted_minus_observed": cal_gap,
        "auc_gap_established_minus_new": auc_gap,
        "thresholds": {
            "max_abs_calibration_gap": MAX_SEGMENT_CALIBRATION_GAP,
            "max_ece": MAX_SEGMENT_ECE,
            "max_abs_auc_gap": MAX_SEGMENT_AUC_GAP,
        },
        "checks": checks,
        "passed": all(checks.values()),
    }


# --- fitting -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FitInfo:
    """How the Newton solver ended."""

    iterations: int
    converged: bool
    final_step: float


def fit_logistic(
    x: Float64Array,
    y: npt.NDArray[Any],
    *,
    l2: float = L2,
    max_iter: int = 50,
    tol: float = 1e-9,
) -> tuple[Float64Array, float, FitInfo]:
    """L2-regularised logistic regression by Newton's method (IRLS); deterministic, no RNG.

    Returns (coef, intercept, info). The problem is strictly convex, so Newton converges in a
    handful of iterations from zero and the result does not depend on a learning rate or order.
    """
    n, d = x.shape
    a = np.empty((n, d + 1), dtype=np.float64)
    a[:, :d] = x
    a[:, d] = 1.0
    yf = np.asarray(y, dtype=np.float64)
    reg = np.full(d + 1, l2)
    reg[d] = 0.0
    w = np.zeros(d + 1)
    step_size = float("inf")
    iterations = 0
    # einsum, not ``@``: multithreaded BLAS splits these long reductions differently for each
    # thread count, which changed the weights' last bits between machines and loads; numpy's own
    # loops add in one fixed order (and beat a contended 2-core BLAS here).
    while iterations < max_iter and step_size >= tol:
        iterations += 1
        p = sigmoid(np.einsum("nd,d->n", a, w))
        grad = np.einsum("nd,n->d", a, p - yf) + reg * w
        hess = np.einsum("nd,ne->de", a * (p * (1.0 - p))[:, None], a) + np.diag(reg)
        step = np.linalg.solve(hess, grad)
        w -= step
        step_size = float(np.max(np.abs(step)))
    info = FitInfo(iterations=iterations, converged=step_size < tol, final_step=step_size)
    return w[:d].copy(), float(w[d]), info


def _split_users(data: simulator.Interactions, seed: int) -> npt.NDArray[np.bool_]:
    """Held-out mask: all rows of a random HELDOUT_USER_SHARE of users (no user in both sets)."""
    users = np.unique(data.user_id)
    rng = np.random.Generator(np.random.PCG64(seed + 1))
    held = rng.permutation(users)[: int(round(len(users) * HELDOUT_USER_SHARE))]
    mask: npt.NDArray[np.bool_] = np.isin(data.user_id, held)
    return mask


# --- the pipeline --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrainedModel:
    """Output of ``train``: the model (card included) ready for ``ModelRegistry.add_version``."""

    model: Model
    fit: FitInfo


def _named_row(values: npt.NDArray[np.float32], group: Group) -> dict[str, float]:
    # NaN means "not provided": leave it out, so the reference check exercises the defaults.
    return {
        f.name: float(v)
        for f, v in zip(features.specs(group), values, strict=True)
        if not np.isnan(v)
    }


def _reference_rows(held: simulator.Interactions, probs: Float64Array) -> list[dict[str, Any]]:
    """A few held-out rows across both segments, prediction spread and defaulted features."""
    chosen: list[int] = []
    for seg in (True, False):
        idx = np.flatnonzero(held.segment == seg)
        order = idx[np.argsort(probs[idx], kind="stable")]
        chosen += [int(order[int(q * (len(order) - 1))]) for q in (0.02, 0.5, 0.98)]
    # Rows with omitted features, so the check covers the defaults policy.
    for group_arr in (held.context, held.candidates):
        with_nan = np.flatnonzero(np.isnan(group_arr).any(axis=1))
        if len(with_nan):
            chosen.append(int(with_nan[0]))
    # Tiny data sets may lack such rows: top up from the middle of the distribution.
    order = np.argsort(probs, kind="stable")
    for q in (0.25, 0.75):
        if len(chosen) < N_REFERENCE_ROWS:
            chosen.append(int(order[int(q * (len(order) - 1))]))
    return [
        {
            "segment": "new" if held.segment[i] else "established",
            "context": _named_row(held.context[i], Group.CONTEXT),
            "candidate": _named_row(held.candidates[i], Group.CANDIDATE),
            "prediction": float(probs[i]),
        }
        for i in chosen
    ]


def train(
    seed: int = SHIPPED_SEED,
    *,
    name: str = MODEL_NAME,
    version: str = "1",
    config: simulator.SimulatorConfig | None = None,
    repo: Path | None = None,
) -> TrainedModel:
    """Build the training set from the feature store, fit the model and a main-effects
    baseline, evaluate on held-out users, and build the model card.

    ``repo``: a Feast repository whose ``data/`` holds event tables (``make features`` writes
    the shipped one); its manifest's seed and configuration are the run's. Without it, a
    temporary copy of the shipped repository is filled from the simulator with ``seed`` and
    ``config``. Either way the rows come from Feast's point-in-time join on the model's feature
    service. Deterministic: one seed, one result.
    """
    from ml_serving.training import feature_store

    with tempfile.TemporaryDirectory(prefix="ml-serving-features-") as scratch:
        if repo is None:
            repo = feature_store.copy_definitions(feature_store.SHIPPED_REPO, Path(scratch))
            feature_store.write_events(repo, seed, config)
        made = feature_store.manifest(repo)
        seed = int(made["seed"])
        cfg = simulator.SimulatorConfig(**made["simulator_config"])
        feature_store.apply(repo)
        data = feature_store.training_set(repo)
    return fit_and_card(
        data, seed=seed, name=name, version=version, config=cfg, window=made["window"]
    )


def fit_and_card(
    data: simulator.Interactions,
    *,
    seed: int,
    name: str,
    version: str,
    config: simulator.SimulatorConfig,
    window: Mapping[str, str],
) -> TrainedModel:
    """Fit, evaluate on held-out users and write the card for training rows ``data``."""
    cfg = config
    held_mask = _split_users(data, seed)
    tr, held = data.subset(~held_mask), data.subset(held_mask)

    ctx_tr = features.fill_defaults(tr.context, Group.CONTEXT)
    cand_tr = features.fill_defaults(tr.candidates, Group.CANDIDATE)
    ctx_ho = features.fill_defaults(held.context, Group.CONTEXT)
    cand_ho = features.fill_defaults(held.candidates, Group.CANDIDATE)

    norm = features.Normalization.fit(ctx_tr, cand_tr)
    x_tr = features.design_matrix(
        norm.normalize_context(ctx_tr), norm.normalize_candidates(cand_tr)
    )
    x_ho = features.design_matrix(
        norm.normalize_context(ctx_ho), norm.normalize_candidates(cand_ho)
    )
    max_abs_z = float(np.abs(x_tr[:, : features.N_CONTEXT + features.N_CANDIDATE]).max())

    coef, intercept, info = fit_logistic(x_tr, tr.labels)
    n_main = features.N_CONTEXT + features.N_CANDIDATE
    base_coef, base_icpt, base_info = fit_logistic(x_tr[:, :n_main], tr.labels)

    weights = ModelWeights(coef=coef, intercept=intercept, normalization=norm)
    weights.check()
    draft = Model(name=name, version=version, card={}, weights=weights)
    # Offline predictions go through the model's row path, the same code serving uses.
    p_model = draft.predict_rows(ctx_ho, cand_ho)
    p_base = sigmoid(x_ho[:, :n_main] @ base_coef + base_icpt)
    prior_col = features.CANDIDATE_FEATURE_NAMES.index("tip_prior_ctr")
    p_popularity = cand_ho[:, prior_col].astype(np.float64)

    metrics: dict[str, Any] = {
        "heldout": evaluate(held.labels, p_model),
        "baseline_main_effects": evaluate(held.labels, p_base),
        "baseline_popularity_auc": _r(auc(held.labels, p_popularity)),
        "oracle_true_probability": evaluate(held.labels, held.true_prob),
        "train": evaluate(tr.labels, draft.predict_rows(ctx_tr, cand_tr)),
    }
    fair = fairness(held.labels, p_model, held.segment)
    fair_base = fairness(held.labels, p_base, held.segment)
    m, b = metrics["heldout"], metrics["baseline_main_effects"]
    inputs = norm.describe()
    for group, rows in ((Group.CONTEXT, ctx_tr), (Group.CANDIDATE, cand_tr)):
        # Raw training means: what serving uses for a value that neither the request nor the
        # feature store has (store down, entity unknown).
        for entry, mean in zip(
            inputs[group.value], rows.astype(np.float64).mean(axis=0), strict=True
        ):
            entry["training_mean"] = _r(mean)
            entry["source"] = features.SOURCES[entry["name"]].value
    card: dict[str, Any] = {
        "card_schema": CARD_SCHEMA,
        "model_name": name,
        "version": version,
        "model_type": MODEL_TYPE,
        "summary": (
            "Probability that a user reacts positively (click or like) to a tip, for ranking "
            "candidate tips. Logistic regression over z-scored features plus context x "
            "candidate crosses."
        ),
        "intended_use": (
            "Online ranking of ~20 candidate tips per request by the tips recommender. Trained "
            "on simulated data only: retrain on logged interactions before trusting the scores "
            "as real reaction rates."
        ),
        "inputs": {
            **inputs,
            "feature_service": features.FEATURE_SERVICE,
            "dtype": np.dtype(features.DTYPE).name,
            "clip_normalized_to": features.Z_CLIP,
            "crosses": [asdict(c) for c in features.CROSSES],
            "design_columns": list(features.DESIGN_COLUMNS),
            "missing_values": (
                "Without a feature store, a feature with a default may be omitted by the caller "
                "and takes that raw default; omitting any other feature is INVALID_ARGUMENT. "
                "With the feature store on, an omitted stored feature comes from the store (a "
                "stored null takes the default) and, when the store has no value, from "
                "training_mean; request-time features must be sent."
            ),
        },
        "parameters": {
            "intercept": intercept,
            "coefficients": dict(zip(features.DESIGN_COLUMNS, coef.tolist(), strict=True)),
        },
        "training": {
            "method": "L2-regularised logistic regression, Newton-IRLS from zero, float64",
            "l2": L2,
            "iterations": info.iterations,
            "converged": info.converged,
            "baseline_iterations": base_info.iterations,
            "max_abs_normalized_value": _r(max_abs_z),
        },
        "training_data": {
            "source": (
                f"Feast feature service {features.FEATURE_SERVICE} (feature_repo/), point-in-time "
                "join of the labelled impressions on the daily user and tip snapshots, from the "
                "event tables of ml_serving.training.simulator.simulate_events (synthetic; "
                "ground truth documented there)"
            ),
            "feature_service": features.FEATURE_SERVICE,
            "event_window": dict(window),
            "seed": seed,
            "simulator_config": asdict(cfg),
            "split": f"by user: {HELDOUT_USER_SHARE:.0%} of users held out (all their rows)",
            "rows": {"total": len(data), "train": len(tr), "heldout": len(held)},
            "users": {
                "total": int(len(np.unique(data.user_id))),
                "train": int(len(np.unique(tr.user_id))),
                "heldout": int(len(np.unique(held.user_id))),
            },
            "requests": int(len(np.unique(data.request_id))),
            "positive_rate_train": _r(np.mean(tr.labels)),
            "new_user_row_share": _r(np.mean(data.segment)),
            "omitted_share": {
                f.name: _r(np.mean(np.isnan(col)))
                for group, arr in (
                    (Group.CONTEXT, data.context),
                    (Group.CANDIDATE, data.candidates),
                )
                for f, col in zip(features.specs(group), arr.T, strict=True)
                if f.default is not None
            },
        },
        "metrics": metrics,
        "model_selection": {
            "chosen": MODEL_TYPE,
            "compared_with": "logistic regression on main effects only (same features, no crosses)",
            "reason": (
                f"held-out AUC {m['auc']:.4f} vs {b['auc']:.4f} and log loss "
                f"{m['log_loss']:.4f} vs {b['log_loss']:.4f} for the baseline; the gain is "
                f"largest for new users (AUC {fair['groups']['new']['auc']:.4f} vs "
                f"{fair_base['groups']['new']['auc']:.4f}), whose taste for short, easy, "
                "actionable tips only the crosses can express. Both are well calibrated (ECE "
                f"{m['ece']:.4f} vs {b['ece']:.4f}). The remaining gap to the oracle (AUC "
                f"{metrics['oracle_true_probability']['auc']:.4f}) is mostly latent user and tip "
                "traits the features see only noisily, so a bigger model class (MLP) was not "
                "needed."
            ),
            "baseline_fairness": fair_base,
        },
        "calibration": {
            "method": f"{N_BINS} equal-width bins on held-out predictions",
            "ece": m["ece"],
            "bins": [
                {k: (_r(v) if isinstance(v, float) else v) for k, v in row.items()}
                for row in calibration_bins(held.labels, p_model)
            ],
        },
        "fairness": fair,
        "rollout_history": [
            {
                "event": "trained",
                "version": version,
                "seed": seed,
                "command": f"python -m ml_serving.training --seed {seed} --version {version}",
            }
        ],
        "reference_rows": _reference_rows(held, p_model),
    }
    model = Model(name=name, version=version, card=card, weights=weights)
    return TrainedModel(model=model, fit=info)


def restamp(card: Mapping[str, Any], version: str) -> dict[str, Any]:
    """The card ``train`` builds for the same run under another version number.

    MLflow numbers a version only once it is created, after training; the version appears in
    these three places of the card and nowhere else (tests/unit/test_train.py checks it).
    """
    out: dict[str, Any] = json.loads(json.dumps(card))
    out["version"] = version
    trained = out["rollout_history"][0]
    trained["version"] = version
    trained["command"] = re.sub(r"--version \S+", f"--version {version}", trained["command"])
    return out


def mlflow_params(card: Mapping[str, Any]) -> dict[str, str]:
    """Run parameters: the seed, the simulator configuration and the fit settings."""
    data, fit = card["training_data"], card["training"]
    params = {"seed": data["seed"], "model_type": card["model_type"]}
    params |= {f"simulator.{k}": v for k, v in data["simulator_config"].items()}
    params |= {
        "fit.method": fit["method"],
        "fit.l2": fit["l2"],
        "fit.iterations": fit["iterations"],
    }
    params |= {"heldout_user_share": HELDOUT_USER_SHARE, "calibration_bins": N_BINS}
    return {k: str(v) for k, v in params.items()}


def mlflow_metrics(card: Mapping[str, Any]) -> dict[str, float]:
    """Run metrics: held-out quality, calibration, and the fairness gaps between segments."""
    m, fair = card["metrics"]["heldout"], card["fairness"]
    gaps = fair["mean_predicted_minus_observed"]
    return {
        "auc": m["auc"],
        "log_loss": m["log_loss"],
        "calibration_error": m["ece"],
        "brier": m["brier"],
        "baseline_auc": card["metrics"]["baseline_main_effects"]["auc"],
        "fairness_auc_gap": fair["auc_gap_established_minus_new"],
        "fairness_calibration_gap_new": gaps["new"],
        "fairness_calibration_gap_established": gaps["established"],
        "fairness_passed": float(fair["passed"]),
    }


def mlflow_card_tags(card: Mapping[str, Any]) -> tuple[str, dict[str, str]]:
    """The registered version's description and tags: the card's essentials."""
    m, fair = card["metrics"]["heldout"], card["fairness"]
    description = (
        f"{card['summary']} Held-out AUC {m['auc']}, log loss {m['log_loss']}, calibration "
        f"error {m['ece']}; fairness checks {'passed' if fair['passed'] else 'FAILED'} "
        f"(AUC gap {fair['auc_gap_established_minus_new']}). Simulated data, seed "
        f"{card['training_data']['seed']}. Full card: artifacts/card.json."
    )
    tags = {
        "model_type": card["model_type"],
        "card_schema": str(card["card_schema"]),
        "seed": str(card["training_data"]["seed"]),
        "training_data": card["training_data"]["source"],
        "auc": str(m["auc"]),
        "log_loss": str(m["log_loss"]),
        "calibration_error": str(m["ece"]),
        "fairness_passed": str(fair["passed"]).lower(),
    }
    return description, tags


def log_to_mlflow(result: TrainedModel, tracking_uri: str, *, promote: bool = False) -> Model:
    """Log a run (parameters, metrics, the model as a pyfunc with its registry files), register
    it as a new version with the alias ``challenger``, and with ``promote`` move ``champion``
    to it when the fairness checks pass. Returns the version as registered."""
    from ml_serving.scoring import mlflow_registry

    with tempfile.TemporaryDirectory(prefix="ml-serving-train-") as cache:
        registry = mlflow_registry.MlflowRegistry(Path(cache), tracking_uri=tracking_uri)
        with mlflow_registry.mlflow_errors(f"logging to MLflow at {tracking_uri}"):
            model: Model = _log_run(registry, result, promote=promote)
    return model


def _log_run(registry: Any, result: TrainedModel, *, promote: bool) -> Model:
    from mlflow.entities import Metric, Param

    card = result.model.card
    name = result.model.name
    client = registry.client
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    seed = card["training_data"]["seed"]
    run = client.create_run(experiment_id, run_name=f"{name}-seed{seed}")
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        client.log_batch(
            run_id,
            metrics=[Metric(k, v, now, 0) for k, v in mlflow_metrics(card).items()],
            params=[Param(k, v) for k, v in mlflow_params(card).items()],
        )
        description, tags = mlflow_card_tags(card)
        model: Model = registry.add_version(
            name,
            result.model.weights,
            lambda version: restamp(card, version),
            run_id=run_id,
            description=description,
            tags=tags,
        )
        client.set_tag(run_id, "registered_version", model.version)
        if promote and card["fairness"]["passed"]:
            registry.promote(name, model.version, note="trained with --promote")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return model


def _load_model(model: Model | Path | str) -> Model:
    if isinstance(model, Model):
        return model
    directory = Path(model)
    return ModelRegistry(directory.parent.parent).load(directory.parent.name, directory.name)


def offline_predict(
    model: Model | Path | str,
    context: Mapping[str, float],
    candidates: Sequence[Mapping[str, float]],
) -> Float64Array:
    """Offline predictions for named rows: the path training evaluation uses.

    ``model`` is a loaded ``Model`` or a version directory (``models/tips-ranker/1``). Omitted
    features take their defaults; a missing required one raises ``ValueError``. The context is
    repeated per candidate row (training's (n, N_CONTEXT) layout), unlike the online path which
    broadcasts one context row, so equality of the two is a real train/serve skew check.
    """
    loaded = _load_model(model)
    ctx_row = features.rows_from_mappings([context], Group.CONTEXT)
    cand = features.rows_from_mappings(candidates, Group.CANDIDATE)
    ctx = np.repeat(ctx_row, len(cand), axis=0)
    return loaded.predict_rows(ctx, cand)


def _next_version(registry: ModelRegistry, name: str) -> str:
    numeric = [int(v) for v in registry.versions(name) if v.isdigit()]
    return str(max(numeric, default=0) + 1)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; see ``--help``."""
    from ml_serving.config import Settings

    parser = argparse.ArgumentParser(prog="python -m ml_serving.training", description=__doc__)
    parser.add_argument("--root", type=Path, default=Path("models"), help="registry root")
    parser.add_argument("--name", default=MODEL_NAME)
    parser.add_argument(
        "--seed",
        type=int,
        default=SHIPPED_SEED,
        help="simulate a temporary feature store with this seed (ignored with --repo)",
    )
    parser.add_argument(
        "--repo",
        type=Path,
        help="train from this Feast repository's event tables (make features writes "
        "feature_repo/data); default: a temporary copy filled from --seed",
    )
    parser.add_argument("--version", help="default: the next integer version")
    parser.add_argument(
        "--promote", action="store_true", help="promote if the fairness checks pass"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing version (regenerating only)"
    )
    parser.add_argument(
        "--tracking-uri",
        default=Settings().mlflow_tracking_uri,
        help="log to this MLflow server and register there instead of --root "
        "(default: MLFLOW_TRACKING_URI)",
    )
    args = parser.parse_args(argv)
    if args.tracking_uri:
        return _main_mlflow(args)
    registry = ModelRegistry(args.root)
    version = args.version or _next_version(registry, args.name)
    result = train(args.seed, name=args.name, version=version, repo=args.repo)
    card = result.model.card
    try:
        path = registry.add_version(
            args.name, version, result.model.weights, card, overwrite=args.overwrite
        )
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    _print_summary(card)
    if args.promote:
        if not card["fairness"]["passed"]:
            print("not promoted: fairness checks failed", file=sys.stderr)
            return 1
        registry.promote(args.name, version, note="trained with --promote")
        print(f"promoted {args.name} version {version}")
    return 0


def _print_summary(card: Mapping[str, Any]) -> None:
    m, b = card["metrics"]["heldout"], card["metrics"]["baseline_main_effects"]
    print(f"held-out  model:    auc={m['auc']} log_loss={m['log_loss']} ece={m['ece']}")
    print(f"held-out  baseline: auc={b['auc']} log_loss={b['log_loss']} ece={b['ece']}")
    print(f"fairness checks: {card['fairness']['checks']}")


def _main_mlflow(args: argparse.Namespace) -> int:
    if args.version or args.overwrite:
        print("error: MLflow numbers versions itself: drop --version/--overwrite", file=sys.stderr)
        return 2
    # The version number is MLflow's: train under a placeholder, restamp once registered.
    result = train(args.seed, name=args.name, version="0", repo=args.repo)
    try:
        model = log_to_mlflow(result, args.tracking_uri, promote=args.promote)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"registered models:/{args.name}/{model.version} (alias challenger) at {args.tracking_uri}"
    )
    _print_summary(model.card)
    if args.promote:
        if not model.card["fairness"]["passed"]:
            print("not promoted: fairness checks failed", file=sys.stderr)
            return 1
        print(f"promoted {args.name} version {model.version} (alias champion)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
