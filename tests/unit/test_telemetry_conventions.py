"""Telemetry follows OpenTelemetry's current semantic conventions with typed values
(issue 19): what Envoy sends as old tags and strings is stored and forwarded as current
names and numbers; the egress port is the destination's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2

from controlplane.api import load_paths
from controlplane.app.cli import build_parser
from controlplane.app.runner import demo_sidecar
from controlplane.compile import compile_sidecar
from controlplane.policies.egress import translate as egress_translate
from controlplane.policies.egress.ir import of as egress_of
from controlplane.telemetry.receiver import OtlpReceiver
from controlplane.telemetry.settings import TelemetrySettings
from controlplane.telemetry.store import TelemetryStore


def _values(attributes: Any) -> dict[str, tuple[str | None, Any]]:
    out = {}
    for kv in attributes:
        which = kv.value.WhichOneof("value")
        out[kv.key] = (which, getattr(kv.value, which) if which else None)
    return out


def _receiver() -> tuple[OtlpReceiver, list[Any]]:
    forwarded: list[Any] = []
    receiver = OtlpReceiver(TelemetrySettings(), TelemetryStore(1000, 1 << 24), forwarded.append)
    return receiver, forwarded


def test_access_log_numbers_are_forwarded_and_stored_as_numbers() -> None:
    request = logs_service_pb2.ExportLogsServiceRequest()
    entry = request.resource_logs.add().scope_logs.add().log_records.add(time_unix_nano=1)
    for key, value in {
        "http.request.method": "POST",
        "http.response.status_code": "403",
        "envoy.duration_ms": "12",
        "envoy.bytes_sent": "-",  # Envoy's "nothing": dropped, not typed
        "modelguard.egress.destination": "api.example.com:8443",
        "modelguard.egress.port": "8443",
        "modelguard.egress.listener.port": "15001",
        "envoy.route": "404",  # a number-looking name that is no number: left a string
    }.items():
        entry.attributes.add(key=key).value.string_value = value
    receiver, forwarded = _receiver()
    (record,) = receiver.ingest_logs(request)
    sent = _values(forwarded[0].resource_logs[0].scope_logs[0].log_records[0].attributes)
    assert sent["http.response.status_code"] == ("int_value", 403)
    assert sent["envoy.duration_ms"] == ("int_value", 12)
    assert sent["modelguard.egress.port"] == ("int_value", 8443)
    assert sent["modelguard.egress.listener.port"] == ("int_value", 15001)
    assert sent["http.request.method"] == ("string_value", "POST")
    assert sent["envoy.route"] == ("string_value", "404")
    assert "envoy.bytes_sent" not in sent
    # The store reads the same values, and still indexes the status.
    assert record.status == 403
    assert dict(record.attributes)["http.response.status_code"] == "403"


def test_envoy_span_tags_become_current_names_with_typed_values() -> None:
    request = trace_service_pb2.ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add(
        name="ingress", start_time_unix_nano=1, end_time_unix_nano=2
    )
    for key, value in {
        "http.method": "GET",
        "http.status_code": "200",
        "http.url": "http://digits/v1/predict",
        "user_agent": "curl/8",
        "response_size": "97",
    }.items():
        span.attributes.add(key=key).value.string_value = value
    receiver, forwarded = _receiver()
    (record,) = receiver.ingest_traces(request)
    sent = _values(forwarded[0].resource_spans[0].scope_spans[0].spans[0].attributes)
    assert sent == {
        "http.request.method": ("string_value", "GET"),
        "http.response.status_code": ("int_value", 200),
        "url.full": ("string_value", "http://digits/v1/predict"),
        "user_agent.original": ("string_value", "curl/8"),
        "http.response.body.size": ("int_value", 97),
    }
    assert record.status == 200 and "http.method" not in dict(record.attributes)


def test_the_egress_port_is_the_destinations_not_the_listeners() -> None:
    attributes = dict(egress_translate.EGRESS_ATTRIBUTES)
    assert attributes["port"] == "modelguard.egress.port"
    assert attributes["outbound_port"] == "modelguard.egress.listener.port"
    # What the sidecar fills in: the port it dialled (upstream), for HTTP and TLS alike.
    root = Path(__file__).resolve().parents[2]
    args = build_parser().parse_args(["run", "--policies", str(root / "policies")])
    loaded, _ = load_paths([str(root / "policies")])
    ir = egress_of(compile_sidecar(demo_sidecar(args, 8080), [lp.policy for lp in loaded]))
    assert ir is not None
    assert egress_translate._http_fields(ir)["port"] == "%UPSTREAM_REMOTE_PORT%"
    assert egress_translate._tcp_fields(ir, "allowed", "p", "r")["port"] == "%UPSTREAM_REMOTE_PORT%"
    assert egress_translate._http_fields(ir)["outbound_port"] == "15001"


def test_spans_from_the_control_plane_keep_their_names() -> None:
    request = trace_service_pb2.ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add(name="modelguard.push")
    span.attributes.add(key="modelguard.sidecars").value.int_value = 3
    receiver, forwarded = _receiver()
    receiver.ingest_traces(request)
    sent = _values(forwarded[0].resource_spans[0].scope_spans[0].spans[0].attributes)
    assert sent == {"modelguard.sidecars": ("int_value", 3)}
    assert common_pb2.AnyValue(int_value=3).int_value == 3
