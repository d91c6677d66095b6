"""Zero-trust inputs → MtlsIR: the sidecar's certificate, its mTLS mode, the mesh it may call.

The identity box (``controlplane/identity``) hands compile a ``MeshInputs`` per rebuild:
the certificates it issued, the API-key digests it loaded, and every sidecar known. Compile
stays pure: it never issues a certificate or reads a file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from controlplane.identity.apikeys import ApiKey
from controlplane.inventory import Sidecar
from controlplane.ir import MeshService, MtlsIR, MtlsMode, PolicyRef, WorkloadCertificate
from controlplane.policies.access.api import AccessPolicy

# (namespace, secret name) → its keys: (id, SHA-256 hex of the key, tenant, tier, principals)
ApiKeyDigests = Mapping[tuple[str, str], tuple[ApiKey, ...]]


@dataclass(frozen=True)
class MeshInputs:
    """What the identity box knows at one rebuild."""

    certificates: Mapping[str, WorkloadCertificate] = field(default_factory=dict)  # by node id
    api_keys: ApiKeyDigests = field(default_factory=dict)
    services: tuple[MeshService, ...] = ()


def mesh_services(sidecars: Iterable[Sidecar]) -> tuple[MeshService, ...]:
    """One MeshService per (service, namespace), with every sidecar of it as an endpoint."""
    grouped: dict[tuple[str, str], list[Sidecar]] = {}
    for sidecar in sidecars:
        grouped.setdefault((sidecar.service, sidecar.namespace), []).append(sidecar)
    out = []
    for (service, namespace), members in sorted(grouped.items()):
        out.append(
            MeshService(
                service=service,
                namespace=namespace,
                identities=tuple(sorted({s.identity for s in members})),
                endpoints=tuple(sorted({(_reachable(s), s.inbound_port) for s in members})),
            )
        )
    return tuple(out)


def _reachable(sidecar: Sidecar) -> str:
    # A sidecar listening on every address is reached at its workload's address (the pod IP).
    if sidecar.inbound_address in ("0.0.0.0", "::"):
        return sidecar.app_address
    return sidecar.inbound_address


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
            PolicyRef(p.kind, p.metadata.namespace, p.metadata.name) for p in deciding
        ),
    )
