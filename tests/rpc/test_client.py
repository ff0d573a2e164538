"""The Python client helper against grpcio-testing's fake channel (no server, no network)."""

from __future__ import annotations

import asyncio
import importlib
import json
import threading
from typing import Any

import grpc
import grpc_testing
import pytest

from ml_serving._proto.mlserving.v1 import inference_service_pb2 as pb
from ml_serving.api import client as client_module
from ml_serving.api.client import InferenceClient, channel_options, service_config
from tests.support.requests import generate_request, score_request
from tests.support.servers import StartServer

TOKEN = "client-test-token-0123456789"

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


def _call_in_thread(call: Any) -> dict[str, Any]:
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["reply"] = call()
        except Exception as exc:  # handed to the test thread, which asserts on it
            result["error"] = exc

    caller = threading.Thread(target=run)
    caller.start()
    result["thread"] = caller
    return result


def test_bearer_token_and_client_metadata_go_on_every_call(fake_channel: Any) -> None:
    client = InferenceClient(fake_channel, bearer_token=TOKEN, metadata=[("x-tenant", "t-1")])
    pending = _call_in_thread(lambda: client.score(score_request(), metadata=[("x-extra", "e")]))
    metadata, _ = _answer_unary(fake_channel, "Score", pb.ScoreResponse())
    pending["thread"].join(5)
    assert "error" not in pending
    sent = dict(metadata)
    assert sent["authorization"] == f"Bearer {TOKEN}"
    assert sent["x-tenant"] == "t-1"
    assert sent["x-extra"] == "e"
    assert len(sent["x-request-id"]) == 32
    assert [key for key, _ in metadata].count("authorization") == 1


def test_a_calls_own_metadata_replaces_the_clients(fake_channel: Any) -> None:
    client = InferenceClient(fake_channel, bearer_token=TOKEN, metadata=[("x-tenant", "t-1")])
    own = [("authorization", "Bearer other-caller-token-000"), ("x-tenant", "t-2")]
    own.append(("x-request-id", "mine"))
    pending = _call_in_thread(lambda: client.list_prompt_versions(metadata=own))
    metadata, _ = _answer_unary(fake_channel, "ListPromptVersions", pb.ListPromptVersionsResponse())
    pending["thread"].join(5)
    assert "error" not in pending
    sent = [(key, value) for key, value in metadata if not key.startswith("grpc.")]
    keys = [key for key, _ in sent]
    assert keys.count("authorization") == keys.count("x-tenant") == keys.count("x-request-id") == 1
    assert dict(sent) == {
        "authorization": "Bearer other-caller-token-000",
        "x-tenant": "t-2",
        "x-request-id": "mine",
    }


def test_request_id_twice_is_refused() -> None:
    client = InferenceClient(grpc_testing.channel([SERVICE], grpc_testing.strict_real_time()))
    with pytest.raises(ValueError, match="not both"):
        client.generate(generate_request(), request_id="a", metadata=[("x-request-id", "b")])


@pytest.mark.parametrize("token", ["", "has space", "tab\there", "caf\u00e9-token-0123456789"])
def test_a_malformed_bearer_token_is_refused_without_echoing_it(
    fake_channel: Any, token: str
) -> None:
    with pytest.raises(ValueError, match="bearer_token must be") as caught:
        InferenceClient(fake_channel, bearer_token=token)
    assert not token or token not in str(caught.value)


def test_message_types_are_reexported_from_one_place() -> None:
    # Every message and enum of the contract, importable from ml_serving.api.client as the
    # generated class itself (so isinstance and the stubs' types agree).
    exported = 0
    for file in (pb.DESCRIPTOR, *pb.DESCRIPTOR.dependencies):
        generated = importlib.import_module(
            "ml_serving._proto." + file.name.removesuffix(".proto").replace("/", ".") + "_pb2"
        )
        for name in (*file.message_types_by_name, *file.enum_types_by_name):
            assert name in client_module.__all__, name
            assert getattr(client_module, name) is getattr(generated, name), name
            exported += 1
    assert exported >= 17  # TipContext, Candidate, ScoreRequest, ExperienceLevel, ...
    assert client_module.SERVICE == pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
    request = client_module.GenerateRequest(
        user_id="u",
        context=client_module.TipContext(
            topic="sleep", experience_level=client_module.ExperienceLevel.EXPERIENCE_LEVEL_BEGINNER
        ),
    )
    assert request.context.experience_level == 1


async def test_bearer_token_opens_an_authenticated_server(start_server: StartServer) -> None:
    app = await start_server(auth_token=TOKEN)

    def call(token: str | None) -> Any:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}", options=channel_options()) as chan:
            return InferenceClient(chan, bearer_token=token).list_prompt_versions()

    assert (await asyncio.to_thread(call, TOKEN)).default_version == "v1"
    with pytest.raises(grpc.RpcError) as refused:
        await asyncio.to_thread(call, None)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
