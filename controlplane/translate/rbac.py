"""AccessIR → Envoy RBAC filters.

Two filters keep Istio's semantics: the first denies what any Deny rule matches, the second
allows only what an Allow rule matches (present when a policy defaults to Deny). Audit-mode
rules go into the same filters' shadow rules: evaluated, logged, never enforced.
"""

from __future__ import annotations

import re
from typing import TypeAlias

from envoy.config.rbac.v3 import rbac_pb2 as rbac_config_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.matcher.v3 import path_pb2, regex_pb2, string_pb2

from controlplane.ir import AccessIR, AccessRule, Action, PathMatch, SidecarIR
from controlplane.translate.module import Module
from controlplane.translate.protos import pack

Permission: TypeAlias = rbac_config_pb2.Permission
Principal: TypeAlias = rbac_config_pb2.Principal


def _string_matcher(match: PathMatch) -> string_pb2.StringMatcher:
    kind = match.kind
    if kind == "prefix":
        return string_pb2.StringMatcher(prefix=match.value)
    if kind == "suffix":
        return string_pb2.StringMatcher(suffix=match.value)
    return string_pb2.StringMatcher(exact=match.value)


def _any_of(items: list[Permission]) -> Permission:
    return items[0] if len(items) == 1 else Permission(or_rules=Permission.Set(rules=items))


def _permission(rule: AccessRule) -> Permission:
    parts: list[Permission] = []
    if rule.methods:
        parts.append(
            _any_of(
                [
                    Permission(
                        header=route_components_pb2.HeaderMatcher(
                            name=":method", string_match=string_pb2.StringMatcher(exact=m)
                        )
                    )
                    for m in rule.methods
                ]
            )
        )
    paths = [p for p in rule.paths if p.kind != "any"]
    if paths and len(paths) == len(rule.paths):
        parts.append(
            _any_of(
                [Permission(url_path=path_pb2.PathMatcher(path=_string_matcher(p))) for p in paths]
            )
        )
    if not parts:
        return Permission(any=True)
    return parts[0] if len(parts) == 1 else Permission(and_rules=Permission.Set(rules=parts))


def _spiffe_namespace(namespace: str) -> Principal:
    pattern = f"spiffe://[^/]+/ns/{re.escape(namespace)}/sa/[^/]+"
    return Principal(
        authenticated=Principal.Authenticated(
            principal_name=string_pb2.StringMatcher(
                safe_regex=regex_pb2.RegexMatcher(regex=pattern)
            )
        )
    )


def _principal(rule: AccessRule) -> Principal:
    if rule.unenforced and rule.action == Action.ALLOW:
        # Fail closed: an Allow whose condition the sidecar cannot check yet matches nobody.
        return Principal(not_id=Principal(any=True))
    ids: list[Principal] = [
        Principal(
            authenticated=Principal.Authenticated(
                principal_name=string_pb2.StringMatcher(exact=identity)
            )
        )
        for identity in rule.identities
    ]
    ids += [_spiffe_namespace(ns) for ns in rule.namespaces]
    if not ids:
        return Principal(any=True)
    return ids[0] if len(ids) == 1 else Principal(or_ids=Principal.Set(ids=ids))


def _policies(rules: tuple[AccessRule, ...], action: Action) -> dict[str, rbac_config_pb2.Policy]:
    return {
        rule.name: rbac_config_pb2.Policy(
            permissions=[_permission(rule)], principals=[_principal(rule)]
        )
        for rule in rules
        if rule.action == action
    }


def _filter(name: str, config: rbac_pb2.RBAC) -> hcm_pb2.HttpFilter:
    return hcm_pb2.HttpFilter(name=name, typed_config=pack(config))


def rbac_filters(access: AccessIR) -> list[hcm_pb2.HttpFilter]:
    filters = []
    deny, audit_deny = (
        _policies(access.enforced, Action.DENY),
        _policies(access.audited, Action.DENY),
    )
    if deny or audit_deny:
        config = rbac_pb2.RBAC(rules_stat_prefix="deny_", shadow_rules_stat_prefix="audit_deny_")
        if deny:
            config.rules.CopyFrom(
                rbac_config_pb2.RBAC(action=rbac_config_pb2.RBAC.DENY, policies=deny)
            )
        if audit_deny:
            config.shadow_rules.CopyFrom(
                rbac_config_pb2.RBAC(action=rbac_config_pb2.RBAC.DENY, policies=audit_deny)
            )
        filters.append(_filter("modelguard.access.deny", config))
    if access.default_deny or access.audit_default_deny:
        config = rbac_pb2.RBAC(rules_stat_prefix="allow_", shadow_rules_stat_prefix="audit_allow_")
        if access.default_deny:
            config.rules.CopyFrom(
                rbac_config_pb2.RBAC(
                    action=rbac_config_pb2.RBAC.ALLOW,
                    policies=_policies(access.enforced, Action.ALLOW),
                )
            )
        if access.audit_default_deny:
            # What would be denied if the audited policies were enforced beside the others.
            config.shadow_rules.CopyFrom(
                rbac_config_pb2.RBAC(
                    action=rbac_config_pb2.RBAC.ALLOW,
                    policies=_policies(access.enforced + access.audited, Action.ALLOW),
                )
            )
        filters.append(_filter("modelguard.access.allow", config))
    return filters


class Rbac(Module):
    name = "envoy.filters.http.rbac"

    def http_filters(self, ir: SidecarIR) -> list[hcm_pb2.HttpFilter]:
        return rbac_filters(ir.access) if ir.access is not None else []


MODULE = Rbac()
