"""The online-store encoding read without Feast, held to Feast 0.67's own functions."""

from __future__ import annotations

from pathlib import Path

import mmh3
import pytest
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import _mmh3, _redis_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Int64List, Null, StringList, Value
from google.protobuf.timestamp_pb2 import Timestamp

from ml_serving.features import codec
from ml_serving.features.repo import RedisAddress, StoreConfig, StoreConfigError
from ml_serving.scoring import features


@pytest.mark.parametrize("entity", ["user-42", "", "é-ü", "x" * 200])
def test_entity_keys_are_feasts(entity: str) -> None:
    key = EntityKey(join_keys=["user_id"], entity_values=[Value(string_val=entity)])
    assert codec.entity_key("user_id", entity) == serialize_entity_key(key, 3)
    assert codec.redis_key("user_id", entity, "tips") == _redis_key("tips", key, 3)
    assert codec.entity_value(codec.entity_key("user_id", entity), "user_id") == entity
    assert codec.entity_value(codec.entity_key("tip_id", entity), "user_id") is None


@pytest.mark.parametrize("data", [b"", b"a", b"ab", b"abc", b"abcd", b"abcde", bytes(range(37))])
def test_murmur3_is_mmh3(data: bytes) -> None:
    assert codec.murmur3_32(data) == mmh3.hash(data, signed=False)


def test_redis_field_names_are_feasts_for_every_stored_field() -> None:
    for view, fields in (
        (features.USER_FEATURE_VIEW, features.USER_FIELDS),
        (features.TIP_FEATURE_VIEW, features.TIP_FIELDS),
        (features.USER_PROFILE_VIEW, features.PROFILE_FIELDS),
    ):
        for name in fields:
            assert codec.redis_field(view, name) == _mmh3(f"{view}:{name}")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (Value(int64_val=-5), -5.0),
        (Value(int64_val=2**40), float(2**40)),
        (Value(int32_val=7), 7.0),
        (Value(double_val=0.25), 0.25),
        (Value(float_val=1.5), 1.5),
        (Value(bool_val=True), 1.0),
        (Value(string_val="advanced"), "advanced"),
        (Value(string_list_val=StringList(val=["a", "b"])), ("a", "b")),
        (Value(string_list_val=StringList()), ()),
        (Value(), None),
        (Value(null_val=Null.NULL), None),
    ],
)
def test_values_decode_as_feast_wrote_them(value: Value, expected: object) -> None:
    assert codec.decode_value(value.SerializeToString()) == expected


@pytest.mark.parametrize(
    "data",
    [
        Value(int64_list_val=Int64List(val=[1])).SerializeToString(),  # a type this reader skips
        b"\xff\xff",
        b"\x12\x05ab",  # a string field longer than the bytes
    ],
)
def test_malformed_values_raise_malformed_value(data: bytes) -> None:
    with pytest.raises(codec.MalformedValue):
        codec.decode_value(data)


def test_timestamps_decode() -> None:
    stamp = Timestamp(seconds=1767225600, nanos=500_000_000)
    assert codec.decode_timestamp(stamp.SerializeToString()) == 1767225600.5


def test_store_config_reads_sqlite_redis_and_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_SECRET", "s3cret")
    yaml_path = tmp_path / "redis.yaml"
    yaml_path.write_text(
        "project: tips\nonline_store:\n  type: redis\n"
        "  connection_string: redis.svc:6380,password=${REDIS_SECRET},ssl=true,db=2\n"
    )
    config = StoreConfig.load(tmp_path, yaml_path)
    assert config.kind == "redis"
    assert config.redis == RedisAddress("redis.svc", 6380, "s3cret", 2, True)
    shipped = StoreConfig.load(features_repo())
    assert shipped.kind == "sqlite" and shipped.project == "tips"
    assert shipped.sqlite_path == features_repo() / "data" / "online_store.db"


@pytest.mark.parametrize(
    "text",
    [
        "project: tips\nonline_store:\n  type: dynamodb\n",
        "project: tips\nentity_key_serialization_version: 2\n",
        "online_store: sqlite\n",
        "project: tips\nonline_store:\n  type: redis\n  connection_string: nohost\n",
        "project: tips\nonline_store:\n  type: redis\n  redis_type: redis_cluster\n",
    ],
)
def test_store_configs_this_reader_cannot_serve_are_refused(tmp_path: Path, text: str) -> None:
    (tmp_path / "feature_store.yaml").write_text(text)
    with pytest.raises(StoreConfigError):
        StoreConfig.load(tmp_path)


def features_repo() -> Path:
    from ml_serving.config import REPO_FEATURES

    return REPO_FEATURES
