"""A real redis-server on loopback and small Feast repositories filled by Feast's own SDK
(sqlite or Redis online store), for the feature-store tests and the bench."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from ml_serving.scoring import features
from ml_serving.training import feature_store, simulator
from tests.support.server_process import free_port

SMALL = simulator.SimulatorConfig(n_users=60, n_tips=40, candidates_per_request=5)
"""Enough users and tips for every value type, null included; Feast fills it in seconds."""
SEED = 7


class RedisServer:
    """Debian's redis-server (installed by `make system-deps`) on 127.0.0.1, no persistence."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def connection_string(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `make system-deps`")
        self.popen = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=10)
        self.popen = None


def redis_yaml(connection_string: str, project: str = "tips") -> str:
    """A feature_store.yaml for the shipped definitions on a Redis online store."""
    return (
        f"project: {project}\n"
        "provider: local\n"
        "registry: data/registry.db\n"
        "online_store:\n"
        "  type: redis\n"
        f"  connection_string: {connection_string}\n"
        "offline_store:\n"
        "  type: file\n"
        "entity_key_serialization_version: 3\n"
        "auth:\n"
        "  type: no_auth\n"
    )


def small_repo(directory: Path, *, redis: RedisServer | None = None) -> Path:
    """The shipped definitions in `directory`, SMALL event tables (SEED), applied and
    materialized by Feast into sqlite (default) or `redis`."""
    repo = feature_store.copy_definitions(feature_store.SHIPPED_REPO, directory)
    if redis is not None:
        (repo / "feature_store.yaml").write_text(redis_yaml(redis.connection_string))
    feature_store.write_events(repo, SEED, SMALL)
    feature_store.apply(repo)
    feature_store.materialize(repo)
    return repo


def latest(frame: pd.DataFrame, key: str) -> pd.DataFrame:
    """Each entity's latest snapshot (what materialize puts online), indexed by `key`."""
    return frame.sort_values("event_timestamp").groupby(key).tail(1).set_index(key)


def every_value(
    user: pd.Series, tips: pd.DataFrame, hour: Mapping[str, float]
) -> tuple[dict[str, float], list[float]]:
    """What a caller without a feature store sends for `user` and `tips` (rows of `latest`):
    the context values by name (a stored null left out: the feature's default) and every
    candidate's values in `features.CANDIDATE_FEATURE_NAMES` order, row-major."""
    context = dict(hour)
    for spec in features.CONTEXT_FEATURES:
        if spec.name not in hour and not pd.isna(user[spec.name]):
            context[spec.name] = float(user[spec.name])
    values: list[float] = []
    for _, tip in tips.iterrows():
        for spec in features.CANDIDATE_FEATURES:
            name = spec.name
            if name.startswith("category_"):
                values.append(float(tip["category"] == name.removeprefix("category_")))
                continue
            raw = user[f"affinity_{tip['category']}"] if name == "topic_affinity" else tip[name]
            if pd.isna(raw):
                assert spec.default is not None
                values.append(spec.default)
            else:
                values.append(float(raw))
    return context, values
