"""The Python client helper against grpcio-testing's fake channel (no server, no network)."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import grpc
import grpc_testing
import pytest

from ml_serving._proto.mlserving.v1 import inference_service_pb2 as pb
from ml_serving.api.client import InferenceClient, channel_options, service_config
from tests.support.requests import generate_request, score_request

SERVICE = pb.DESCRIPTOR.services_by_name["InferenceService"]


@pytest.fixture
def fake_channel() -> Any:
    return grpc_testing.channel([SERVICE], grpc_testing.strict_real_time())


def _answer_unary(channel: Any, method: str, response: Any) -> tuple[Any, Any]:
    metadata, request, rpc = channel.take_unary_unary(SERVICE.methods_by_name[method])
    rpc.send_initial_metadata(())
    rpc.terminate(response, (), grpc.StatusCode.OK, "")
    return metadata, request


def test_score_sends_a_request_id(fake_channel: Any) -> None:
    client = InferenceClient(fake_channel)
    result: dict[str, Any] = {}
    caller = threading.Thread(target=lambda: result.update(reply=client.score(score_request())))
    caller.start()
    metadata, request = _answer_unary(
        fake_channel, "Score", pb.ScoreResponse(model_name="tips-ranker", model_version="1")
    )
    caller.join(5)
    assert result["reply"].model_name == "tips-ranker"
    assert request == score_request()
    assert len(dict(metadata)["x-request-id"]) == 32


def test_explicit_request_id_and_per_method_timeouts(fake_channel: Any) -> None:
    client = InferenceClient(fake_channel, timeouts_s={"Generate": 9.0})
    caller = threading.Thread(target=lambda: client.generate(generate_request(), request_id="r-1"))
    caller.start()
    metadata, _ = _answer_unary(fake_channel, "Generate", pb.GenerateResponse(text="x"))
    caller.join(5)
    assert dict(metadata)["x-request-id"] == "r-1"
    # grpc_testing does not model deadlines: check the one the client would send.
    assert client._timeout("Generate", None) == 9.0
    assert client._timeout("Score", None) == 2.0
    assert client._timeout("Score", 0.5) == 0.5


def test_service_config_retries_score_only() -> None:
    config = json.loads(service_config(max_attempts=4))
    (method_config,) = config["methodConfig"]
    assert method_config["name"] == [
        {"service": "mlserving.v1.InferenceService", "method": "Score"}
    ]
    assert method_config["retryPolicy"]["maxAttempts"] == 4
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert ("grpc.enable_retries", 1) in channel_options()


async def test_client_options_work_on_a_real_channel(app: Any) -> None:
    # The options must be accepted by grpc's own parser, not only by json.loads.
    def call() -> pb.ListPromptVersionsResponse:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}", options=channel_options()) as chan:
            return InferenceClient(chan).list_prompt_versions()

    reply = await asyncio.to_thread(call)
    assert reply.default_version == "v1"
