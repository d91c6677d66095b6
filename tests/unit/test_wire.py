"""The hand-written protobuf wire helpers agree with protobuf itself."""

from __future__ import annotations

import pytest
from google.protobuf import wrappers_pb2

from controlplane.xds.wire import read_varint, varint, wire_field


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 16_383, 16_384, 2**32 - 1, 2**63])
def test_varints_round_trip_and_match_protobuf(value: int) -> None:
    encoded = varint(value)
    assert read_varint(encoded + b"tail", 0) == (value, len(encoded))
    if 0 < value < 2**64:  # proto3 writes no field for 0
        assert wrappers_pb2.UInt64Value(value=value).SerializeToString() == b"\x08" + encoded


def test_a_length_delimited_field_is_what_protobuf_writes() -> None:
    payload = "é" * 100
    assert wire_field(1, payload.encode()) == wrappers_pb2.StringValue(
        value=payload
    ).SerializeToString()


def test_a_truncated_varint_is_an_error() -> None:
    with pytest.raises(ValueError, match="truncated"):
        read_varint(varint(300)[:1], 0)
