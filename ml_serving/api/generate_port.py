"""The Generate port's servicer: Generate and GenerateStream only, every other method refused."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Final, cast

import grpc

from ml_serving import errors
from ml_serving.api import rpc
from ml_serving.api.servicer import InferenceServicer
from ml_serving.config import Settings

GENERATE_METHODS: Final = frozenset({"Generate", "GenerateStream"})
"""What the Generate port (ML_SERVING_GENERATE_PORT) serves; the mesh routes these paths there."""


def _not_served(method: str) -> errors.NotServedHere:
    return errors.NotServedHere(
        f"{method} is not served on the Generate port (ML_SERVING_GENERATE_PORT), which serves "
        "only Generate and GenerateStream: call the main port (ML_SERVING_PORT)"
    )


def _refusal(method: str, kind: str) -> Callable[..., Any]:
    """A handler for `method` that refuses it, wrapped by the per-RPC layer like any other, so
    the refusal is authenticated, logged and counted as the method's own UNIMPLEMENTED call."""
    if kind == "unary":

        async def refuse(
            self: InferenceServicer, request: object, context: grpc.aio.ServicerContext[Any, Any]
        ) -> Any:
            raise _not_served(method)

        refuse.__name__ = refuse.__qualname__ = method  # the layer names the call after it
        return rpc.unary(refuse)
    if kind == "server_stream":

        async def refuse_stream(
            self: InferenceServicer, request: object, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            raise _not_served(method)
            yield  # pragma: no cover - makes this an async generator, as the layer expects

        refuse_stream.__name__ = refuse_stream.__qualname__ = method
        return rpc.server_streaming(refuse_stream)
    raise TypeError(f"{rpc.SERVICE}.{method}: the RPC layer has no {kind} wrapper")


def _generate_only_servicer() -> type[InferenceServicer]:
    # Built from the descriptor, not listed by hand: a method added to the service later is
    # refused here too, rather than served in the low-priority process by inheritance.
    refusals = {
        name: _refusal(name, kind)
        for name, kind in rpc.METHOD_TYPES.items()
        if name not in GENERATE_METHODS
    }
    cls = type("GenerateOnlyServicer", (InferenceServicer,), refusals)
    cls.__doc__ = "InferenceService as the Generate port serves it: Generate and GenerateStream."
    return cast(type[InferenceServicer], cls)


GenerateOnlyServicer: Final = _generate_only_servicer()


def servicer_class(settings: Settings) -> type[InferenceServicer]:
    """The servicer this process registers: the Generate port's with ML_SERVING_GENERATE_ONLY,
    else the whole service."""
    return GenerateOnlyServicer if settings.generate_only else InferenceServicer
