"""Training's MLflow side without a server: the version restamp, run parameters and metrics,
and the version's description and tags (tests/system/ logs to a real server)."""

from __future__ import annotations

import json

import pytest

from ml_serving.training import simulator, train
from tests.support import REPO

SMALL = simulator.SimulatorConfig(n_users=400, n_tips=80)
SHIPPED_CARD = json.loads((REPO / "models" / "tips-ranker" / "1" / "card.json").read_text())


@pytest.fixture(scope="module")
def small() -> train.TrainedModel:
    return train.train(7, version="1", config=SMALL)


def test_restamp_is_training_under_the_other_version(small: train.TrainedModel) -> None:
    # MLflow numbers a version after training: restamping must equal training under that number.
    direct = train.train(7, version="12", config=SMALL).model.card
    assert train.restamp(small.model.card, "12") == json.loads(json.dumps(direct))
    assert small.model.card["version"] == "1"  # the input is left alone


def test_run_parameters_and_metrics_come_from_the_card() -> None:
    params = train.mlflow_params(SHIPPED_CARD)
    assert params["seed"] == str(train.SHIPPED_SEED)
    assert params["simulator.n_users"] == str(simulator.SimulatorConfig().n_users)
    assert params["fit.l2"] == str(train.L2)
    assert all(isinstance(v, str) and len(v) <= 6000 for v in params.values())
    metrics = train.mlflow_metrics(SHIPPED_CARD)
    heldout, fairness = SHIPPED_CARD["metrics"]["heldout"], SHIPPED_CARD["fairness"]
    assert metrics["auc"] == heldout["auc"]
    assert metrics["log_loss"] == heldout["log_loss"]
    assert metrics["calibration_error"] == heldout["ece"]
    assert metrics["fairness_auc_gap"] == fairness["auc_gap_established_minus_new"]
    assert metrics["fairness_passed"] == 1.0


def test_version_description_and_tags_carry_the_cards_essentials() -> None:
    description, tags = train.mlflow_card_tags(SHIPPED_CARD)
    assert SHIPPED_CARD["summary"] in description
    assert f"AUC {SHIPPED_CARD['metrics']['heldout']['auc']}" in description
    assert tags["model_type"] == SHIPPED_CARD["model_type"]
    assert tags["fairness_passed"] == "true"
    assert tags["seed"] == str(train.SHIPPED_SEED)
    assert all(isinstance(v, str) for v in tags.values())


def test_mlflow_training_refuses_a_chosen_version(capsys: pytest.CaptureFixture[str]) -> None:
    code = train.main(["--tracking-uri", "http://127.0.0.1:9", "--version", "3"])
    assert code == 2
    assert "MLflow numbers versions itself" in capsys.readouterr().err
