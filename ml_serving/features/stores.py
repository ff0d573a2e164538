"""Feast's sqlite and Redis online stores, read in their own format: one entity's row of a view
on the hot path (no Feast SDK, no retries), a whole view for the background caches."""

from __future__ import annotations

import asyncio
import collections
import logging
import sqlite3
import ssl
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import hiredis

from ml_serving.features import codec
from ml_serving.features.repo import RedisAddress, StoreConfig

logger = logging.getLogger(__name__)

Row = tuple[float | None, dict[str, bytes]]
"""One entity's row of one view: its event time (epoch seconds; None if the store keeps none)
and each stored field's raw bytes (a serialized Feast value)."""


class StoreError(Exception):
    """A lookup that got no answer; ``cause`` is the metrics label."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(detail)
        self.cause = cause


class OnlineStore(Protocol):
    """What the lookup policy needs of an online store."""

    async def read(
        self, view: str, join_key: str, entity: str, fields: Sequence[str], timeout_s: float
    ) -> Row | None:
        """The entity's row of ``view`` (None when the store has none), within ``timeout_s``;
        raises ``StoreError`` on a timeout or an unreachable store."""

    def scan(self, view: str, join_key: str, fields: Sequence[str]) -> dict[str, Row]:
        """Every entity's row of ``view`` (blocking: call it in a thread)."""

    async def connect(self) -> None:
        """Open what a lookup needs, bounded in time; failing quietly (lookups then default)."""

    async def close(self) -> None:
        """Release connections."""


def open_store(config: StoreConfig) -> OnlineStore:
    """The reader for ``config``'s online store (connections open lazily)."""
    if config.kind == "redis":
        assert config.redis is not None
        return RedisStore(config.project, config.redis)
    assert config.sqlite_path is not None
    return SqliteStore(config.project, config.sqlite_path)


def _epoch(value: object) -> float | None:
    """Feast's sqlite event_ts: epoch seconds (its adapter) or an ISO string (older writers)."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, bytes):
        value = value.decode()
    parsed = datetime.fromisoformat(str(value))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


class SqliteStore:
    """Feast's sqlite online store (the embedded default): table ``<project>_<view>`` with one
    row per (entity_key, feature_name). Read-only; a missing file is an unavailable store."""

    def __init__(self, project: str, path: Path) -> None:
        self.project = project
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._queries: dict[str, str] = {}

    def _connect(self) -> sqlite3.Connection:
        # Read-only and no busy wait: a locked or missing database is an answer at once.
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=0.0)

    async def read(
        self, view: str, join_key: str, entity: str, fields: Sequence[str], timeout_s: float
    ) -> Row | None:
        # A local file read by primary key (tens of microseconds): done inline, the budget
        # cannot be exceeded by waiting on a network.
        try:
            if self._conn is None:
                self._conn = self._connect()
            query = self._queries.get(view)
            if query is None:
                table = f'"{self.project}_{view}"'
                query = f"SELECT feature_name, value, event_ts FROM {table} WHERE entity_key = ?"
                self._queries[view] = query
            rows = self._conn.execute(query, (codec.entity_key(join_key, entity),)).fetchall()
        except sqlite3.Error as exc:
            self._conn = None
            raise StoreError("unavailable", f"sqlite online store {self.path}: {exc}") from None
        if not rows:
            return None
        wanted = set(fields)
        return _epoch(rows[0][2]), {name: value for name, value, _ in rows if name in wanted}

    def scan(self, view: str, join_key: str, fields: Sequence[str]) -> dict[str, Row]:
        wanted = set(fields)
        out: dict[str, Row] = {}
        try:
            conn = self._connect()
            try:
                cursor = conn.execute(
                    f'SELECT entity_key, feature_name, value, event_ts FROM "{self.project}_{view}"'
                )
                for key, name, value, ts in cursor:
                    entity = codec.entity_value(key, join_key)
                    if entity is None or name not in wanted:
                        continue
                    row = out.get(entity)
                    if row is None:
                        out[entity] = row = (_epoch(ts), {})
                    row[1][name] = value
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StoreError("unavailable", f"sqlite online store {self.path}: {exc}") from None
        return out

    async def connect(self) -> None:
        try:
            self._conn = self._conn or self._connect()
        except sqlite3.Error as exc:
            logger.warning("feature store: cannot open %s: %s", self.path, exc)

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# --- Redis: a pipelined RESP2 connection on the event loop ---------------------------------


_MAX_PENDING = 1024
"""Commands awaiting an answer on one connection past which it is given up as hung."""


def _command(*args: bytes) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


class _RespProtocol(asyncio.Protocol):
    """One Redis connection: commands are written at once and answered in order (pipelining),
    so one connection serves every concurrent lookup of the process without a pool."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending: collections.deque[asyncio.Future[object]] = collections.deque()
        self.reader = hiredis.Reader()  # the C parser redis-py uses too
        self.loop = asyncio.get_running_loop()
        self.closed = self.loop.create_future()
        self._outgoing: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, payload: bytes) -> asyncio.Future[object]:
        """Queue one command; the commands of one loop turn leave in one write (one syscall
        for all the lookups of the Score calls that turn handled)."""
        if len(self.pending) >= _MAX_PENDING:
            # A server that stopped answering (its TCP still open): drop the connection so the
            # queue of unanswered commands stays bounded; the next lookup reconnects.
            self._fail(StoreError("unavailable", "Redis stopped answering (queue full)"))
        future: asyncio.Future[object] = self.loop.create_future()
        if self.transport is None or self.transport.is_closing():
            future.set_exception(StoreError("unavailable", "Redis connection closed"))
            return future
        self.pending.append(future)
        if not self._outgoing:
            self.loop.call_soon(self._flush)
        self._outgoing.append(payload)
        return future

    def _flush(self) -> None:
        payload = b"".join(self._outgoing)
        self._outgoing.clear()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(payload)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        pending = self.pending
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self._fail(StoreError("malformed", f"Redis protocol error: {exc}"))
                return
            if reply is False:
                return
            if not pending:  # an answer nobody asked for: the connection is confused
                self._fail(StoreError("malformed", "unexpected reply from Redis"))
                return
            future = pending.popleft()
            if future.done():  # a lookup that timed out leaves its answer to be dropped
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(StoreError("unavailable", f"Redis error: {reply}"))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(StoreError("unavailable", f"Redis connection lost: {exc or 'closed'}"))

    def _fail(self, error: StoreError) -> None:
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(error)
        if not self.closed.done():
            self.closed.set_result(None)
        if self.transport is not None:
            self.transport.close()


class RedisStore:
    """Feast's Redis online store: one hash per entity (key: serialized entity key + project),
    fields ``mmh3("<view>:<feature>")`` and ``_ts:<view>``. The connection is made in the
    background; a lookup while there is none fails at once (the policy falls back)."""

    def __init__(self, project: str, address: RedisAddress) -> None:
        self.project = project
        self.address = address
        self._protocol: _RespProtocol | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._fields: dict[tuple[str, tuple[str, ...]], tuple[int, bytes]] = {}
        self.connect_timeout_s = 1.0
        self._connect_failing = False

    def _hash_fields(self, view: str, fields: Sequence[str]) -> list[bytes]:
        names = [codec.redis_field(view, f) for f in fields]
        names.append(codec.redis_timestamp_field(view))
        return names

    def _hmget_tail(self, view: str, fields: Sequence[str]) -> tuple[int, bytes]:
        """(argument count, the encoded field arguments) of a view's HMGET: the same bytes for
        every entity, built once."""
        key = (view, tuple(fields))
        tail = self._fields.get(key)
        if tail is None:
            names = self._hash_fields(view, fields)
            encoded = b"".join(b"$%d\r\n%s\r\n" % (len(n), n) for n in names)
            tail = (len(names) + 2, encoded)
            self._fields[key] = tail
        return tail

    async def read(
        self, view: str, join_key: str, entity: str, fields: Sequence[str], timeout_s: float
    ) -> Row | None:
        protocol = self._protocol
        if protocol is None or protocol.closed.done():
            self._protocol = None
            self._connect_in_background()
            raise StoreError("unavailable", "no Redis connection (connecting in the background)")
        count, tail = self._hmget_tail(view, fields)
        key = codec.redis_key(join_key, entity, self.project)
        future = protocol.send(
            b"*%d\r\n$5\r\nHMGET\r\n$%d\r\n%s\r\n%s" % (count, len(key), key, tail)
        )
        loop = asyncio.get_running_loop()
        timer = loop.call_later(timeout_s, _expire, future)
        try:
            reply = await future
        finally:
            timer.cancel()
        if not isinstance(reply, list) or len(reply) != count - 2:
            raise StoreError("malformed", "HMGET answered with something else")
        *values, ts = reply
        if ts is None and all(v is None for v in values):
            return None
        stamp = None
        if isinstance(ts, bytes):
            try:
                stamp = codec.decode_timestamp(ts)
            except codec.MalformedValue:
                stamp = None
        return stamp, {f: v for f, v in zip(fields, values, strict=False) if isinstance(v, bytes)}

    def _connect_in_background(self) -> None:
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.get_running_loop().create_task(
                self._connect(), name="redis-connect"
            )

    async def connect(self) -> None:
        if self._protocol is None or self._protocol.closed.done():
            self._connect_in_background()
            assert self._connecting is not None
            await asyncio.shield(self._connecting)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        address = self.address
        protocol: _RespProtocol | None = None
        ready = False
        try:
            _, made = await asyncio.wait_for(
                loop.create_connection(
                    _RespProtocol,
                    address.host,
                    address.port,
                    ssl=ssl.create_default_context() if address.ssl else None,
                ),
                self.connect_timeout_s,
            )
            protocol = made
            if address.password:
                await asyncio.wait_for(
                    made.send(_command(b"AUTH", address.password.encode())),
                    self.connect_timeout_s,
                )
            if address.db:
                await asyncio.wait_for(
                    made.send(_command(b"SELECT", str(address.db).encode())),
                    self.connect_timeout_s,
                )
            ready = True
        except (OSError, TimeoutError, StoreError) as exc:
            # Once per outage, not once per attempt (one every breaker period while it lasts).
            if not self._connect_failing:
                logger.warning(
                    "feature store: cannot connect to Redis at %s:%s: %s (retried in the "
                    "background; logged again once it has answered)",
                    address.host,
                    address.port,
                    exc,
                )
            self._connect_failing = True
        finally:
            if not ready and protocol is not None and protocol.transport is not None:
                protocol.transport.close()  # also when cancelled mid-handshake
        if ready:
            if self._connect_failing:
                logger.info(
                    "feature store: connected to Redis at %s:%s", address.host, address.port
                )
            self._connect_failing = False
            self._protocol = protocol

    def scan(self, view: str, join_key: str, fields: Sequence[str]) -> dict[str, Row]:
        import redis

        address = self.address
        client = redis.Redis(
            host=address.host,
            port=address.port,
            password=address.password,
            db=address.db,
            ssl=address.ssl,
            socket_timeout=5.0,
            socket_connect_timeout=self.connect_timeout_s,
        )
        names = self._hash_fields(view, fields)
        project = self.project.encode()
        pattern = _glob_escape(codec.entity_key_prefix(join_key)) + b"*" + _glob_escape(project)
        out: dict[str, Row] = {}
        try:
            keys = [k for k in client.scan_iter(match=pattern, count=1000) if k.endswith(project)]
            for start in range(0, len(keys), 500):
                batch = keys[start : start + 500]
                with client.pipeline(transaction=False) as pipe:
                    for key in batch:
                        pipe.hmget(key, names)
                    replies = pipe.execute()
                for key, reply in zip(batch, replies, strict=True):
                    entity = codec.entity_value(key[: -len(project)], join_key)
                    *values, ts = reply
                    if entity is None or all(v is None for v in values):
                        continue
                    stamp = None
                    if ts is not None:
                        try:
                            stamp = codec.decode_timestamp(ts)
                        except codec.MalformedValue:
                            stamp = None
                    out[entity] = (
                        stamp,
                        {f: v for f, v in zip(fields, values, strict=False) if v is not None},
                    )
        except redis.RedisError as exc:
            raise StoreError("unavailable", f"Redis scan of {view}: {exc}") from None
        finally:
            client.close()
        return out

    async def close(self) -> None:
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
            try:
                await self._connecting
            except asyncio.CancelledError:
                pass
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None


def _expire(future: asyncio.Future[object]) -> None:
    if not future.done():
        future.set_exception(StoreError("timeout", "the feature store did not answer in budget"))


def _glob_escape(data: bytes) -> bytes:
    out = bytearray()
    for byte in data:
        if byte in b"*?[]\\":
            out += b"\\"
        out.append(byte)
    return bytes(out)
