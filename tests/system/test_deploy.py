"""Consistency checks across the Kubernetes and Istio manifests in deploy/base.

Schema validation lives in deploy/validate/validate.sh; these tests check that the numbers
and names spread over several files agree with each other and with the server's settings.
Plain PyYAML, no cluster, no network.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from ml_serving.api.generate_port import GENERATE_METHODS
from ml_serving.api.rpc import SERVICE
from ml_serving.config import Settings
from tests.support import REPO

BASE = REPO / "deploy" / "base"
SERVICE_NAME = SERVICE  # the manifests must name the service the code serves
SCORE_PATH = f"/{SERVICE_NAME}/Score"
NON_IDEMPOTENT_PATHS = {f"/{SERVICE_NAME}/Generate", f"/{SERVICE_NAME}/GenerateStream"}
GENERATE_PORT_PATHS = {f"/{SERVICE_NAME}/{method}" for method in GENERATE_METHODS}
MONITORING = REPO / "deploy" / "monitoring"
# SIGKILL must not land exactly when the server's own grace runs out.
MIN_KILL_MARGIN_S = 2
# LiteLLM's import takes ~5 s; the startup probe must wait at least this long.
MIN_STARTUP_BUDGET_S = 30

Doc = dict[str, Any]


def _load(path: Path) -> list[Doc]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


@cache
def _kustomization() -> Doc:
    (doc,) = _load(BASE / "kustomization.yaml")
    return doc


@cache
def _manifests() -> tuple[Doc, ...]:
    docs: list[Doc] = []
    for name in _kustomization()["resources"]:
        docs.extend(_load(BASE / name))
    return tuple(docs)


def _one(kind: str) -> Doc:
    found = [doc for doc in _manifests() if doc["kind"] == kind]
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]


def _pod_spec() -> Doc:
    spec: Doc = _one("Deployment")["spec"]["template"]["spec"]
    return spec


def _container() -> Doc:
    containers = _pod_spec()["containers"]
    assert len(containers) == 1, "the server pod has one container (Istio adds its sidecar)"
    container: Doc = containers[0]
    return container


def _env(name: str) -> str:
    for var in _container().get("env", []):
        if var["name"] == name:
            value = var.get("value")
            assert isinstance(value, str), f"env {name} must be a literal string"
            return value
    raise AssertionError(f"env {name} is not set on the server container")


def _container_port(name: str) -> int:
    for port in _container()["ports"]:
        if port["name"] == name:
            number = port["containerPort"]
            assert isinstance(number, int)
            return number
    raise AssertionError(f"container has no port named {name}")


def _resolve_target_port(target: int | str) -> int:
    return target if isinstance(target, int) else _container_port(target)


def _service_port(name: str) -> Doc:
    for port in _one("Service")["spec"]["ports"]:
        if port["name"] == name:
            found: Doc = port
            return found
    raise AssertionError(f"Service has no port named {name}")


def _duration_s(text: str) -> float:
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(h|m|s|ms)", text)
    assert match, f"unsupported duration {text!r}"
    return float(match.group(1)) * units[match.group(2)]


def _prestop_sleep_s() -> int:
    command = _container()["lifecycle"]["preStop"]["exec"]["command"]
    assert len(command) == 2 and command[0] == "sleep", f"preStop is not `sleep N`: {command}"
    return int(command[1])


def _http_routes() -> list[Doc]:
    routes: list[Doc] = _one("VirtualService")["spec"]["http"]
    return routes


def _exact_paths(route: Doc) -> set[str]:
    return {m["uri"]["exact"] for m in route.get("match", []) if "exact" in m.get("uri", {})}


# --- layout ------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    listed = set(_kustomization()["resources"])
    on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_istio_files_hold_only_istio_kinds() -> None:
    # deploy/validate/validate.sh sends istio-*.yaml to the kubernetes-models validator and
    # everything else to kubernetes-validate: the split must follow the file names.
    for name in _kustomization()["resources"]:
        for doc in _load(BASE / name):
            is_istio = doc["apiVersion"].split("/")[0].endswith(".istio.io")
            assert is_istio == name.startswith("istio-"), f"{name}: {doc['kind']}"


def test_no_secret_values_in_the_manifests() -> None:
    assert not [doc for doc in _manifests() if doc["kind"] == "Secret"]
    secret_refs = [
        src["secretRef"]["name"] for src in _container().get("envFrom", []) if "secretRef" in src
    ]
    assert secret_refs == ["ml-serving-llm-keys"]


# --- drain timeline ----------------------------------------------------------------------


def test_drain_fits_in_termination_grace_period() -> None:
    sleep_s = _prestop_sleep_s()
    grace_s = float(_env("ML_SERVING_SHUTDOWN_GRACE_S"))
    termination_s = _pod_spec()["terminationGracePeriodSeconds"]
    assert sleep_s > 0
    assert sleep_s + grace_s + MIN_KILL_MARGIN_S <= termination_s


def test_sidecar_outlives_the_drain() -> None:
    annotations = _one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    proxy_config = yaml.safe_load(annotations["proxy.istio.io/config"])
    drain_s = _duration_s(proxy_config["terminationDrainDuration"])
    assert drain_s >= _prestop_sleep_s() + float(_env("ML_SERVING_SHUTDOWN_GRACE_S"))


def test_liveness_does_not_restart_a_draining_pod() -> None:
    # Health is NOT_SERVING for the whole drain: liveness must tolerate that long.
    probe = _container()["livenessProbe"]
    tolerated_s = probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)
    assert tolerated_s > float(_env("ML_SERVING_SHUTDOWN_GRACE_S"))


# --- probes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("probe", "port", "setting"),
    [
        # The startup probe gates the others: the Generate port's process must be ready
        # before readiness (the main port's) is even asked, so a Ready pod serves both ports.
        ("startupProbe", "grpc-generate", "ML_SERVING_GENERATE_PORT"),
        ("livenessProbe", "grpc", "ML_SERVING_PORT"),
        ("readinessProbe", "grpc", "ML_SERVING_PORT"),
    ],
)
def test_probe_uses_native_grpc_on_its_port(probe: str, port: str, setting: str) -> None:
    grpc_probe = _container()[probe]["grpc"]
    assert grpc_probe["port"] == _container_port(port) == int(_env(setting))


@pytest.mark.parametrize(
    ("probe", "service"),
    [("startupProbe", SERVICE_NAME), ("livenessProbe", ""), ("readinessProbe", SERVICE_NAME)],
)
def test_probe_health_service_names(probe: str, service: str) -> None:
    assert _container()[probe]["grpc"]["service"] == service


def test_startup_probe_covers_the_litellm_import() -> None:
    probe = _container()["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= MIN_STARTUP_BUDGET_S


# --- ports and Service -------------------------------------------------------------------


def test_service_grpc_port() -> None:
    port = _service_port("grpc")
    assert port["appProtocol"] == "grpc"
    assert _resolve_target_port(port["targetPort"]) == int(_env("ML_SERVING_PORT"))


def test_the_generate_port_is_exposed_and_the_settings_accept_it() -> None:
    port = _service_port("grpc-generate")
    assert port["appProtocol"] == "grpc"
    generate_port = int(_env("ML_SERVING_GENERATE_PORT"))
    assert _resolve_target_port(port["targetPort"]) == generate_port
    # The container's settings as the server reads them: the split topology must validate.
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        port=int(_env("ML_SERVING_PORT")),
        generate_port=generate_port,
        metrics_port=int(_env("ML_SERVING_METRICS_PORT")),
    )
    assert settings.generate_port != settings.port


def test_every_server_process_has_its_metrics_port_scraped() -> None:
    # The Generate port's process serves /metrics after the main port's workers.
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    metrics_port = int(_env("ML_SERVING_METRICS_PORT"))
    assert _container_port("gen-metrics") == metrics_port + settings.workers
    (podmonitor,) = _load(MONITORING / "podmonitor.yaml")
    scraped = {e["port"] for e in podmonitor["spec"]["podMetricsEndpoints"]}
    assert scraped == {"http-metrics", "gen-metrics"}


def test_service_selects_the_pods() -> None:
    selector = _one("Service")["spec"]["selector"]
    labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()


def test_metrics_port_matches_settings_and_scrape_annotations() -> None:
    metrics_port = int(_env("ML_SERVING_METRICS_PORT"))
    assert _container_port("http-metrics") == metrics_port
    assert _resolve_target_port(_service_port("http-metrics")["targetPort"]) == metrics_port
    annotations = _one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == metrics_port


def test_service_links_cannot_shadow_server_settings() -> None:
    # A Service named ml-serving would inject ML_SERVING_PORT=tcp://... into the pod.
    assert _pod_spec()["enableServiceLinks"] is False


# --- LLM config --------------------------------------------------------------------------


def test_llm_config_is_mounted_where_the_server_reads_it() -> None:
    (generator,) = _kustomization()["configMapGenerator"]
    (entry,) = generator["files"]
    key, _, source = entry.partition("=")
    volume = next(v for v in _pod_spec()["volumes"] if "configMap" in v)
    assert volume["configMap"]["name"] == generator["name"]
    mount = next(m for m in _container()["volumeMounts"] if m["name"] == volume["name"])
    item = next(i for i in volume["configMap"]["items"] if i["key"] == key)
    assert _env("ML_SERVING_LLM_CONFIG") == f"{mount['mountPath']}/{item['path']}"

    with (BASE / source).open(encoding="utf-8") as f:
        config = yaml.safe_load(f)
    aliases = [m["model_name"] for m in config["model_list"]]
    assert _env("ML_SERVING_LLM_MODEL") in aliases
    for model in config["model_list"]:
        key_ref = model["litellm_params"].get("api_key")
        assert key_ref is None or key_ref.startswith("os.environ/"), "no literal keys"


# --- pod hardening -----------------------------------------------------------------------


def test_container_runs_non_root_with_a_read_only_root() -> None:
    pod_sc = _pod_spec()["securityContext"]
    sc = _container()["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] == 10001
    assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    tmp = next(m for m in _container()["volumeMounts"] if m["mountPath"] == "/tmp")
    volume = next(v for v in _pod_spec()["volumes"] if v["name"] == tmp["name"])
    assert "emptyDir" in volume


def test_resources_are_bounded() -> None:
    resources = _container()["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert {"cpu", "memory"} <= resources["limits"].keys()


def test_hpa_and_pdb_cover_the_deployment() -> None:
    deployment = _one("Deployment")
    hpa = _one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    pdb_selector = _one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb_selector.items() <= labels.items()


# --- Istio -------------------------------------------------------------------------------


def test_virtualservice_retries_only_score() -> None:
    routes = _http_routes()
    covered = set().union(*(_exact_paths(r) for r in routes))
    assert {SCORE_PATH, *NON_IDEMPOTENT_PATHS} <= covered
    for route in routes:
        retries = route.get("retries")
        # No `retries` block means Istio's default retry policy, so every route sets one.
        assert retries is not None, f"route {route.get('name')} has no retries block"
        if _exact_paths(route) == {SCORE_PATH}:
            assert retries["attempts"] > 0
            assert set(retries["retryOn"].split(",")) == {"unavailable"}
        else:
            assert retries["attempts"] == 0, f"route {route.get('name')} retries"
            assert not _exact_paths(route) & {SCORE_PATH}


def test_virtualservice_routes_have_timeouts_and_target_the_method_s_port() -> None:
    grpc_port = _service_port("grpc")["port"]
    generate_port = _service_port("grpc-generate")["port"]
    routed_to_generate: set[str] = set()
    for route in _http_routes():
        assert _duration_s(route["timeout"]) > 0, f"route {route.get('name')}"
        paths = _exact_paths(route)
        # Only Generate's methods go to the Generate port (it refuses the rest).
        expected = generate_port if paths and paths <= GENERATE_PORT_PATHS else grpc_port
        for destination in route["route"]:
            assert destination["destination"]["port"]["number"] == expected, route.get("name")
        if expected == generate_port:
            routed_to_generate |= paths
    assert routed_to_generate == GENERATE_PORT_PATHS


def test_destination_rule_balances_per_request_over_mtls() -> None:
    policy = _one("DestinationRule")["spec"]["trafficPolicy"]
    assert policy["loadBalancer"]["simple"] in {"ROUND_ROBIN", "LEAST_REQUEST"}
    assert policy["outlierDetection"]
    assert policy["tls"]["mode"] == "ISTIO_MUTUAL"


def test_peer_authentication_is_strict() -> None:
    peer_auth = _one("PeerAuthentication")
    assert peer_auth["spec"]["mtls"]["mode"] == "STRICT"
    labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert peer_auth["spec"]["selector"]["matchLabels"].items() <= labels.items()
