"""AccessPolicy's part of one sidecar's IR: its rules, merged (``of`` reads it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from controlplane.ir import Action, SidecarIR

KIND: Final = "AccessPolicy"  # the key of this kind's feature in SidecarIR.features


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


def of(ir: SidecarIR) -> AccessIR | None:
    value = ir.feature(KIND)
    return value if isinstance(value, AccessIR) else None
