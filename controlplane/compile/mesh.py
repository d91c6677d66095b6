"""Zero-trust inputs of compile: the certificates issued, API-key digests, the mesh's services
(AccessPolicy's ``mtls_compile`` turns them into a sidecar's MtlsIR).

The identity box (``controlplane/identity``) hands compile a ``MeshInputs`` per rebuild:
the certificates it issued, the API-key digests it loaded, and every sidecar known. Compile
stays pure: it never issues a certificate or reads a file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from controlplane.identity.apikeys import ApiKey
from controlplane.inventory import Sidecar
from controlplane.ir import MeshService, WorkloadCertificate

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
