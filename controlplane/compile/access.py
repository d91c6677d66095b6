"""AccessPolicy → AccessIR: all access policies of one sidecar, merged."""

from __future__ import annotations

from collections.abc import Sequence

from controlplane.api import AccessPolicy
from controlplane.ir import AccessIR, AccessRule, Action, PathMatch


def _rules(policy: AccessPolicy) -> list[AccessRule]:
    out = []
    for i, rule in enumerate(policy.spec.rules):
        name = rule.name or f"rule-{i}"
        source, dest = rule.from_, rule.to
        out.append(
            AccessRule(
                name=f"{policy.metadata.namespace}.{policy.metadata.name}.{name}",
                action=Action(rule.action),
                methods=tuple(dest.methods) if dest else (),
                paths=tuple(PathMatch(p) for p in dest.paths) if dest else (),
                identities=tuple(source.identities) if source else (),
                namespaces=tuple(source.namespaces) if source else (),
                # API keys and JWTs are enforced by the identity work (issue 6); until then
                # the translator makes such Allow rules match nothing (fail closed).
                unenforced=tuple(
                    what
                    for what, present in (
                        ("apiKeys", source is not None and source.api_keys is not None),
                        ("jwt", source is not None and source.jwt is not None),
                    )
                    if present
                ),
            )
        )
    return out


def compile_access(policies: Sequence[AccessPolicy]) -> AccessIR | None:
    if not policies:
        return None
    enforced: list[AccessRule] = []
    audited: list[AccessRule] = []
    default_deny = audit_default_deny = False
    for policy in policies:
        audit = policy.spec.mode == "Audit"
        (audited if audit else enforced).extend(_rules(policy))
        if policy.spec.default_action == "Deny":
            if audit:
                audit_default_deny = True
            else:
                default_deny = True
    return AccessIR(
        enforced=tuple(enforced),
        audited=tuple(audited),
        default_deny=default_deny,
        audit_default_deny=audit_default_deny,
    )
