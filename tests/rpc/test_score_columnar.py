"""Score's columnar form (candidate_ids + packed candidate_values) and columnar response."""

from __future__ import annotations

import math

import grpc
import pytest

from ml_serving._proto.mlserving.v1 import inference_service_pb2 as pb
from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from ml_serving._proto.mlserving.v1 import scoring_pb2
from ml_serving.api import server
from tests.support.requests import columnar, score_request
from tests.support.scores import offline_scores

ROWS = scoring_pb2.SCORE_LAYOUT_ROWS
COLUMNS = scoring_pb2.SCORE_LAYOUT_COLUMNS


async def _invalid(stub: pb_grpc.InferenceServiceAsyncStub, request: pb.ScoreRequest) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Score(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return str(caught.value.details())


@pytest.mark.parametrize("candidates", [1, 20, 200])
async def test_both_forms_and_both_layouts_give_identical_scores(
    stub: pb_grpc.InferenceServiceAsyncStub, candidates: int
) -> None:
    rows_request = score_request(candidates=candidates, seed=candidates)
    by_rows = await stub.Score(rows_request, timeout=10)
    ids = [s.id for s in by_rows.scores]
    scores = [s.score for s in by_rows.scores]
    assert ids == [c.id for c in rows_request.candidates]
    for layout in (0, ROWS):
        reply = await stub.Score(columnar(rows_request, layout), timeout=10)
        assert [(s.id, s.score) for s in reply.scores] == list(zip(ids, scores, strict=True))
        assert not reply.candidate_ids and not reply.candidate_scores
    for request in (columnar(rows_request, COLUMNS), _with_layout(rows_request, COLUMNS)):
        reply = await stub.Score(request, timeout=10)
        assert list(reply.candidate_ids) == ids
        assert list(reply.candidate_scores) == scores  # the same float32 values, bit for bit
        assert not reply.scores
        assert (reply.model_name, reply.model_version) == (
            by_rows.model_name,
            by_rows.model_version,
        )
    offline = offline_scores(rows_request)
    assert all(
        math.isclose(a, b, rel_tol=0, abs_tol=1e-6) for a, b in zip(scores, offline, strict=True)
    )


def _with_layout(request: pb.ScoreRequest, layout: int) -> pb.ScoreRequest:
    out = pb.ScoreRequest()
    out.CopyFrom(request)
    out.response_layout = layout  # type: ignore[assignment]
    return out


async def test_columnar_with_a_subset_of_features_fills_defaults_like_rows(
    stub: pb_grpc.InferenceServiceAsyncStub,
) -> None:
    rows_request = score_request(candidates=5)
    names = list(rows_request.candidate_feature_names)
    keep = [i for i, n in enumerate(names) if n != "tip_prior_ctr"]  # optional: has a default
    del rows_request.candidate_feature_names[:]
    rows_request.candidate_feature_names.extend(names[i] for i in keep)
    for c in rows_request.candidates:
        values = list(c.values)
        del c.values[:]
        c.values.extend(values[i] for i in keep)
    by_rows = await stub.Score(rows_request, timeout=10)
    reply = await stub.Score(columnar(rows_request, COLUMNS), timeout=10)
    assert list(reply.candidate_scores) == [s.score for s in by_rows.scores]


async def test_mixing_the_two_forms_is_refused(stub: pb_grpc.InferenceServiceAsyncStub) -> None:
    request = score_request(candidates=3)
    request.candidate_ids.append("extra")
    assert (await _invalid(stub, request)).startswith("candidates: send candidates, or ")


@pytest.mark.parametrize(
    ("mutate", "says"),
    [
        (lambda r: r.candidate_values.pop(), "candidate_values: expected 4 x 11 = 44 values"),
        (lambda r: r.candidate_values.append(0.5), "candidate_values: expected 4 x 11 = 44 values"),
        (lambda r: r.candidate_ids.__setitem__(2, ""), "candidate_ids[2]: must be non-empty"),
        (
            lambda r: r.candidate_ids.__setitem__(3, r.candidate_ids[1]),
            "candidate_ids[3]: duplicate id 'tip-0001' (also candidate_ids[1])",
        ),
        (
            lambda r: r.candidate_values.__setitem__(41, math.nan),
            "candidate_values[41]: feature ",
        ),
        (lambda r: setattr(r, "response_layout", 7), "response_layout: unknown value 7"),
    ],
)
async def test_columnar_errors_name_the_field_and_index(
    stub: pb_grpc.InferenceServiceAsyncStub, mutate: object, says: str
) -> None:
    request = columnar(score_request(candidates=4))
    mutate(request)  # type: ignore[operator]
    assert (await _invalid(stub, request)).startswith(says)


async def test_a_non_finite_value_names_its_candidate_and_feature(
    stub: pb_grpc.InferenceServiceAsyncStub,
) -> None:
    request = columnar(score_request(candidates=4))
    k = len(request.candidate_feature_names)
    request.candidate_values[3 * k + 2] = math.inf
    feature = request.candidate_feature_names[2]
    assert await _invalid(stub, request) == (
        f"candidate_values[{3 * k + 2}]: feature {feature!r} of candidate 3 ('tip-0003') "
        "must be a finite float32, got inf"
    )


async def test_columnar_candidate_count_limits(
    stub: pb_grpc.InferenceServiceAsyncStub, app: server.App
) -> None:
    request = columnar(score_request(candidates=1))
    del request.candidate_ids[:]  # values without ids: the columnar form, with no candidate
    assert await _invalid(stub, request) == "candidate_ids: at least one candidate is required"
    del request.candidate_values[:]  # neither form: no candidates at all
    assert await _invalid(stub, request) == "candidates: at least one candidate is required"
    n = app.settings.max_candidates + 1
    request.candidate_ids.extend(f"t{i}" for i in range(n))
    assert await _invalid(stub, request) == (
        f"candidate_ids: at most {app.settings.max_candidates} candidates per request, got {n}"
    )
