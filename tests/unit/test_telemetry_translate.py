"""The access logger asks Envoy only for attributes the sidecar's configuration can fill, and
leaving one out is invisible: the receiver reads an absent attribute as Envoy's "-"."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.common.v1 import common_pb2

from controlplane.api import parse_documents
from controlplane.compile import compile_sidecar
from controlplane.compile.inputs.inventory import Sidecar
from controlplane.ir import MtlsIR, MtlsMode, SidecarIR, WorkloadCertificate
from controlplane.telemetry.receiver import OtlpReceiver
from controlplane.telemetry.settings import TelemetrySettings
from controlplane.telemetry.store import TelemetryStore
from controlplane.translate import translate
from controlplane.translate.render import to_dict
from controlplane.translate.telemetry import (
    ACCESS_LOGGER,
    CLIENT_KEY_ATTRIBUTE,
    CONDITIONAL_ATTRIBUTES,
    LOG_ATTRIBUTES,
)
from controlplane.xds import resources as rt

SIDECAR = Sidecar(
    node_id="digits-model-0",
    service="digits-model",
    namespace="demo",
    identity="spiffe://cluster.local/ns/demo/sa/digits-model",
    app_port=8080,
    inbound_port=10000,
)
AUDIT = {"audit_deny_", "audit_allow_"}
POLICIES = {
    "none": "",
    "enforced only": """
apiVersion: modelguard.io/v1alpha1
kind: AccessPolicy
metadata: {name: p, namespace: demo}
spec:
  targetRef: {service: digits-model}
  defaultAction: Deny
  rules:
  - {name: predict, action: Allow, to: {paths: [/v1/predict]}}
  - {name: admin, action: Deny, to: {paths: [/admin]}}
""",
    "audit deny": """
apiVersion: modelguard.io/v1alpha1
kind: AccessPolicy
metadata: {name: a, namespace: demo}
spec:
  targetRef: {service: digits-model}
  mode: Audit
  defaultAction: Allow
  rules:
  - {name: admin, action: Deny, to: {paths: [/admin]}}
""",
    "audit default deny": """
apiVersion: modelguard.io/v1alpha1
kind: AccessPolicy
metadata: {name: a, namespace: demo}
spec:
  targetRef: {service: digits-model}
  mode: Audit
  defaultAction: Deny
  rules:
  - {name: predict, action: Allow, to: {paths: [/v1/predict]}}
""",
    "hardening": """
apiVersion: modelguard.io/v1alpha1
kind: ExtractionPolicy
metadata: {name: e, namespace: demo}
spec:
  targetRef: {service: digits-model}
  clientKey: {header: x-api-key}
  request: {features: "$.instances[*]"}
  response: {scores: "$.predictions[*]"}
  output: {topK: 1}
""",
    "feed only": """
apiVersion: modelguard.io/v1alpha1
kind: ExtractionPolicy
metadata: {name: e, namespace: demo}
spec:
  targetRef: {service: digits-model}
  clientKey: {header: x-api-key}
  request: {features: "$.instances[*]"}
  response: {scores: "$.predictions[*]"}
  detection: {sensitivity: high}
""",
}


def _ir(policy: str, mtls: bool = False) -> SidecarIR:
    loaded, violations = parse_documents(policy, "test") if policy else ([], [])
    assert not violations, [str(v) for v in violations]
    ir = compile_sidecar(SIDECAR, [lp.policy for lp in loaded], TelemetrySettings())
    if mtls:
        pem = Path(__file__).parent.parent / "testdata" / "identity"
        certificate = WorkloadCertificate(
            spiffe_id=SIDECAR.identity,
            certificate_pem=(pem / "svid.crt").read_text(),
            private_key_pem=(pem / "svid.key").read_text(),
            trust_bundle_pem=(pem / "ca.crt").read_text(),
        )
        ir = dataclasses.replace(ir, mtls=MtlsIR(mode=MtlsMode.STRICT, certificate=certificate))
    return ir


def _inbound(ir: SidecarIR) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the inbound filter chain, its connection manager) as Envoy gets them."""
    listener = to_dict(translate(ir)[rt.LISTENER][0])
    chain: dict[str, Any] = listener["filter_chains"][0]
    return chain, chain["filters"][0]["typed_config"]


def _logged(manager: dict[str, Any]) -> set[str]:
    [config] = [
        log["typed_config"] for log in manager["access_log"] if log["name"] == ACCESS_LOGGER
    ]
    return {kv["key"] for kv in config["attributes"]["values"]}


def _shadow_prefixes(manager: dict[str, Any]) -> set[str]:
    """The metadata prefixes of the RBAC filters' shadow rules: what Envoy can fill the
    envoy.rbac.audit_* attributes from."""
    configs = [f.get("typed_config", {}) for f in manager["http_filters"]]
    return {
        c["shadow_rules_stat_prefix"]
        for c in configs
        if "shadow_rules" in c or "shadow_matcher" in c
    } & AUDIT


@pytest.mark.parametrize("case", sorted(POLICIES))
@pytest.mark.parametrize("mtls", [False, True])
def test_an_attribute_is_logged_exactly_when_the_sidecar_can_fill_it(case: str, mtls: bool) -> None:
    ir = _ir(POLICIES[case], mtls)
    chain, manager = _inbound(ir)
    logged = _logged(manager)
    # Everything unconditional, the client key and the rate limit's name always.
    assert {k for k, _ in LOG_ATTRIBUTES} - set(CONDITIONAL_ATTRIBUTES) <= logged
    assert {CLIENT_KEY_ATTRIBUTE, "modelguard.ratelimit.limit"} <= logged
    # The caller's identity: only where the inbound listener terminates TLS.
    assert ("modelguard.caller.identity" in logged) == ("transport_socket" in chain) == mtls
    # Audit verdicts: exactly the prefixes some RBAC filter's shadow rules write.
    for prefix in AUDIT:
        keys = {f"envoy.rbac.{prefix}shadow_engine_result"}
        keys.add(f"envoy.rbac.{prefix}shadow_effective_policy_id")
        assert (keys <= logged) == (prefix in _shadow_prefixes(manager)), prefix
        assert keys <= logged or not keys & logged
    assert _shadow_prefixes(manager) == {
        "audit deny": {"audit_deny_"},
        "audit default deny": {"audit_allow_"},
    }.get(case, set())
    # What hardening did: only with an ExtractionPolicy that hardens.
    assert ("modelguard.output.hardened" in logged) == (case == "hardening")


def _export(attributes: dict[str, str]) -> logs_service_pb2.ExportLogsServiceRequest:
    request = logs_service_pb2.ExportLogsServiceRequest()
    resource = request.resource_logs.add()
    resource.resource.attributes.add(key="service.name").value.string_value = "digits-model"
    entry = resource.scope_logs.add().log_records.add()
    entry.time_unix_nano = 1
    entry.body.string_value = "POST /v1/predict 200"
    for key, value in attributes.items():
        entry.attributes.add(key=key, value=common_pb2.AnyValue(string_value=value))
    return request


OUTCOMES = [
    {"http.response.status_code": "200", "envoy.response_code_details": "via_upstream"},
    {
        "http.response.status_code": "403",
        "envoy.response_code_details": "rbac_access_denied_matched_policy[demo.p.admin]",
    },
    {
        "http.response.status_code": "429",
        "envoy.response_flags": "RL",
        "envoy.response_code_details": "local_rate_limited",
    },
]


@pytest.mark.parametrize("forward", [False, True])
@pytest.mark.parametrize("outcome", range(len(OUTCOMES)))
def test_the_receiver_reads_a_left_out_attribute_as_envoys_dash(
    outcome: int, forward: bool
) -> None:
    """A record with every conditional attribute "-" (what Envoy sends when it has nothing)
    and one without them: the same record for the store, the CLI and a backend."""
    base = {k: "-" for k, _ in LOG_ATTRIBUTES} | OUTCOMES[outcome]
    base |= {"url.path": "/v1/predict", "envoy.route": "r", CLIENT_KEY_ATTRIBUTE: "k-1"}
    dashed = dict(base) | {k: "-" for k in CONDITIONAL_ATTRIBUTES}
    absent = {k: v for k, v in base.items() if k not in CONDITIONAL_ATTRIBUTES}
    seen = []
    for attributes in (dashed, absent):
        forwarded: list[Any] = []
        receiver = OtlpReceiver(
            TelemetrySettings(),
            TelemetryStore(1000, 1 << 20),
            forwarded.append if forward else None,
        )
        [record] = receiver.ingest_logs(_export(attributes))
        fields = record._replace(raw=b"", size=0)
        out = [
            {kv.key: kv.value.string_value for kv in r.log_records[0].attributes}
            for f in forwarded
            for r in f.resource_logs[0].scope_logs
        ]
        seen.append((fields, record.name, record.attributes, out))
    assert seen[0] == seen[1]
    assert seen[0][0].verdict  # a sidecar request, judged
