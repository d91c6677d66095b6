"""Compile: policies × inventory → one frozen IR per sidecar.

One module per policy kind turns the policies that target a sidecar into its part of the
IR; this module only decides which policies target which sidecar and assembles the parts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from controlplane.api import AccessPolicy, EgressPolicy, ExtractionPolicy, Policy, RatePolicy
from controlplane.compile import access, rate
from controlplane.compile.egress import compile_egress
from controlplane.compile.extraction import compile_extraction
from controlplane.compile.mesh import MeshInputs, compile_mtls
from controlplane.compile.telemetry import compile_telemetry
from controlplane.compile.verdicts import compile_verdicts
from controlplane.extraction.hardened import Hardened
from controlplane.extraction.verdicts import Enforcement
from controlplane.inventory import Sidecar
from controlplane.ir import InboundIR, PolicyRef, SidecarIR
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
) -> SidecarIR:
    mine = sorted(
        (p for p in policies if targets(p, sidecar)),
        key=lambda p: (p.kind, p.metadata.namespace, p.metadata.name),
    )
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
        ),
        access=access.compile_access([p for p in mine if isinstance(p, AccessPolicy)], mesh),
        mtls=compile_mtls(sidecar, [p for p in mine if isinstance(p, AccessPolicy)], mesh),
        telemetry=compile_telemetry(telemetry),
        rate=rate.compile_rate([p for p in mine if isinstance(p, RatePolicy)]),
        egress=compile_egress(sidecar, [p for p in mine if isinstance(p, EgressPolicy)]),
        extraction=compile_extraction(
            [p for p in mine if isinstance(p, ExtractionPolicy)], hardened
        ),
        verdicts=compile_verdicts([p for p in mine if isinstance(p, ExtractionPolicy)], verdicts),
        policies=tuple(policy_ref(p) for p in mine),
    )


def compile_all(policy_set: PolicySet, sidecars: Iterable[Sidecar]) -> dict[str, SidecarIR]:
    return {s.node_id: compile_sidecar(s, policy_set.policies) for s in sidecars}
