"""The deploy manifests' MLflow side: the registry ConfigMap (empty in the base = the file
registry), the overlay that switches to MLflow, credentials from a Secret only, the cache on an
emptyDir. Plain PyYAML; deploy/validate/validate.sh checks the schemas and renders the overlay."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ml_serving.config import Settings
from ml_serving.scoring.mlflow_registry import ModelUri
from tests.support import REPO

BASE = REPO / "deploy" / "base"
OVERLAY = REPO / "deploy" / "overlays" / "mlflow"
CONFIGMAP = "ml-serving-model-registry"
CREDENTIALS = "ml-serving-mlflow-credentials"


def _docs(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def _container() -> dict[str, Any]:
    (deployment,) = _docs(BASE / "deployment.yaml")
    container: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


def _pod() -> dict[str, Any]:
    (deployment,) = _docs(BASE / "deployment.yaml")
    pod: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return pod


def test_base_configmap_is_empty_so_the_file_registry_serves() -> None:
    (configmap,) = _docs(BASE / "model-registry.yaml")
    assert configmap["kind"] == "ConfigMap" and configmap["metadata"]["name"] == CONFIGMAP
    assert not configmap.get("data")
    refs = [s["configMapRef"] for s in _container()["envFrom"] if "configMapRef" in s]
    assert refs == [{"name": CONFIGMAP, "optional": True}]


def test_overlay_switches_to_mlflow_with_a_valid_uri() -> None:
    (kustomization,) = _docs(OVERLAY / "kustomization.yaml")
    assert kustomization["resources"] == ["../../base"]
    (patch,) = kustomization["patches"]
    assert patch["target"]["name"] == CONFIGMAP
    data = {op["path"].rsplit("/", 1)[1]: op["value"] for op in yaml.safe_load(patch["patch"])}
    assert set(data) == {"ML_SERVING_MODEL_URI", "MLFLOW_TRACKING_URI"}
    uri = ModelUri.parse(data["ML_SERVING_MODEL_URI"])
    assert uri.alias == "champion"
    # The keys are the server's own settings (ML_SERVING_ prefix; the standard MLflow name).
    assert "model_uri" in Settings.model_fields
    alias = Settings.model_fields["mlflow_tracking_uri"].validation_alias
    assert "MLFLOW_TRACKING_URI" in str(alias)


def test_mlflow_credentials_only_by_reference() -> None:
    env = {e["name"]: e for e in _container()["env"]}
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert "value" not in env[name]
        assert ref == {"name": CREDENTIALS, "key": name, "optional": True}
    for path in (BASE / "model-registry.yaml", OVERLAY / "kustomization.yaml"):
        text = path.read_text(encoding="utf-8")
        assert "PASSWORD:" not in text and "TOKEN:" not in text


def test_model_cache_is_on_an_emptydir() -> None:
    env = {e["name"]: e.get("value") for e in _container()["env"]}
    cache = Path(env["ML_SERVING_MODEL_CACHE_DIR"])
    mount = next(m for m in _container()["volumeMounts"] if cache.is_relative_to(m["mountPath"]))
    assert mount.get("readOnly") is not True
    volume = next(v for v in _pod()["volumes"] if v["name"] == mount["name"])
    assert "emptyDir" in volume and volume["emptyDir"]["sizeLimit"]
