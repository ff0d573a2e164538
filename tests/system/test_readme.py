"""The README's grpcurl examples work as written: each one's JSON parses into its method's
request type and the call succeeds against the default server (shipped model, offline route)."""

from __future__ import annotations

import json
import re
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2

from ml_serving._proto.mlserving.v1 import inference_service_pb2 as pb
from ml_serving.api import server
from tests.support import REPO

README = REPO / "README.md"
_COMMAND = re.compile(
    r"\$G -plaintext(?: -d '(?P<data>[^']*)')? 127\.0\.0\.1:50051 (?P<call>[\w.]+/\w+)"
)


def readme_calls() -> list[tuple[str, str]]:
    """(call, JSON data) of every `$G -plaintext [-d '...'] 127.0.0.1:50051 Service/Method`."""
    text = README.read_text().replace("\\\n", " ")
    text = re.sub(r" {2,}", " ", text)
    return [(m["call"], m["data"] or "{}") for m in _COMMAND.finditer(text)]


def _types(call: str) -> tuple[type[Any], type[Any], bool]:
    service, _, method = call.rpartition("/")
    if service == "grpc.health.v1.Health":
        return health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse, False
    assert service == "mlserving.v1.InferenceService", call
    descriptor = pb.DESCRIPTOR.services_by_name["InferenceService"].methods_by_name[method]
    request = getattr(pb, descriptor.input_type.name)
    response = getattr(pb, descriptor.output_type.name)
    return request, response, descriptor.server_streaming


def test_the_readme_shows_every_method() -> None:
    methods = {call.rpartition("/")[2] for call, _ in readme_calls()}
    assert methods >= {"Check", "ListPromptVersions", "Generate", "GenerateStream"}


@pytest.mark.parametrize(("call", "data"), readme_calls(), ids=lambda v: str(v)[:40])
async def test_readme_example_succeeds(app: server.App, call: str, data: str) -> None:
    request_type, response_type, streaming = _types(call)
    request = json_format.Parse(data, request_type())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        if streaming:
            stream = channel.unary_stream(
                f"/{call}",
                request_serializer=request_type.SerializeToString,
                response_deserializer=response_type.FromString,
            )
            replies = [reply async for reply in stream(request, timeout=30)]
            assert replies
        else:
            unary = channel.unary_unary(
                f"/{call}",
                request_serializer=request_type.SerializeToString,
                response_deserializer=response_type.FromString,
            )
            reply = await unary(request, timeout=30)
            assert json.loads(json_format.MessageToJson(reply))  # a non-empty answer
