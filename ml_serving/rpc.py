"""The one layer every RPC passes through: request id, admission, error mapping, access log."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from ml_serving import errors
from ml_serving.logs import request_id_var

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("ml_serving.access")

REQUEST_ID_KEY = "x-request-id"
_MAX_REQUEST_ID_LEN = 128

Req = TypeVar("Req")
Resp = TypeVar("Resp")
S = TypeVar("S", bound="HasGate")
P = ParamSpec("P")

_annotations: ContextVar[dict[str, Any] | None] = ContextVar("rpc_annotations", default=None)


def annotate(**fields: Any) -> None:
    """Add fields (prompt_version, model, ...) to the current RPC's access-log line."""
    current = _annotations.get()
    if current is not None:
        current.update(fields)


@dataclass
class Gate:
    """Admission control shared by every InferenceService RPC: a concurrency cap and draining."""

    limit: int
    in_flight: int = 0
    draining: bool = False
    shed: int = 0
    observers: list[Callable[[str, str, float, dict[str, Any]], None]] = field(default_factory=list)

    def admit(self) -> None:
        """Take a slot or raise: UNAVAILABLE while draining, RESOURCE_EXHAUSTED when full."""
        if self.draining:
            raise errors.Draining("server is draining; retry on another replica")
        if self.in_flight >= self.limit:
            self.shed += 1
            raise errors.Overloaded(
                f"server is at its concurrency limit ({self.limit}); retry with backoff"
            )
        self.in_flight += 1


def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and value:
            # Caller-chosen ids end up in logs: keep them short and printable.
            clean = "".join(ch for ch in value[:_MAX_REQUEST_ID_LEN] if ch.isprintable())
            if clean:
                return clean
    return uuid.uuid4().hex


def _status_details(exc: errors.ServingError) -> tuple[tuple[str, bytes], ...]:
    """google.rpc.BadRequest details for invalid arguments, so clients can read the field."""
    if not isinstance(exc, errors.InvalidArgument):
        return ()
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field=exc.field, description=exc.description
            )
        ]
    )
    detail = any_pb2.Any()
    detail.Pack(bad_request)
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=str(exc), details=[detail])
    return (("grpc-status-details-bin", status.SerializeToString()),)


@contextmanager
def _call(
    gate: Gate, method: str, context: grpc.aio.ServicerContext[Any, Any]
) -> Iterator[dict[str, Any]]:
    """Set up one RPC: request id in and out, admission, and the access-log line at the end."""
    request_id = _request_id(context)
    id_token = request_id_var.set(request_id)
    notes: dict[str, Any] = {}
    notes_token = _annotations.set(notes)
    context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
    started = time.perf_counter()
    code = "OK"
    admitted = False
    try:
        gate.admit()
        admitted = True
        yield notes
    except BaseException as exc:
        code = _code_name(exc)
        raise
    finally:
        if admitted:
            gate.in_flight -= 1
        elapsed = time.perf_counter() - started
        access_logger.info(
            "rpc %s %s",
            method,
            code,
            extra={"method": method, "code": code, "duration_ms": round(elapsed * 1e3, 3), **notes},
        )
        for observe in gate.observers:
            observe(method, code, elapsed, notes)
        _annotations.reset(notes_token)
        request_id_var.reset(id_token)


def _code_name(exc: BaseException) -> str:
    if isinstance(exc, errors.ServingError):
        return exc.code.name
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    if isinstance(exc, _Aborted):
        return exc.code_name
    return "INTERNAL"


class _Aborted(Exception):
    """Raised inside _call's block to carry the status of an abort to the access log."""

    def __init__(self, code_name: str) -> None:
        super().__init__(code_name)
        self.code_name = code_name


def _status_details_for(exc: BaseException) -> tuple[tuple[str, bytes], ...]:
    return _status_details(exc) if isinstance(exc, errors.ServingError) else ()


class HasGate(Protocol):
    """A servicer whose RPCs share one admission Gate."""

    gate: Gate


def unary(
    method: str,
) -> Callable[
    [Callable[Concatenate[S, Req, grpc.aio.ServicerContext[Req, Resp], P], Awaitable[Resp]]],
    Callable[Concatenate[S, Req, grpc.aio.ServicerContext[Req, Resp], P], Awaitable[Resp]],
]:
    """Wrap a unary handler: admission, request id, error mapping and one access-log line."""

    def decorate(
        handler: Callable[
            Concatenate[S, Req, grpc.aio.ServicerContext[Req, Resp], P], Awaitable[Resp]
        ],
    ) -> Callable[Concatenate[S, Req, grpc.aio.ServicerContext[Req, Resp], P], Awaitable[Resp]]:
        @functools.wraps(handler)
        async def wrapper(
            self: S,
            request: Req,
            context: grpc.aio.ServicerContext[Req, Resp],
            *args: P.args,
            **kwargs: P.kwargs,
        ) -> Resp:
            failure: BaseException | None = None
            try:
                with _call(self.gate, method, context):
                    try:
                        return await handler(self, request, context, *args, **kwargs)
                    except (errors.ServingError, asyncio.CancelledError):
                        raise
                    except Exception as exc:
                        logger.error("unhandled error in %s", method, exc_info=exc)
                        raise _Aborted("INTERNAL") from exc
            except errors.ServingError as exc:
                failure = exc
            except _Aborted:
                failure = RuntimeError("hidden")
            await _abort(context, failure)
            raise AssertionError("unreachable: abort raises")  # pragma: no cover

        return wrapper

    return decorate


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
    """End the RPC with the status for exc; anything not a ServingError is a fixed INTERNAL."""
    if isinstance(exc, errors.ServingError):
        code, details = exc.code, str(exc)
    else:
        code, details = grpc.StatusCode.INTERNAL, errors.INTERNAL_MESSAGE
    trailing = ((REQUEST_ID_KEY, request_id_var.get()), *_status_details_for(exc))
    await context.abort(code, details, trailing_metadata=trailing)


def server_streaming(
    method: str,
) -> Callable[
    [Callable[Concatenate[S, Req, grpc.aio.ServicerContext[Req, Resp], P], AsyncIterator[Resp]]],
    Callable[Concatenate[S, Req, grpc.aio.ServicerContext[Req, Resp], P], AsyncIterator[Resp]],
]:
    """Wrap a server-streaming handler the same way as `unary`."""

    def decorate(
        handler: Callable[
            Concatenate[S, Req, grpc.aio.ServicerContext[Req, Resp], P], AsyncIterator[Resp]
        ],
    ) -> Callable[Concatenate[S, Req, grpc.aio.ServicerContext[Req, Resp], P], AsyncIterator[Resp]]:
        @functools.wraps(handler)
        async def wrapper(
            self: S,
            request: Req,
            context: grpc.aio.ServicerContext[Req, Resp],
            *args: P.args,
            **kwargs: P.kwargs,
        ) -> AsyncIterator[Resp]:
            failure: BaseException | None = None
            try:
                with _call(self.gate, method, context):
                    try:
                        async for message in handler(self, request, context, *args, **kwargs):
                            yield message
                        return
                    except (errors.ServingError, asyncio.CancelledError, GeneratorExit):
                        raise
                    except Exception as exc:
                        logger.error("unhandled error in %s", method, exc_info=exc)
                        raise _Aborted("INTERNAL") from exc
            except errors.ServingError as exc:
                failure = exc
            except _Aborted:
                failure = RuntimeError("hidden")
            await _abort(context, failure)

        return wrapper

    return decorate
