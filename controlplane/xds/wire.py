"""Protobuf wire format, the little of it the xDS side writes and reads by hand: varints and
length-delimited fields (pre-encoded responses, templates cut around placeholders, the
simulated sidecar's name lookup)."""

from __future__ import annotations

import functools

WIRE_VARINT, WIRE_64, WIRE_LEN, WIRE_32 = 0, 1, 2, 5


# Field keys and most lengths in a response are below 128: one byte, made once. Every
# response to every sidecar writes a few (bench/convergence.py: ~3 % of a push's CPU).
_ONE_BYTE = tuple(bytes((i,)) for i in range(0x80))


def varint(value: int) -> bytes:
    """``value`` (≥ 0) as a varint."""
    if 0 <= value < 0x80:
        return _ONE_BYTE[value]
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it. Raises ValueError if truncated."""
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


@functools.cache
def field_tag(number: int) -> bytes:
    """The key of a length-delimited field."""
    return varint(number << 3 | WIRE_LEN)


def wire_field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (strings, bytes, sub-messages)."""
    return field_tag(number) + varint(len(payload)) + payload
