"""Score's packed float fields as float32 arrays, read from the wire bytes without a Python float
per value."""

from __future__ import annotations

from typing import Final

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from ml_serving._proto.mlserving.v1 import inference_service_pb2 as pb
from ml_serving.scoring.features import DTYPE, Float32Array

_FIELDS: Final = ("context_values", "candidate_values")


def _view_class() -> type[Message]:
    """A message with ScoreRequest's packed float fields declared as `bytes`, same numbers.

    A packed repeated float is one length-delimited field whose payload is the floats,
    little-endian, back to back: the wire type of a `bytes` field. Parsed with this view, upb
    hands over each payload as one bytes object (every other field is skipped), and numpy reads
    it in place: for a Score request of 20 candidates, about 2 µs instead of 9 for 228 Python
    floats packed again. In a pool of its own: nothing else sees the type.
    """
    t = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(
        name="mlserving_score_view.proto", package="mlserving_score_view", syntax="proto3"
    )
    view = fdp.message_type.add(name="ScoreValues")
    for name in _FIELDS:
        number = pb.ScoreRequest.DESCRIPTOR.fields_by_name[name].number
        view.field.add(name=name, number=number, type=t.TYPE_BYTES, label=t.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("mlserving_score_view.ScoreValues")
    )


_View: Final = _view_class()
_LITTLE_ENDIAN_F32: Final = np.dtype(DTYPE).newbyteorder("<")


def score_values(request: pb.ScoreRequest) -> Float32Array:
    """`request.context_values` then `request.candidate_values`, as one read-only float32 array.

    The request is serialized again first: upb writes each packed field as one block, however
    the sender split or unpacked it (both are valid encodings), so the view always sees it
    whole (``align_columnar_request`` checks the length against the fields' counts all the
    same).
    """
    view = _View.FromString(request.SerializeToString())
    return np.frombuffer(
        view.context_values + view.candidate_values,  # type: ignore[attr-defined]
        dtype=_LITTLE_ENDIAN_F32,
    )
