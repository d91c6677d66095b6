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


@dataclass(frozen=True)
class SidecarIR:
    node_id: str
    service: str
    namespace: str
    identity: str
    inbound: InboundIR
    access: AccessIR | None = None
    policies: tuple[PolicyRef, ...] = ()  # every policy that targets this sidecar, sorted
