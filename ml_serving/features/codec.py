"""Feast's online-store encoding, read without the Feast SDK: entity keys, values, Redis field
names and timestamps (held to Feast 0.67's own answers by tests/unit/test_feature_codec.py and
the parity tests)."""

from __future__ import annotations

import struct
from typing import Any, Final

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

ENTITY_KEY_SERIALIZATION_VERSION: Final = 3
"""The only entity-key encoding this reader speaks (Feast's default since 0.43)."""
_STRING_TYPE: Final = 2  # feast.types.ValueType.STRING
_DOUBLE: Final = struct.Struct("<d")

Scalar = float | str | tuple[str, ...] | None
"""A decoded stored value: a number, a string, a string list, or None for a null."""


class MalformedValue(ValueError):
    """Stored bytes that are not a Feast value of a type this reader knows."""


def entity_key(join_key: str, value: str) -> bytes:
    """Feast's serialized entity key (version 3) for one string join key and its value."""
    key, val = join_key.encode(), value.encode()
    return b"".join(
        (
            struct.pack("<IIi", 1, _STRING_TYPE, len(key)),
            key,
            struct.pack("<Ii", _STRING_TYPE, len(val)),
            val,
        )
    )


def entity_key_prefix(join_key: str) -> bytes:
    """The bytes every version-3 key of one string join key starts with (to scan a view)."""
    key = join_key.encode()
    return struct.pack("<IIi", 1, _STRING_TYPE, len(key)) + key


def entity_value(serialized_key: bytes, join_key: str) -> str | None:
    """The entity value of a key built by ``entity_key(join_key, ...)``; None for another."""
    prefix = entity_key_prefix(join_key)
    if not serialized_key.startswith(prefix):
        return None
    rest = serialized_key[len(prefix) :]
    if len(rest) < 8:
        return None
    value_type, length = struct.unpack_from("<Ii", rest)
    if value_type != _STRING_TYPE or length != len(rest) - 8:
        return None
    return rest[8:].decode("utf-8", "replace")


def _value_message_class() -> type[Message]:
    """A message class with the fields of ``feast.types.Value`` this project stores, in a pool
    of its own (so Feast's SDK may be imported beside it): upb parses it in C."""
    fdp = descriptor_pb2.FileDescriptorProto(
        name="mlserving_feast_value.proto", package="mlserving_feast_value", syntax="proto3"
    )
    string_list = fdp.message_type.add(name="StringList")
    string_list.field.add(
        name="val",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
    )
    value = fdp.message_type.add(name="Value")
    value.oneof_decl.add(name="val")
    t = descriptor_pb2.FieldDescriptorProto
    for name, number, kind, type_name in (
        ("string_val", 2, t.TYPE_STRING, ""),
        ("int32_val", 3, t.TYPE_INT32, ""),
        ("int64_val", 4, t.TYPE_INT64, ""),
        ("double_val", 5, t.TYPE_DOUBLE, ""),
        ("float_val", 6, t.TYPE_FLOAT, ""),
        ("bool_val", 7, t.TYPE_BOOL, ""),
        ("string_list_val", 12, t.TYPE_MESSAGE, ".mlserving_feast_value.StringList"),
        ("null_val", 19, t.TYPE_INT32, ""),  # an enum on Feast's side: one value, NULL = 0
    ):
        added = value.field.add(
            name=name, number=number, type=kind, label=t.LABEL_OPTIONAL, oneof_index=0
        )
        if type_name:
            added.type_name = type_name
    timestamp = fdp.message_type.add(name="Timestamp")
    timestamp.field.add(name="seconds", number=1, type=t.TYPE_INT64, label=t.LABEL_OPTIONAL)
    timestamp.field.add(name="nanos", number=2, type=t.TYPE_INT32, label=t.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("mlserving_feast_value.Value")
    )


_Value: Final = _value_message_class()
_Timestamp: Final[type[Message]] = message_factory.GetMessageClass(
    _Value.DESCRIPTOR.file.pool.FindMessageTypeByName(  # type: ignore[arg-type]
        "mlserving_feast_value.Timestamp"
    )
)


def decode_value(data: bytes) -> Scalar:
    """One stored ``feast.types.Value`` -> a number, string, string tuple, or None (null or
    unset). Raises ``MalformedValue`` for bytes that do not parse or a type not used here."""
    # Fast paths for what the model views hold (one tag byte, then the value): a double is 9
    # bytes, an int64 a varint. Anything else goes through the message class.
    n = len(data)
    if n == 0:
        return None
    tag = data[0]
    if tag == 0x29 and n == 9:  # double_val (field 5, 64-bit)
        value: float = _DOUBLE.unpack_from(data, 1)[0]
        return value
    if tag == 0x20 and 1 < n <= 11:  # int64_val (field 4, varint)
        result = shift = 0
        for i in range(1, n):
            byte = data[i]
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                if i != n - 1:
                    break  # trailing bytes: let the parser judge them
                return float(result - (1 << 64) if result >= 1 << 63 else result)
    message = _Value()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise MalformedValue(f"not a Feast value: {exc}") from None
    kind = message.WhichOneof("val")
    if kind == "null_val":
        return None
    if kind is None:
        # Empty bytes are Feast's null (an unset Value); anything else set no field known here:
        # a type this reader does not decode (a list of numbers, a map...), not a null.
        if data:
            raise MalformedValue("a Feast value of a type this reader does not know")
        return None
    got: Any = getattr(message, kind)
    if kind == "string_list_val":
        return tuple(got.val)
    if kind == "bool_val":
        return 1.0 if got else 0.0
    return float(got) if isinstance(got, int) else got


def decode_timestamp(data: bytes) -> float:
    """A serialized ``google.protobuf.Timestamp`` (Redis' ``_ts:<view>`` field) -> epoch s."""
    message = _Timestamp()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise MalformedValue(f"not a timestamp: {exc}") from None
    seconds: int = getattr(message, "seconds")  # noqa: B009 (a runtime-built message class)
    nanos: int = getattr(message, "nanos")  # noqa: B009
    return float(seconds) + nanos / 1e9


def murmur3_32(data: bytes, seed: int = 0) -> int:
    """MurmurHash3 x86 32-bit, unsigned (what the ``mmh3`` package computes for Feast)."""
    c1, c2, mask = 0xCC9E2D51, 0x1B873593, 0xFFFFFFFF
    h = seed & mask
    n_blocks = len(data) // 4
    for (k,) in struct.iter_unpack("<I", data[: n_blocks * 4]):
        k = (k * c1) & mask
        k = ((k << 15) | (k >> 17)) & mask
        k = (k * c2) & mask
        h ^= k
        h = ((h << 13) | (h >> 19)) & mask
        h = (h * 5 + 0xE6546B64) & mask
    tail = data[n_blocks * 4 :]
    k = 0
    for i, byte in enumerate(tail):
        k |= byte << (8 * i)
    if tail:
        k = (k * c1) & mask
        k = ((k << 15) | (k >> 17)) & mask
        k = (k * c2) & mask
        h ^= k
    h ^= len(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & mask
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & mask
    h ^= h >> 16
    return h


def redis_field(view: str, feature: str) -> bytes:
    """The Redis hash field of one feature of a view: Feast's ``_mmh3("view:feature")``."""
    return struct.pack("<I", murmur3_32(f"{view}:{feature}".encode()))


def redis_timestamp_field(view: str) -> bytes:
    """The Redis hash field holding a view's event timestamp for the entity."""
    return f"_ts:{view}".encode()


def redis_key(join_key: str, value: str, project: str) -> bytes:
    """The Redis key of one entity: its serialized entity key, then the project name."""
    return entity_key(join_key, value) + project.encode()
