"""Golden tests at both steps, as Envoy Gateway has them: policies + one sidecar → the IR
(``ir.yaml`` beside ``in.yaml``), and → Envoy resources as YAML, one file per type (``out/``).

Regenerate with:  UPDATE_GOLDEN=1 .venv/bin/pytest tests/golden
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.api import parse_documents
from controlplane.compile import compile_sidecar
from controlplane.compile.inputs.inventory import Sidecar
from controlplane.extraction.verdicts import Enforcement
from controlplane.ir import SidecarIR
from controlplane.local.envoy import validate_config
from controlplane.translate import translate
from controlplane.translate.render import FILE_NAMES, to_yaml, validation_bootstrap
from controlplane.xds.snapshot import Snapshot

CASES = Path(__file__).parent.parent / "testdata" / "translate"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"
REGENERATE = "UPDATE_GOLDEN=1 .venv/bin/pytest tests/golden"


def _case_ir(case: Path):  # type: ignore[no-untyped-def]
    spec = yaml.safe_load((case / "in.yaml").read_text())
    side = spec["sidecar"]
    sidecar = Sidecar(
        node_id=side["node_id"],
        service=side["service"],
        namespace=side["namespace"],
        identity=side.get(
            "identity", f"spiffe://cluster.local/ns/{side['namespace']}/sa/{side['service']}"
        ),
        app_port=side["app_port"],
        inbound_port=side["inbound_port"],
        labels=tuple(sorted((side.get("labels") or {}).items())),
        outbound_port=side.get("outbound_port"),
        mesh_port=side.get("mesh_port"),
    )
    loaded, violations = parse_documents(yaml.safe_dump_all(spec["policies"]), str(case))
    assert not violations, [str(v) for v in violations]
    # Extraction verdicts in force (quarantines, throttles): an input of compile.
    verdicts = [Enforcement.from_json(v) for v in spec.get("verdicts") or []]
    mesh = _mesh(spec.get("mesh"), sidecar)
    policies = [lp.policy for lp in loaded]
    return compile_sidecar(sidecar, policies, verdicts=verdicts, mesh=mesh)


def _case_resources(case: Path):  # type: ignore[no-untyped-def]
    return translate(_case_ir(case))


def ir_data(value: Any) -> Any:
    """The IR as plain YAML data: dataclasses as mappings in field order, enums by value.
    Fields kept out of ``repr`` (private keys, trust bundles) appear only as a digest."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if not f.repr:
                out[f.name] = "sha256:" + hashlib.sha256(str(item).encode()).hexdigest()[:16]
            elif isinstance(value, SidecarIR) and f.name == "features":  # by kind
                out[f.name] = {kind: ir_data(part) for kind, part in item}
            else:
                out[f.name] = ir_data(item)
        return out
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [ir_data(v) for v in value]
    return value


def ir_yaml(ir: Any) -> str:
    return yaml.safe_dump(ir_data(ir), sort_keys=False, width=100)


def _mesh(raw, sidecar):  # type: ignore[no-untyped-def]
    """``mesh:`` of a case: the sidecar gets the fixed test SVID (tests/testdata/identity),
    ``services`` are the other sidecars, ``apiKeys`` the key Secrets (keys hashed here)."""
    if raw is None:
        return None
    from controlplane.compile.mesh import MeshInputs, mesh_services
    from controlplane.identity.apikeys import digest
    from controlplane.ir import WorkloadCertificate

    pem = CASES.parent / "identity"
    certificate = WorkloadCertificate(
        spiffe_id=sidecar.identity,
        certificate_pem=(pem / "svid.crt").read_text(),
        private_key_pem=(pem / "svid.key").read_text(),
        trust_bundle_pem=(pem / "ca.crt").read_text(),
    )
    others = [
        Sidecar(
            node_id=f"{s['service']}-{i}",
            service=s["service"],
            namespace=s["namespace"],
            identity=f"spiffe://cluster.local/ns/{s['namespace']}/sa/{s['service']}",
            app_port=8080,
            inbound_port=s["port"],
            inbound_address=s.get("address", "10.0.0.1"),
        )
        for i, s in enumerate(raw.get("services", []))
    ]
    from controlplane.identity.apikeys import ApiKey

    def key(client, value):  # type: ignore[no-untyped-def]
        # A key, or {key, tenant, tier, principals} (a key with its metadata).
        if isinstance(value, str):
            return ApiKey(client, digest(value), client)
        return ApiKey(
            client, digest(value["key"]), value.get("tenant", client), value.get("tier", ""),
            tuple(value.get("principals", ())),
        )

    keys = {
        tuple(ref.split("/")): tuple(sorted(key(c, k) for c, k in clients.items()))
        for ref, clients in (raw.get("apiKeys") or {}).items()
    }
    return MeshInputs(
        certificates={sidecar.node_id: certificate},
        api_keys=keys,
        services=mesh_services([sidecar, *others]),
    )


CASE_DIRS = sorted(p for p in CASES.iterdir() if (p / "in.yaml").exists())


@pytest.mark.parametrize("case", CASE_DIRS, ids=[p.name for p in CASE_DIRS])
def test_compile_matches_ir_golden(case: Path) -> None:
    want = ir_yaml(_case_ir(case))
    golden = case / "ir.yaml"
    if UPDATE:
        golden.write_text(want)
    assert golden.exists(), f"{case.name}/ir.yaml is missing; regenerate: {REGENERATE}"
    assert golden.read_text() == want, f"{case.name}/ir.yaml is stale; regenerate: {REGENERATE}"


@pytest.mark.parametrize("case", CASE_DIRS, ids=[p.name for p in CASE_DIRS])
def test_translation_matches_golden(case: Path) -> None:
    resources = _case_resources(case)
    out = case / "out"
    want = {f"{FILE_NAMES[t]}.yaml": to_yaml(msgs) for t, msgs in resources.items()}
    if UPDATE:
        out.mkdir(exist_ok=True)
        for orphan in out.glob("*.yaml"):
            if orphan.name not in want:
                orphan.unlink()
        for name, text in want.items():
            (out / name).write_text(text)
    have = {p.name: p.read_text() for p in out.glob("*.yaml")} if out.exists() else {}
    assert sorted(have) == sorted(want), f"golden files differ in name; regenerate: {REGENERATE}"
    for name, text in want.items():
        assert have[name] == text, f"{case.name}/out/{name} is stale; regenerate: {REGENERATE}"


@pytest.mark.parametrize("case", CASE_DIRS, ids=[p.name for p in CASE_DIRS])
def test_translation_is_a_consistent_snapshot_envoy_accepts(case: Path) -> None:
    resources = _case_resources(case)
    Snapshot.build(resources)  # raises InconsistentSnapshot on dangling names
    ok, output = validate_config(validation_bootstrap(resources))
    assert ok, output
