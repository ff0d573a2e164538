"""The Prefect flows: thin wrappers whose tasks call the domain steps, with retries and reports.

Every task is a plain function of ``gate``, ``rewards``, ``retrain`` or ``materialize``; Prefect
adds retries where I/O can fail (files, SQL, the registries, MLflow), a markdown artifact per
run (the flow's report), and scheduling once deployed (``deploy/pipelines/prefect.yaml``).
Parameters left unset take the server's settings (``ML_SERVING_*``), so a deployment and the
server it feeds read one configuration.
"""

from __future__ import annotations

import base64
import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Final

from prefect import Flow, flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from ml_serving.config import Settings
from ml_serving.pipelines import gate, materialize, retrain, rewards
from ml_serving.scoring.registry import RegistryUnavailable
from ml_serving.training import simulator

REPORTS_DIR: Final = Path(tempfile.gettempdir()) / "ml-serving-pipelines"
"""Where report files (markdown, the calibration PNG) go when a run names no folder."""
IO_RETRIES: Final = 2
IO_RETRY_DELAY_S: Final = 10
_NOT_TRANSIENT: Final = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a task only when it failed on I/O that may work next time (a network, a database,
    an unreachable registry), never on bad input, which would fail the same way again."""
    try:
        state.result()
    except _NOT_TRANSIENT:
        return False
    except (OSError, RegistryUnavailable):
        return True
    except Exception as exc:
        # SQLAlchemy's connection-level errors (a database restarting), by name: the module
        # is imported only by the rewards step.
        return type(exc).__name__ in {"OperationalError", "InterfaceError", "DisconnectionError"}
    return False


io_task: Final = task(
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAY_S,
    retry_condition_fn=transient,
    cache_policy=NO_CACHE,
)
"""A task that does I/O: retried on transient failures only, never served from a cache."""


def _reports(reports_dir: str | None, name: str) -> Path:
    folder = Path(reports_dir) if reports_dir else REPORTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def _publish(key: str, markdown: str, reports_dir: str | None, description: str) -> str:
    """The report as a Prefect markdown artifact and as a file; returns the file's path."""
    create_markdown_artifact(markdown=markdown, key=key, description=description)
    path = _reports(reports_dir, f"{key}.md")
    path.write_text(markdown, encoding="utf-8")
    return str(path)


# --- rewards -------------------------------------------------------------------------------------


@io_task
def snapshot_rewards(
    decision_logs: list[str],
    rewards_source: str,
    rewards_table: str | None,
    experiments: str | None,
    experiment: str | None,
    out: str | None,
) -> rewards.RewardsRun:
    """Decision logs + rewards -> the experiment's snapshot file (``rewards.run_rewards``)."""
    return rewards.run_rewards(
        decision_logs,
        rewards_source,
        rewards_table=rewards_table,
        experiments=Path(experiments) if experiments else None,
        experiment=experiment,
        out=Path(out) if out else None,
    )


@flow(name="rewards", log_prints=True)
def rewards_flow(
    rewards_source: str,
    rewards_table: str | None = "rewards",
    decision_logs: list[str] | None = None,
    experiments: str | None = None,
    experiment: str | None = None,
    out: str | None = None,
    reports_dir: str | None = None,
) -> dict[str, Any]:
    """The decision log and reward rows (a CSV path, or a SQLAlchemy URL and its table) to the
    experiment's reward snapshot. Defaults: the decision log file ML_SERVING_DECISION_LOG and
    the experiments file ML_SERVING_EXPERIMENTS (its name and snapshot path)."""
    settings = Settings()
    logs = decision_logs or ([str(settings.decision_log)] if settings.decision_log else [])
    experiments = experiments or (str(settings.experiments) if settings.experiments else None)
    run = snapshot_rewards(logs, rewards_source, rewards_table, experiments, experiment, out)
    report = rewards.report_markdown(run)
    path = _publish("rewards-report", report, reports_dir, f"reward snapshot of {run.out}")
    print(report)
    return {
        "experiment": run.report.experiment,
        "snapshot": str(run.out),
        "decisions": run.report.decisions,
        "rewarded": run.report.rewarded,
        "unmatched_rewards": len(run.report.unmatched_rewards),
        "shares": run.shares,
        "report": path,
    }


# --- train ---------------------------------------------------------------------------------------


@io_task
def train_and_register(
    model_root: str,
    name: str,
    seed: int,
    tracking_uri: str | None,
    shadow: bool,
    repo_path: str | None,
) -> retrain.TrainOutcome:
    """Fit, evaluate and register a new version, never the champion (``retrain``)."""
    return retrain.train_version(
        model_root=Path(model_root),
        name=name,
        seed=seed,
        tracking_uri=tracking_uri,
        shadow=shadow,
        repo=Path(repo_path) if repo_path else None,
    )


@flow(name="train", log_prints=True)
def train_flow(
    seed: int | None = None,
    model_root: str | None = None,
    model_name: str | None = None,
    tracking_uri: str | None = None,
    shadow: bool = True,
    repo_path: str | None = None,
    reports_dir: str | None = None,
) -> dict[str, Any]:
    """Train a new version from the Feast repository ``repo_path`` (the features flow's; the
    model's feature service, point in time), or without one from the simulator's tables of
    ``seed`` (default today's YYYYMMDD), and register it with its card: MLflow (alias
    ``challenger``) when MLFLOW_TRACKING_URI is set, else the file registry (named in SHADOW
    when ``shadow``). It never moves the champion."""
    settings = Settings()
    outcome = train_and_register(
        model_root or str(settings.model_root),
        model_name or settings.model_name,
        seed if seed is not None else retrain.daily_seed(),
        tracking_uri or settings.mlflow_tracking_uri,
        shadow,
        repo_path,
    )
    card = outcome.model.card
    png = retrain.calibration_png(card)
    png_path = _reports(reports_dir, f"calibration-{card['model_name']}-{card['version']}.png")
    png_path.write_bytes(png)
    # The artifact carries the plot itself (a worker's files are gone once its pod is).
    inline = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    create_markdown_artifact(
        markdown=retrain.report_markdown(outcome, plot=inline),
        key="train-report",
        description=f"training of {card['model_name']} version {card['version']}",
    )
    report = retrain.report_markdown(outcome, plot=png_path.name)
    path = _reports(reports_dir, "train-report.md")
    path.write_text(report, encoding="utf-8")
    print(report)
    metrics = card["metrics"]["heldout"]
    return {
        "version": outcome.model.version,
        "auc": metrics["auc"],
        "log_loss": metrics["log_loss"],
        "ece": metrics["ece"],
        "fairness_passed": card["fairness"]["passed"],
        "calibration_png": str(png_path),
        "report": str(path),
    }


# --- promote -------------------------------------------------------------------------------------


@io_task
def judge_challenger(
    registry: gate.GateRegistry,
    name: str,
    challenger: str | None,
    shadow_sources: list[str],
    margins: gate.Margins,
    require_shadow: bool,
    reevaluate: bool | None,
    override: str | None,
) -> gate.GateResult:
    """Measure the challenger against the champion and run the checks (``gate.judge``)."""
    return gate.judge(
        registry,
        name,
        challenger=challenger,
        shadow_sources=shadow_sources,
        margins=margins,
        require_shadow=require_shadow,
        reevaluate=reevaluate,
        override=override,
    )


@io_task
def promote_if_passed(registry: gate.GateRegistry, result: gate.GateResult) -> gate.GateResult:
    """Promote when every check passed or a person overrode (``gate.promote_if_passed``)."""
    return gate.promote_if_passed(registry, result)


@flow(name="promote", log_prints=True)
def promote_flow(
    challenger: str | None = None,
    shadow_metrics: list[str] | None = None,
    require_shadow: bool = False,
    reevaluate: bool | None = None,
    override: str | None = None,
    auc_margin: float = gate.DEFAULT_MARGINS.auc,
    ece_margin: float = gate.DEFAULT_MARGINS.ece,
    model_root: str | None = None,
    model_name: str | None = None,
    tracking_uri: str | None = None,
    reports_dir: str | None = None,
) -> dict[str, Any]:
    """The promotion gate: the challenger (default: MLflow's ``challenger`` alias, or the file
    registry's SHADOW or newest version) against the champion on one held-out set, plus the
    shadow comparison from ``shadow_metrics`` (the servers' /metrics URLs or comparison
    files). Promotes only when every check passes, or with ``override`` (a person's reason)."""
    settings = Settings()
    registry = gate.open_gate_registry(
        Path(model_root or settings.model_root),
        tracking_uri=tracking_uri or settings.mlflow_tracking_uri,
        cache_dir=settings.model_cache_dir,
    )
    margins = dataclasses.replace(gate.DEFAULT_MARGINS, auc=auc_margin, ece=ece_margin)
    name = model_name or settings.model_name
    result = judge_challenger(
        registry,
        name,
        challenger,
        list(shadow_metrics or []),
        margins,
        require_shadow,
        reevaluate,
        override,
    )
    result = promote_if_passed(registry, result)
    report = gate.report_markdown(result, where=registry.where)
    path = _publish(
        "promote-report",
        report,
        reports_dir,
        f"promotion gate of {name} {result.challenger} vs {result.champion}",
    )
    print(report)
    return {
        "champion": result.champion,
        "challenger": result.challenger,
        "promoted": result.promoted,
        "failed_checks": [c.name for c in result.failed],
        "override": result.override,
        "report": path,
    }


# --- features ------------------------------------------------------------------------------------


@io_task
def refresh_features(
    repo_path: str | None, seed: int | None, n_users: int | None
) -> materialize.FeaturesRun:
    """Event tables, ``feast apply`` and incremental materialization (``materialize``)."""
    return materialize.run_features(
        Path(repo_path) if repo_path else None,
        seed=seed,
        config=simulator.SimulatorConfig(n_users=n_users) if n_users else None,
    )


@flow(name="features", log_prints=True)
def features_flow(
    repo_path: str | None = None,
    seed: int | None = None,
    n_users: int | None = None,
    reports_dir: str | None = None,
) -> dict[str, Any]:
    """Write the simulator's event tables of ``seed`` (``n_users`` users; default: the
    simulator's population) or load those in the repository's data/, apply the Feast
    repository and materialize incrementally into the online store."""
    run = refresh_features(repo_path, seed, n_users)
    report = materialize.report_markdown(run)
    path = _publish("features-report", report, reports_dir, f"feature refresh of {run.repo}")
    print(report)
    return {**run.summary(), "report": path}


FLOWS: Final[dict[str, Flow[..., dict[str, Any]]]] = {
    "features": features_flow,
    "train": train_flow,
    "promote": promote_flow,
    "rewards": rewards_flow,
}
"""Every flow by the name ``make pipeline FLOW=<name>`` and the deployments use."""
