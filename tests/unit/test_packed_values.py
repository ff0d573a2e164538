"""Score's packed float fields read off the wire (api.packed) equal the parsed fields."""

from __future__ import annotations

import struct

import numpy as np

from ml_serving._proto.mlserving.v1 import inference_service_pb2 as pb
from ml_serving.api import packed


def _tag(number: int, wire_type: int) -> bytes:
    return bytes([number << 3 | wire_type])


def test_values_equal_the_parsed_fields_and_are_float32() -> None:
    request = pb.ScoreRequest(
        context_values=[1.5, -2.25, 3.4e38, 1e-45],
        candidate_ids=["a", "b"],
        candidate_values=[0.1, 0.2, float("nan"), float("inf")],
    )
    values = packed.score_values(pb.ScoreRequest.FromString(request.SerializeToString()))
    assert values.dtype == np.float32
    want = [*request.context_values, *request.candidate_values]
    np.testing.assert_array_equal(values, np.array(want, dtype=np.float32))


def test_unpacked_and_split_encodings_read_whole() -> None:
    # Both are valid encodings of a packed field (parsers must accept them): one float per tag,
    # and the values split over several packed blocks, here mixed, out of field order.
    number = pb.ScoreRequest.DESCRIPTOR.fields_by_name["candidate_values"].number
    block = struct.pack("<2f", 1.0, 2.0)
    wire = (
        _tag(number, 2)
        + bytes([len(block)])
        + block
        + _tag(number, 5)
        + struct.pack("<f", 3.0)
        + _tag(6, 2)
        + b"\x01x"
        + _tag(number, 2)
        + bytes([4])
        + struct.pack("<f", 4.0)
    )
    request = pb.ScoreRequest.FromString(wire)
    assert list(request.candidate_values) == [1.0, 2.0, 3.0, 4.0]
    assert packed.score_values(request).tolist() == [1.0, 2.0, 3.0, 4.0]


def test_empty_request() -> None:
    assert packed.score_values(pb.ScoreRequest()).size == 0
