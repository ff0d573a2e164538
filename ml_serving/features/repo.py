"""Where the online store is: a Feast repository's feature_store.yaml, read without Feast."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from ml_serving.features.codec import ENTITY_KEY_SERIALIZATION_VERSION

_ENV: Final = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class StoreConfigError(ValueError):
    """A feature_store.yaml this reader cannot serve from (the message says what to change)."""


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """A Redis server from Feast's ``connection_string`` (``host:port,password=..,ssl=true``)."""

    host: str
    port: int
    password: str | None = None
    db: int = 0
    ssl: bool = False

    @classmethod
    def parse(cls, connection_string: str) -> RedisAddress:
        """Parse Feast's single-node connection string; cluster and sentinel are refused."""
        parts = [p.strip() for p in connection_string.split(",") if p.strip()]
        if not parts:
            raise StoreConfigError("online_store.connection_string is empty")
        host, _, port = parts[0].rpartition(":")
        if not host or not port.isdigit():
            raise StoreConfigError("online_store.connection_string must start with host:port")
        options: dict[str, str] = {}
        for part in parts[1:]:
            key, sep, value = part.partition("=")
            if not sep:
                raise StoreConfigError(f"online_store.connection_string: {key!r} has no value")
            options[key.strip().lower()] = value.strip()
        unknown = set(options) - {"password", "db", "ssl"}
        if unknown:
            raise StoreConfigError(
                f"online_store.connection_string: unsupported option(s) {sorted(unknown)}"
            )
        return cls(
            host=host,
            port=int(port),
            password=options.get("password"),
            db=int(options.get("db", "0")),
            ssl=options.get("ssl", "false").lower() == "true",
        )


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """The online store of one Feast repository: project, kind and where it is."""

    project: str
    kind: str
    """``sqlite`` or ``redis``."""
    sqlite_path: Path | None = None
    redis: RedisAddress | None = None

    @classmethod
    def load(cls, repo: Path, yaml_path: Path | None = None) -> StoreConfig:
        """Read ``yaml_path`` (default ``repo/feature_store.yaml``); ``${VAR}`` is replaced by
        the environment variable, as Feast does, so a secret is named, never written."""
        path = yaml_path or repo / "feature_store.yaml"
        try:
            text = path.read_text()
        except OSError as exc:
            raise StoreConfigError(f"cannot read {path}: {exc.strerror}") from None
        raw: Any = yaml.safe_load(_ENV.sub(lambda m: os.environ.get(m.group(1), ""), text))
        if not isinstance(raw, dict) or not isinstance(raw.get("project"), str):
            raise StoreConfigError(f"{path}: no project")
        version = raw.get("entity_key_serialization_version", ENTITY_KEY_SERIALIZATION_VERSION)
        if version != ENTITY_KEY_SERIALIZATION_VERSION:
            raise StoreConfigError(
                f"{path}: entity_key_serialization_version must be "
                f"{ENTITY_KEY_SERIALIZATION_VERSION}, got {version}"
            )
        online = raw.get("online_store") or {"type": "sqlite"}
        if isinstance(online, str):
            online = {"type": online}
        kind = online.get("type", "sqlite")
        if kind == "sqlite":
            db = Path(online.get("path", "data/online_store.db"))
            return cls(raw["project"], "sqlite", sqlite_path=db if db.is_absolute() else repo / db)
        if kind == "redis":
            if online.get("redis_type", "redis") != "redis":
                raise StoreConfigError(f"{path}: only redis_type: redis is supported")
            address = RedisAddress.parse(str(online.get("connection_string", "localhost:6379")))
            return cls(raw["project"], "redis", redis=address)
        raise StoreConfigError(
            f"{path}: online_store type {kind!r} is not supported (sqlite, redis)"
        )
