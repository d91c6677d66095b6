"""AccessIR → Envoy RBAC filters, with the authentication filters they rely on.

Two RBAC filters keep Istio's semantics: the first denies what any Deny rule matches, the
second allows only what an Allow rule matches (present when a policy defaults to Deny).
Audit-mode rules go into the same filters' shadow rules: evaluated, logged, never enforced.
Policy names in the RBAC config are the rule names, so a denial names its rule.

Callers are matched by:
* workload identity and namespace: the peer certificate's URI SAN (mTLS, ``mtls.py``);
* API key: a Lua filter adds the SHA-256 digest of ``x-api-key`` as a header the caller
  cannot forge (no key is ever in the configuration), and no digest is compared key by
  key. Allow rules whose callers are API keys alone (the common case) become the Allow
  filter's ``matcher``: an ``exact_match_map`` of digests that names the rule, or nothing
  (``[none]``). Other rules keep policies: the Lua filter also names the digest's *key
  class* (the set of rules listing it, from a table in the script) in a second header, and
  a rule compares that header with its classes. Filters, rule names, verdicts, shadow
  results and the metadata the decision log reads are the same as with one header matcher
  per key (bench/policy_tax.py: the cost no longer grows with the number of keys);
* JWT: ``jwt_authn`` verifies tokens against a local JWKS (a token that is present but
  invalid gets 401), and RBAC matches the verified claims in its dynamic metadata.

A denied request gets 403 with a JSON body whose ``reason`` names the deciding rule
(``rbac_access_denied_matched_policy[<ns>.<policy>.<rule>]``; ``[none]``: no Allow rule
matched), and one JSON access-log line; an audited request that would have been denied is
let through and logged the same way (``"verdict": "would-deny"``).
"""

from __future__ import annotations

import re
from typing import TypeAlias

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import base_pb2, substitution_format_string_pb2
from envoy.config.rbac.v3 import rbac_pb2 as rbac_config_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.matcher.v3 import (
    http_inputs_pb2,
    metadata_pb2,
    path_pb2,
    regex_pb2,
    string_pb2,
    value_pb2,
)
from google.protobuf import struct_pb2
from xds.core.v3 import extension_pb2
from xds.type.matcher.v3 import matcher_pb2

from controlplane.ir import Action, CallerIR, SidecarIR
from controlplane.policies.access import mtls_translate as mtls
from controlplane.policies.access.ir import AccessIR, AccessRule, JwtRequirement, PathMatch
from controlplane.policies.access.ir import of as access_of
from controlplane.translate import apikey
from controlplane.translate.module import Inbound, Module, Phase
from controlplane.translate.protos import pack

Permission: TypeAlias = rbac_config_pb2.Permission
Principal: TypeAlias = rbac_config_pb2.Principal
OnMatch: TypeAlias = matcher_pb2.Matcher.OnMatch

RBAC_FILTER = "envoy.filters.http.rbac"
JWT_FILTER = "envoy.filters.http.jwt_authn"
DENY_FILTER = "modelguard.access.deny"
ALLOW_FILTER = "modelguard.access.allow"
# Stat and metadata prefixes: ``<prefix>shadow_effective_policy_id`` names an audited rule.
DENY_PREFIX, AUDIT_DENY_PREFIX = "deny_", "audit_deny_"
ALLOW_PREFIX, AUDIT_ALLOW_PREFIX = "allow_", "audit_allow_"
ACCESS_LOG = "modelguard.access"


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


def _one_of(ids: list[Principal]) -> Principal:
    return ids[0] if len(ids) == 1 else Principal(or_ids=Principal.Set(ids=ids))


def _claim(provider: str, claim: str, values: tuple[str, ...]) -> Principal:
    """A verified claim with one of ``values``: a string claim, or a list holding one."""
    path = [
        metadata_pb2.MetadataMatcher.PathSegment(key=provider),
        metadata_pb2.MetadataMatcher.PathSegment(key=claim),
    ]
    ids = []
    for value in values:
        exact = string_pb2.StringMatcher(exact=value)
        for matcher in (
            value_pb2.ValueMatcher(string_match=exact),
            value_pb2.ValueMatcher(
                list_match=value_pb2.ListMatcher(one_of=value_pb2.ValueMatcher(string_match=exact))
            ),
        ):
            ids.append(
                Principal(
                    metadata=metadata_pb2.MetadataMatcher(
                        filter=JWT_FILTER, path=path, value=matcher
                    )
                )
            )
    return _one_of(ids)


def _jwt(requirement: JwtRequirement) -> Principal:
    # A payload under the provider's key exists only for a token that provider verified.
    verified = Principal(
        metadata=metadata_pb2.MetadataMatcher(
            filter=JWT_FILTER,
            path=[
                metadata_pb2.MetadataMatcher.PathSegment(key=requirement.provider),
                metadata_pb2.MetadataMatcher.PathSegment(key="iss"),
            ],
            value=value_pb2.ValueMatcher(present_match=True),
        )
    )
    parts = [verified] + [_claim(requirement.provider, c, v) for c, v in requirement.claims]
    return parts[0] if len(parts) == 1 else Principal(and_ids=Principal.Set(ids=parts))


UNBOUND_RULE = "api-key-not-bound-to-principal"


def _header(name: str, exact: str | None = None) -> Principal:
    matcher = route_components_pb2.HeaderMatcher(name=name)
    if exact is None:
        matcher.present_match = True
    else:
        matcher.string_match.exact = exact
    return Principal(header=matcher)


def _jwt_value(provider: str, claim: str, exact: str | None = None) -> Principal:
    value = (
        value_pb2.ValueMatcher(present_match=True)
        if exact is None
        else value_pb2.ValueMatcher(string_match=string_pb2.StringMatcher(exact=exact))
    )
    return Principal(
        metadata=metadata_pb2.MetadataMatcher(
            filter=JWT_FILTER,
            path=[
                metadata_pb2.MetadataMatcher.PathSegment(key=provider),
                metadata_pb2.MetadataMatcher.PathSegment(key=claim),
            ],
            value=value,
        )
    )


def _all(ids: list[Principal]) -> Principal:
    return ids[0] if len(ids) == 1 else Principal(and_ids=Principal.Set(ids=ids))


def _peer(spiffe_id: str) -> Principal:
    return Principal(
        authenticated=Principal.Authenticated(
            principal_name=string_pb2.StringMatcher(exact=spiffe_id)
        )
    )


def binding_policy(access: AccessIR, caller: CallerIR | None) -> rbac_config_pb2.Policy | None:
    """Deny an ``x-api-key`` presented beside a verified JWT or client certificate unless
    the key (by the binding label the caller filter set) lists that principal: a stolen or made-up
    key cannot ride on another principal's credentials. Native matchers in the Deny filter,
    so the binding costs no filter and no Lua call of its own."""
    if caller is None or not (caller.bind_peer or caller.bind_jwt):
        return None
    key_sent = _header("x-api-key")
    # The caller filter labels a verified key with its set of principals (one label per
    # distinct set, apikey.binding_labels), so a key is bound when its label's set holds
    # the caller: one match per set, not one per key.
    groups = apikey.binding_sets(caller.keys)
    principals = []
    if caller.bind_peer:
        bound = [
            _all([_header(apikey.BINDING_HEADER, label), _one_of([_peer(p) for p in peers])])
            for label, members in groups
            if (peers := [p for p in members if p.startswith("spiffe://")])
        ]
        parts = [key_sent, Principal(authenticated=Principal.Authenticated())]
        if bound:
            parts.append(Principal(not_id=_one_of(bound)))
        principals.append(_all(parts))
    providers = [p.name for p in access.jwt_providers]
    if caller.bind_jwt and providers:
        bound = [
            _all([_header(apikey.BINDING_HEADER, label), _one_of(subjects)])
            for label, members in groups
            if (
                subjects := [
                    _jwt_value(provider, "sub", p)
                    for p in members
                    if not p.startswith("spiffe://")
                    for provider in providers
                ]
            )
        ]
        parts = [key_sent, _one_of([_jwt_value(provider, "iss") for provider in providers])]
        if bound:
            parts.append(Principal(not_id=_one_of(bound)))
        principals.append(_all(parts))
    if not principals:
        return None
    return rbac_config_pb2.Policy(
        permissions=[Permission(any=True)], principals=principals
    )


def _key_classes(
    rules: tuple[AccessRule, ...],
) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """Digest → key class, and rule name → the classes of the keys it lists.

    A class is the set of rules that list a digest, so one name per digest says every rule
    it belongs to: rules sharing keys stay exact, and there are at most as many classes as
    digests (one per distinct rule set, usually one per rule).
    """
    rules_of: dict[str, set[str]] = {}
    for rule in rules:
        for digest in rule.api_key_hashes:
            rules_of.setdefault(digest, set()).add(rule.name)
    class_of = {digest: tuple(sorted(names)) for digest, names in sorted(rules_of.items())}
    label = {members: f"keys-{i}" for i, members in enumerate(sorted(set(class_of.values())))}
    classes: dict[str, list[str]] = {}
    for members, name in label.items():
        for rule_name in members:
            classes.setdefault(rule_name, []).append(name)
    return (
        {digest: label[members] for digest, members in class_of.items()},
        {rule_name: tuple(names) for rule_name, names in classes.items()},
    )


def _key_class(label: str) -> Principal:
    return Principal(
        header=route_components_pb2.HeaderMatcher(
            name=apikey.CLASS_HEADER, string_match=string_pb2.StringMatcher(exact=label)
        )
    )


def _principal(rule: AccessRule, key_classes: dict[str, tuple[str, ...]]) -> Principal:
    if rule.unenforced and rule.action == Action.ALLOW:
        # Fail closed: an Allow whose condition the sidecar cannot check matches nobody.
        return Principal(not_id=Principal(any=True))
    # Every condition of `from` must hold; within one, any listed value will do.
    parts: list[Principal] = []
    workloads: list[Principal] = [
        Principal(
            authenticated=Principal.Authenticated(
                principal_name=string_pb2.StringMatcher(exact=identity)
            )
        )
        for identity in rule.identities
    ]
    if workloads:
        parts.append(_one_of(workloads))
    if rule.namespaces:
        parts.append(_one_of([_spiffe_namespace(ns) for ns in rule.namespaces]))
    if rule.api_key_hashes:
        parts.append(_one_of([_key_class(label) for label in key_classes[rule.name]]))
    if rule.jwt is not None:
        parts.append(_jwt(rule.jwt))
    if not parts:
        return Principal(any=True)
    return parts[0] if len(parts) == 1 else Principal(and_ids=Principal.Set(ids=parts))


def _policies(
    rules: tuple[AccessRule, ...], action: Action, key_classes: dict[str, tuple[str, ...]]
) -> dict[str, rbac_config_pb2.Policy]:
    return {
        rule.name: rbac_config_pb2.Policy(
            permissions=[_permission(rule)], principals=[_principal(rule, key_classes)]
        )
        for rule in rules
        if rule.action == action
    }


def _filter(name: str, config: rbac_pb2.RBAC) -> hcm_pb2.HttpFilter:
    return hcm_pb2.HttpFilter(name=name, typed_config=pack(config))


def _keys_only(rule: AccessRule) -> bool:
    """A rule that matches API keys and nothing else: any method, path and peer."""
    return (
        bool(rule.api_key_hashes)
        and not (rule.identities or rule.namespaces or rule.jwt is not None)
        and not (rule.unenforced and rule.action == Action.ALLOW)
        and _permission(rule) == Permission(any=True)
    )


def _rbac_action(name: str, verdict: rbac_config_pb2.RBAC.Action.ValueType) -> OnMatch:
    action = rbac_config_pb2.Action(name=name, action=verdict)
    return OnMatch(action=extension_pb2.TypedExtensionConfig(name=name, typed_config=pack(action)))


def _digest_map(entries: dict[str, OnMatch]) -> matcher_pb2.Matcher:
    header = extension_pb2.TypedExtensionConfig(
        name="envoy.matching.inputs.request_headers",
        typed_config=pack(
            http_inputs_pb2.HttpRequestHeaderMatchInput(header_name=apikey.DIGEST_HEADER)
        ),
    )
    return matcher_pb2.Matcher(
        matcher_tree=matcher_pb2.Matcher.MatcherTree(
            input=header,
            exact_match_map=matcher_pb2.Matcher.MatcherTree.MatchMap(map=entries),
        )
    )


def _allow_map(rules: tuple[AccessRule, ...]) -> matcher_pb2.Matcher:
    """Allow rules that all match keys only, as one map lookup that decides like policies.

    Envoy checks policies in name order and names the first that matches; here each digest
    maps to the first rule by name that lists it, so the verdict and the rule named in the
    metadata are the same. A miss (unknown or no key) is denied naming no rule: ``[none]``.
    """
    first: dict[str, str] = {}
    for rule in sorted(rules, key=lambda r: r.name):
        for digest in rule.api_key_hashes:
            first.setdefault(digest, rule.name)
    allow = rbac_config_pb2.RBAC.ALLOW
    return _digest_map({d: _rbac_action(name, allow) for d, name in sorted(first.items())})


def _is_map(rules: tuple[AccessRule, ...]) -> bool:
    """Whether an engine's rules (of one action) become a digest map: Allow rules that all
    match keys only (the common case). Deny rules keep policies: a map's miss would have to
    name an action that allows, and the name would show in the metadata the log reads."""
    return bool(rules) and all(r.action == Action.ALLOW and _keys_only(r) for r in rules)


Engines: TypeAlias = tuple[
    tuple[AccessRule, ...],
    tuple[AccessRule, ...],
    tuple[AccessRule, ...] | None,
    tuple[AccessRule, ...] | None,
]


def _engines(access: AccessIR) -> Engines:
    """The rules of each engine: Deny, audited Deny, Allow and audited Allow (``None``: no
    Allow engine, as no policy defaults to Deny)."""

    def chosen(rules: tuple[AccessRule, ...], action: Action) -> tuple[AccessRule, ...]:
        return tuple(rule for rule in rules if rule.action == action)

    return (
        chosen(access.enforced, Action.DENY),
        chosen(access.audited, Action.DENY),
        chosen(access.enforced, Action.ALLOW) if access.default_deny else None,
        # What would be denied if the audited policies were enforced beside the others.
        chosen(access.enforced + access.audited, Action.ALLOW)
        if access.audit_default_deny
        else None,
    )


def _policy_key_classes(access: AccessIR) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """Key classes of the rules checked as policies (digest maps need none)."""
    engines = [rules or () for rules in _engines(access)]
    return _key_classes(tuple(r for rules in engines if not _is_map(rules) for r in rules))


def rbac_filters(access: AccessIR, caller: CallerIR | None = None) -> list[hcm_pb2.HttpFilter]:
    """The Deny and Allow filters.

    Each engine (a filter's rules, its shadow rules) is a digest map or policies on its own,
    so mixing them keeps every engine's verdict: Deny still wins, and the Allow filter still
    denies what no Allow rule matches. Policies match a key by its class, which the Lua
    filter names in a header (``api_key_filter(access)``): one comparison per rule.
    """

    deny, audit_deny, allow, audit_allow = _engines(access)
    _, key_classes = _policy_key_classes(access)
    verdict = {Action.DENY: rbac_config_pb2.RBAC.DENY, Action.ALLOW: rbac_config_pb2.RBAC.ALLOW}

    def engine(
        config: rbac_pb2.RBAC, rules: tuple[AccessRule, ...], action: Action, *, shadow: bool
    ) -> None:
        if _is_map(rules):
            (config.shadow_matcher if shadow else config.matcher).CopyFrom(_allow_map(rules))
            return
        policies = rbac_config_pb2.RBAC(
            action=verdict[action], policies=_policies(rules, action, key_classes)
        )
        (config.shadow_rules if shadow else config.rules).CopyFrom(policies)

    filters = []
    binding = binding_policy(access, caller)
    if deny or audit_deny or binding is not None:
        config = rbac_pb2.RBAC(
            rules_stat_prefix=DENY_PREFIX, shadow_rules_stat_prefix=AUDIT_DENY_PREFIX
        )
        if deny:
            engine(config, deny, Action.DENY, shadow=False)
        if binding is not None:
            # Enforced whatever the policies' mode: it is the caller filter's verdict on
            # the key, not a rule someone may be rolling out.
            config.rules.action = rbac_config_pb2.RBAC.DENY
            config.rules.policies[UNBOUND_RULE].CopyFrom(binding)
        if audit_deny:
            engine(config, audit_deny, Action.DENY, shadow=True)
        filters.append(_filter(DENY_FILTER, config))
    if allow is not None or audit_allow is not None:
        config = rbac_pb2.RBAC(
            rules_stat_prefix=ALLOW_PREFIX, shadow_rules_stat_prefix=AUDIT_ALLOW_PREFIX
        )
        if allow is not None:
            engine(config, allow, Action.ALLOW, shadow=False)
        if audit_allow is not None:
            engine(config, audit_allow, Action.ALLOW, shadow=True)
        filters.append(_filter(ALLOW_FILTER, config))
    return filters


def key_classes_of(access: AccessIR) -> dict[str, str]:
    """Digest → key class, for the rules checked as policies (the Lua filter names it)."""
    return _policy_key_classes(access)[0]


def api_key_filter(access: AccessIR | None = None) -> hcm_pb2.HttpFilter:
    """The Lua filter that hashes the key, and names its class for the policies that need it."""
    classes = _policy_key_classes(access)[0] if access is not None else {}
    source = apikey.script(classes=classes) if classes else apikey.SCRIPT
    config = lua_pb2.Lua(default_source_code=base_pb2.DataSource(inline_string=source))
    return hcm_pb2.HttpFilter(name="envoy.filters.http.lua", typed_config=pack(config))


def jwt_filter(access: AccessIR) -> hcm_pb2.HttpFilter:
    providers = {}
    for provider in access.jwt_providers:
        jwks = (
            base_pb2.DataSource(filename=provider.jwks)
            if provider.jwks_is_file
            else base_pb2.DataSource(inline_string=provider.jwks)
        )
        providers[provider.name] = jwt_pb2.JwtProvider(
            issuer=provider.issuer,
            local_jwks=jwks,
            forward=True,
            payload_in_metadata=provider.name,
        )
    # Like Istio's RequestAuthentication: no token is fine (RBAC decides, and no JWT rule
    # matches), a token that no provider verifies is rejected with 401.
    requirement = jwt_pb2.JwtRequirement(
        requires_any=jwt_pb2.JwtRequirementOrList(
            requirements=[jwt_pb2.JwtRequirement(provider_name=n) for n in sorted(providers)]
            + [jwt_pb2.JwtRequirement(allow_missing={})]
        )
    )
    config = jwt_pb2.JwtAuthentication(
        providers=providers,
        rules=[
            jwt_pb2.RequirementRule(
                match=route_components_pb2.RouteMatch(prefix="/"), requires=requirement
            )
        ],
    )
    return hcm_pb2.HttpFilter(name=JWT_FILTER, typed_config=pack(config))


def _struct(fields: dict[str, str]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(fields)
    return out


def _rbac_meta(key: str) -> str:
    return f"%DYNAMIC_METADATA({RBAC_FILTER}:{key})%"


def _denied_status() -> accesslog_pb2.AccessLogFilter:
    """Responses with the denial status (403, runtime key modelguard.access.denied_status)."""
    return accesslog_pb2.AccessLogFilter(
        status_code_filter=accesslog_pb2.StatusCodeFilter(
            comparison=accesslog_pb2.ComparisonFilter(
                op=accesslog_pb2.ComparisonFilter.EQ,
                value=base_pb2.RuntimeUInt32(
                    default_value=403, runtime_key="modelguard.access.denied_status"
                ),
            )
        )
    )


def denial_reply() -> hcm_pb2.LocalReplyConfig:
    """403s get a JSON body naming the deciding rule, which users look up in their policies."""
    body = substitution_format_string_pb2.SubstitutionFormatString(
        json_format=_struct(
            {
                "error": "access denied",
                "reason": "%RESPONSE_CODE_DETAILS%",
                "request_id": "%REQ(X-REQUEST-ID)%",
            }
        ),
        content_type="application/json",
    )
    return hcm_pb2.LocalReplyConfig(
        mappers=[
            hcm_pb2.ResponseMapper(
                filter=_denied_status(),
                body_format_override=body,
            )
        ]
    )


def _shadow_denied(prefix: str) -> accesslog_pb2.AccessLogFilter:
    return accesslog_pb2.AccessLogFilter(
        metadata_filter=accesslog_pb2.MetadataFilter(
            matcher=metadata_pb2.MetadataMatcher(
                filter=RBAC_FILTER,
                path=[
                    metadata_pb2.MetadataMatcher.PathSegment(key=f"{prefix}shadow_engine_result")
                ],
                value=value_pb2.ValueMatcher(string_match=string_pb2.StringMatcher(exact="denied")),
            ),
            match_if_key_not_found={"value": False},
        )
    )


def decision_log(access: AccessIR) -> accesslog_pb2.AccessLog:
    """One JSON line per denial and per would-be denial (Audit), with the deciding rule."""
    fields = {
        "log": ACCESS_LOG,
        "time": "%START_TIME%",
        "status": "%RESPONSE_CODE%",
        "reason": "%RESPONSE_CODE_DETAILS%",
        "audit_deny_rule": _rbac_meta(f"{AUDIT_DENY_PREFIX}shadow_effective_policy_id"),
        "audit_deny_result": _rbac_meta(f"{AUDIT_DENY_PREFIX}shadow_engine_result"),
        "audit_allow_rule": _rbac_meta(f"{AUDIT_ALLOW_PREFIX}shadow_effective_policy_id"),
        "audit_allow_result": _rbac_meta(f"{AUDIT_ALLOW_PREFIX}shadow_engine_result"),
        "peer": "%DOWNSTREAM_PEER_URI_SAN%",
        "method": "%REQ(:METHOD)%",
        "path": "%REQ(:PATH)%",
        "request_id": "%REQ(X-REQUEST-ID)%",
    }
    which = [_denied_status()]
    if any(r.action == Action.DENY for r in access.audited):
        which.append(_shadow_denied(AUDIT_DENY_PREFIX))
    if access.audit_default_deny:
        which.append(_shadow_denied(AUDIT_ALLOW_PREFIX))
    condition = (
        which[0]
        if len(which) == 1
        else accesslog_pb2.AccessLogFilter(or_filter=accesslog_pb2.OrFilter(filters=which))
    )
    logger = stream_pb2.StdoutAccessLog(
        log_format=substitution_format_string_pb2.SubstitutionFormatString(
            json_format=_struct(fields)
        )
    )
    return accesslog_pb2.AccessLog(
        name="envoy.access_loggers.stdout", filter=condition, typed_config=pack(logger)
    )


class Rbac(Module):
    name = RBAC_FILTER

    def http_filters(self, ir: SidecarIR) -> list[hcm_pb2.HttpFilter]:
        access = access_of(ir)
        if access is None:
            return []
        filters = []
        # With a caller filter (translate/caller.py, first in the chain) the key is hashed
        # and the JWT verified there, before quarantines read the verified caller.
        if access.api_keys and ir.caller is None:
            filters.append(api_key_filter(access))
        if access.jwt_providers and ir.caller is None:
            filters.append(jwt_filter(access))
        return filters + rbac_filters(access, ir.caller)

    def patch(self, ir: SidecarIR, inbound: Inbound) -> None:
        access = access_of(ir)
        if access is None:
            return
        inbound.manager.local_reply_config.CopyFrom(denial_reply())
        inbound.manager.access_log.append(decision_log(access))


MODULE = Rbac()
MODULES: tuple[tuple[int, Module], ...] = ((Phase.ACCESS, MODULE), (Phase.MESH, mtls.MODULE))
