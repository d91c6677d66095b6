"""EgressPolicy → EgressIR (who decides, what is allowed) and the outbound port's plumbing."""

from __future__ import annotations

import argparse
from typing import Any

import pytest
import yaml
from google.protobuf.message import Message

from controlplane.api import EgressPolicy, parse_documents
from controlplane.app import bootstrap_cli
from controlplane.app.admin import egress_blocks
from controlplane.app.status_cli import render
from controlplane.compile import compile_sidecar
from controlplane.compile.inputs.inventory import InventoryError, Sidecar
from controlplane.gen.modelguard.admin.v1 import admin_pb2
from controlplane.ir import PolicyRef
from controlplane.local.envoy import validate_config
from controlplane.policies.egress.compile import compile_egress
from controlplane.policies.egress.ir import EgressDestination, EgressIR, EgressProtocol
from controlplane.policies.egress.ir import of as egress_of
from controlplane.policies.egress.translate import (
    EGRESS_ATTRIBUTES,
    OTEL_ACCESS_LOGGER,
    route_configuration,
)
from controlplane.telemetry import records
from controlplane.telemetry.records import Kind, Record, make_record
from controlplane.telemetry.settings import TelemetrySettings
from controlplane.telemetry.store import TelemetryStore
from controlplane.translate import translate
from controlplane.translate.render import to_dict, validation_bootstrap
from controlplane.xds import resources as rt

SIDECAR = Sidecar(
    node_id="digits-model-0",
    service="digits-model",
    namespace="demo",
    identity="spiffe://cluster.local/ns/demo/sa/digits-model",
    app_port=8080,
    inbound_port=15006,
    outbound_port=15001,
)


def policy(name: str, mode: str = "Enforce", *rules: dict[str, object]) -> EgressPolicy:
    doc = {
        "apiVersion": "modelguard.io/v1alpha1",
        "kind": "EgressPolicy",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": {"targetRef": {"service": "digits-model"}, "mode": mode, "allow": list(rules)},
    }
    loaded, violations = parse_documents(yaml.safe_dump(doc), "test.yaml")
    assert not violations, [str(v) for v in violations]
    result = loaded[0].policy
    assert isinstance(result, EgressPolicy)
    return result


def ref(name: str) -> PolicyRef:
    return PolicyRef("EgressPolicy", "demo", name)


def test_no_outbound_port_means_no_egress_ir() -> None:
    sidecar = Sidecar(**{**SIDECAR.__dict__, "outbound_port": None})
    assert (
        compile_egress(sidecar, [policy("p", "Enforce", {"host": "a.com", "ports": [443]})]) is None
    )
    assert egress_of(compile_sidecar(sidecar, [])) is None


def test_no_policy_is_default_deny_by_the_sidecar() -> None:
    assert compile_egress(SIDECAR, []) == EgressIR(
        listen_address="127.0.0.1", port=15001, enforce=True, allowed=(), deciding=()
    )


def test_rules_become_destinations_with_protocols() -> None:
    egress = compile_egress(
        SIDECAR,
        [
            policy(
                "p",
                "Enforce",
                {"host": "api.example.com", "ports": [80], "protocol": "HTTP"},
                {"host": "*.s3.example.com", "ports": [443, 8443]},
                {"host": "up.example.com", "ports": [443], "protocol": "TLS"},
            )
        ],
    )
    assert egress is not None
    assert egress.allowed == (
        EgressDestination(
            "demo.p.allow-0", ref("p"), "api.example.com", (80,), (EgressProtocol.HTTP,)
        ),
        EgressDestination(
            "demo.p.allow-1",
            ref("p"),
            "*.s3.example.com",
            (443, 8443),
            (EgressProtocol.HTTP, EgressProtocol.TLS),
        ),
        EgressDestination(
            "demo.p.allow-2",
            ref("p"),
            "up.example.com",
            (443,),
            (EgressProtocol.TLS,),
        ),
    )
    assert [d.wildcard for d in egress.allowed] == [False, True, False]


def test_enforced_policies_merge_and_audited_ones_open_nothing_beside_them() -> None:
    enforced_b = policy("b", "Enforce", {"host": "b.com", "ports": [443]})
    enforced_a = policy("a", "Enforce", {"host": "a.com", "ports": [443]})
    audited = policy("c", "Audit", {"host": "c.com", "ports": [443]})
    egress = compile_egress(SIDECAR, [enforced_b, audited, enforced_a])
    assert egress is not None
    assert egress.enforce
    assert [d.host for d in egress.allowed] == ["a.com", "b.com"]
    assert egress.deciding == (ref("a"), ref("b"))


def test_audit_only_policies_let_everything_through() -> None:
    egress = compile_egress(SIDECAR, [policy("c", "Audit", {"host": "c.com", "ports": [443]})])
    assert egress is not None
    assert not egress.enforce
    assert [d.host for d in egress.allowed] == ["c.com"]
    assert egress.deciding == (ref("c"),)


def test_policies_of_other_workloads_do_not_apply() -> None:
    other = policy("p", "Audit", {"host": "c.com", "ports": [443]})
    other = other.model_copy(
        update={
            "spec": other.spec.model_copy(
                update={"target_ref": other.spec.target_ref.model_copy(update={"service": "x"})}
            )
        }
    )
    ir = compile_sidecar(SIDECAR, [other])
    assert egress_of(ir) is not None and egress_of(ir).enforce and egress_of(ir).allowed == ()


def test_http_domains_port_80_alone_allows_the_bare_host() -> None:
    egress = compile_egress(
        SIDECAR,
        [
            policy(
                "p",
                "Enforce",
                {"host": "a.com", "ports": [80, 8080], "protocol": "HTTP"},
                {"host": "*.w.com", "ports": [8080], "protocol": "HTTP"},
                {"host": "a.com", "ports": [80, 9090], "protocol": "HTTP"},  # a.com:80 taken
                {"host": "t.com", "ports": [443], "protocol": "TLS"},  # no virtual host
            )
        ],
    )
    assert egress is not None
    vhosts = {v.name: list(v.domains) for v in route_configuration(egress).virtual_hosts}
    assert vhosts == {
        "demo.p.allow-0": ["a.com", "a.com:80", "a.com:8080"],
        "demo.p.allow-1": ["*.w.com:8080"],
        "demo.p.allow-2": ["a.com:9090"],
        "default-deny": ["*"],
    }


def test_translate_adds_the_outbound_listener_only_with_an_outbound_port() -> None:
    with_port = translate(compile_sidecar(SIDECAR, []))
    assert "outbound|15001" in {rt.resource_name(m) for m in with_port[rt.LISTENER]}
    without = translate(compile_sidecar(Sidecar(**{**SIDECAR.__dict__, "outbound_port": None}), []))
    assert all(not rt.resource_name(m).startswith("outbound") for m in without[rt.LISTENER])
    assert all(not rt.resource_name(m).startswith("outbound") for m in without[rt.CLUSTER])


def test_outbound_port_round_trips_through_node_metadata() -> None:
    assert Sidecar.from_metadata(SIDECAR.node_id, SIDECAR.to_metadata()) == SIDECAR
    bare = Sidecar(**{**SIDECAR.__dict__, "outbound_port": None})
    assert "outbound_port" not in bare.to_metadata()["modelguard"]
    assert Sidecar.from_metadata(bare.node_id, bare.to_metadata()) == bare
    bad = SIDECAR.to_metadata()
    bad["modelguard"]["outbound_port"] = 70000
    with pytest.raises(InventoryError, match=r"metadata\.modelguard\.outbound_port"):
        Sidecar.from_metadata(SIDECAR.node_id, bad)


def test_bootstrap_cli_takes_the_outbound_port() -> None:
    parser = argparse.ArgumentParser()
    bootstrap_cli.add_arguments(parser)
    common = ["--service", "m", "--app-port", "8080", "--inbound-port", "15006"]
    common += ["--admin-port", "15000", "--xds", "127.0.0.1:18000"]
    args = parser.parse_args([*common, "--outbound-port", "15001"])
    assert bootstrap_cli.sidecar_from_args(args).outbound_port == 15001
    assert bootstrap_cli.sidecar_from_args(parser.parse_args(common)).outbound_port is None


# --- byte budgets: rejected until enforced ---------------------------------------------------


def test_a_byte_budget_is_rejected_with_its_path_not_silently_ignored() -> None:
    doc = {
        "apiVersion": "modelguard.io/v1alpha1",
        "kind": "EgressPolicy",
        "metadata": {"name": "p", "namespace": "demo"},
        "spec": {
            "targetRef": {"service": "digits-model"},
            "allow": [
                {"host": "a.com", "ports": [443]},
                {"host": "b.com", "ports": [443], "budget": {"bytes": 10, "per": "day"}},
            ],
        },
    }
    loaded, violations = parse_documents(yaml.safe_dump(doc), "egress.yaml")
    assert [str(v) for v in violations] == [
        "egress.yaml[0] EgressPolicy demo/p: spec.allow[1].budget: byte budgets are not "
        "enforced yet; remove `budget` (the rule itself is enforced without it)"
    ]
    assert loaded == []


# --- telemetry: egress decisions as OpenTelemetry log records --------------------------------

TELEMETRY = TelemetrySettings()


def _otel_configs(resources: dict[str, list[Message]]) -> list[dict[str, Any]]:
    """Every OpenTelemetry access logger of the outbound listener, as dicts."""
    (outbound,) = [m for m in resources[rt.LISTENER] if rt.resource_name(m) == "outbound|15001"]
    found = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("name") == OTEL_ACCESS_LOGGER:
                found.append(node["typed_config"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(to_dict(outbound))
    return found


def _attributes(config: dict[str, Any]) -> dict[str, str]:
    return {kv["key"]: kv["value"]["string_value"] for kv in config["attributes"]["values"]}


def test_every_outbound_chain_logs_to_the_control_plane_when_telemetry_is_on() -> None:
    p = policy(
        "p",
        "Enforce",
        {"host": "api.example.com", "ports": [80], "protocol": "HTTP"},
        {"host": "t.example.com", "ports": [443], "protocol": "TLS"},
    )
    resources = translate(compile_sidecar(SIDECAR, [p], telemetry=TELEMETRY))
    configs = _otel_configs(resources)
    # HTTP connection manager, the allowed TLS chain, the default (blocked) TLS chain.
    assert len(configs) == 3
    by_protocol = {_attributes(c)["modelguard.egress.protocol"]: c for c in configs}
    http = _attributes(by_protocol["HTTP"])
    assert http["modelguard.egress.destination"] == "%REQ(:AUTHORITY)%"
    assert http["modelguard.egress.verdict"] == "%METADATA(ROUTE:modelguard.egress:verdict)%"
    assert http["modelguard.policy"] == "%METADATA(ROUTE:modelguard.egress:policy)%"
    tls = [_attributes(c) for c in configs if _attributes(c)["modelguard.egress.protocol"] == "TLS"]
    assert {(a["modelguard.egress.verdict"], a["modelguard.policy"]) for a in tls} == {
        ("allowed", "EgressPolicy/demo/p"),
        ("blocked", "EgressPolicy/demo/p"),
    }
    assert all(a["modelguard.egress.destination"] == "%REQUESTED_SERVER_NAME%" for a in tls)
    resource = {
        kv["key"]: kv["value"]["string_value"] for kv in configs[0]["resource_attributes"]["values"]
    }
    assert resource == {
        "service.name": "digits-model",
        "service.namespace": "demo",
        "modelguard.node_id": "digits-model-0",
    }
    ok, output = validate_config(validation_bootstrap(resources))
    assert ok, output


def test_without_telemetry_decisions_only_go_to_stdout() -> None:
    resources = translate(compile_sidecar(SIDECAR, []))
    assert _otel_configs(resources) == []


def _egress_record(verdict: str, **extra: str) -> Record:
    attributes = {
        "modelguard.egress.protocol": "HTTP",
        "modelguard.egress.destination": "evil.example.com:80",
        "modelguard.egress.verdict": verdict,
        "modelguard.egress.rule": "default-deny",
        "modelguard.policy": "EgressPolicy/demo/p",
        # A blocked HTTP request is RBAC's 403 too; that is not an access-policy verdict.
        "http.response.status_code": "403",
        "envoy.response_code_details": "rbac_access_denied_matched_policy[none]",
        **extra,
    }
    return make_record(
        Kind.LOG,
        time_unix_nano=1_000_000_000,
        source="sidecar",
        resource={"service.name": "digits-model", "modelguard.node_id": "digits-model-0"},
        name="egress blocked HTTP evil.example.com:80",
        attributes=attributes,
    )


def test_the_receiver_reads_the_egress_verdict_the_sidecar_sends() -> None:
    # The names the translation asks Envoy for are the ones the receiver reads.
    sent = {attribute for _field, attribute in EGRESS_ATTRIBUTES}
    assert {
        records.EGRESS_DESTINATION_ATTRIBUTE,
        records.EGRESS_VERDICT_ATTRIBUTE,
        records.EGRESS_RULE_ATTRIBUTE,
        records.POLICY_ATTRIBUTE,
    } <= sent
    blocked = _egress_record("blocked")
    assert (blocked.verdict, blocked.rule) == ("blocked", "default-deny")
    assert dict(blocked.attributes)["modelguard.verdict"] == "blocked"
    assert _egress_record("would-block").verdict == "would-block"
    allowed = _egress_record("allowed", **{"modelguard.egress.rule": "demo.p.allow-0"})
    assert (allowed.verdict, allowed.rule) == ("allowed", "demo.p.allow-0")


def test_status_lists_recent_blocked_destinations_per_sidecar() -> None:
    store = TelemetryStore(max_records=100, max_bytes=1 << 20)
    store.add([_egress_record("blocked") for _ in range(3)])
    store.add(
        [
            _egress_record(
                "would-block", **{"modelguard.egress.destination": "c2.example.net"}
            )._replace(time_unix_nano=5_000_000_000),
            _egress_record("allowed")._replace(time_unix_nano=9_000_000_000),
        ]
    )
    blocks = egress_blocks(store)
    assert list(blocks) == ["digits-model-0"]
    assert [
        (b.destination, b.verdict, b.count, b.last_seen.seconds, b.policy)
        for b in blocks["digits-model-0"]
    ] == [
        ("c2.example.net", "would-block", 1, 5, "EgressPolicy/demo/p"),
        ("evil.example.com:80", "blocked", 3, 1, "EgressPolicy/demo/p"),
    ]
    report = admin_pb2.StatusReport()
    report.generated_at.FromSeconds(65)
    report.sidecars.add(node_id="digits-model-0", egress_blocked=blocks["digits-model-0"])
    text = render(report)
    lines = text.splitlines()
    header = lines.index("Egress blocked (recent telemetry):")
    assert lines[header + 1].split() == [
        "SIDECAR",
        "DESTINATION",
        "PROTOCOL",
        "VERDICT",
        "COUNT",
        "LAST",
        "SEEN",
        "POLICY",
    ]
    assert lines[header + 2].split() == [
        "digits-model-0",
        "c2.example.net",
        "HTTP",
        "would-block",
        "1",
        "1m",
        "ago",
        "EgressPolicy/demo/p",
    ]
    assert lines[header + 3].split()[1:5] == ["evil.example.com:80", "HTTP", "blocked", "3"]
    assert "Egress blocked" not in render(admin_pb2.StatusReport())


# --- make run: the demo sidecar has a way out, and policies/egress.yaml governs it -----------


def test_make_run_gives_the_demo_workload_an_enforced_way_out() -> None:
    from pathlib import Path

    from controlplane.api import load_paths
    from controlplane.app.cli import build_parser
    from controlplane.app.runner import banner, demo_sidecar

    root = Path(__file__).resolve().parents[2]
    args = build_parser().parse_args(["run", "--policies", str(root / "policies")])
    assert args.outbound_port == 15001
    sidecar = demo_sidecar(args, model_port=8080)
    loaded, violations = load_paths([str(root / "policies")])
    assert not violations
    egress = egress_of(compile_sidecar(sidecar, [lp.policy for lp in loaded]))
    assert egress is not None and egress.enforce and egress.port == 15001
    assert egress.deciding == (ref("digits-model"),)
    assert {d.host for d in egress.allowed} == {
        "otel-collector.observability",
        "*.s3.amazonaws.com",
    }
    text = banner(args, 18001, Path(".modelguard"))
    assert "curl -s -x http://127.0.0.1:15001 http://example.com/" in text
    assert "traces --admin 127.0.0.1:18001 --verdict blocked" in text

    off = build_parser().parse_args(["run", "--outbound-port", "0"])
    assert demo_sidecar(off, 8080).outbound_port is None
    assert "15001" not in banner(off, 18001, Path(".modelguard"))
