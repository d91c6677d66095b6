"""The IR: what one sidecar must enforce, independent of Envoy's shape.

``compile`` produces one frozen ``SidecarIR`` per sidecar from policies × inventory;
``translate`` turns it into Envoy resources. These are plain frozen dataclasses so they
can be compared, diffed, hashed and golden-tested without Envoy.

This module holds what every kind shares; each policy kind's part of the IR lives in its
folder (``controlplane/policies/<kind>/ir.py``) and travels in ``SidecarIR.features``,
keyed by kind (Kuma's approach), so this module names no kind and imports none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

_D = TypeVar("_D")


class Action(StrEnum):
    ALLOW = "Allow"
    DENY = "Deny"


class Mode(StrEnum):
    ENFORCE = "Enforce"
    AUDIT = "Audit"  # log what would have been denied, let it through


@dataclass(frozen=True)
class PolicyRef:
    """Which policy an IR element came from (for status, logs and deny reasons)."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"


class MtlsMode(StrEnum):
    STRICT = "Strict"  # inbound accepts mutual TLS only
    PERMISSIVE = "Permissive"  # mutual TLS and plaintext (migration, outside callers)


@dataclass(frozen=True)
class WorkloadCertificate:
    """The sidecar's X.509-SVID and the trust bundle, delivered over SDS."""

    spiffe_id: str
    certificate_pem: str
    private_key_pem: str = field(repr=False)
    trust_bundle_pem: str = field(repr=False)


@dataclass(frozen=True)
class MeshService:
    """Another service of the mesh this sidecar may call, with the identities it must show."""

    service: str
    namespace: str
    identities: tuple[str, ...]  # SPIFFE IDs its sidecars present (verified on connect)
    endpoints: tuple[tuple[str, int], ...]  # (address, inbound port) of each sidecar

    @property
    def host(self) -> str:
        return f"{self.service}.{self.namespace}"


@dataclass(frozen=True)
class MtlsIR:
    """Mutual TLS of one sidecar: inbound termination, and origination to mesh services
    through the local mesh listener (``mesh_port``; 0: no such listener)."""

    mode: MtlsMode
    certificate: WorkloadCertificate
    mesh_port: int = 0
    upstreams: tuple[MeshService, ...] = ()
    deciding: tuple[PolicyRef, ...] = ()  # policies that chose the mode (empty: default)


@dataclass(frozen=True)
class InboundIR:
    """The sidecar's inbound listener and the local workload behind it."""

    listen_address: str
    port: int
    app_address: str
    app_port: int
    # Proxies in front of the sidecar whose X-Forwarded-For entries are believed (0: the
    # caller is the TCP peer; XFF is never trusted).
    xff_num_trusted_hops: int = 0


@dataclass(frozen=True)
class ClientKeyIR:
    """What identifies one client: a header, the peer's SPIFFE ID, a JWT claim, the IP."""

    source: str  # "header" | "identity" | "jwtClaim" | "sourceIP"
    name: str = ""  # the header name or the claim


@dataclass(frozen=True)
class TelemetryIR:
    """Traces and access logs one sidecar sends to the control plane's OTLP receiver."""

    sampling_percent: float  # of requests traced; every request gets an access-log record
    header_attributes: tuple[str, ...]  # request headers recorded (lower-case names)
    client_key_header: str  # identifies a client; the receiver stores only its hash


@dataclass(frozen=True)
class ApiKeyIR:
    """A registered API key as the sidecar knows it: its digest and metadata, never the key."""

    digest: str  # SHA-256 hex of the key
    id: str  # its entry name in the key Secret: what budgets, the feed and verdicts see
    tenant: str  # its cohort (defaults to the id)
    tier: str = ""  # its hardening tier ("": the policy's default hardening)
    principals: tuple[str, ...] = ()  # JWT subjects / SPIFFE IDs that may present it


@dataclass(frozen=True)
class CallerIR:
    """How the sidecar names a verified caller before any other filter reads it (issue 14).

    It drops every ``x-modelguard-*`` header the caller sent, then sets the key id, tenant
    and tier of a registered key, the values of JWT claims that client keys read, and, for
    callers without a registered key, their source address as id and tenant.
    """

    keys: tuple[ApiKeyIR, ...] = ()  # every key of the Secrets this sidecar's rules name
    key_classes: tuple[tuple[str, str], ...] = ()  # digest → key class (RBAC policies)
    jwt_claims: tuple[str, ...] = ()  # claims published as headers, for jwtClaim client keys
    anonymous_by_address: bool = False  # an apiKey client key: unkeyed callers by address
    bind_jwt: bool = False  # JWT providers: a key beside a verified JWT must list its sub
    bind_peer: bool = False  # mTLS: a key beside a client certificate must list its SPIFFE ID


@dataclass(frozen=True)
class SidecarIR:
    node_id: str
    service: str
    namespace: str
    identity: str
    inbound: InboundIR
    telemetry: TelemetryIR | None = None
    mtls: MtlsIR | None = None  # present when the control plane runs a CA (issue 6)
    caller: CallerIR | None = None  # verified caller identity headers (issue 14)
    # (kind, that kind's IR) for every kind with something to enforce here, sorted by kind.
    # Each kind reads its own with ``controlplane.policies.<kind>.ir.of``.
    features: tuple[tuple[str, object], ...] = ()
    policies: tuple[PolicyRef, ...] = ()  # every policy that targets this sidecar, sorted

    def feature(self, kind: str) -> object | None:
        for key, value in self.features:
            if key == kind:
                return value
        return None


def evolve(obj: _D, **changes: Any) -> _D:
    """``dataclasses.replace`` for frozen dataclasses (IR, inventory), without running
    ``__init__``: a rebuild copies an IR per sidecar, and ``replace`` costs ~20 µs each.
    Only for values of the right type: nothing is validated."""
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__)
    new.__dict__.update(changes)
    return new
