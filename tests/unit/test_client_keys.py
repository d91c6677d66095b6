"""Client keys on verified identities (issue 14): the apiKey form, what each key is read
as in the sidecar, and the warning a raw header key gets in validate and status."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.api import parse_documents
from controlplane.api.common import ClientKey
from controlplane.api.warnings import policy_warnings
from controlplane.app.cli import main
from controlplane.app.status_cli import render
from controlplane.compile.inputs.store import PolicyStore, UnitContent
from controlplane.gen.modelguard.admin.v1 import admin_pb2

RATE = """\
apiVersion: modelguard.io/v1alpha1
kind: RatePolicy
metadata: {name: p, namespace: demo}
spec:
  targetRef: {service: m}
  limits:
  - {name: per-key, clientKey: {apiKey: {}}, requests: 20, per: second}
  - {name: cohort, clientKey: {apiKey: {groupBy: tenant}}, requests: 100, per: day, scope: Global}
  - {name: raw, clientKey: {header: x-api-key}, requests: 100, per: day, scope: Global}
"""


def test_each_client_key_is_read_where_the_sidecar_verified_it() -> None:
    cases = {
        '{"apiKey": {}}': ("header", "x-modelguard-key-id"),
        '{"apiKey": {"groupBy": "tenant"}}': ("header", "x-modelguard-tenant"),
        '{"jwtClaim": "sub"}': ("header", "x-modelguard-jwt-sub"),
        '{"jwtClaim": "https://x.io/Org"}': ("header", "x-modelguard-jwt-https---x-io-org"),
        '{"identity": true}': ("identity", ""),
        '{"sourceIP": true}': ("sourceIP", ""),
        '{"header": "X-Api-Key"}': ("header", "x-api-key"),
    }
    for raw, want in cases.items():
        key = ClientKey.model_validate_json(raw)
        assert key.read_as == want, raw
    # The translate side builds the same claim header name (it cannot import the API).
    from controlplane.translate.apikey import claim_header

    assert claim_header("https://x.io/Org") == "x-modelguard-jwt-https---x-io-org"


def test_group_by_takes_key_or_tenant_only() -> None:
    _, violations = parse_documents(RATE.replace("groupBy: tenant", "groupBy: team"), "rate")
    assert [(v.path, v.message) for v in violations] == [
        ("spec.limits[1].clientKey.apiKey.groupBy", "must be one of key, tenant")
    ]
    both = RATE.replace("{apiKey: {}}", "{apiKey: {}, sourceIP: true}")
    _, violations = parse_documents(both, "r")
    assert [v.path for v in violations] == ["spec.limits[0].clientKey"]


def test_a_raw_header_key_warns_in_validate_and_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    loaded, violations = parse_documents(RATE, "rate.yaml")
    assert not violations
    warnings = policy_warnings(loaded[0].policy)
    assert len(warnings) == 1
    assert warnings[0].startswith("spec.limits[2].clientKey.header x-api-key")
    (tmp_path / "rate.yaml").write_text(RATE)
    assert main(["validate", str(tmp_path)]) == 0  # a warning, not an error
    out = capsys.readouterr().out
    assert "RatePolicy demo/p: warning: spec.limits[2].clientKey.header x-api-key" in out
    store = PolicyStore()
    store.apply({"rate.yaml": UnitContent(tuple(loaded), ())})
    (status,) = store.statuses()
    assert status.state == "Accepted" and status.warnings == tuple(warnings)
    report = admin_pb2.StatusReport()
    report.policies.add(
        kind="RatePolicy", namespace="demo", name="p", state="Accepted", serving=True,
        warnings=list(status.warnings),
    )
    shown = render(report)
    assert "Warnings:\n  RatePolicy demo/p: spec.limits[2].clientKey.header" in shown
