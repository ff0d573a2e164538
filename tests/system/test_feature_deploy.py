"""The feature store in deployment: the image carries the embedded store, the Redis overlay's
feature_store.yaml is one this server serves from, with its secret referenced, never written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ml_serving.features.repo import RedisAddress, StoreConfig

REPO = Path(__file__).resolve().parents[2]
OVERLAY = REPO / "deploy" / "overlays" / "redis"


def test_the_redis_overlay_names_its_secret_and_the_server_reads_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text = (OVERLAY / "feature_store.yaml").read_text()
    assert "${REDIS_CONNECTION_STRING}" in text
    assert "password=" not in yaml.safe_load(text)["online_store"]["connection_string"]
    monkeypatch.setenv("REDIS_CONNECTION_STRING", "redis.fs.svc:6380,password=pw,ssl=true")
    config = StoreConfig.load(REPO / "feature_repo", OVERLAY / "feature_store.yaml")
    assert config.kind == "redis" and config.project == "tips"
    assert config.redis == RedisAddress("redis.fs.svc", 6380, "pw", 0, True)
    shipped = yaml.safe_load((REPO / "feature_repo" / "feature_store.yaml").read_text())
    assert shipped["project"] == config.project  # the same views, another online store


def test_the_overlay_mounts_the_yaml_where_the_setting_points() -> None:
    kustomization = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    ops = yaml.safe_load(kustomization["patches"][0]["patch"])
    env = {op["value"]["name"]: op["value"] for op in ops if op["path"].endswith("/env/-")}
    mount = next(op["value"] for op in ops if op["path"].endswith("/volumeMounts/-"))
    setting = env["ML_SERVING_FEATURE_STORE_YAML"]["value"]
    assert setting == f"{mount['mountPath']}/feature_store.yaml"
    secret = env["REDIS_CONNECTION_STRING"]["valueFrom"]["secretKeyRef"]
    assert secret["name"] == "ml-serving-redis" and secret["optional"] is True


def test_the_image_carries_the_embedded_store_and_no_feast() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "feature_repo/data/online_store.db.gz" in dockerfile
    assert "COPY --from=build /src/feature_repo /app/feature_repo" in dockerfile
    runtime = (REPO / "requirements.lock").read_text()
    assert "\nfeast==" not in runtime and "\nhiredis==" in runtime and "\nredis==" in runtime
