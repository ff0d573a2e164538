"""The one layer every RPC passes through: request id, auth, admission, errors, access log, metrics.

Every InferenceService method is registered here (`add_service`), from the generated service
descriptor: a method the layer does not wrap, or wraps with the wrong cardinality, stops start-up.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from random import random
from typing import Any, Concatenate, Final, ParamSpec, Protocol, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from pydantic import SecretStr

from ml_serving import errors
from ml_serving._proto.mlserving.v1 import inference_service_pb2 as pb
from ml_serving.api import security
from ml_serving.generation.context import MAX_ID_CHARS
from ml_serving.observability import tracing
from ml_serving.observability.logs import FieldsLogger, access_notes_var, request_id_var

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("ml_serving.access")
_access_log = FieldsLogger(access_logger)

# The proto file holds one service: its descriptor names it, its methods and their cardinality.
(SERVICE_DESCRIPTOR,) = pb.DESCRIPTOR.services_by_name.values()
SERVICE: Final = SERVICE_DESCRIPTOR.full_name
"""'mlserving.v1.InferenceService': method paths, metrics labels, the health name probes ask for."""


def _cardinality(method: MethodDescriptor) -> str:
    """The grpc_type label of the standard gRPC metrics: unary, client_stream, server_stream,
    bidi_stream."""
    if method.client_streaming:
        return "bidi_stream" if method.server_streaming else "client_stream"
    return "server_stream" if method.server_streaming else "unary"


METHOD_TYPES: Final = {m.name: _cardinality(m) for m in SERVICE_DESCRIPTOR.methods}
"""{method name: grpc_type} for every InferenceService method, from the descriptor."""
_WRAPPED_AS = "__rpc_layer__"
"""Attribute the layer's wrappers carry: the grpc_type they implement."""
REQUEST_ID_KEY = "x-request-id"
ALWAYS_LOGGED: Final = frozenset({"Generate", "GenerateStream"})
"""Methods whose every call writes an access-log line; OK calls of the others are sampled
(`Gate.access_sample`), as Envoy and Istio sample theirs. A non-OK call is always logged."""
_MAX_REQUEST_ID_LEN = MAX_ID_CHARS
# Status messages ride in the grpc-message header (percent-encoded, so up to 9 bytes per
# character) and clients refuse metadata over 16 KiB: a longer message would turn the status
# into a client-side RESOURCE_EXHAUSTED. Domain messages stay far below this; it is a backstop.
_MAX_DETAILS_CHARS = 512

Req = TypeVar("Req")
Resp = TypeVar("Resp")
S = TypeVar("S", bound="HasGate")
P = ParamSpec("P")


class RpcObserver(Protocol):
    """Told about every InferenceService RPC (metrics)."""

    def rpc_started(self, method: str) -> None: ...

    def rpc_finished(
        self, method: str, code: str, seconds: float, notes: Mapping[str, Any]
    ) -> None: ...


@dataclass
class Gate:
    """Admission control shared by every InferenceService RPC: a concurrency cap and draining."""

    limit: int
    in_flight: int = 0
    draining: bool = False
    shed: int = 0
    observers: list[RpcObserver] = field(default_factory=list)
    auth_token: SecretStr | None = None
    """Bearer token every call must carry (security.check_bearer); None turns auth off."""
    stall_timeout_s: float = 30.0
    """A stream whose client has not taken a message for this long is ended (`watch_stalls`)."""
    stalled: int = 0
    """Streams ended because their client stopped reading."""
    last_arrival: float = 0.0
    """perf_counter() when the latest call reached the layer (a drain waits for quiet)."""
    arrivals: int = 0
    """Calls that reached the layer (a drain counts those after its signal)."""
    cut_at: float | None = None
    """time.monotonic() when a drain's grace runs out and grpc cancels what is still open:
    its clients see UNAVAILABLE, so a call cancelled from then on is logged as that."""
    streams: set[_StreamWrites] = field(default_factory=set)
    """The server-streaming calls in progress, for `watch_stalls`."""
    access_sample: float = 1.0
    """Share of the OK calls of methods not in ALWAYS_LOGGED that write an access-log line
    (Settings.access_log_sample); the metrics count every call whatever it is."""

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


class _StreamWrites:
    """When a stream's pending write began (None when none is pending), and the task to end."""

    __slots__ = ("since", "task", "stalled")

    def __init__(self, task: asyncio.Task[Any] | None) -> None:
        self.since: float | None = None
        self.task = task
        self.stalled = False


async def watch_stalls(gate: Gate) -> None:
    """End the streams whose client stopped reading (flow-control window at zero): each held a
    concurrency slot, and an upstream call, until the connection aged out (330 s by default).

    One task for every stream instead of a timer per message (a timeout per write costs more
    than the write): it looks at each stream's pending write every quarter of the timeout.
    """
    while True:
        await asyncio.sleep(gate.stall_timeout_s / 4)
        now = time.monotonic()
        for writes in list(gate.streams):
            since = writes.since
            if since is not None and now - since > gate.stall_timeout_s and not writes.stalled:
                writes.stalled = True
                gate.stalled += 1
                if writes.task is not None:
                    writes.task.cancel()


class _RequestIds:
    """Ids for calls that bring none: 32 hex digits, a random per-process prefix and a counter.

    Unique across processes and restarts like a uuid4, at a tenth of its cost (no syscall).
    """

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter) & 0xFFFFFFFFFFFFFFFF:016x}"


_request_ids = _RequestIds()


def _request_id(metadata: Sequence[tuple[str, Any]]) -> tuple[str, int, bool]:
    """The call's request id, the length of the caller's when it was over the bound on ids
    (0 otherwise: such a call gets a generated id and is refused, INVALID_ARGUMENT), and
    whether the caller sent one (it then always comes back in the trailers)."""
    for key, value in metadata:
        if key == REQUEST_ID_KEY and isinstance(value, str) and value:
            # Caller-chosen ids go to logs and back out in the trailers, where grpc refuses any
            # value that is not printable ASCII (the whole call then ends INTERNAL, after the
            # work is done): keep them printable ASCII only.
            if not (value.isascii() and value.isprintable()):
                value = "".join(ch for ch in value if ch.isascii() and ch.isprintable())
            if len(value) > _MAX_REQUEST_ID_LEN:
                # Cut short, it would correlate this call with someone else's.
                return _request_ids.next(), len(value), True
            if value:
                return value, 0, True
    return _request_ids.next(), 0, False


@dataclass(frozen=True)
class TooLarge:
    """A per-method request size bound, and why it holds (for the INVALID_ARGUMENT message)."""

    limit: int
    why: str
    """e.g. "a Score request of at most 1000 candidates"."""

    def reason(self, size: int) -> str:
        return f"{size} bytes is more than {self.why} can take ({self.limit} bytes)"


class MalformedRequest:
    """Stands in for request bytes that did not parse (see `lenient`); the RPC layer answers it
    with INVALID_ARGUMENT after authentication and admission, like any other bad request."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def lenient(
    parse: Callable[[bytes], Req], type_name: str, max_bytes: TooLarge | None = None
) -> Callable[[bytes], Req]:
    """A request deserializer that never raises: undecodable bytes become a MalformedRequest.

    gRPC's own handling of a deserializer error is UNKNOWN plus an ERROR traceback per call,
    before any of this layer runs (no auth, request id, access log or metrics). With
    `max_bytes`, a request larger than any valid one is refused unparsed: before
    authentication, it costs neither parse time nor memory.
    """

    def parse_or_flag(raw: bytes) -> Req:
        if max_bytes is not None and len(raw) > max_bytes.limit:
            return MalformedRequest(max_bytes.reason(len(raw)))  # type: ignore[return-value]
        try:
            return parse(raw)
        except DecodeError as exc:
            reason = str(exc).rpartition(": ")[2][:80]
            return MalformedRequest(f"not a valid {type_name} message ({reason})")  # type: ignore[return-value]

    return parse_or_flag


async def _aclose(stream: object) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


def _clip(message: str) -> str:
    if len(message) <= _MAX_DETAILS_CHARS:
        return message
    return message[: _MAX_DETAILS_CHARS - 3] + "..."


def _status_details(exc: errors.ServingError) -> tuple[tuple[str, bytes], ...]:
    """google.rpc.BadRequest details for invalid arguments, so clients can read the field."""
    if not isinstance(exc, errors.InvalidArgument):
        return ()
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field=exc.field, description=_clip(exc.description)
            )
        ]
    )
    detail = any_pb2.Any()
    detail.Pack(bad_request)
    status = status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT, message=_clip(str(exc)), details=[detail]
    )
    # grpcio-status packs it under the key its clients read (rpc_status.from_call).
    return tuple(rpc_status.to_status(status).trailing_metadata)


class _Call:
    """One RPC's bookkeeping: request id in and out, its admission slot, the access-log line."""

    __slots__ = (
        "gate",
        "method",
        "context",
        "metadata",
        "request_id",
        "_long_id",
        "notes",
        "admitted",
        "started",
        "logged",
        "_tokens",
        "_span",
    )

    def __init__(
        self,
        gate: Gate,
        method: str,
        path: str,
        always_logged: bool,
        context: grpc.aio.ServicerContext[Any, Any],
    ):
        self.gate = gate
        self.method = method
        self.context = context
        # Read once: request id, tracing and the bearer check all look at it.
        self.metadata: Sequence[tuple[str, Any]] = tuple(context.invocation_metadata() or ())
        self.request_id, self._long_id, sent = _request_id(self.metadata)
        self.notes: dict[str, Any] = {}
        self.admitted = False
        self.started = gate.last_arrival = time.perf_counter()
        gate.arrivals += 1
        # Drawn now, so that the trailers can say so: whether an OK end writes its line.
        sample = gate.access_sample
        self.logged = always_logged or sample >= 1.0 or (sample > 0.0 and random() < sample)
        self._tokens = (request_id_var.set(self.request_id), access_notes_var.set(self.notes))
        self._span = tracing.rpc_span(path, self.metadata) if tracing.enabled else None
        if sent or self.logged:
            # The id comes back when the caller chose it, or when a line carries it; a failure
            # sends it with its status (`fail`). A generated id no line holds would only cost
            # grpc a trailer on each sampled-out call.
            context.set_trailing_metadata(((REQUEST_ID_KEY, self.request_id),))
        for observer in gate.observers:
            observer.rpc_started(method)

    def admit(self, request: object) -> None:
        # Credentials first: an unauthenticated caller never takes (or is counted against) a slot.
        if self.gate.auth_token is not None:
            security.check_bearer(self.metadata, self.gate.auth_token)
        self.gate.admit()
        self.admitted = True
        if self._long_id:
            raise errors.InvalidArgument(
                REQUEST_ID_KEY,
                f"too long: {self._long_id} characters, at most {_MAX_REQUEST_ID_LEN}",
            )
        if isinstance(request, MalformedRequest):
            raise errors.InvalidArgument("request", request.reason)

    def cancelled_code(self) -> str:
        """The status a cancelled call ended with, as its client saw it: UNAVAILABLE once a
        drain's grace has run out (grpc cancels every call then, and tells the clients
        UNAVAILABLE "Cancelling all calls"), else CANCELLED (the client went away)."""
        cut_at = self.gate.cut_at
        if cut_at is not None and time.monotonic() >= cut_at:
            return "UNAVAILABLE"
        return "CANCELLED"

    def finish(self, code: str) -> None:
        """Release the slot and write the access-log line (exactly once per RPC)."""
        if self.admitted:
            self.gate.in_flight -= 1
            self.admitted = False
        elapsed = time.perf_counter() - self.started
        if self.logged or code != "OK":
            _access_log.log(
                f"rpc {self.method} {code}",
                {
                    "request_id": self.request_id,
                    "method": self.method,
                    "code": code,
                    "duration_ms": round(elapsed * 1e3, 3),
                    **self.notes,
                },
            )
        for observer in self.gate.observers:
            observer.rpc_finished(self.method, code, elapsed, self.notes)
        if self._span is not None:
            self._span.end(code, self.notes)
        try:
            access_notes_var.reset(self._tokens[1])
            request_id_var.reset(self._tokens[0])
        except ValueError:
            # A stream finalised after a cancel runs here in another Context, where these
            # tokens cannot be reset (nor need to be: the call's own Context is gone).
            pass

    async def fail(self, exc: BaseException) -> None:
        """End the RPC with the status for exc; anything not a ServingError is a fixed INTERNAL
        whose traceback goes to the log only."""
        trailing: tuple[tuple[str, str | bytes], ...] = ((REQUEST_ID_KEY, self.request_id),)
        if isinstance(exc, errors.ServingError):
            code, details = exc.code, _clip(str(exc))
            trailing += _status_details(exc)
        else:
            logger.error("unhandled error in %s", self.method, exc_info=exc)
            code, details = grpc.StatusCode.INTERNAL, errors.INTERNAL_MESSAGE
        self.finish(code.name)
        await self.context.abort(code, details, trailing_metadata=trailing)


class HasGate(Protocol):
    """A servicer whose RPCs share one admission Gate."""

    gate: Gate


UnaryHandler = Callable[
    Concatenate[S, Req, grpc.aio.ServicerContext[Req, Resp], P], Awaitable[Resp]
]
StreamHandler = Callable[
    Concatenate[S, Req, grpc.aio.ServicerContext[Req, Resp], P], AsyncIterator[Resp]
]


def unary(handler: UnaryHandler[S, Req, Resp, P]) -> UnaryHandler[S, Req, Resp, P]:
    """Wrap a unary handler, named as its RPC: auth, admission, request id, error mapping, one
    access-log line and the metrics."""
    method = handler.__name__
    path = f"/{SERVICE}/{method}"
    always_logged = method in ALWAYS_LOGGED

    @functools.wraps(handler)
    async def wrapper(
        self: S,
        request: Req,
        context: grpc.aio.ServicerContext[Req, Resp],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Resp:
        call = _Call(self.gate, method, path, always_logged, context)
        try:
            call.admit(request)
            response = await handler(self, request, context, *args, **kwargs)
        except asyncio.CancelledError:
            call.finish(call.cancelled_code())
            raise
        except Exception as exc:
            await call.fail(exc)
            raise AssertionError("unreachable: abort raises") from exc  # pragma: no cover
        call.finish("OK")
        return response

    setattr(wrapper, _WRAPPED_AS, "unary")  # noqa: B010 - read by add_service
    return wrapper  # type: ignore[return-value]  # functools.wraps loses the exact type


def server_streaming(handler: StreamHandler[S, Req, Resp, P]) -> StreamHandler[S, Req, Resp, P]:
    """Wrap a server-streaming handler, named as its RPC, the same way as `unary`; the wrapper
    writes each message itself, so a client that stops reading is noticed (`watch_stalls`)."""
    method = handler.__name__
    path = f"/{SERVICE}/{method}"
    always_logged = method in ALWAYS_LOGGED

    @functools.wraps(handler)
    async def wrapper(
        self: S,
        request: Req,
        context: grpc.aio.ServicerContext[Req, Resp],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> None:
        call = _Call(self.gate, method, path, always_logged, context)
        writes = _StreamWrites(asyncio.current_task())
        streams = self.gate.streams
        stream = handler(self, request, context, *args, **kwargs)
        try:
            call.admit(request)
            streams.add(writes)
            async for message in stream:
                writes.since = time.monotonic()
                await context.write(message)
                writes.since = None
        except asyncio.CancelledError:
            if not writes.stalled:
                call.finish(call.cancelled_code())
                raise
            # Ended by watch_stalls: the client cannot take a status either (its window is
            # shut); grpc resets the stream when the connection ages out. Raised on, as any
            # cancellation: returning made grpc send a status behind the write still pending,
            # which it refused and logged at ERROR (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS).
            call.notes["stalled_s"] = self.gate.stall_timeout_s
            call.finish("CANCELLED")
            raise
        except Exception as exc:
            await call.fail(exc)
            return
        finally:
            streams.discard(writes)
            # Close the handler's stream (and its upstream call) now, not at GC.
            await _aclose(stream)
        call.finish("OK")

    setattr(wrapper, _WRAPPED_AS, "server_stream")  # noqa: B010 - read by add_service
    return wrapper  # type: ignore[return-value]  # writes itself: grpc awaits it, no generator


class UnknownMethods(grpc.GenericRpcHandler):
    """Answers a method no service here has, as grpc would (UNIMPLEMENTED), with a request id
    in the trailers and an access-log line: grpc's own answer carried neither. Registered last,
    after every service's handler; any cardinality (the request is never read). Not in the
    per-method metrics: a client choosing paths must not choose their labels."""

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        path = str(getattr(handler_call_details, "method", "") or "")[: _MAX_DETAILS_CHARS // 2]
        return grpc.stream_stream_rpc_method_handler(functools.partial(_unimplemented, path))


async def _unimplemented(
    path: str, _requests: object, context: grpc.aio.ServicerContext[Any, Any]
) -> None:
    request_id, _, _ = _request_id(tuple(context.invocation_metadata() or ()))
    _access_log.log(
        "rpc (unknown method) UNIMPLEMENTED",
        {"request_id": request_id, "method": path, "code": "UNIMPLEMENTED", "duration_ms": 0.0},
    )
    await context.abort(
        grpc.StatusCode.UNIMPLEMENTED,
        f"unknown method {path}",
        trailing_metadata=((REQUEST_ID_KEY, request_id),),
    )


_METHOD_HANDLERS: Final = {
    "unary": grpc.unary_unary_rpc_method_handler,
    "server_stream": grpc.unary_stream_rpc_method_handler,
    "client_stream": grpc.stream_unary_rpc_method_handler,
    "bidi_stream": grpc.stream_stream_rpc_method_handler,
}


def add_service(
    servicer: HasGate, server: grpc.aio.Server, size_bounds: Mapping[str, TooLarge] | None = None
) -> None:
    """Register every InferenceService method of `servicer` on `server`, each as its descriptor
    says (what the generated add_InferenceServiceServicer_to_server does), with request parsing
    that never raises (`lenient`) and refuses a request over its method's `size_bounds`.

    Raises TypeError, stopping start-up, when a method is not wrapped by this layer (`unary` or
    `server_streaming`) or is wrapped with another cardinality than the proto's.
    """
    handlers = {}
    for method in SERVICE_DESCRIPTOR.methods:
        implementation = getattr(servicer, method.name, None)
        wrapped_as = getattr(implementation, _WRAPPED_AS, None)  # None: not wrapped
        expected = METHOD_TYPES[method.name]
        if implementation is None or wrapped_as is None:
            raise TypeError(
                f"{SERVICE}.{method.name} is not wrapped by the per-RPC layer: decorate it with "
                f"rpc.{'unary' if expected == 'unary' else 'server_streaming'}"
            )
        if wrapped_as != expected:
            raise TypeError(
                f"{SERVICE}.{method.name} is a {expected} RPC but is wrapped as {wrapped_as}"
            )
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        handlers[method.name] = _METHOD_HANDLERS[expected](
            implementation,
            request_deserializer=lenient(
                request_type.FromString,
                method.input_type.full_name,
                (size_bounds or {}).get(method.name),
            ),
            response_serializer=response_type.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
