"""EgressPolicy → EgressIR (who decides, what is allowed) and the outbound port's plumbing."""

from __future__ import annotations

import argparse

import pytest
import yaml

from controlplane import bootstrap
from controlplane.api import EgressPolicy, parse_documents
from controlplane.compile import compile_sidecar
from controlplane.compile.egress import compile_egress
from controlplane.inventory import InventoryError, Sidecar
from controlplane.ir import EgressBudget, EgressDestination, EgressIR, EgressProtocol, PolicyRef
from controlplane.translate import translate
from controlplane.translate.egress import route_configuration
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
    assert compile_sidecar(sidecar, []).egress is None


def test_no_policy_is_default_deny_by_the_sidecar() -> None:
    assert compile_egress(SIDECAR, []) == EgressIR(
        listen_address="127.0.0.1", port=15001, enforce=True, allowed=(), deciding=()
    )


def test_rules_become_destinations_with_protocols_and_budgets() -> None:
    egress = compile_egress(
        SIDECAR,
        [
            policy(
                "p",
                "Enforce",
                {"host": "api.example.com", "ports": [80], "protocol": "HTTP"},
                {"host": "*.s3.example.com", "ports": [443, 8443]},
                {
                    "host": "up.example.com",
                    "ports": [443],
                    "protocol": "TLS",
                    "budget": {"bytes": 1000, "per": "day"},
                },
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
            EgressBudget(1000, 86400),
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
    assert ir.egress is not None and ir.egress.enforce and ir.egress.allowed == ()


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
    bootstrap.add_arguments(parser)
    common = ["--service", "m", "--app-port", "8080", "--inbound-port", "15006"]
    common += ["--admin-port", "15000", "--xds", "127.0.0.1:18000"]
    args = parser.parse_args([*common, "--outbound-port", "15001"])
    assert bootstrap.sidecar_from_args(args).outbound_port == 15001
    assert bootstrap.sidecar_from_args(parser.parse_args(common)).outbound_port is None
