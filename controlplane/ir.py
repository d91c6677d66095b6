"""The IR: what one sidecar must enforce, independent of Envoy's shape.

``compile`` produces one frozen ``SidecarIR`` per sidecar from policies × inventory;
``translate`` turns it into Envoy resources. These are plain frozen dataclasses so they
can be compared, diffed, hashed and golden-tested without Envoy.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


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


@dataclass(frozen=True)
class InboundIR:
    """The sidecar's inbound listener and the local workload behind it."""

    listen_address: str
    port: int
    app_address: str
    app_port: int


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


@dataclass(frozen=True)
class RateIR:
    """Every rate limit of one sidecar's inbound traffic; all that apply are checked."""

    limits: tuple[RateLimitIR, ...]

    def by(self, enforcement: RateEnforcement) -> tuple[RateLimitIR, ...]:
        return tuple(limit for limit in self.limits if limit.enforcement == enforcement)


@dataclass(frozen=True)
class SidecarIR:
    node_id: str
    service: str
    namespace: str
    identity: str
    inbound: InboundIR
    access: AccessIR | None = None
    rate: RateIR | None = None
    policies: tuple[PolicyRef, ...] = ()  # every policy that targets this sidecar, sorted
