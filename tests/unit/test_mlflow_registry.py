"""The MLflow backend without a server: URIs, error mapping, the cache, and the lazy holder's
NotReady, backoff and first load (a fake client; tests/system/ has the real server)."""

from __future__ import annotations

import asyncio
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from ml_serving import errors
from ml_serving.scoring import mlflow_registry
from ml_serving.scoring.mlflow_registry import MlflowRegistry, ModelUri, mlflow_errors
from ml_serving.scoring.registry import (
    InvalidModelError,
    ModelHolder,
    RegistryError,
    RegistryUnavailable,
)
from tests.support import REPO

NAME = "tips-ranker"
SHIPPED = REPO / "models" / NAME / "1"


@dataclass
class _Version:
    version: str


class FakeClient:
    """The one MlflowClient call the poll makes; ``down`` makes it fail like a dead server."""

    def __init__(self) -> None:
        self.aliases: dict[str, str] = {}
        self.down = False
        self.calls = 0

    def get_model_version_by_alias(self, name: str, alias: str) -> _Version:
        self.calls += 1
        if self.down:
            raise ConnectionError("connection refused")
        if alias not in self.aliases:
            raise _HttpError(400, f"alias {alias} not found")
        return _Version(self.aliases[alias])


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    def get_http_status_code(self) -> int:
        return self.status


def _version_files(root: Path, version: str, *, corrupt: bool = False) -> Path:
    """The shipped model's files restamped as ``version`` (what MLflow would hand out)."""
    directory = root / f"source-{version}" / mlflow_registry.FILES_PATH
    directory.mkdir(parents=True)
    shutil.copy(SHIPPED / "weights.npz", directory / "weights.npz")
    card = json.loads((SHIPPED / "card.json").read_text())
    card["version"] = version
    if corrupt:
        card["reference_rows"][0]["prediction"] += 0.01
    (directory / "card.json").write_text(json.dumps(card))
    return directory.parent


class Registry(MlflowRegistry):
    """An MlflowRegistry whose downloads copy local directories (or fail when ``down``)."""

    def __init__(self, cache: Path, sources: Path, client: FakeClient, **kw: Any) -> None:
        super().__init__(cache, tracking_uri="http://mlflow.test", client=client, **kw)
        self.sources = sources
        self.fetches: list[str] = []

    def fetch(self, name: str, version: str, destination: Path) -> None:
        self.fetches.append(version)
        if self._client.down:
            raise ConnectionError("connection reset mid-download")
        shutil.copytree(self.sources / f"source-{version}", destination, dirs_exist_ok=True)


@pytest.fixture
def client() -> FakeClient:
    return FakeClient()


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    root = tmp_path / "mlflow"
    for version in ("1", "2"):
        _version_files(root, version)
    _version_files(root, "3", corrupt=True)
    return root


def _registry(tmp_path: Path, sources: Path, client: FakeClient, **kw: Any) -> Registry:
    return Registry(tmp_path / "cache", sources, client, **kw)


def test_model_uri_forms() -> None:
    assert ModelUri.parse("models:/tips-ranker@champion") == ModelUri(NAME, alias="champion")
    assert ModelUri.parse("models:/tips-ranker/7") == ModelUri(NAME, version="7")
    assert str(ModelUri(NAME, alias="champion")) == "models:/tips-ranker@champion"
    assert str(ModelUri(NAME, version="7")) == "models:/tips-ranker/7"
    for bad in ("tips-ranker", "models:/tips-ranker", "models:/../x@a", "models:/m/0", "runs:/x"):
        with pytest.raises(ValueError, match="expected models:/<name>@<alias>"):
            ModelUri.parse(bad)


def test_error_mapping_4xx_is_a_registry_error_the_rest_unavailable() -> None:
    with pytest.raises(RegistryError) as err, mlflow_errors("resolving"):
        raise _HttpError(404, "RESOURCE_DOES_NOT_EXIST: no such model")
    assert not isinstance(err.value, RegistryUnavailable)
    for exc in (_HttpError(503, "busy"), ConnectionError("refused"), TimeoutError("slow")):
        with pytest.raises(RegistryUnavailable, match="resolving"), mlflow_errors("resolving"):
            raise exc


def test_load_downloads_once_into_a_file_registry_layout(
    tmp_path: Path, sources: Path, client: FakeClient
) -> None:
    registry = _registry(tmp_path, sources, client)
    model = registry.load(NAME, "2")
    assert (model.name, model.version) == (NAME, "2")
    assert registry.load(NAME, "2").version == "2"
    assert registry.fetches == ["2"]  # the second load came from the cache
    assert registry.cache.load(NAME, "2").version == "2"  # validated like the file registry
    assert not [p for p in (registry.cache.root / NAME).iterdir() if p.name.startswith(".")]


def test_a_damaged_cache_copy_is_downloaded_again(
    tmp_path: Path, sources: Path, client: FakeClient
) -> None:
    registry = _registry(tmp_path, sources, client)
    registry.load(NAME, "2")
    (registry.cache.root / NAME / "2" / "weights.npz").write_bytes(b"not a zip")
    assert registry.load(NAME, "2").version == "2"
    assert registry.fetches == ["2", "2"]


def test_a_corrupt_version_is_refused_and_not_downloaded_again(
    tmp_path: Path, sources: Path, client: FakeClient
) -> None:
    registry = _registry(tmp_path, sources, client)
    for _ in range(2):
        with pytest.raises(InvalidModelError, match="reference row 0"):
            registry.load(NAME, "3")
    assert registry.fetches == ["3"]  # remembered for REFUSED_RETRY_S
    assert not (registry.cache.root / NAME / "3").exists()


def test_unreachable_download_is_unavailable_and_retried(
    tmp_path: Path, sources: Path, client: FakeClient
) -> None:
    registry = _registry(tmp_path, sources, client)
    client.down = True
    for _ in range(2):
        with pytest.raises(RegistryUnavailable, match="mid-download"):
            registry.load(NAME, "2")
    assert registry.fetches == ["2", "2"]
    client.down = False
    assert registry.load(NAME, "2").version == "2"


def test_cache_serves_the_last_remembered_version_and_keeps_a_few(
    tmp_path: Path, sources: Path, client: FakeClient
) -> None:
    registry = _registry(tmp_path, sources, client)
    assert registry.cached(NAME) is None
    _version_files(sources, "4")
    _version_files(sources, "5")
    for version in ("1", "2", "4", "5"):
        registry.remember(registry.load(NAME, version))
    kept = sorted(p.name for p in (registry.cache.root / NAME).iterdir() if p.is_dir())
    assert len(kept) == mlflow_registry.CACHE_KEEP and "5" in kept and "1" not in kept
    restarted = _registry(tmp_path, sources, FakeClient())
    cached = restarted.cached(NAME)
    assert cached is not None and cached.version == "5"
    pinned = _registry(tmp_path, sources, client, select=ModelUri(NAME, version="4"))
    cached = pinned.cached(NAME)
    assert cached is not None and cached.version == "4"  # the pinned one, when cached


def test_one_cache_per_tracking_server(tmp_path: Path, sources: Path, client: FakeClient) -> None:
    a = MlflowRegistry(tmp_path, tracking_uri="http://a.test", client=client)
    b = MlflowRegistry(tmp_path, tracking_uri="http://user:secret@b.test", client=client)
    assert a.cache.root != b.cache.root
    assert "secret" not in str(b.cache.root)


def test_pinned_uri_needs_no_alias_lookup(
    tmp_path: Path, sources: Path, client: FakeClient
) -> None:
    registry = _registry(tmp_path, sources, client, select=ModelUri(NAME, version="2"))
    assert registry.promoted_version(NAME) == "2"
    assert client.calls == 0


def test_lazy_holder_is_not_ready_until_a_version_loads(
    tmp_path: Path, sources: Path, client: FakeClient
) -> None:
    registry = _registry(tmp_path, sources, client, select=ModelUri(NAME, alias="champion"))
    holder = ModelHolder(registry, NAME, lazy=True, initial=None, on_swap=registry.remember)
    with pytest.raises(errors.NotReady) as err:
        _ = holder.current
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert str(err.value) == (
        "model 'tips-ranker' is not loaded yet (registry unreachable or version refused)"
    )
    assert holder.loaded is None

    client.down = True
    assert holder.refresh() is False
    assert holder.poll_failures["unavailable"] == 1
    client.down = False
    client.aliases["champion"] = "3"  # corrupt
    assert holder.refresh() is False
    assert holder.poll_failures["refused"] == 1 and holder.loaded is None
    client.aliases["champion"] = "2"
    assert holder.refresh() is True
    assert holder.current.version == "2"
    cached = registry.cached(NAME)  # on_swap recorded it for a restart
    assert cached is not None and cached.version == "2"


def test_backoff_doubles_while_unreachable_and_resets(
    tmp_path: Path, sources: Path, client: FakeClient
) -> None:
    registry = _registry(tmp_path, sources, client)
    client.aliases["champion"] = "1"
    holder = ModelHolder(registry, NAME, lazy=True, initial=registry.load(NAME, "1"))
    assert holder.next_delay(1.0, 8.0) == 1.0
    client.down = True
    delays = []
    for _ in range(6):
        holder.refresh()
        delays.append(holder.next_delay(1.0, 8.0))
    assert holder.current.version == "1"  # still serving throughout
    for i, delay in enumerate(delays):
        assert 0.8 * min(8.0, 2.0 ** (i + 1)) <= delay <= min(8.0, 2.0 ** (i + 1))
    client.down = False
    holder.refresh()
    assert holder.next_delay(1.0, 8.0) == 1.0


async def test_watch_polls_at_once_and_signals_the_first_load(
    tmp_path: Path, sources: Path, client: FakeClient
) -> None:
    registry = _registry(tmp_path, sources, client)
    client.aliases["champion"] = "2"
    holder = ModelHolder(registry, NAME, lazy=True, initial=None)
    task = asyncio.create_task(holder.watch(60.0))  # a long interval: only the first poll runs
    try:
        await asyncio.wait_for(holder.wait_loaded(), 10)
        assert holder.current.version == "2"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_open_holder_checks_its_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI"):
        mlflow_registry.open_holder(
            "models:/tips-ranker@champion", cache_dir=tmp_path, tracking_uri=None
        )
    with pytest.raises(ValueError, match="expected models:/"):
        mlflow_registry.open_holder("tips-ranker", cache_dir=tmp_path, tracking_uri="http://x")
    holder = mlflow_registry.open_holder(
        "models:/tips-ranker@champion", cache_dir=tmp_path, tracking_uri="http://x.test"
    )
    assert holder.loaded is None and holder.name == NAME


def test_the_server_does_not_import_mlflow_unless_configured() -> None:
    import subprocess
    import sys

    code = (
        "import sys, ml_serving.__main__, ml_serving.api.server;"
        "print([m for m in sys.modules if m == 'mlflow' or m.startswith('mlflow.')])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"
