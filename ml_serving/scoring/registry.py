"""File-based model registry (models/<name>/<version>/) and the hot-swappable ModelHolder."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import hashlib
import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np

from ml_serving.errors import InvalidArgument, NotReady
from ml_serving.scoring import features
from ml_serving.scoring.model import Model, ModelWeights, score

logger = logging.getLogger(__name__)

WEIGHTS_FILE: Final = "weights.npz"
"""Weights of a version: ``ModelWeights.to_arrays()`` as an uncompressed, pickle-free npz."""
CARD_FILE: Final = "card.json"
"""The model card of a version (see ``ml_serving.training.train`` for its sections)."""
PROMOTED_FILE: Final = "PROMOTED"
"""``models/<name>/PROMOTED`` holds the version that serves, as text."""
CARD_SCHEMA: Final = 1
"""Version of the model-card layout this module reads and writes."""
REFERENCE_ATOL: Final = 1e-6
"""How far a reference prediction may move before a version is refused."""

_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class RegistryError(Exception):
    """A registry operation failed: unknown model or version, or unreadable registry files."""


class InvalidModelError(RegistryError):
    """A model version exists but fails validation; it must not serve."""


def _check_name(kind: str, value: str) -> str:
    # Names become path components: refuse anything that could climb out of the root.
    if not _NAME_RE.fullmatch(value):
        raise RegistryError(f"invalid {kind} {value!r}: use letters, digits, '.', '_' or '-'")
    return value


def _version_key(version: str) -> tuple[int, int, str]:
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory and ``os.replace``: readers never see half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; registry files are meant to be readable by the serving user.
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dump_card(card: Mapping[str, Any]) -> bytes:
    """Serialise a card the one way the registry writes it (stable key order, trailing newline)."""
    return (json.dumps(card, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def write_weights(path: Path, weights: ModelWeights) -> None:
    """Write ``weights`` as an npz whose bytes depend on the values only (fixed zip timestamps)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, arr in sorted(weights.to_arrays().items()):
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w") as fh:
                np.lib.format.write_array(fh, np.array(arr, order="C"), allow_pickle=False)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_card_inputs(card: Mapping[str, Any], weights: ModelWeights) -> None:
    """The card's declared inputs must be exactly what ``features`` serves, with these weights."""
    inputs = card["inputs"]
    described = weights.normalization.describe()
    for group in features.Group:
        got = [(f["name"], f["transform"], f["default"]) for f in inputs[group.value]]
        want = [(f.name, f.transform.value, f.default) for f in features.specs(group)]
        if got != want:
            raise InvalidModelError(
                f"card {group.value} inputs {[g[0] for g in got]} do not match the serving "
                f"feature definition {[w[0] for w in want]} (names, transforms or defaults)"
            )
        for card_f, w_f in zip(inputs[group.value], described[group.value], strict=True):
            if (card_f["mean"], card_f["std"]) != (w_f["mean"], w_f["std"]):
                raise InvalidModelError(
                    f"card normalisation of {card_f['name']!r} differs from the weights file"
                )
    if list(inputs["design_columns"]) != list(features.DESIGN_COLUMNS):
        raise InvalidModelError(
            "card design_columns (crosses) do not match features.DESIGN_COLUMNS"
        )


def _check_reference_rows(model: Model) -> None:
    rows = model.card.get("reference_rows") or []
    if not rows:
        raise InvalidModelError("card has no reference_rows to check the weights against")
    for i, row in enumerate(rows):
        ctx: dict[str, float] = row["context"]
        cand: dict[str, float] = row["candidate"]
        try:
            # The serving entry point itself, so the check covers alignment and defaults too.
            got = score(
                model,
                context_feature_names=list(ctx),
                context_values=list(ctx.values()),
                candidate_feature_names=list(cand),
                candidate_ids=[f"reference-{i}"],
                candidate_values=[list(cand.values())],
                max_candidates=1,
            ).scores[0]
        except InvalidArgument as exc:
            raise InvalidModelError(f"reference row {i} is not a valid request: {exc}") from exc
        want = float(row["prediction"])
        if not abs(got - want) <= REFERENCE_ATOL:
            raise InvalidModelError(
                f"reference row {i}: weights predict {got:.9f}, card says {want:.9f} "
                f"(tolerance {REFERENCE_ATOL:g})"
            )


def load_version_dir(directory: Path, name: str, version: str) -> Model:
    """Load and fully validate one version directory; raise ``InvalidModelError`` if broken.

    Checks: both files present; the card parses, names this model and version, and declares the
    inputs ``features`` serves; the weights match the card's sha256, have the shapes ``features``
    implies and are finite; every reference row of the card is reproduced within 1e-6.
    """
    where = f"model {name!r} version {version!r}"
    card_path, weights_path = directory / CARD_FILE, directory / WEIGHTS_FILE
    for path in (card_path, weights_path):
        if not path.is_file():
            raise InvalidModelError(f"{where}: {path.name} is missing in {directory}")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
        if card.get("card_schema") != CARD_SCHEMA:
            raise InvalidModelError(f"unsupported card_schema {card.get('card_schema')!r}")
        if (card.get("model_name"), card.get("version")) != (name, version):
            raise InvalidModelError(
                f"card names {card.get('model_name')!r} version {card.get('version')!r}"
            )
        sha = _sha256(weights_path)
        if sha != card.get("weights_sha256"):
            raise InvalidModelError(f"{WEIGHTS_FILE} sha256 {sha[:12]}… does not match the card")
        if not zipfile.is_zipfile(weights_path):
            # np.load would take any other bytes for a pickle and say so: confusing.
            raise InvalidModelError(f"{WEIGHTS_FILE} is not an npz (zip) file")
        with np.load(weights_path, allow_pickle=False) as npz:
            weights = ModelWeights.from_arrays({k: npz[k] for k in npz.files})
        _check_card_inputs(card, weights)
        model = Model(name=name, version=version, card=card, weights=weights)
        _check_reference_rows(model)
    except InvalidModelError as exc:
        raise InvalidModelError(f"{where}: {exc}") from exc
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise InvalidModelError(f"{where}: {type(exc).__name__}: {exc}") from exc
    return model


class ModelRegistry:
    """Model versions on disk: ``<root>/<name>/<version>/{weights.npz,card.json}``.

    ``<root>/<name>/PROMOTED`` names the serving version. Versions are immutable once added;
    promotion only rewrites PROMOTED (atomically) and appends to the card's rollout history.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def model_names(self) -> list[str]:
        """Models that have a directory under the root, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and _NAME_RE.fullmatch(p.name)
        )

    def versions(self, name: str) -> list[str]:
        """Version directories of ``name`` (valid or not); numeric ones first, in number order."""
        base = self.root / _check_name("model name", name)
        if not base.is_dir():
            return []
        found = [p.name for p in base.iterdir() if p.is_dir() and _NAME_RE.fullmatch(p.name)]
        return sorted(found, key=_version_key)

    def load(self, name: str, version: str) -> Model:
        """Load and validate one version (see ``load_version_dir``)."""
        directory = self.root / _check_name("model name", name) / _check_name("version", version)
        if not directory.is_dir():
            raise RegistryError(f"model {name!r} has no version {version!r} under {self.root}")
        return load_version_dir(directory, name, version)

    def promoted_version(self, name: str) -> str:
        """The version named by ``<root>/<name>/PROMOTED``; ``RegistryError`` if there is none."""
        path = self.root / _check_name("model name", name) / PROMOTED_FILE
        try:
            version = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError as exc:
            raise RegistryError(f"model {name!r} has no promoted version ({path} missing)") from exc
        return _check_name("version", version)

    def promote(self, name: str, version: str, *, note: str = "") -> Model:
        """Validate ``version`` fully, then make it the served one; returns the loaded model.

        A version that fails validation raises and leaves PROMOTED untouched.
        """
        model = self.load(name, version)
        try:
            previous: str | None = self.promoted_version(name)
        except RegistryError:
            previous = None
        path = self.root / name / PROMOTED_FILE
        try:
            _atomic_write_bytes(path, f"{version}\n".encode())
            path = self.root / name / version / CARD_FILE
            card = json.loads(path.read_text(encoding="utf-8"))
            card.setdefault("rollout_history", []).append(
                {"event": "promoted", "at": _utc_now(), "previous_version": previous, "note": note}
            )
            _atomic_write_bytes(path, dump_card(card))
        except OSError as exc:
            # A failed write (a full disk, a file size limit) names no file: say which one.
            if exc.filename is None:
                exc.filename = str(path)
            raise
        logger.info("model %s: promoted version %s (was %s)", name, version, previous)
        return model

    def add_version(
        self,
        name: str,
        version: str,
        weights: ModelWeights,
        card: Mapping[str, Any],
        *,
        overwrite: bool = False,
    ) -> Path:
        """Write a new version: files go to a hidden temp dir, are validated, then renamed in.

        ``card`` gets ``weights_sha256`` added. An existing version is refused unless
        ``overwrite`` (meant for regenerating shipped artefacts, never for a served model).
        """
        base = self.root / _check_name("model name", name)
        final = base / _check_name("version", version)
        if final.exists() and not overwrite:
            raise RegistryError(f"model {name!r} version {version!r} already exists at {final}")
        base.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=base, prefix=f".{version}.", suffix=".tmp"))
        try:
            staging.chmod(0o755)  # mkdtemp makes 0700; the version dir must be world-readable
            write_weights(staging / WEIGHTS_FILE, weights)
            full_card = {**card, "weights_sha256": _sha256(staging / WEIGHTS_FILE)}
            (staging / CARD_FILE).write_bytes(dump_card(full_card))
            load_version_dir(staging, name, version)
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return final


class ModelSource(Protocol):
    """Where ``ModelHolder`` finds versions: ``ModelRegistry``, or ``MlflowRegistry`` (MLflow)."""

    def promoted_version(self, name: str) -> str:
        """The version that should serve ``name`` now; ``RegistryError`` if it cannot be told."""
        ...

    def load(self, name: str, version: str) -> Model:
        """One fully validated version; ``InvalidModelError`` if it must not serve."""
        ...


class RegistryUnavailable(RegistryError):
    """The registry could not be reached (network, server down): worth retrying with backoff."""


MAX_POLL_BACKOFF_S: Final = 30.0
"""Longest wait between polls while the registry is unreachable (doubling from the interval)."""


class PollHealth:
    """A registry poller's memory between polls: failures by reason (for metrics), the last
    failure (to warn once per distinct one), and the backoff while the registry is unreachable.
    Shared by the served model's holder and the shadow model's poller."""

    def __init__(self) -> None:
        self.failures: collections.Counter[str] = collections.Counter()
        self._last: tuple[str | None, str] | None = None
        self._unavailable_streak = 0

    def ok(self) -> bool:
        """A poll that worked; True when it ends a run of failures (worth a log line)."""
        recovered = self._last is not None
        self._last = None
        self._unavailable_streak = 0
        return recovered

    def failed(self, version: str | None, reason: str, *, unavailable: bool) -> int:
        """Count a failed poll; the log level to report it at (WARNING once per distinct
        failure, DEBUG while it repeats)."""
        self._unavailable_streak = self._unavailable_streak + 1 if unavailable else 0
        self.failures["unavailable" if unavailable else "refused"] += 1
        level = logging.DEBUG if self._last == (version, reason) else logging.WARNING
        self._last = (version, reason)
        return level

    def next_delay(self, interval_s: float, max_backoff_s: float = MAX_POLL_BACKOFF_S) -> float:
        """Seconds to the next poll: the interval, doubled per poll the registry was unreachable
        (up to ``max_backoff_s``, with jitter so that many replicas do not retry in step)."""
        if not self._unavailable_streak:
            return interval_s
        cap = max(interval_s, max_backoff_s)
        backoff = min(cap, interval_s * 2.0 ** min(self._unavailable_streak, 16))
        return backoff * random.uniform(0.8, 1.0)


class ModelHolder:
    """The model that serves ``name`` now, swapped without a restart when the promoted version
    changes.

    ``current`` is read once per request, which then finishes on that version even if a swap
    happens meanwhile. By default construction loads the promoted version and raises
    ``RegistryError`` if it cannot; ``lazy=True`` starts from ``initial`` (possibly nothing)
    and lets the first poll resolve the version, for registries that may be down at start.
    """

    def __init__(
        self,
        registry: ModelSource,
        name: str,
        *,
        lazy: bool = False,
        initial: Model | None = None,
        on_swap: Callable[[Model], None] | None = None,
    ) -> None:
        self.registry = registry
        self.name = name
        self._model: Model | None = (
            initial if lazy else registry.load(name, registry.promoted_version(name))
        )
        self._poll_first = lazy
        self._on_swap = on_swap
        self._poll = PollHealth()
        self.poll_failures = self._poll.failures
        self.next_delay = self._poll.next_delay
        """Failed polls by reason: ``unavailable`` (registry unreachable) or ``refused``."""
        self._loaded = asyncio.Event()
        if self._model is not None:
            self._loaded.set()

    @property
    def current(self) -> Model:
        """The serving version; ``NotReady`` (FAILED_PRECONDITION) while none has loaded yet."""
        model = self._model
        if model is None:
            raise NotReady(
                f"model {self.name!r} is not loaded yet (registry unreachable or version refused)"
            )
        return model

    @property
    def loaded(self) -> Model | None:
        """The serving version, or None before the first one loads (metrics, logs)."""
        return self._model

    async def wait_loaded(self) -> None:
        """Return once a version serves (at once when one already does)."""
        await self._loaded.wait()

    def refresh(self) -> bool:
        """Re-resolve the promoted version and swap to it if it loads and validates.

        Returns True when a swap happened. Any failure is logged as a WARNING naming the version
        and the reason (once per distinct failure), counted in ``poll_failures``, and the old
        version keeps serving.
        """
        version: str | None = None
        try:
            version = self.registry.promoted_version(self.name)
            if self._model is not None and version == self._model.version:
                self._ok()
                return False
            started = time.perf_counter()
            model = self.registry.load(self.name, version)
        except RegistryUnavailable as exc:
            self._warn(version, f"registry unreachable: {exc}", unavailable=True)
            return False
        except Exception as exc:  # whatever breaks, the old model keeps serving
            self._warn(version, f"{type(exc).__name__}: {exc}", unavailable=False)
            return False
        previous = self._model.version if self._model is not None else None
        self._model = model
        self._ok()
        if self._on_swap is not None:
            self._on_swap(model)
        logger.info(
            "model %s: now serving version %s (was %s; loaded in %.1f ms)",
            self.name,
            version,
            previous,
            (time.perf_counter() - started) * 1000,
        )
        return True

    def _ok(self) -> None:
        if self._poll.ok():
            logger.info("model %s: registry polling recovered", self.name)

    def _warn(self, version: str | None, reason: str, *, unavailable: bool) -> None:
        # Polling repeats the same failure every interval: warn once per distinct failure.
        logger.log(
            self._poll.failed(version, reason, unavailable=unavailable),
            "model %s: cannot switch to version %s, still serving version %s: %s",
            self.name,
            version if version is not None else "(unresolved)",
            self._model.version if self._model is not None else "(none)",
            reason,
        )

    async def watch(self, interval_s: float, max_backoff_s: float = MAX_POLL_BACKOFF_S) -> None:
        """Poll ``refresh`` until cancelled (its I/O in a thread): every ``interval_s`` seconds,
        backing off while the registry is unreachable; a lazy holder polls once at once."""
        delay = 0.0 if self._poll_first else interval_s
        while True:
            await asyncio.sleep(delay)
            await asyncio.to_thread(self.refresh)
            if self._model is not None:
                self._loaded.set()  # here, on the loop: asyncio.Event is not thread-safe
            delay = self.next_delay(interval_s, max_backoff_s)


if __name__ == "__main__":
    # The command line moved to ml_serving/scoring/cli.py (it needs shadow.py, which imports
    # this module): say where, rather than exit 0 having done nothing.
    print("error: run `python -m ml_serving.scoring` (list, promote, shadow)", file=sys.stderr)
    raise SystemExit(2)
