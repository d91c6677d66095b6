"""Compile: policies × inventory → one frozen IR per sidecar.

One module per policy kind turns the policies that target a sidecar into its part of the
IR; this module only decides which policies target which sidecar and assembles the parts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from controlplane.api import AccessPolicy, EgressPolicy, ExtractionPolicy, Policy, RatePolicy
from controlplane.compile.caller import compile_caller
from controlplane.compile.mesh import MeshInputs, compile_mtls
from controlplane.compile.telemetry import compile_telemetry
from controlplane.extraction.hardened import Hardened
from controlplane.extraction.verdicts import Enforcement
from controlplane.inventory import Sidecar
from controlplane.ir import InboundIR, PolicyRef, SidecarIR
from controlplane.policies.access import compile as access
from controlplane.policies.access import ir as access_ir_module
from controlplane.policies.egress import ir as egress_ir
from controlplane.policies.egress.compile import compile_egress
from controlplane.policies.extraction import ir as extraction_ir_module
from controlplane.policies.extraction.compile import compile_extraction
from controlplane.policies.extraction.ir import ExtractionFeature
from controlplane.policies.extraction.verdicts_compile import compile_verdicts
from controlplane.policies.rate import compile as rate
from controlplane.policies.rate import ir as rate_ir
from controlplane.store import PolicySet
from controlplane.telemetry.settings import TelemetrySettings


def targets(policy: Policy, sidecar: Sidecar) -> bool:
    """Whether a policy applies to a sidecar: same namespace, and service or labels match."""
    if policy.metadata.namespace != sidecar.namespace:
        return False
    ref = policy.spec.target_ref
    if ref.service is not None:
        return ref.service == sidecar.service
    if ref.selector is not None:
        labels = sidecar.label_map
        return all(labels.get(k) == v for k, v in ref.selector.match_labels.items())
    return False


def policy_ref(policy: Policy) -> PolicyRef:
    return PolicyRef(policy.kind, policy.metadata.namespace, policy.metadata.name)


def compile_sidecar(
    sidecar: Sidecar,
    policies: Iterable[Policy],
    telemetry: TelemetrySettings | None = None,
    mesh: MeshInputs | None = None,
    verdicts: Sequence[Enforcement] = (),
    hardened: Sequence[Hardened] = (),
    xff_num_trusted_hops: int = 0,
) -> SidecarIR:
    mine = sorted(
        (p for p in policies if targets(p, sidecar)),
        key=lambda p: (p.kind, p.metadata.namespace, p.metadata.name),
    )
    access_policies = [p for p in mine if isinstance(p, AccessPolicy)]
    rate_policies = [p for p in mine if isinstance(p, RatePolicy)]
    extraction_policies = [p for p in mine if isinstance(p, ExtractionPolicy)]
    access_ir = access.compile_access(access_policies, mesh)
    mtls_ir = compile_mtls(sidecar, access_policies, mesh)
    extraction_ir = compile_extraction(extraction_policies, hardened)
    verdicts_ir = compile_verdicts(extraction_policies, verdicts)
    # Each kind's part, keyed by kind; absent when the kind has nothing to enforce here.
    parts: dict[str, object | None] = {
        access_ir_module.KIND: access_ir,
        rate_ir.KIND: rate.compile_rate(rate_policies),
        egress_ir.KIND: compile_egress(sidecar, [p for p in mine if isinstance(p, EgressPolicy)]),
        extraction_ir_module.KIND: (
            ExtractionFeature(extraction_ir, verdicts_ir)
            if extraction_ir or verdicts_ir is not None
            else None
        ),
    }
    return SidecarIR(
        node_id=sidecar.node_id,
        service=sidecar.service,
        namespace=sidecar.namespace,
        identity=sidecar.identity,
        inbound=InboundIR(
            listen_address=sidecar.inbound_address,
            port=sidecar.inbound_port,
            app_address=sidecar.app_address,
            app_port=sidecar.app_port,
            xff_num_trusted_hops=xff_num_trusted_hops,
        ),
        mtls=mtls_ir,
        telemetry=compile_telemetry(telemetry),
        features=tuple((k, v) for k, v in sorted(parts.items()) if v is not None),
        caller=compile_caller(
            access_policies, rate_policies, extraction_policies, mesh, access_ir, mtls_ir,
            extraction_ir,
        ),
        policies=tuple(policy_ref(p) for p in mine),
    )


def compile_all(policy_set: PolicySet, sidecars: Iterable[Sidecar]) -> dict[str, SidecarIR]:
    return {s.node_id: compile_sidecar(s, policy_set.policies) for s in sidecars}
