"""The receiver's access-log path (wire view, per-export caches, records kept as bytes) keeps
exactly what the straightforward reading keeps: every field, the body and the attributes
of each record, credentials hashed, and the same export for a forwarder."""

from __future__ import annotations

import gc
import itertools
import tracemalloc
from collections.abc import Iterator

import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.common.v1 import common_pb2

from controlplane.telemetry import wire
from controlplane.telemetry.receiver import OtlpReceiver
from controlplane.telemetry.records import (
    CLIENT_HASH_ATTRIBUTE,
    VERDICT_INPUTS,
    Kind,
    Record,
    attribute_map,
    hash_secret,
    make_record,
    measure,
    normalized_attributes,
    scrub_attributes,
    secret_attributes,
    small_int,
    verdict_of,
)
from controlplane.telemetry.settings import TelemetrySettings
from controlplane.telemetry.store import Query, TelemetryStore
from controlplane.translate.telemetry import CLIENT_KEY_ATTRIBUTE, LOG_ATTRIBUTES

SETTINGS = TelemetrySettings()


def _s(text: str) -> common_pb2.AnyValue:
    return common_pb2.AnyValue(string_value=text)


OUTCOMES = [
    {"http.response.status_code": "200", "envoy.response_code_details": "via_upstream"},
    {
        "http.response.status_code": "403",
        "envoy.response_code_details": "rbac_access_denied_matched_policy[demo.p.rule-1]",
    },
    {
        "http.response.status_code": "429",
        "envoy.response_flags": "RL",
        "envoy.response_code_details": "request_rate_limited",
        "modelguard.ratelimit.limit": "demo.burst",
    },
    {
        "http.response.status_code": "200",
        "envoy.response_code_details": "via_upstream",
        "modelguard.output.hardened": "topK=1",
    },
    {
        "http.response.status_code": "200",
        "envoy.rbac.audit_deny_shadow_engine_result": "denied",
        "envoy.rbac.audit_deny_shadow_effective_policy_id": "demo.audit.r",
    },
    {
        "modelguard.egress.verdict": "blocked",
        "modelguard.egress.rule": "default-deny",
        "modelguard.egress.destination": "c2.example.net",
    },
    {"http.status_code": "503", "response_flags": "UF"},
    {},  # no request at all: no verdict
]
CLIENTS = ["key-1", "key-2", "-", "", None]


def _entries() -> Iterator[list[common_pb2.KeyValue]]:
    """Attribute lists as Envoy sends them ("-" for what it has not), and odder ones."""
    for i, (outcome, client) in enumerate(itertools.product(OUTCOMES, CLIENTS)):
        attrs = []
        for key, _ in LOG_ATTRIBUTES:
            attrs.append(common_pb2.KeyValue(key=key, value=_s(outcome.get(key, "-"))))
        for key, value in outcome.items():
            if key not in dict(LOG_ATTRIBUTES):
                attrs.append(common_pb2.KeyValue(key=key, value=_s(value)))
        if client is not None:
            attrs.append(common_pb2.KeyValue(key=CLIENT_KEY_ATTRIBUTE, value=_s(client)))
        if i % 3 == 0:
            attrs += [
                common_pb2.KeyValue(key="http.request.header.authorization", value=_s("Bearer t")),
                common_pb2.KeyValue(key="http.request.header.cookie", value=_s("-")),
                common_pb2.KeyValue(key="envoy.bytes_sent", value=common_pb2.AnyValue(int_value=7)),
                common_pb2.KeyValue(key="flag", value=common_pb2.AnyValue(bool_value=True)),
                common_pb2.KeyValue(key="unset", value=common_pb2.AnyValue()),
                common_pb2.KeyValue(key="long", value=_s("é" * 300)),
                common_pb2.KeyValue(
                    key="http.request.header.x-api-key", value=common_pb2.AnyValue(int_value=9)
                ),
            ]
        if i % 4 == 1:
            attrs.append(common_pb2.KeyValue(key="modelguard.node_id", value=_s("from-record")))
            attrs.append(
                common_pb2.KeyValue(
                    key="modelguard.caller.identity", value=_s("spiffe://td/ns/a/sa/b")
                )
            )
        yield attrs


def _export(resource_node: bool = True) -> logs_service_pb2.ExportLogsServiceRequest:
    request = logs_service_pb2.ExportLogsServiceRequest()
    resource_logs = request.resource_logs.add()
    resource = {"log_name": "modelguard.inbound", "service.name": "digits-model"}
    if resource_node:
        resource["modelguard.node_id"] = "digits-model-0"
    for key, value in resource.items():
        resource_logs.resource.attributes.add(key=key).value.string_value = value
    scope = resource_logs.scope_logs.add()
    for i, attrs in enumerate(_entries()):
        entry = scope.log_records.add(time_unix_nano=1_000 + i, severity_number=9)
        if i % 5 == 0:
            entry.time_unix_nano = 0
            entry.observed_time_unix_nano = 5_000 + i
        entry.body.string_value = f"POST /v1/predict {i}"
        if i % 7 == 0:
            entry.trace_id, entry.span_id = bytes(range(16)), bytes(range(8))
        entry.attributes.extend(attrs)
    return request


def _reference(request: logs_service_pb2.ExportLogsServiceRequest) -> list[Record]:
    """The records as the receiver made them before the wire view (one pass over each
    record's KeyValues, ``make_record``)."""
    secret = secret_attributes(SETTINGS.secret_headers)
    out = []
    for resource_logs in request.resource_logs:
        resource = attribute_map(resource_logs.resource.attributes)
        for scope in resource_logs.scope_logs:
            for entry in scope.log_records:
                attrs = normalized_attributes(entry.attributes, secret)
                out.append(
                    make_record(
                        Kind.LOG,
                        time_unix_nano=entry.time_unix_nano or entry.observed_time_unix_nano,
                        source="sidecar",
                        resource=resource,
                        name=entry.body.string_value,
                        attributes=attrs,
                        trace_id=entry.trace_id,
                        span_id=entry.span_id,
                        duration_ms=float(small_int(attrs.get("envoy.duration_ms", ""))),
                    )
                )
    return out


FIELDS = [f for f in Record._fields if f not in ("title", "pairs", "raw", "size", "seq")]


@pytest.mark.parametrize("resource_node", [True, False])
def test_records_are_those_of_the_straightforward_reading(resource_node: bool) -> None:
    request = _export(resource_node)
    want = _reference(request)
    receiver = OtlpReceiver(SETTINGS, TelemetryStore(10_000, 1 << 30))
    got = receiver.ingest_logs(wire.ExportLogsView.FromString(request.SerializeToString()))
    assert len(got) == len(want) == len(OUTCOMES) * len(CLIENTS)
    for record, expected in zip(got, want, strict=True):
        assert [getattr(record, f) for f in FIELDS] == [getattr(expected, f) for f in FIELDS]
        assert record.name == expected.name
        assert record.attributes == expected.attributes
        assert record.raw and not expected.raw
        assert b"key-1" not in record.raw and b"Bearer t" not in record.raw
    assert {r.verdict for r in got} == {
        *("allowed", "denied", "rate_limited", "hardened", "audit_denied", "blocked", "")
    }
    assert {r.client for r in got} == {hash_secret("key-1"), hash_secret("key-2"), ""}


def test_the_store_reads_and_measures_kept_bytes() -> None:
    store = TelemetryStore(10_000, 1 << 30)
    receiver = OtlpReceiver(SETTINGS, store)
    (first, *_) = receiver.ingest_logs(_export())
    assert first.size == measure(first)
    assert store.query(Query(client="key-1"))
    listed = store.query(Query(verdict="denied"), limit=1)[0]
    assert dict(listed.attributes)["modelguard.verdict.rule"] == "demo.p.rule-1"


def test_verdict_inputs_are_every_attribute_the_verdict_reads() -> None:
    read: set[str] = set()

    class Recording(dict[str, str]):
        def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
            read.add(key)
            return super().get(key, default)

        def __getitem__(self, key: str) -> str:
            read.add(key)
            return super().__getitem__(key)

    for outcome in OUTCOMES:
        verdict_of(Recording(outcome))
        verdict_of(Recording({**outcome, "envoy.rbac.audit_allow_shadow_engine_result": "denied"}))
    assert read <= set(VERDICT_INPUTS), read - set(VERDICT_INPUTS)


def test_a_key_that_is_not_utf8_costs_nothing_of_its_batch() -> None:
    """Envoy sends header bytes as they came: one request with a non-UTF-8 x-api-key made
    the whole export undecodable (every record of the batch lost). Now the batch is kept
    and that key is hashed from its bytes."""
    request = _export()
    raw = bytearray(request.SerializeToString())
    marker = b"\x0a\x05key-2"
    at = raw.index(marker)
    raw[at + 2 : at + 7] = b"k\xff\xfe-2"
    with pytest.raises(Exception, match="UTF-8"):
        logs_service_pb2.ExportLogsServiceRequest.FromString(bytes(raw))
    receiver = OtlpReceiver(SETTINGS, TelemetryStore(10_000, 1 << 30))
    records = receiver.ingest_logs(wire.ExportLogsView.FromString(bytes(raw)))
    assert len(records) == len(OUTCOMES) * len(CLIENTS)
    odd = [r for r in records if r.client not in ("", hash_secret("key-1"), hash_secret("key-2"))]
    assert len(odd) == 1 and b"\xff\xfe" not in odd[0].raw
    assert dict(odd[0].attributes)[CLIENT_HASH_ATTRIBUTE] == odd[0].client


def test_a_forwarded_export_is_the_scrubbed_export() -> None:
    sent: list[logs_service_pb2.ExportLogsServiceRequest] = []
    receiver = OtlpReceiver(SETTINGS, TelemetryStore(10_000, 1 << 30), sent.append)
    request = _export()
    records = receiver.ingest_logs(request)
    (forwarded,) = sent
    reference = _export()
    for resource_logs in reference.resource_logs:
        for scope in resource_logs.scope_logs:
            for entry in scope.log_records:
                kept = scrub_attributes(entry.attributes, SETTINGS.secret_headers)
                del entry.attributes[:]
                entry.attributes.extend(kept)
    got_entries = forwarded.resource_logs[0].scope_logs[0].log_records
    want_entries = reference.resource_logs[0].scope_logs[0].log_records
    assert len(got_entries) == len(want_entries)
    for got, want, record in zip(got_entries, want_entries, records, strict=True):
        expected = attribute_map(want.attributes)
        if record.verdict:
            expected["modelguard.verdict"] = record.verdict
            if record.rule:
                expected["modelguard.verdict.rule"] = record.rule
        assert attribute_map(got.attributes) == expected
        assert (got.body, got.time_unix_nano, got.severity_number) == (
            want.body,
            want.time_unix_nano,
            want.severity_number,
        )
    assert "key-1" not in str(forwarded)


def test_kept_bytes_are_what_the_store_holds() -> None:
    """The byte bound holds for records kept as bytes, and means real memory."""
    bound = 256 * 1024
    request = _export()
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        store = TelemetryStore(max_records=10**9, max_bytes=bound)
        receiver = OtlpReceiver(SETTINGS, store)
        for _ in range(40):
            receiver.ingest_logs(wire.ExportLogsView.FromString(request.SerializeToString()))
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    stats = store.stats()
    assert stats.bytes <= bound and stats.evicted > 0
    assert bound * 0.3 <= held <= bound * 1.25, (held, bound)
