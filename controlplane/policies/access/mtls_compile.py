"""AccessPolicy's mTLS mode + the mesh inputs → the sidecar's MtlsIR: its certificate, its
mode, the mesh services it may call."""

from __future__ import annotations

from collections.abc import Sequence

from controlplane.compile.inputs.inventory import Sidecar
from controlplane.compile.mesh import MeshInputs
from controlplane.ir import MtlsIR, MtlsMode, PolicyRef
from controlplane.policies.access.api import AccessPolicy


def compile_mtls(
    sidecar: Sidecar, policies: Sequence[AccessPolicy], inputs: MeshInputs | None
) -> MtlsIR | None:
    """None when no certificate was issued to the sidecar (no CA: plaintext, as before)."""
    if inputs is None:
        return None
    certificate = inputs.certificates.get(sidecar.node_id)
    if certificate is None:
        return None
    # Like Istio's PeerAuthentication, but merged: an explicit Strict beats Permissive, so
    # one policy cannot silently weaken what another workload owner asked for.
    chosen = [(p.spec.mtls.mode, p) for p in policies if p.spec.mtls is not None]
    strict = [p for mode, p in chosen if mode == "Strict"]
    permissive = [p for mode, p in chosen if mode == "Permissive"]
    mode, deciding = MtlsMode.STRICT, strict
    if permissive and not strict:
        mode, deciding = MtlsMode.PERMISSIVE, permissive
    return MtlsIR(
        mode=mode,
        certificate=certificate,
        mesh_port=sidecar.mesh_port or 0,
        # A sidecar calls the others; it never needs a cluster to itself. Its workload
        # reaches them through the mesh listener or, under egress control, the outbound one.
        upstreams=tuple(
            s
            for s in inputs.services
            if (s.service, s.namespace) != (sidecar.service, sidecar.namespace)
        )
        if sidecar.mesh_port or sidecar.outbound_port
        else (),
        deciding=tuple(
            PolicyRef(*p.ref) for p in deciding
        ),
    )
