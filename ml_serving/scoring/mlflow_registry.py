"""The MLflow registry backend: models:/ URIs, alias promotion, and a validated local cache."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ml_serving.scoring.model import Model, ModelWeights
from ml_serving.scoring.registry import (
    CARD_FILE,
    PROMOTED_FILE,
    WEIGHTS_FILE,
    ModelHolder,
    ModelRegistry,
    RegistryError,
    RegistryUnavailable,
    dump_card,
    load_version_dir,
    write_weights,
)

logger = logging.getLogger(__name__)

CHAMPION: Final = "champion"
"""The alias that serves: promotion moves it."""
CHALLENGER: Final = "challenger"
"""The alias training sets on the version it registers."""
MODEL_PATH: Final = "model"
"""The MLflow (pyfunc) model's directory in its run's artifacts."""
FILES_PATH: Final = "artifacts"
"""Where, inside the model directory, pyfunc keeps weights.npz and card.json."""
REFUSED_RETRY_S: Final = 60.0
"""A refused version is not downloaded again for this long (polls repeat every few seconds)."""
CACHE_KEEP: Final = 3
"""Versions kept in the cache: the one serving and the most recently used others."""
HTTP_DEFAULTS: Final = {
    # The poll has its own backoff; MLflow's default (7 retries, 120 s timeout) would hold one
    # poll for minutes while the server is down. Operators' own values win.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}

_URI_RE: Final = re.compile(
    r"models:/(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,63})"
    r"(?:@(?P<alias>[A-Za-z][A-Za-z0-9_-]{0,63})|/(?P<version>[1-9][0-9]{0,9}))"
)
_RUNS_SOURCE_RE: Final = re.compile(r"runs:/(?P<run_id>[0-9a-f]{32})/(?P<path>.+)")


@dataclass(frozen=True, slots=True)
class ModelUri:
    """``models:/<name>@<alias>`` (follow an alias) or ``models:/<name>/<version>`` (pinned)."""

    name: str
    alias: str | None = None
    version: str | None = None

    @classmethod
    def parse(cls, uri: str) -> ModelUri:
        """Parse MLflow's own URI form; ``ValueError`` for anything else."""
        m = _URI_RE.fullmatch(uri.strip())
        if m is None:
            raise ValueError(
                f"model URI {uri!r}: expected models:/<name>@<alias> (e.g. "
                "models:/tips-ranker@champion) or models:/<name>/<version>"
            )
        return cls(m["name"], alias=m["alias"], version=m["version"])

    def __str__(self) -> str:
        return (
            f"models:/{self.name}@{self.alias}"
            if self.alias
            else f"models:/{self.name}/{self.version}"
        )


def import_mlflow() -> Any:
    """Import the MLflow client (seconds of CPU: only when configured, off the event loop)."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    import mlflow
    import mlflow.artifacts

    return mlflow


@contextlib.contextmanager
def mlflow_errors(what: str) -> Iterator[None]:
    """One mapping of MLflow's failures: 4xx answers are registry errors (a missing alias, model
    or version, bad credentials); anything else (no connection, timeouts, 5xx) is unavailable."""
    try:
        yield
    except RegistryError:
        raise
    except Exception as exc:
        status_of = getattr(exc, "get_http_status_code", None)
        status = status_of() if callable(status_of) else None
        message = " ".join(str(exc).split())[:300]
        if isinstance(status, int) and 400 <= status < 500:
            raise RegistryError(f"{what}: {message}") from exc
        raise RegistryUnavailable(f"{what}: {type(exc).__name__}: {message}") from exc


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


class MlflowRegistry:
    """Model versions in an MLflow model registry, checked through a local cache.

    A version's files (``weights.npz``, ``card.json``) live in its MLflow model's ``artifacts/``
    directory; they are downloaded once into ``<cache_dir>/<tracking-uri hash>/<name>/<version>/``
    (the file registry's layout, whose ``PROMOTED`` records the version served last) and
    validated by ``load_version_dir``, exactly as the file registry validates its versions.
    ``select`` is what ``promoted_version`` resolves: an alias (default ``champion``) or a
    pinned version.
    """

    def __init__(
        self,
        cache_dir: Path,
        *,
        tracking_uri: str,
        select: ModelUri | None = None,
        client: Any = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.select = select
        # One cache per tracking server: version 3 of one server is not version 3 of another
        # (and the URI may carry credentials, so only its hash names the directory).
        slug = hashlib.sha256(tracking_uri.encode()).hexdigest()[:12]
        self.cache = ModelRegistry(Path(cache_dir) / slug)
        self._client = client
        self._client_lock = threading.Lock()
        self._refused: dict[tuple[str, str], tuple[float, RegistryError]] = {}

    @property
    def client(self) -> Any:
        """The ``MlflowClient`` (imported on first use)."""
        with self._client_lock:
            if self._client is None:
                mlflow = import_mlflow()
                self._client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
            return self._client

    # --- reading -------------------------------------------------------------------------------

    def promoted_version(self, name: str) -> str:
        """The version ``select`` names now (an alias lookup: one request to MLflow)."""
        if self.select is not None and self.select.version is not None:
            return self.select.version
        alias = self.select.alias if self.select and self.select.alias else CHAMPION
        return self.version_by_alias(name, alias)

    def version_by_alias(self, name: str, alias: str) -> str:
        """The version ``alias`` points at; ``RegistryError`` if it points nowhere."""
        with mlflow_errors(f"resolving models:/{name}@{alias}"):
            return str(self.client.get_model_version_by_alias(name, alias).version)

    def versions(self, name: str) -> list[str]:
        """Registered versions of ``name``, in number order."""
        with mlflow_errors(f"listing versions of {name!r}"):
            found = self.client.search_model_versions(f"name = '{name}'")
        return sorted((str(v.version) for v in found), key=int)

    def load(self, name: str, version: str) -> Model:
        """One version, from the cache or downloaded into it, validated like the file registry.

        ``InvalidModelError`` when it must not serve (remembered for ``REFUSED_RETRY_S``, so
        that polls do not download it again), ``RegistryUnavailable`` when MLflow is down.
        """
        refused = self._refused.get((name, version))
        if refused is not None and time.monotonic() - refused[0] < REFUSED_RETRY_S:
            raise refused[1]
        with contextlib.suppress(RegistryError):  # not cached yet, or a damaged copy
            return self.cache.load(name, version)
        try:
            return self._download(name, version)
        except RegistryUnavailable:
            raise
        except RegistryError as exc:
            self._refused[(name, version)] = (time.monotonic(), exc)
            raise

    def _download(self, name: str, version: str) -> Model:
        base = self.cache.root / name
        base.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=base, prefix=f".{version}.", suffix=".tmp"))
        try:
            with mlflow_errors(f"downloading models:/{name}/{version}"):
                self.fetch(name, version, staging)
            files = staging / FILES_PATH
            model = load_version_dir(files, name, version)
            files.chmod(0o755)
            final = base / version
            if final.exists():
                shutil.rmtree(final)
            os.replace(files, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("model %s: version %s downloaded and validated", name, version)
        return model

    def fetch(self, name: str, version: str, destination: Path) -> None:
        """Download the version's ``artifacts/`` directory (its registry files) into
        ``destination``; MLflow's exceptions pass through (``load`` maps them)."""
        source = self.client.get_model_version_download_uri(name, version)
        import_mlflow().artifacts.download_artifacts(
            artifact_uri=f"{source.rstrip('/')}/{FILES_PATH}",
            dst_path=str(destination),
            tracking_uri=self.tracking_uri,
        )

    def cached(self, name: str) -> Model | None:
        """What the cache can serve while MLflow cannot answer: the pinned version if cached,
        else the version served last; None when the cache has neither (never raises)."""
        candidates = []
        if self.select is not None and self.select.version is not None:
            candidates.append(self.select.version)
        with contextlib.suppress(RegistryError, OSError):
            candidates.append(self.cache.promoted_version(name))
        for version in candidates:
            try:
                return self.cache.load(name, version)
            except RegistryError as exc:
                logger.warning("model %s: cached version %s is unusable: %s", name, version, exc)
        return None

    def remember(self, model: Model) -> None:
        """Record ``model`` as the version served last, and drop old versions from the cache."""
        base = self.cache.root / model.name
        try:
            fd, tmp = tempfile.mkstemp(dir=base, prefix=f".{PROMOTED_FILE}.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(f"{model.version}\n")
            os.replace(tmp, base / PROMOTED_FILE)
            others = sorted(
                (p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")),
                key=lambda p: p.stat().st_mtime,
                reverse=True,
            )
            for old in [p for p in others if p.name != model.version][CACHE_KEEP - 1 :]:
                shutil.rmtree(old, ignore_errors=True)
        except OSError as exc:
            # The cache only helps a restart while MLflow is down; serving goes on without it.
            logger.warning("model %s: cannot update the cache in %s: %s", model.name, base, exc)

    # --- writing (training and promotion) ------------------------------------------------------

    def add_version(
        self,
        name: str,
        weights: ModelWeights,
        card_for: Callable[[str], Mapping[str, Any]],
        *,
        run_id: str,
        description: str = "",
        tags: Mapping[str, str] | None = None,
        alias: str | None = CHALLENGER,
    ) -> Model:
        """Register a new version of ``name`` from the run ``run_id`` and upload its files.

        MLflow numbers versions itself, and the card names its version: so the version is
        created first (its source is the run's ``model/`` directory, still empty), then
        ``card_for(version)`` gives the card, the files are validated locally, logged as a
        pyfunc model, and ``alias`` is set last, once the version is complete. A failure after
        creation deletes the version again.
        """
        client = self.client
        with mlflow_errors(f"registering a version of {name!r}"):
            try:
                client.get_registered_model(name)
            except Exception as exc:
                if getattr(exc, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                    raise
                client.create_registered_model(name)
            mv = client.create_model_version(
                name, f"runs:/{run_id}/{MODEL_PATH}", run_id=run_id, description=description
            )
        version = str(mv.version)
        try:
            with tempfile.TemporaryDirectory(prefix="ml-serving-mlflow-") as tmp:
                files = Path(tmp) / "files"
                files.mkdir()
                write_weights(files / WEIGHTS_FILE, weights)
                sha = hashlib.sha256((files / WEIGHTS_FILE).read_bytes()).hexdigest()
                card = {**card_for(version), "weights_sha256": sha}
                (files / CARD_FILE).write_bytes(dump_card(card))
                model = load_version_dir(files, name, version)  # refuse before uploading
                saved = Path(tmp) / MODEL_PATH
                _save_pyfunc(saved, files, card)
                with mlflow_errors(f"uploading models:/{name}/{version}"):
                    client.log_artifacts(run_id, str(saved), artifact_path=MODEL_PATH)
                    for key, value in (tags or {}).items():
                        client.set_model_version_tag(name, version, key, value)
                    if alias:
                        client.set_registered_model_alias(name, alias, version)
        except BaseException:
            with contextlib.suppress(Exception):
                client.delete_model_version(name, version)
            raise
        logger.info("model %s: registered version %s (alias %s)", name, version, alias)
        return model

    def promote(self, name: str, version: str, *, alias: str = CHAMPION, note: str = "") -> Model:
        """Validate ``version`` fully, move ``alias`` to it, append to its card's rollout history.

        A version that fails validation raises and leaves the alias where it was.
        """
        model = self.load(name, version)
        try:
            previous: str | None = self.version_by_alias(name, alias)
        except RegistryUnavailable:
            raise
        except RegistryError:
            previous = None
        with mlflow_errors(f"moving {alias} of {name!r} to version {version}"):
            self.client.set_registered_model_alias(name, alias, version)
        card = json.loads(json.dumps(model.card))
        card.setdefault("rollout_history", []).append(
            {
                "event": "promoted",
                "at": _utc_now(),
                "alias": alias,
                "previous_version": previous,
                "note": note,
            }
        )
        self._rewrite_card(name, version, card)
        logger.info("model %s: %s -> version %s (was %s)", name, alias, version, previous)
        return model

    def _rewrite_card(self, name: str, version: str, card: Mapping[str, Any]) -> None:
        with mlflow_errors(f"updating the card of models:/{name}/{version}"):
            source = str(self.client.get_model_version(name, version).source)
            m = _RUNS_SOURCE_RE.fullmatch(source)
            if m is None:
                logger.warning(
                    "model %s %s: source %s is not a run; card kept", name, version, source
                )
                return
            with tempfile.TemporaryDirectory(prefix="ml-serving-card-") as tmp:
                path = Path(tmp) / CARD_FILE
                path.write_bytes(dump_card(card))
                self.client.log_artifact(
                    m["run_id"], str(path), artifact_path=f"{m['path'].rstrip('/')}/{FILES_PATH}"
                )
        cached = self.cache.root / name / version / CARD_FILE
        if cached.is_file():
            cached.write_bytes(dump_card(card))


def _save_pyfunc(path: Path, files: Path, card: Mapping[str, Any]) -> None:
    """Write an MLflow pyfunc model whose artifacts are exactly the registry files, with the
    ml_serving package as its code (it loads where ml-serving is not installed)."""
    import importlib.metadata
    import warnings

    import pandas as pd

    package = Path(__file__).resolve().parent.parent
    example = pd.DataFrame(
        [{**row["context"], **row["candidate"]} for row in card["reference_rows"][:2]]
    )
    with warnings.catch_warnings():
        # MLflow's own warnings (its agent types' hints at import, pandas 3 deprecations in its
        # input-example code): not ours to fix, and errors under the test suite's filters.
        warnings.filterwarnings("ignore", module=r"mlflow(\.|$)")
        warnings.filterwarnings("ignore", message=".*Any type hint is inferred")
        import mlflow.pyfunc

        from ml_serving.scoring import mlflow_pyfunc

        mlflow.pyfunc.save_model(
            str(path),
            python_model=mlflow_pyfunc.__file__,
            artifacts={key: str(files / f) for key, f in mlflow_pyfunc.ARTIFACT_KEYS.items()},
            code_paths=[str(package)],
            signature=mlflow_pyfunc.signature(),
            input_example=example,
            pip_requirements=[
                f"{dist}=={importlib.metadata.version(dist)}" for dist in ("numpy", "grpcio")
            ],
        )


def open_holder(model_uri: str, *, cache_dir: Path, tracking_uri: str | None) -> ModelHolder:
    """The serving holder for ``model_uri``: starts from the cache (no MLflow call, so a server
    starts while MLflow is down) and resolves the URI on its first poll, off the request path.

    With nothing cached, ``current`` answers NotReady (FAILED_PRECONDITION) until a version
    loads. ``ValueError`` for a malformed URI or a missing tracking URI.
    """
    uri = ModelUri.parse(model_uri)
    if not tracking_uri:
        raise ValueError("ML_SERVING_MODEL_URI is set: MLFLOW_TRACKING_URI must name the server")
    registry = MlflowRegistry(cache_dir, tracking_uri=tracking_uri, select=uri)
    initial = registry.cached(uri.name)
    if initial is None:
        logger.info("model %s: nothing cached; waiting for %s", uri.name, uri)
    else:
        logger.info(
            "model %s: version %s from the cache until %s answers", uri.name, initial.version, uri
        )
    return ModelHolder(registry, uri.name, lazy=True, initial=initial, on_swap=registry.remember)


# --- CLI -----------------------------------------------------------------------------------------


def _cmd_list(registry: MlflowRegistry, name: str) -> int:
    try:
        champion: str | None = registry.version_by_alias(name, CHAMPION)
    except RegistryUnavailable:
        raise
    except RegistryError:
        champion = None
    for version in registry.versions(name):
        mark = "*" if version == champion else " "
        try:
            model = registry.load(name, version)
        except RegistryUnavailable:
            raise
        except RegistryError as exc:
            print(f"{mark} {name} {version}  INVALID: {exc}")
            continue
        m = model.card.get("metrics", {}).get("heldout", {})
        print(
            f"{mark} {name} {version}  auc={m.get('auc')} log_loss={m.get('log_loss')} "
            f"ece={m.get('ece')}"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``list`` versions (``*`` marks the champion) or ``promote`` one (moves an alias)."""
    from ml_serving.config import Settings

    settings = Settings()
    parser = argparse.ArgumentParser(
        prog="python -m ml_serving.scoring.mlflow_registry", description=__doc__
    )
    parser.add_argument(
        "--tracking-uri",
        default=settings.mlflow_tracking_uri,
        help="MLflow tracking server (default: MLFLOW_TRACKING_URI)",
    )
    parser.add_argument(
        "--cache", type=Path, default=settings.model_cache_dir, help="local artifact cache"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list versions; * marks the champion")
    p_list.add_argument("--name", default=settings.model_name)
    p_prom = sub.add_parser("promote", help="validate a version and move an alias to it")
    p_prom.add_argument("--name", default=settings.model_name)
    p_prom.add_argument("--version", required=True)
    p_prom.add_argument("--alias", default=CHAMPION)
    p_prom.add_argument("--note", default="", help="recorded in the card's rollout history")
    args = parser.parse_args(argv)
    if not args.tracking_uri:
        print("error: set MLFLOW_TRACKING_URI or --tracking-uri", file=sys.stderr)
        return 2
    registry = MlflowRegistry(args.cache, tracking_uri=args.tracking_uri)
    try:
        if args.command == "list":
            return _cmd_list(registry, args.name)
        registry.promote(args.name, args.version, alias=args.alias, note=args.note)
    except (RegistryError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"promoted {args.name} version {args.version} ({args.alias})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
