"""Tests of the file-based model registry, promotion, validation and the hot-swapping holder."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ml_serving.scoring import cli as registry_cli
from ml_serving.scoring import features
from ml_serving.scoring import model as scoring
from ml_serving.scoring import registry as model_registry
from ml_serving.scoring.registry import (
    InvalidModelError,
    ModelHolder,
    ModelRegistry,
    RegistryError,
)
from tests.support import REPO

SHIPPED = REPO / "models"
NAME = "tips-ranker"


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    """A copy of the shipped registry (version 1, promoted) in a temp dir."""
    shutil.copytree(SHIPPED / NAME, tmp_path / NAME)
    return ModelRegistry(tmp_path)


def add_shifted_version(registry: ModelRegistry, version: str, shift: float = 0.25) -> None:
    """A valid new version: version 1 with its intercept moved, reference rows recomputed."""
    v1 = registry.load(NAME, "1")
    weights = replace(v1.weights, intercept=v1.weights.intercept + shift)
    card: dict[str, Any] = copy.deepcopy(dict(v1.card))
    card["version"] = version
    card["rollout_history"] = [{"event": "trained", "version": version}]
    model = scoring.Model(NAME, version, card, weights)
    for i, row in enumerate(card["reference_rows"]):
        ctx = features.rows_from_mappings([row["context"]], features.Group.CONTEXT)[0]
        cand = features.rows_from_mappings([row["candidate"]], features.Group.CANDIDATE)
        row["prediction"] = float(model.predict(ctx, cand)[0])
        assert row["prediction"] != v1.card["reference_rows"][i]["prediction"]
    registry.add_version(NAME, version, weights, card)


def rewrite_card(registry: ModelRegistry, version: str, edit: Any) -> None:
    path = registry.root / NAME / version / "card.json"
    card = json.loads(path.read_text())
    edit(card)
    path.write_text(json.dumps(card))


def test_versions_load_and_promoted(registry: ModelRegistry) -> None:
    assert registry.model_names() == [NAME]
    assert registry.versions(NAME) == ["1"]
    assert registry.promoted_version(NAME) == "1"
    model = registry.load(NAME, "1")
    assert (model.name, model.version) == (NAME, "1")
    assert model.card["model_type"] == "logistic_regression_with_crosses"
    assert model.weights.coef.shape == (features.N_DESIGN,)


def test_versions_sort_numerically(registry: ModelRegistry) -> None:
    for v in ("10", "2", "exp-a"):
        (registry.root / NAME / v).mkdir()
    (registry.root / NAME / ".2.tmp").mkdir()  # a staging dir is not a version
    assert registry.versions(NAME) == ["1", "2", "10", "exp-a"]
    assert registry.versions("no-such-model") == []


@pytest.mark.parametrize("bad", ["../etc", "", "a/b", ".hidden"])
def test_names_cannot_escape_the_root(registry: ModelRegistry, bad: str) -> None:
    with pytest.raises(RegistryError, match="invalid"):
        registry.load(NAME, bad)
    with pytest.raises(RegistryError, match="invalid"):
        registry.versions(bad)


def test_load_unknown_version(registry: ModelRegistry) -> None:
    with pytest.raises(RegistryError, match="model 'tips-ranker' has no version '7'"):
        registry.load(NAME, "7")


def test_promote_switches_atomically_and_records_history(registry: ModelRegistry) -> None:
    add_shifted_version(registry, "2")
    model = registry.promote(NAME, "2", note="canary passed")
    assert model.version == "2"
    assert (registry.root / NAME / "PROMOTED").read_text() == "2\n"
    assert registry.promoted_version(NAME) == "2"
    history = registry.load(NAME, "2").card["rollout_history"]
    assert history[-1]["event"] == "promoted"
    assert history[-1]["previous_version"] == "1"
    assert history[-1]["note"] == "canary passed"
    leftovers = [p.name for p in (registry.root / NAME).iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_add_version_refuses_to_overwrite(registry: ModelRegistry) -> None:
    v1 = registry.load(NAME, "1")
    with pytest.raises(RegistryError, match="already exists"):
        registry.add_version(NAME, "1", v1.weights, v1.card)


def test_add_version_validates_before_publishing(registry: ModelRegistry) -> None:
    v1 = registry.load(NAME, "1")
    card = {**v1.card, "version": "3"}  # reference predictions are v1's: still valid
    broken = replace(v1.weights, intercept=v1.weights.intercept + 1.0)
    with pytest.raises(InvalidModelError, match="reference row 0"):
        registry.add_version(NAME, "3", broken, card)
    assert not (registry.root / NAME / "3").exists()
    assert sorted(p.name for p in (registry.root / NAME).iterdir()) == ["1", "PROMOTED"]


def _corrupt_weights_bytes(registry: ModelRegistry, version: str) -> None:
    path = registry.root / NAME / version / "weights.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _resign(registry: ModelRegistry, version: str) -> None:
    """Make the card's checksum match whatever the weights file now holds."""
    sha = model_registry._sha256(registry.root / NAME / version / "weights.npz")
    rewrite_card(registry, version, lambda c: c.__setitem__("weights_sha256", sha))


def _write_npz(registry: ModelRegistry, version: str, arrays: dict[str, np.ndarray]) -> None:
    path = registry.root / NAME / version / "weights.npz"
    with zipfile.ZipFile(path, "w") as zf:
        for key, arr in arrays.items():
            with zf.open(f"{key}.npy", "w") as fh:
                np.lib.format.write_array(fh, arr)
    _resign(registry, version)


def _break_reference(registry: ModelRegistry, version: str) -> None:
    def edit(card: dict[str, Any]) -> None:
        card["reference_rows"][3]["prediction"] += 1e-4

    rewrite_card(registry, version, edit)


def _wrong_coef_shape(registry: ModelRegistry, version: str) -> None:
    arrays = registry.load(NAME, version).weights.to_arrays()
    arrays["coef"] = arrays["coef"][:-1]
    _write_npz(registry, version, arrays)


def _garbage_npz(registry: ModelRegistry, version: str) -> None:
    (registry.root / NAME / version / "weights.npz").write_bytes(b"not a zip file")
    _resign(registry, version)


def _nan_coef(registry: ModelRegistry, version: str) -> None:
    arrays = registry.load(NAME, version).weights.to_arrays()
    arrays["coef"] = arrays["coef"].copy()
    arrays["coef"][0] = np.nan
    _write_npz(registry, version, arrays)


def _missing_card(registry: ModelRegistry, version: str) -> None:
    (registry.root / NAME / version / "card.json").unlink()


def _card_feature_renamed(registry: ModelRegistry, version: str) -> None:
    rewrite_card(
        registry, version, lambda c: c["inputs"]["context"][0].__setitem__("name", "tenure")
    )


def _card_wrong_version(registry: ModelRegistry, version: str) -> None:
    rewrite_card(registry, version, lambda c: c.__setitem__("version", "99"))


def _card_not_json(registry: ModelRegistry, version: str) -> None:
    (registry.root / NAME / version / "card.json").write_text("{")


BREAKAGES = [
    ("corrupted weights bytes", _corrupt_weights_bytes, "sha256 .* does not match the card"),
    ("reference prediction mismatch", _break_reference, "reference row 3: weights predict"),
    ("coef of the wrong shape", _wrong_coef_shape, r"coef: expected float64 shape \(27,\)"),
    ("weights not an npz", _garbage_npz, r"weights.npz is not an npz \(zip\) file"),
    ("non-finite weights", _nan_coef, "non-finite"),
    ("card missing", _missing_card, "card.json is missing"),
    ("card inputs differ from features.py", _card_feature_renamed, "do not match the serving"),
    ("card for another version", _card_wrong_version, "card names 'tips-ranker' version '99'"),
    ("card not JSON", _card_not_json, "JSONDecodeError"),
]


@pytest.mark.parametrize(
    ("breakage", "message"), [b[1:] for b in BREAKAGES], ids=[b[0] for b in BREAKAGES]
)
def test_promote_refuses_a_broken_version(
    registry: ModelRegistry, breakage: Any, message: str
) -> None:
    add_shifted_version(registry, "2")
    breakage(registry, "2")
    with pytest.raises(InvalidModelError, match=message) as info:
        registry.promote(NAME, "2")
    assert "model 'tips-ranker' version '2'" in str(info.value)
    assert registry.promoted_version(NAME) == "1"


def test_holder_refresh_picks_up_a_promotion(registry: ModelRegistry) -> None:
    holder = ModelHolder(registry, NAME)
    assert holder.current.version == "1"
    assert holder.refresh() is False
    in_flight = holder.current  # what a request grabbed before the swap
    add_shifted_version(registry, "2")
    registry.promote(NAME, "2")
    assert holder.refresh() is True
    assert holder.current.version == "2"
    # The request that started on version 1 finishes on version 1.
    assert in_flight.version == "1"
    ctx = np.zeros(features.N_CONTEXT, dtype=np.float32)
    cand = np.zeros((1, features.N_CANDIDATE), dtype=np.float32)
    assert in_flight.predict(ctx, cand)[0] < holder.current.predict(ctx, cand)[0]
    # Rollback is a promotion too.
    registry.promote(NAME, "1")
    assert holder.refresh() is True and holder.current.version == "1"


def test_holder_keeps_serving_when_the_promoted_version_is_broken(
    registry: ModelRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    holder = ModelHolder(registry, NAME)
    add_shifted_version(registry, "2")
    _break_reference(registry, "2")
    # Written by hand (promote() would refuse): the holder is the last line of defence.
    (registry.root / NAME / "PROMOTED").write_text("2\n")
    with caplog.at_level(logging.DEBUG, logger="ml_serving.scoring.registry"):
        assert holder.refresh() is False
        assert holder.current.version == "1"
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        message = warnings[0].getMessage()
        assert "cannot switch to version 2, still serving version 1" in message
        assert "reference row 3" in message
        # The same failure on the next poll is not warned about again.
        assert holder.refresh() is False
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_holder_survives_a_missing_promoted_file(
    registry: ModelRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    holder = ModelHolder(registry, NAME)
    (registry.root / NAME / "PROMOTED").unlink()
    with caplog.at_level(logging.WARNING, logger="ml_serving.scoring.registry"):
        assert holder.refresh() is False
    assert holder.current.version == "1"
    assert "has no promoted version" in caplog.text


def test_holder_needs_a_promoted_version(tmp_path: Path) -> None:
    shutil.copytree(SHIPPED / NAME, tmp_path / NAME)
    (tmp_path / NAME / "PROMOTED").unlink()
    with pytest.raises(RegistryError, match="no promoted version"):
        ModelHolder(ModelRegistry(tmp_path), NAME)


async def test_watch_swaps_in_the_background(registry: ModelRegistry) -> None:
    holder = ModelHolder(registry, NAME)
    task = asyncio.create_task(holder.watch(0.01))
    try:
        add_shifted_version(registry, "2")
        registry.promote(NAME, "2")
        for _ in range(500):
            if holder.current.version == "2":
                break
            await asyncio.sleep(0.01)
        assert holder.current.version == "2"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_cli_promote_and_list(registry: ModelRegistry, capsys: pytest.CaptureFixture[str]) -> None:
    add_shifted_version(registry, "2")
    root = str(registry.root)
    assert registry_cli.main(["promote", "--root", root, "--name", NAME, "--version", "2"]) == 0
    assert registry.promoted_version(NAME) == "2"
    assert "promoted tips-ranker version 2" in capsys.readouterr().out
    assert registry_cli.main(["list", "--root", root]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("  tips-ranker 1  logistic_regression_with_crosses  auc=")
    assert lines[1].startswith("* tips-ranker 2  ")


def test_cli_refuses_a_broken_version(
    registry: ModelRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    add_shifted_version(registry, "2")
    _corrupt_weights_bytes(registry, "2")
    root = str(registry.root)
    assert registry_cli.main(["promote", "--root", root, "--name", NAME, "--version", "2"]) == 1
    assert "error: model 'tips-ranker' version '2'" in capsys.readouterr().err
    assert registry.promoted_version(NAME) == "1"
    assert registry_cli.main(["list", "--root", root, "--name", NAME]) == 0
    assert "* tips-ranker 1" in capsys.readouterr().out


def test_shipped_artefacts_are_small_and_valid() -> None:
    registry = ModelRegistry(SHIPPED)
    assert registry.promoted_version(NAME) == "1"
    registry.load(NAME, "1")
    total = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert total < 200_000
