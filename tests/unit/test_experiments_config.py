"""The experiments file: the shape it accepts, and a refusal naming the key for each mistake."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from ml_serving.experiments.config import (
    DEFAULT_DRAWS,
    ExperimentConfigError,
    Policy,
    ShadowConfig,
    load_experiments,
    parse_experiments,
)
from ml_serving.generation.prompts.registry import PromptRegistry

KNOWN = ("v1", "v2-mentor", "v3-few-shot")

ISSUE_EXAMPLE = """\
experiments:
  - name: tip-prompts          # also the hashing salt unless `salt` is given
    variants: {v1: 50, v2-mentor: 25, v3-few-shot: 25}   # prompt_version: weight
    policy: fixed              # or thompson
    snapshot: rewards/tip-prompts.json   # thompson: reward counts, polled like PROMOTED
    min_share: 0.05            # exploration floor per variant (thompson)
    shadow: {prompt_version: v3-few-shot, share: 0.1, max_in_flight: 8}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "experiments.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_the_issue_example_loads(tmp_path: Path) -> None:
    config = load_experiments(write(tmp_path, ISSUE_EXAMPLE), KNOWN)
    assert config is not None
    assert config.name == config.salt == "tip-prompts"
    assert dict(config.variants) == {"v1": 50.0, "v2-mentor": 25.0, "v3-few-shot": 25.0}
    assert config.policy is Policy.FIXED
    # Relative to the experiments file's folder, not to wherever the server was started.
    assert config.snapshot == tmp_path.resolve() / "rewards" / "tip-prompts.json"
    assert config.min_share == 0.05
    assert config.draws == DEFAULT_DRAWS
    assert config.shadow == ShadowConfig("v3-few-shot", 0.1, 8, 30.0)


def test_the_known_versions_are_the_prompt_registrys() -> None:
    # The server passes its registry's versions: the issue's example names exactly those.
    assert set(KNOWN) <= set(PromptRegistry().known_versions())


def test_a_thompson_experiment_with_list_variants_and_its_own_salt(tmp_path: Path) -> None:
    config = load_experiments(
        write(
            tmp_path,
            """\
            experiments:
              - name: tip-prompts
                salt: tip-prompts-2024-05
                variants: [v1, v3-few-shot]
                policy: thompson
                snapshot: /abs/snap.json
                draws: 5000
            """,
        ),
        KNOWN,
    )
    assert config is not None
    assert config.salt == "tip-prompts-2024-05"
    assert dict(config.variants) == {"v1": 1.0, "v3-few-shot": 1.0}
    assert config.policy is Policy.THOMPSON
    assert config.snapshot == Path("/abs/snap.json")
    assert (config.min_share, config.draws, config.shadow) == (0.0, 5000, None)


@pytest.mark.parametrize("path", [None, ""])
def test_unset_means_no_experiment(path: str | None) -> None:
    assert load_experiments(path, KNOWN) is None


@pytest.mark.parametrize("text", ["", "experiments: []\n", "experiments:\n"])
def test_a_file_without_experiments_means_none(tmp_path: Path, text: str) -> None:
    assert load_experiments(write(tmp_path, text), KNOWN) is None


def test_without_known_versions_any_version_passes() -> None:
    config = parse_experiments({"experiments": [{"name": "x", "variants": {"v9": 1}}]}, None)
    assert config is not None and dict(config.variants) == {"v9": 1.0}


def base(**changes: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": "tip-prompts", "variants": {"v1": 50, "v2-mentor": 50}}
    for key, value in changes.items():
        if value is _DELETE:
            entry.pop(key)
        else:
            entry[key] = value
    return {"experiments": [entry]}


_DELETE = object()

BAD = [
    (base(variants={"v1": 1, "v9": 1}), "experiments[0].variants.v9", "unknown prompt version"),
    (base(variants={"v1": -1}), "experiments[0].variants.v1", "must be >= 0"),
    (base(variants={"v1": True}), "experiments[0].variants.v1", "must be a number"),
    (base(variants={"v1": float("nan")}), "experiments[0].variants.v1", "must be >= 0"),
    (base(variants={"v1": 0, "v2-mentor": 0}), "experiments[0].variants", "positive"),
    (base(variants={}), "experiments[0].variants", "required"),
    (base(variants=[]), "experiments[0].variants", "required"),
    (base(variants=_DELETE), "experiments[0].variants", "required"),
    (base(variants={1: 1}), "experiments[0].variants.1", "prompt version string"),
    (base(name=_DELETE), "experiments[0].name", "required"),
    (base(name="has space"), "experiments[0].name", "letters, digits"),
    (base(salt=""), "experiments[0].salt", "1..64 bytes"),
    (base(salt="x" * 65), "experiments[0].salt", "1..64 bytes"),
    (base(policy="greedy"), "experiments[0].policy", "fixed, thompson"),
    (base(policy="thompson"), "experiments[0].snapshot", "required with policy thompson"),
    (
        base(policy="thompson", snapshot="s.json", variants={"v1": 1}),
        "experiments[0].variants",
        "at least two",
    ),
    (base(snapshot=3), "experiments[0].snapshot", "file path"),
    (base(min_share=0.6), "experiments[0].min_share", "exceeds 1"),
    (base(min_share=-0.1), "experiments[0].min_share", "must be >= 0"),
    (base(draws=10), "experiments[0].draws", "integer >= 100"),
    (base(draws=1000.5), "experiments[0].draws", "integer >= 100"),
    (base(colour="blue"), "experiments[0].colour", "unknown key"),
    (base(shadow={"share": 0.1}), "experiments[0].shadow.prompt_version", "required"),
    (base(shadow={"prompt_version": "v1"}), "experiments[0].shadow.share", "required"),
    (
        base(shadow={"prompt_version": "v7", "share": 0.1}),
        "experiments[0].shadow.prompt_version",
        "unknown prompt version",
    ),
    (
        base(shadow={"prompt_version": "v1", "share": 0}),
        "experiments[0].shadow.share",
        "must be > 0 and <= 1",
    ),
    (
        base(shadow={"prompt_version": "v1", "share": 1.5}),
        "experiments[0].shadow.share",
        "must be > 0 and <= 1",
    ),
    (
        base(shadow={"prompt_version": "v1", "share": 0.1, "max_in_flight": 0}),
        "experiments[0].shadow.max_in_flight",
        "integer >= 1",
    ),
    (
        base(shadow={"prompt_version": "v1", "share": 0.1, "timeout_s": 0}),
        "experiments[0].shadow.timeout_s",
        "must be > 0",
    ),
    (
        base(shadow={"prompt_version": "v1", "share": 0.1, "mirror": True}),
        "experiments[0].shadow.mirror",
        "unknown key",
    ),
    ({"experiment": []}, "experiment", "unknown key"),
    ({"experiments": {"name": "x"}}, "experiments", "must be a list"),
    (["x"], "(top level)", "must be a mapping"),
    ({"experiments": ["x"]}, "experiments[0]", "must be a mapping"),
    (
        {"experiments": [base()["experiments"][0], base()["experiments"][0]]},
        "experiments",
        "one over Generate's prompt versions is supported",
    ),
]


@pytest.mark.parametrize(("data", "key", "problem"), BAD)
def test_a_bad_file_is_refused_naming_the_key(data: Any, key: str, problem: str) -> None:
    with pytest.raises(ExperimentConfigError) as info:
        parse_experiments(data, KNOWN, source="exp.yaml")
    assert info.value.key == key
    assert problem in info.value.problem
    assert str(info.value).startswith(f"exp.yaml: {key}: ")
    assert isinstance(info.value, ValueError)


def test_unknown_version_message_lists_the_known_ones(tmp_path: Path) -> None:
    path = write(tmp_path, "experiments:\n  - {name: t, variants: {v1: 1, v4: 1}}\n")
    with pytest.raises(ValueError, match=r"variants\.v4: unknown prompt version 'v4'; known: v1, "):
        load_experiments(path, KNOWN)


def test_unreadable_and_invalid_yaml_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ExperimentConfigError, match="cannot read it"):
        load_experiments(tmp_path / "missing.yaml", KNOWN)
    with pytest.raises(ExperimentConfigError, match="not valid YAML"):
        load_experiments(write(tmp_path, "experiments: [\n"), KNOWN)
