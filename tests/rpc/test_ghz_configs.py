"""Every bench/ghz/*.json works as ghz would use it, proven through server reflection only:
`call` names a real method of a service the server exposes, `data` parses into that method's
request type (from reflection's file descriptors, not the generated stubs), and the call succeeds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import Message
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from bench.scenarios import load_ghz, parse_duration, split_call
from tests.support import REPO

GHZ_DIR = REPO / "bench" / "ghz"
CONFIGS = sorted(GHZ_DIR.glob("*.json"))


def test_the_three_scenarios_ship() -> None:
    assert {p.stem for p in CONFIGS} >= {"score", "generate", "generate_stream"}


async def _reflect(
    channel: grpc.aio.Channel, request: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    stub: Any = reflection_pb2_grpc.ServerReflectionStub(channel)  # type: ignore[arg-type]
    async for reply in stub.ServerReflectionInfo(iter([request])):
        assert not reply.HasField("error_response"), reply.error_response.error_message
        return reply  # type: ignore[no-any-return]
    raise AssertionError("no reflection reply")


async def reflected_pool(channel: grpc.aio.Channel, symbol: str) -> descriptor_pool.DescriptorPool:
    """A fresh descriptor pool holding the file that defines `symbol` and its dependencies,
    all as the server's reflection describes them."""
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
    while True:
        reply = await _reflect(channel, request)
        for raw in reply.file_descriptor_response.file_descriptor_proto:
            fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
            files.setdefault(fd.name, fd)
        missing = sorted({d for fd in files.values() for d in fd.dependency} - files.keys())
        if not missing:
            break
        request = reflection_pb2.ServerReflectionRequest(file_by_filename=missing[0])
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str) -> None:
        if name in added:
            return
        for dep in files[name].dependency:
            add(dep)
        pool.Add(files[name])
        added.add(name)

    for name in files:
        add(name)
    return pool


def _metadata(raw: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(
        (k, str(v).replace("{{.RequestNumber}}", "0")) for k, v in raw.get("metadata", {}).items()
    )


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_has_what_ghz_needs(path: Path) -> None:
    raw = json.loads(path.read_text())
    assert {"call", "host", "data"} <= raw.keys()
    assert raw.get("insecure") is True, "the server speaks plaintext gRPC"
    assert 1 <= raw["concurrency"] <= raw["total"]
    assert 0 < parse_duration(raw["timeout"]) <= 60


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
async def test_call_resolves_data_parses_and_call_succeeds(
    path: Path, app: Any, channel: grpc.aio.Channel
) -> None:
    raw = json.loads(path.read_text())
    service_name, method_name = split_call(raw["call"])

    listing = await _reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    assert service_name in {s.name for s in listing.list_services_response.service}

    pool = await reflected_pool(channel, service_name)
    service = pool.FindServiceByName(service_name)
    assert method_name in service.methods_by_name, f"{service_name} has no {method_name}"
    method = service.methods_by_name[method_name]
    assert not method.client_streaming, "ghz configs here send one request per call"

    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    request: Message = json_format.ParseDict(raw["data"], request_cls())  # unknown keys raise
    assert request.ByteSize() > 0
    # The bench sends the very same bytes (it resolves through the generated stubs instead).
    assert load_ghz(path).request().SerializeToString(
        deterministic=True
    ) == request.SerializeToString(deterministic=True)

    rpc_path = f"/{service.full_name}/{method.name}"
    kwargs: dict[str, Any] = {
        "timeout": parse_duration(raw["timeout"]),
        "metadata": _metadata(raw),
    }
    if method.server_streaming:
        call = channel.unary_stream(
            rpc_path,
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        replies = [reply async for reply in call(request, **kwargs)]
        assert replies
    else:
        unary = channel.unary_unary(
            rpc_path,
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        reply = await unary(request, **kwargs)
        assert reply.ByteSize() > 0
