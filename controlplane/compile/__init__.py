"""Compile: policies × inventory → one frozen IR per sidecar.

One module per policy kind turns the policies that target a sidecar into its part of the
IR; this module only decides which policies target which sidecar and assembles the parts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from controlplane.api import AccessPolicy, ExtractionPolicy, Policy, RatePolicy
from controlplane.compile.caller import compile_caller
from controlplane.compile.feature import FeatureInputs
from controlplane.compile.inputs.inventory import Sidecar, targets
from controlplane.compile.inputs.store import PolicySet
from controlplane.compile.inputs.verdicts import Enforcement, Hardened
from controlplane.compile.mesh import MeshInputs
from controlplane.compile.telemetry import compile_telemetry
from controlplane.ir import InboundIR, PolicyRef, SidecarIR, evolve
from controlplane.policies import compilers
from controlplane.policies.access.ir import of as access_of
from controlplane.policies.access.mtls_compile import compile_mtls
from controlplane.policies.extraction.ir import policies_of as extraction_of
from controlplane.telemetry.settings import TelemetrySettings


def policy_ref(policy: Policy) -> PolicyRef:
    return PolicyRef(*policy.ref)


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
        key=lambda p: p.ref,
    )
    access_policies = [p for p in mine if isinstance(p, AccessPolicy)]
    inputs = FeatureInputs(sidecar, mine, mesh, verdicts, hardened)
    # Each registered kind's part (policies/compilers.py, generated from the registry),
    # keyed by kind; absent when the kind has nothing to enforce on this sidecar.
    parts = ((module.KIND, module.compile_feature(inputs)) for module in compilers.MODULES)
    mtls_ir = compile_mtls(sidecar, access_policies, mesh)
    ir = SidecarIR(
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
        features=tuple(sorted(((k, v) for k, v in parts if v is not None), key=lambda kv: kv[0])),
        policies=tuple(policy_ref(p) for p in mine),
    )
    # Who the caller is: what the kinds that name callers ask for (explicit cross-kind reads).
    caller = compile_caller(
        access_policies,
        [p for p in mine if isinstance(p, RatePolicy)],
        [p for p in mine if isinstance(p, ExtractionPolicy)],
        mesh,
        access_of(ir),
        mtls_ir,
        extraction_of(ir),
    )
    return evolve(ir, caller=caller) if caller is not None else ir


def compile_all(policy_set: PolicySet, sidecars: Iterable[Sidecar]) -> dict[str, SidecarIR]:
    return {s.node_id: compile_sidecar(s, policy_set.policies) for s in sidecars}
