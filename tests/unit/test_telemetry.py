"""Telemetry: verdicts from Envoy's attributes, secrets scrubbed, settings, the translation
(golden file + ``envoy --mode validate`` with the bootstrap's runtime layer)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from opentelemetry.proto.common.v1 import common_pb2

from controlplane.compile import compile_sidecar
from controlplane.compile.inputs.inventory import Sidecar
from controlplane.local.envoy import validate_config
from controlplane.sidecar.bootstrap import TELEMETRY_RUNTIME, build_bootstrap, xds_cluster
from controlplane.telemetry.records import (
    CLIENT_HASH_ATTRIBUTE,
    hash_secret,
    scrub_attributes,
    verdict_of,
)
from controlplane.telemetry.settings import SettingsError, TelemetrySettings
from controlplane.translate import translate
from controlplane.translate.render import to_dict, validation_bootstrap
from controlplane.xds import resources as rt

GOLDEN = Path(__file__).parent.parent / "testdata" / "telemetry" / "connection_manager.yaml"
SIDECAR = Sidecar(
    node_id="digits-model-0",
    service="digits-model",
    namespace="demo",
    identity="spiffe://cluster.local/ns/demo/sa/digits-model",
    app_port=8080,
    inbound_port=10000,
)
SETTINGS = TelemetrySettings(sampling_percent=25.0, header_attributes=("user-agent",))


@pytest.mark.parametrize(
    ("attrs", "want"),
    [
        (
            {"http.response.status_code": "200", "envoy.response_code_details": "via_upstream"},
            ("allowed", ""),
        ),
        (
            {
                "http.response.status_code": "403",
                "envoy.response_code_details": "rbac_access_denied_matched_policy[none]",
            },
            ("denied", "default-deny"),
        ),
        (
            {
                "http.response.status_code": "403",
                "envoy.response_code_details": "rbac_access_denied_matched_policy[demo.p.rule-1]",
            },
            ("denied", "demo.p.rule-1"),
        ),
        (
            {
                "http.response.status_code": "429",
                "envoy.response_flags": "RL",
                "envoy.response_code_details": "local_rate_limited",
                "modelguard.ratelimit.limit": "demo.p.burst",
            },
            ("rate_limited", "demo.p.burst"),
        ),
        (
            {
                "http.response.status_code": "429",
                "envoy.response_flags": "RL",
                "envoy.response_code_details": "request_rate_limited",
            },
            ("rate_limited", "request_rate_limited"),
        ),
        (
            {"http.response.status_code": "200", "modelguard.output.hardened": "topK=1"},
            ("hardened", "topK=1"),
        ),
        (
            {
                "http.response.status_code": "200",
                "envoy.rbac.audit_allow_shadow_engine_result": "denied",
            },
            ("audit_denied", "default-deny"),
        ),
        # Envoy's own span tags use other names for the same facts.
        ({"http.status_code": "429", "response_flags": "RL"}, ("rate_limited", "")),
    ],
)
def test_verdicts(attrs: dict[str, str], want: tuple[str, str]) -> None:
    verdict, rule = verdict_of(attrs)
    assert (str(verdict), rule) == want


def test_no_verdict_on_the_control_planes_own_spans() -> None:
    assert verdict_of({"modelguard.revision": "3"}) == (None, "")


def _kv(key: str, value: str) -> common_pb2.KeyValue:
    return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(string_value=value))


def test_secrets_are_hashed_and_empty_values_dropped() -> None:
    kept = scrub_attributes(
        [
            _kv("modelguard.client.key", "k-123"),
            _kv("http.request.header.authorization", "Bearer abc"),
            _kv("http.request.header.user-agent", "curl"),
            _kv("modelguard.caller.identity", "-"),
            _kv("url.path", "/v1/predict"),
        ],
        ("authorization",),
    )
    got = {kv.key: kv.value.string_value for kv in kept}
    assert got == {
        CLIENT_HASH_ATTRIBUTE: hash_secret("k-123"),
        "http.request.header.authorization": hash_secret("Bearer abc"),
        "http.request.header.user-agent": "curl",
        "url.path": "/v1/predict",
    }


def test_settings_report_every_bad_value() -> None:
    with pytest.raises(SettingsError) as err:
        TelemetrySettings(
            sampling_percent=150,
            header_attributes=("User Agent",),
            max_bytes=0,
            forward_endpoint="nowhere",
        )
    message = str(err.value)
    for part in ("sampling_percent", "'User Agent'", "max_bytes", "forward_endpoint"):
        assert part in message


def _manager(resources: dict[str, list[object]]) -> dict[str, object]:
    listener = to_dict(resources[rt.LISTENER][0])  # type: ignore[arg-type]
    config: dict[str, object] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return config


def test_translation_matches_golden() -> None:
    manager = _manager(translate(compile_sidecar(SIDECAR, [], SETTINGS)))  # type: ignore[arg-type]
    want = yaml.safe_dump(
        {"tracing": manager["tracing"], "access_log": manager["access_log"]}, sort_keys=True
    )
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(want)
    assert GOLDEN.read_text() == want, (
        "stale; regenerate: UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_telemetry.py"
    )


def test_no_settings_no_telemetry() -> None:
    manager = _manager(translate(compile_sidecar(SIDECAR, [])))  # type: ignore[arg-type]
    assert "tracing" not in manager and "access_log" not in manager
    off = TelemetrySettings(enabled=False)
    manager = _manager(translate(compile_sidecar(SIDECAR, [], off)))  # type: ignore[arg-type]
    assert "tracing" not in manager


def test_envoy_accepts_the_telemetry_config_and_the_runtime_layer() -> None:
    resources = translate(compile_sidecar(SIDECAR, [], SETTINGS))
    config = validation_bootstrap(resources)
    config["static_resources"]["clusters"].append(xds_cluster("127.0.0.1", 18000))
    bootstrap = build_bootstrap(SIDECAR, xds_host="127.0.0.1", xds_port=18000, admin_port=0)
    config["layered_runtime"] = bootstrap["layered_runtime"]
    assert bootstrap["layered_runtime"]["layers"][0]["static_layer"] == TELEMETRY_RUNTIME
    ok, output = validate_config(config)
    assert ok, output


def test_collector_manifest_receives_otlp_and_exports_to_the_one_value() -> None:
    import kubernetes_validate

    path = Path(__file__).parent.parent.parent / "k8s" / "otel-collector" / "collector.yaml"
    objects = {
        o["kind"] + "/" + o["metadata"]["name"]: o for o in yaml.safe_load_all(path.read_text())
    }
    for obj in objects.values():
        kubernetes_validate.validate(obj, "1.31", strict=True)
    config = yaml.safe_load(objects["ConfigMap/otel-collector-config"]["data"]["config.yaml"])
    for signal in ("traces", "logs", "metrics"):
        pipeline = config["service"]["pipelines"][signal]
        assert pipeline["receivers"] == ["otlp"] and pipeline["exporters"] == ["otlp"]
    assert config["exporters"]["otlp"]["endpoint"] == "${env:EXPORT_ENDPOINT}"
    container = objects["Deployment/otel-collector"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["valueFrom"]["configMapKeyRef"] for e in container["env"]}
    assert env["EXPORT_ENDPOINT"] == {"name": "otel-collector-export", "key": "endpoint"}
    assert objects["ConfigMap/otel-collector-export"]["data"]["endpoint"].endswith(":4317")
    ports = {p["port"] for p in objects["Service/otel-collector"]["spec"]["ports"]}
    assert ports == {4317, 4318}


def test_the_default_samples_one_percent_of_traces_and_logs_every_request() -> None:
    """Istio's default: 1 % of requests traced, every request access-logged."""
    assert TelemetrySettings().sampling_percent == 1.0
    manager = _manager(translate(compile_sidecar(SIDECAR, [], TelemetrySettings())))  # type: ignore[arg-type]
    assert manager["tracing"]["random_sampling"] == {"value": 1.0}
    assert manager["access_log"][0]["name"] == "envoy.access_loggers.open_telemetry"


def test_normalized_attributes_are_the_scrubbed_attributes() -> None:
    """The receiver's one-pass reading (no forwarder) keeps exactly what scrubbing keeps."""
    from controlplane.telemetry.records import (
        attribute_map,
        normalized_attributes,
        secret_attributes,
    )

    attributes = [
        _kv("modelguard.client.key", "k-123"),
        _kv("http.request.header.authorization", "Bearer abc"),
        _kv("http.request.header.cookie", "-"),
        _kv("http.request.header.user-agent", "curl"),
        _kv("modelguard.caller.identity", "-"),
        _kv("envoy.route", ""),
        _kv("url.path", "/v1/predict"),
        common_pb2.KeyValue(key="envoy.bytes_sent", value=common_pb2.AnyValue(int_value=42)),
        common_pb2.KeyValue(key="flag", value=common_pb2.AnyValue(bool_value=True)),
        common_pb2.KeyValue(key="raw", value=common_pb2.AnyValue(bytes_value=b"\x01\xff")),
        common_pb2.KeyValue(key="unset", value=common_pb2.AnyValue()),
        common_pb2.KeyValue(
            key="http.request.header.x-api-key", value=common_pb2.AnyValue(int_value=7)
        ),
    ]
    secret = ("authorization", "cookie", "x-api-key")
    want = attribute_map(scrub_attributes(attributes, secret))
    got = normalized_attributes(attributes, secret_attributes(secret))
    assert got == want
    assert got[CLIENT_HASH_ATTRIBUTE] == hash_secret("k-123")
    assert got["http.request.header.x-api-key"] == hash_secret("7")
    assert got["envoy.bytes_sent"] == "42" and got["flag"] == "true"
    assert "http.request.header.cookie" not in got and "unset" not in got


def test_without_a_forwarder_the_export_is_read_not_rewritten() -> None:
    """No forwarder: records are hashed, the export itself is left alone (it is dropped);
    with one, the forwarded export carries hashes and the derived verdict."""
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2

    from controlplane.telemetry.receiver import OtlpReceiver
    from controlplane.telemetry.store import TelemetryStore

    def export() -> logs_service_pb2.ExportLogsServiceRequest:
        request = logs_service_pb2.ExportLogsServiceRequest()
        entry = request.resource_logs.add().scope_logs.add().log_records.add()
        entry.attributes.extend(
            [
                _kv("modelguard.client.key", "plain-key"),
                _kv("http.response.status_code", "200"),
                _kv("envoy.response_code_details", "via_upstream"),
            ]
        )
        return request

    local = OtlpReceiver(TelemetrySettings(), TelemetryStore(100, 1 << 20))
    request = export()
    before = request.SerializeToString()
    (record,) = local.ingest_logs(request)
    assert record.client == hash_secret("plain-key") and record.verdict == "allowed"
    assert request.SerializeToString() == before

    sent: list[logs_service_pb2.ExportLogsServiceRequest] = []
    forwarding = OtlpReceiver(TelemetrySettings(), TelemetryStore(100, 1 << 20), sent.append)
    (record,) = forwarding.ingest_logs(export())
    (forwarded,) = sent
    out = {
        kv.key: kv.value.string_value
        for kv in forwarded.resource_logs[0].scope_logs[0].log_records[0].attributes
    }
    assert "plain-key" not in str(forwarded)
    assert out[CLIENT_HASH_ATTRIBUTE] == hash_secret("plain-key")
    assert out["modelguard.verdict"] == "allowed"
    assert record.client == hash_secret("plain-key")
