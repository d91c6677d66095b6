"""AccessPolicy → AccessIR: all access policies of one sidecar, merged.

API keys are resolved here from the digests the identity box loaded (``MeshInputs``): a
rule names a key set (``apiKeys.secretRef``), the IR carries only SHA-256 digests. A rule
whose key set is unknown keeps ``apiKeys`` in ``unenforced`` (an Allow then matches nobody).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from controlplane.compile.feature import FeatureInputs
from controlplane.compile.mesh import MeshInputs
from controlplane.ir import Action
from controlplane.policies.access.api import AccessPolicy, JwtRule
from controlplane.policies.access.ir import KIND as KIND  # the key of compile_feature's result
from controlplane.policies.access.ir import (
    AccessIR,
    AccessRule,
    JwtProvider,
    JwtRequirement,
    PathMatch,
)


def jwt_provider(rule: JwtRule) -> JwtProvider:
    """One provider per (issuer, keys): the same issuer in two policies shares it."""
    jwks = rule.jwks_file or rule.jwks or ""
    digest = hashlib.sha256(f"{rule.issuer}\0{jwks}".encode()).hexdigest()[:10]
    return JwtProvider(
        name=f"jwt-{digest}",
        issuer=rule.issuer,
        jwks=jwks,
        jwks_is_file=rule.jwks_file is not None,
    )


def _rules(policy: AccessPolicy, inputs: MeshInputs | None) -> list[AccessRule]:
    out = []
    namespace = policy.metadata.namespace
    for i, rule in enumerate(policy.spec.rules):
        name = rule.name or f"rule-{i}"
        source, dest = rule.from_, rule.to
        unenforced: list[str] = []
        key_hashes: tuple[str, ...] = ()
        if source is not None and source.api_keys is not None:
            keys = (inputs.api_keys if inputs else {}).get(
                (namespace, source.api_keys.secret_ref)
            )
            if keys:
                key_hashes = tuple(sorted(key.digest for key in keys))
            else:
                # No such key set (yet): fail closed rather than match any caller.
                unenforced.append("apiKeys")
        jwt = None
        if source is not None and source.jwt is not None and not (
            source.jwt.jwks or source.jwt.jwks_file
        ):
            unenforced.append("jwt")  # no keys to verify tokens with
        elif source is not None and source.jwt is not None:
            jwt = JwtRequirement(
                provider=jwt_provider(source.jwt).name,
                claims=tuple(
                    (claim, tuple(values)) for claim, values in sorted(source.jwt.claims.items())
                ),
            )
        out.append(
            AccessRule(
                name=f"{namespace}.{policy.metadata.name}.{name}",
                action=Action(rule.action),
                methods=tuple(dest.methods) if dest else (),
                paths=tuple(PathMatch(p) for p in dest.paths) if dest else (),
                identities=tuple(source.identities) if source else (),
                namespaces=tuple(source.namespaces) if source else (),
                unenforced=tuple(unenforced),
                api_key_hashes=key_hashes,
                jwt=jwt,
            )
        )
    return out


def compile_access(
    policies: Sequence[AccessPolicy], inputs: MeshInputs | None = None
) -> AccessIR | None:
    if not policies:
        return None
    enforced: list[AccessRule] = []
    audited: list[AccessRule] = []
    providers: dict[str, JwtProvider] = {}
    default_deny = audit_default_deny = False
    for policy in policies:
        audit = policy.spec.mode == "Audit"
        (audited if audit else enforced).extend(_rules(policy, inputs))
        for rule in policy.spec.rules:
            if rule.from_ is not None and rule.from_.jwt is not None and (
                rule.from_.jwt.jwks or rule.from_.jwt.jwks_file
            ):
                provider = jwt_provider(rule.from_.jwt)
                providers[provider.name] = provider
        if policy.spec.default_action == "Deny":
            if audit:
                audit_default_deny = True
            else:
                default_deny = True
    rules = enforced + audited
    return AccessIR(
        enforced=tuple(enforced),
        audited=tuple(audited),
        default_deny=default_deny,
        audit_default_deny=audit_default_deny,
        jwt_providers=tuple(providers[n] for n in sorted(providers)),
        api_keys=any(r.api_key_hashes for r in rules),
    )


def compile_feature(inputs: FeatureInputs) -> AccessIR | None:
    return compile_access(inputs.of_kind(AccessPolicy), inputs.mesh)
