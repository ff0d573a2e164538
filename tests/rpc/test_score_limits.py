"""Score's size limits: oversized requests are refused before any per-candidate work."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from ml_serving._proto.mlserving.v1 import inference_service_pb2 as pb
from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from ml_serving._proto.mlserving.v1 import scoring_pb2
from ml_serving.api import server
from ml_serving.scoring import model
from tests.support.requests import score_request

EMPTY_CANDIDATE = b"\x2a\x00"  # field 5 (candidates), length 0: the smallest candidate there is


def _largest_valid_request(max_candidates: int) -> pb.ScoreRequest:
    """As many candidates as allowed, each with the longest id (4-byte characters) and every
    candidate feature: the biggest request the size bound must still let through."""
    request = score_request(candidates=1)
    values = list(request.candidates[0].values)
    del request.candidates[:]
    for i in range(max_candidates):
        suffix = f"{i:06d}"
        cid = "\U0001f600" * (model.MAX_CANDIDATE_ID_CHARS - len(suffix)) + suffix
        request.candidates.append(scoring_pb2.Candidate(id=cid, values=values))
    return request


def test_the_size_bound_admits_the_largest_valid_request() -> None:
    for max_candidates in (1, 20, 1000):
        request = _largest_valid_request(max_candidates)
        assert request.ByteSize() <= model.max_request_bytes(max_candidates)


async def test_the_largest_valid_request_is_scored(
    stub: pb_grpc.InferenceServiceAsyncStub, app: server.App
) -> None:
    request = _largest_valid_request(app.settings.max_candidates)
    reply = await stub.Score(request, timeout=30)
    assert len(reply.scores) == app.settings.max_candidates


async def test_millions_of_empty_candidates_are_refused_unparsed(
    channel: grpc.aio.Channel, stub: pb_grpc.InferenceServiceAsyncStub, app: server.App
) -> None:
    """~2.1 M empty candidates fit in the 4 MiB message limit; building them took seconds of
    the loop and 1.4 GB that stayed. Now the raw size alone refuses the request."""
    raw = EMPTY_CANDIDATE * ((app.settings.max_receive_message_bytes - 64) // 2)
    call: Any = channel.unary_unary(f"/{server.SERVICE_NAME}/Score")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(raw, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bound = model.max_request_bytes(app.settings.max_candidates)
    assert caught.value.details() == (
        f"request: {len(raw)} bytes is more than a Score request of at most "
        f"{app.settings.max_candidates} candidates can take ({bound} bytes)"
    )
    # The server goes on serving.
    assert len((await stub.Score(score_request(), timeout=10)).scores) == 20


async def test_too_many_small_candidates_are_counted_before_they_are_read(
    channel: grpc.aio.Channel, app: server.App
) -> None:
    """Under the size bound but over the count: the count check comes before any candidate is
    built, and still after the feature names (the documented order of errors)."""
    head = score_request(candidates=1)
    del head.candidates[:]
    n = app.settings.max_candidates + 1
    raw = head.SerializeToString() + EMPTY_CANDIDATE * n
    call: Any = channel.unary_unary(f"/{server.SERVICE_NAME}/Score")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(raw, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == (
        f"candidates: at most {app.settings.max_candidates} candidates per request, got {n}"
    )
    head.candidate_feature_names.append("no_such_feature")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(head.SerializeToString() + EMPTY_CANDIDATE * n, timeout=30)
    assert str(caught.value.details()).startswith("candidate_feature_names")


async def test_an_over_long_candidate_id_is_refused(
    stub: pb_grpc.InferenceServiceAsyncStub,
) -> None:
    request = score_request(candidates=3)
    request.candidates[1].id = "x" * (model.MAX_CANDIDATE_ID_CHARS + 1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Score(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = str(caught.value.details())
    assert details.startswith("candidates[1].id: ")
    assert f"longer than {model.MAX_CANDIDATE_ID_CHARS} characters" in details
