"""OpenTelemetry's current semantic conventions on what the sidecars send, with typed values.

Envoy's OpenTelemetry tracer still tags spans with the old HTTP names (``http.method``,
``http.status_code``, ``http.url``...), while our access logs use the current ones; and its
access logger formats every value as a string. The receiver applies both fixes before
anything is stored or forwarded, so a backend sees one vocabulary and can compare numbers.
"""

from __future__ import annotations

from collections.abc import MutableSequence

from opentelemetry.proto.common.v1 import common_pb2

from controlplane.telemetry.records import small_int, value_text

# Envoy tracer tag → current semantic convention (semconv 1.26+ HTTP, client, user agent).
SPAN_RENAMES: dict[str, str] = {
    "http.method": "http.request.method",
    "http.status_code": "http.response.status_code",
    "http.url": "url.full",
    "user_agent": "user_agent.original",
    "peer.address": "client.address",
    "request_size": "http.request.body.size",
    "response_size": "http.response.body.size",
}

# Attributes that are integers (the conventions' and ours). Sent as strings by Envoy.
INT_ATTRIBUTES: tuple[str, ...] = (
    "http.response.status_code",
    "http.request.body.size",
    "http.response.body.size",
    "envoy.duration_ms",
    "envoy.bytes_received",
    "envoy.bytes_sent",
    "modelguard.egress.port",
    "modelguard.egress.listener.port",
)
_INTS = frozenset(INT_ATTRIBUTES)


def typed_int(raw: bytes) -> bytes | None:
    """An encoded AnyValue holding a whole number as text → the same number as an int
    AnyValue; None when it holds something else (it is then kept as it is)."""
    text = value_text(raw)
    number = small_int(text, -1) if text else -1
    if number < 0:
        return None
    encoded: bytes = common_pb2.AnyValue(int_value=number).SerializeToString()
    return encoded


def current_span_attributes(attributes: MutableSequence[common_pb2.KeyValue]) -> None:
    """Rename old HTTP tags and type integers, in place (a span's attribute list)."""
    for kv in attributes:
        kv.key = SPAN_RENAMES.get(kv.key, kv.key)
        if kv.key in _INTS and kv.value.WhichOneof("value") == "string_value":
            number = small_int(kv.value.string_value, -1)
            if number >= 0:
                kv.value.int_value = number
