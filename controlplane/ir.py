"""The IR: what one sidecar must enforce, independent of Envoy's shape.

``compile`` produces one frozen ``SidecarIR`` per sidecar from policies × inventory;
``translate`` turns it into Envoy resources. These are plain frozen dataclasses so they
can be compared, diffed, hashed and golden-tested without Envoy.
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


@dataclass(frozen=True)
class PathMatch:
    """Istio-style path pattern: exact ``/a``, prefix ``/a/*``, suffix ``*/a``, any ``*``."""

    pattern: str

    @property
    def kind(self) -> str:
        if self.pattern == "*":
            return "any"
        if self.pattern.endswith("*"):
            return "prefix"
        if self.pattern.startswith("*"):
            return "suffix"
        return "exact"

    @property
    def value(self) -> str:
        return self.pattern.strip("*") if self.kind != "exact" else self.pattern


@dataclass(frozen=True)
class AccessRule:
    """One rule of an AccessPolicy. Empty tuples mean 'any'."""

    name: str  # stable, unique within the sidecar: <ns>.<policy>.rule-<i>
    action: Action
    methods: tuple[str, ...] = ()
    paths: tuple[PathMatch, ...] = ()
    identities: tuple[str, ...] = ()  # SPIFFE IDs (enforced with mTLS, issue 6)
    namespaces: tuple[str, ...] = ()
    # Conditions the data plane cannot check yet: an Allow rule with any of them matches
    # nothing, a Deny rule ignores them (both fail closed).
    unenforced: tuple[str, ...] = ()
    # Outside callers (issue 6). API keys only as SHA-256 hex digests, never in plain text.
    api_key_hashes: tuple[str, ...] = ()
    jwt: JwtRequirement | None = None


@dataclass(frozen=True)
class AccessIR:
    """Access control of one sidecar's inbound traffic: all AccessPolicies merged.

    Semantics follow Istio: any matching Deny rule denies; if any policy defaults to Deny,
    a request must match an Allow rule. Audit rules are evaluated but never enforced.
    """

    enforced: tuple[AccessRule, ...]
    audited: tuple[AccessRule, ...]
    default_deny: bool  # from an enforced policy with defaultAction: Deny
    audit_default_deny: bool  # from an audited policy with defaultAction: Deny
    jwt_providers: tuple[JwtProvider, ...] = ()  # every issuer a rule names, deduplicated
    api_keys: bool = False  # some rule matches API keys: the sidecar hashes x-api-key


@dataclass(frozen=True)
class JwtProvider:
    """A JWT issuer whose tokens the sidecar verifies with a local JWKS."""

    name: str  # stable: derived from the issuer, names the verified payload in metadata
    issuer: str
    jwks: str  # the JWKS document (public keys) or, with ``jwks_is_file``, a path
    jwks_is_file: bool = False


@dataclass(frozen=True)
class JwtRequirement:
    """A valid JWT of ``provider`` whose claims have one of the accepted values each."""

    provider: str
    claims: tuple[tuple[str, tuple[str, ...]], ...] = ()


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


class RateEnforcement(StrEnum):
    """Where a rate limit is counted (compile decides from scope and window)."""

    LOCAL = "Local"  # a token bucket in each sidecar (local_ratelimit)
    EXACT = "Exact"  # every request asks the rate limit service (ratelimit filter)
    QUOTA = "Quota"  # the quota service assigns buckets, the sidecar enforces (RLQS)


@dataclass(frozen=True)
class ClientKeyIR:
    """What identifies one client: a header, the peer's SPIFFE ID, a JWT claim, the IP."""

    source: str  # "header" | "identity" | "jwtClaim" | "sourceIP"
    name: str = ""  # the header name or the claim


@dataclass(frozen=True)
class RateLimitIR:
    """One limit of a RatePolicy, per client: ``requests`` per ``window_seconds``."""

    name: str  # <ns>.<policy>.<limit>: unique within the sidecar; names buckets and stats
    policy: str  # <ns>/<policy>: what run-time throttles of the rate limit service name
    client_key: ClientKeyIR
    requests: int
    window_seconds: int
    burst: int  # bucket size of a Local limit (>= requests)
    enforcement: RateEnforcement
    shadow: bool = False  # count and report, never reject
    fail_closed: bool = False  # reject while the rate limit service is unreachable
    cost: str = "requests"  # "instances": a request costs its instance count (budgets only)


@dataclass(frozen=True)
class RateIR:
    """Every rate limit of one sidecar's inbound traffic; all that apply are checked."""

    limits: tuple[RateLimitIR, ...]

    def by(self, enforcement: RateEnforcement) -> tuple[RateLimitIR, ...]:
        return tuple(limit for limit in self.limits if limit.enforcement == enforcement)


@dataclass(frozen=True)
class TelemetryIR:
    """Traces and access logs one sidecar sends to the control plane's OTLP receiver."""

    sampling_percent: float  # of requests traced; every request gets an access-log record
    header_attributes: tuple[str, ...]  # request headers recorded (lower-case names)
    client_key_header: str  # identifies a client; the receiver stores only its hash


class EgressProtocol(StrEnum):
    HTTP = "HTTP"  # plain HTTP, matched by Host / :authority
    TLS = "TLS"  # TLS passed through untouched, matched by SNI


@dataclass(frozen=True)
class EgressBudget:
    """Bytes the workload may send to one destination per window (exfiltration bound)."""

    bytes: int
    window_seconds: int


@dataclass(frozen=True)
class EgressDestination:
    """One allow-listed outside destination. ``host`` is exact or ``*.suffix``; a wildcard
    matches any subdomain (one label or more) but never the bare parent."""

    name: str  # stable, unique within the sidecar: <ns>.<policy>.allow-<i>
    policy: PolicyRef
    host: str
    ports: tuple[int, ...]
    protocols: tuple[EgressProtocol, ...]
    budget: EgressBudget | None = None

    @property
    def wildcard(self) -> bool:
        return self.host.startswith("*.")


@dataclass(frozen=True)
class EgressIR:
    """The sidecar's outbound listener: everything the workload sends outside goes through
    it and only allow-listed destinations pass (default deny).

    ``enforce`` False is Audit: nothing is blocked, what would be is logged. ``deciding``
    names the policies whose default deny decides for unlisted destinations (empty when no
    EgressPolicy targets the sidecar: the sidecar's own default deny decides).
    """

    listen_address: str
    port: int
    enforce: bool
    allowed: tuple[EgressDestination, ...]
    deciding: tuple[PolicyRef, ...]


@dataclass(frozen=True)
class HardeningIR:
    """How the sidecar perturbs a score vector; the model's top-1 class never changes."""

    top_k: int | None = None  # keep the k highest scores, the others become 0
    round_digits: int | None = None
    label_only: bool = False  # one-hot on the top-1 class
    noise: float | None = None  # each score moves by at most this much


@dataclass(frozen=True)
class QueryFeedIR:
    """How the sidecar ships queries to the extraction monitor: batched, off the request
    path; what it cannot ship is counted per client as unobserved."""

    max_body_bytes: int = 64 * 1024  # per request or response body; larger: unobserved
    batch_queries: int = 128  # a batch is shipped when it holds this many queries ...
    batch_bytes: int = 1024 * 1024  # ... or this many bytes ...
    flush_ms: int = 250  # ... or on this timer
    max_in_flight: int = 4  # batches per worker awaiting an answer; beyond: buffer_full
    timeout_ms: int = 5000


@dataclass(frozen=True)
class ExtractionIR:
    """One ExtractionPolicy as one sidecar applies it: output hardening and the query feed."""

    policy: PolicyRef
    client_key: ClientKeyIR
    features: str  # JSONPath of the query vectors in a request (read by the monitor)
    # Where the score vectors are in a response: keys, indices, None for the wildcard.
    # None when the path cannot be followed in the sidecar (hardening then matches nothing).
    scores: tuple[str | int | None, ...] | None
    label: str | None = None  # JSONPath of the predicted label, when the model returns one
    output: HardeningIR | None = None  # the default; None: scores pass unchanged
    tier_header: str | None = None
    tiers: tuple[tuple[str, HardeningIR], ...] = ()  # tier → settings replacing the default
    feed: QueryFeedIR | None = None  # present when the policy asks for detection
    # Clients answered with another tier (onRisk): client key → ((its tier, answered with), ...)
    risk_overrides: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    max_body_bytes: int = 512 * 1024  # larger responses cannot be hardened (counted)
    # Request limits the sidecar enforces before the model sees a request (413 / 400).
    max_request_bytes: int = 64 * 1024
    max_instances: int | None = None
    max_depth: int = 64
    # Where the rows are in a request (steps, as scores): counted for maxInstances and the
    # feed. None when the path cannot be followed in one pass (negative indices).
    instances: tuple[str | int | None, ...] | None = None
    request_format: str = "json"  # json | kserveV2 (rows from the tensors' shape)
    response_format: str = "json"
    deny_unhardenable: bool = True  # an answer too large to harden: 502, not passed


@dataclass(frozen=True)
class ClientVerdictIR:
    """One client under an extraction verdict: denied (quarantine) or slowed (throttle)."""

    policy: PolicyRef  # the ExtractionPolicy whose monitor decided
    client_key: ClientKeyIR
    value: str  # the client key's value: API key, SPIFFE ID or IP address
    requests: int = 0  # throttle only: requests per window_seconds
    window_seconds: int = 0


@dataclass(frozen=True)
class VerdictsIR:
    """Verdicts of the extraction monitor in force on this sidecar (an input of compile)."""

    quarantined: tuple[ClientVerdictIR, ...] = ()
    throttled: tuple[ClientVerdictIR, ...] = ()


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
    access: AccessIR | None = None
    telemetry: TelemetryIR | None = None
    rate: RateIR | None = None
    egress: EgressIR | None = None  # present when the sidecar has an outbound port
    mtls: MtlsIR | None = None  # present when the control plane runs a CA (issue 6)
    extraction: tuple[ExtractionIR, ...] = ()  # one per ExtractionPolicy, sorted by name
    verdicts: VerdictsIR | None = None  # quarantines and throttles of single clients
    caller: CallerIR | None = None  # verified caller identity headers (issue 14)
    policies: tuple[PolicyRef, ...] = ()  # every policy that targets this sidecar, sorted


def evolve(obj: _D, **changes: Any) -> _D:
    """``dataclasses.replace`` for frozen dataclasses (IR, inventory), without running
    ``__init__``: a rebuild copies an IR per sidecar, and ``replace`` costs ~20 µs each.
    Only for values of the right type: nothing is validated."""
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__)
    new.__dict__.update(changes)
    return new
