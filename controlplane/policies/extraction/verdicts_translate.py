"""VerdictsIR → the first HTTP filters after the caller filter: digest, quarantine, throttle.

No client key is ever in the configuration: header keys (API keys are secrets) are known
by their SHA-256 only, and a 50 KB key costs what a short one does.

* Digest: a Lua filter hashes each header that a verdict keys on (Envoy has no hashing
  matcher) into ``x-modelguard-client-sha256-<header>`` (the first ``DIGEST_HEX`` hex
  digits: 128 bits, short enough that 10,000 quarantined keys add under 64 bytes each to
  the configuration). The same filter holds the quarantined digests as one Lua table per
  header, a hash lookup however many there are, and names the quarantining policy in
  ``x-modelguard-quarantined``. Headers of those names a caller sends are removed first,
  so they cannot be forged. Separate from the API-key filter (``apikey``), which runs only
  with AccessPolicies that match keys; this one only while a header verdict is in force.
* Quarantine: an RBAC DENY filter: one policy per ExtractionPolicy matching its name in
  that header, plus one policy per quarantined SPIFFE ID or address (not secrets; matched
  natively). It runs right after the caller filter (which sets the verified key id a policy
  may key on) and before everything else: a quarantined client costs nothing further.
* Throttle: a ``local_ratelimit`` filter with one descriptor (and token bucket) per
  throttled client, on its digest header; other clients match no descriptor and pass.

All are in-process filters: no per-request call leaves the sidecar.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.rbac.v3 import rbac_pb2 as rbac_config_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as common_rl_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.matcher.v3 import string_pb2
from envoy.type.v3 import percent_pb2, token_bucket_pb2
from google.protobuf import duration_pb2, wrappers_pb2

from controlplane.ir import SidecarIR
from controlplane.policies.extraction.ir import ClientVerdictIR, verdicts_of
from controlplane.translate.apikey import SHA256_LUA
from controlplane.translate.module import Module
from controlplane.translate.protos import pack

DIGEST_FILTER = "modelguard.extraction.client_digest"
QUARANTINE_FILTER = "modelguard.extraction.quarantine"
DIGEST_PREFIX = "x-modelguard-client-sha256-"  # + the client-key header's name
QUARANTINED_HEADER = "x-modelguard-quarantined"  # the quarantining policy, ns/name
DIGEST_HEX = 32
THROTTLE_FILTER = "modelguard.extraction.throttle"
VERDICT_KEY = "modelguard_verdict"  # descriptor entry naming the policy of the verdict
CLIENT_KEY = "modelguard_client"

Action = route_components_pb2.RateLimit.Action


_LUA = r"""
-- modelguard: the SHA-256 of each client-key header a verdict keys on, and whether that
-- digest is quarantined (one table lookup). Generated configuration holds digests only.
SHA256
local cache, cached = {}, 0
local policies = POLICIES
-- Per header, the quarantined digests as one string of fixed-width entries (digest, then
-- the policy's index), read into a table once: one constant however many.
local quarantined = {}
for name, data in pairs(QUARANTINED) do
  local set = {}
  for i = 1, #data, DIGEST_HEX + INDEX_WIDTH do
    set[string.sub(data, i, i + DIGEST_HEX - 1)] =
      tonumber(string.sub(data, i + DIGEST_HEX, i + DIGEST_HEX + INDEX_WIDTH - 1))
  end
  quarantined[name] = set
end

function envoy_on_request(handle)
  local headers = handle:headers()
  headers:remove("QUARANTINED_HEADER")
  for name, set in pairs(quarantined) do
    headers:remove("DIGEST_PREFIX" .. name)
    local key = headers:get(name)
    if key ~= nil and key ~= "" then
      local digest = cache[key]
      if digest == nil then
        digest = string.sub(sha256(key), 1, DIGEST_HEX)
        if #key <= 256 then
          if cached >= 4096 then
            cache, cached = {}, 0
          end
          cache[key], cached = digest, cached + 1
        end
      end
      headers:add("DIGEST_PREFIX" .. name, digest)
      local policy = set[digest]
      if policy ~= nil then
        headers:replace("QUARANTINED_HEADER", policies[policy])
      end
    end
  end
end
"""
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_./")


def _lua_string(text: str) -> str:
    # Names come from validated policies (header names, ns/name); refuse anything else.
    if not text or not set(text.lower()) <= _SAFE:
        raise ValueError(f"not a header or policy name: {text!r}")
    return f'"{text}"'


def digest_script(clients: tuple[ClientVerdictIR, ...], headers: tuple[str, ...]) -> str:
    """The digest filter's Lua: ``headers`` to hash, the quarantined ``clients`` by digest."""
    policies = sorted({f"{c.policy.namespace}/{c.policy.name}" for c in clients})
    # The policy's index, in as many digits as the count needs (two for up to 99).
    width = max(2, len(str(len(policies))))
    index = {p: i + 1 for i, p in enumerate(policies)}
    tables: dict[str, list[str]] = {h.lower(): [] for h in headers}
    for c in clients:
        name = c.client_key.name.lower()
        policy = index[f"{c.policy.namespace}/{c.policy.name}"]
        tables.setdefault(name, []).append(f"{_short(c.value)}{policy:0{width}d}")
    body = "{" + "".join(
        f'[{_lua_string(h)}]="' + "".join(sorted(rows)) + '",' for h, rows in sorted(tables.items())
    ) + "}"
    return (
        _LUA.replace("SHA256", SHA256_LUA)
        .replace("QUARANTINED_HEADER", QUARANTINED_HEADER)
        .replace("DIGEST_PREFIX", DIGEST_PREFIX)
        .replace("INDEX_WIDTH", str(width))
        .replace("DIGEST_HEX", str(DIGEST_HEX))
        .replace("QUARANTINED", body)
        .replace("POLICIES", "{" + ",".join(_lua_string(p) for p in policies) + "}")
    )


def _short(hexdigest: str) -> str:
    if len(hexdigest) < DIGEST_HEX or not set(hexdigest) <= set("0123456789abcdef"):
        raise ValueError(f"a header verdict must carry a SHA-256 digest, not {hexdigest[:8]}…")
    return hexdigest[:DIGEST_HEX]


def digest_filter(
    quarantined: tuple[ClientVerdictIR, ...], throttled: tuple[ClientVerdictIR, ...]
) -> hcm_pb2.HttpFilter | None:
    headers = tuple(
        sorted({c.client_key.name.lower() for c in quarantined + throttled if _by_digest(c)})
    )
    if not headers:
        return None
    source = digest_script(tuple(c for c in quarantined if _by_digest(c)), headers)
    config = lua_pb2.Lua(default_source_code=base_pb2.DataSource(inline_string=source))
    return hcm_pb2.HttpFilter(name=DIGEST_FILTER, typed_config=pack(config))


def _by_digest(client: ClientVerdictIR) -> bool:
    return client.client_key.source == "header"


def _principal(client: ClientVerdictIR) -> rbac_config_pb2.Principal:
    source = client.client_key.source
    if source == "identity":
        return rbac_config_pb2.Principal(
            authenticated=rbac_config_pb2.Principal.Authenticated(
                principal_name=string_pb2.StringMatcher(exact=client.value)
            )
        )
    address = ipaddress.ip_address(client.value)
    return rbac_config_pb2.Principal(
        direct_remote_ip=address_pb2.CidrRange(
            address_prefix=str(address),
            prefix_len=wrappers_pb2.UInt32Value(value=address.max_prefixlen),
        )
    )


def _enforceable(client: ClientVerdictIR) -> bool:
    if client.client_key.source != "sourceIP":
        return True
    try:
        ipaddress.ip_address(client.value)
    except ValueError:
        return False
    return True


def quarantine_filter(clients: tuple[ClientVerdictIR, ...]) -> hcm_pb2.HttpFilter | None:
    policies = {
        f"quarantine.{c.policy.namespace}.{c.policy.name}.{i}": rbac_config_pb2.Policy(
            permissions=[rbac_config_pb2.Permission(any=True)],
            principals=[_principal(c)],
        )
        for i, c in enumerate(clients)
        if _enforceable(c) and not _by_digest(c)
    }
    # Header keys: the digest filter names the policy that quarantined the caller's digest.
    for ref in sorted({c.policy for c in clients if _by_digest(c)}, key=str):
        name = f"{ref.namespace}/{ref.name}"
        policies[f"quarantine.{ref.namespace}.{ref.name}"] = rbac_config_pb2.Policy(
            permissions=[rbac_config_pb2.Permission(any=True)],
            principals=[
                rbac_config_pb2.Principal(
                    header=route_components_pb2.HeaderMatcher(
                        name=QUARANTINED_HEADER, string_match=string_pb2.StringMatcher(exact=name)
                    )
                )
            ],
        )
    if not policies:
        return None
    config = rbac_pb2.RBAC(
        rules=rbac_config_pb2.RBAC(action=rbac_config_pb2.RBAC.DENY, policies=policies),
        rules_stat_prefix="extraction_quarantine_",
    )
    return hcm_pb2.HttpFilter(name=QUARANTINE_FILTER, typed_config=pack(config))


def _client_action(client: ClientVerdictIR) -> Any:
    if client.client_key.source == "header":
        return Action(
            request_headers=Action.RequestHeaders(
                header_name=DIGEST_PREFIX + client.client_key.name.lower(),
                descriptor_key=CLIENT_KEY,
            )
        )
    return Action(remote_address=Action.RemoteAddress())


def _client_entry_key(client: ClientVerdictIR) -> str:
    return CLIENT_KEY if client.client_key.source == "header" else "remote_address"


def throttle_filter(clients: tuple[ClientVerdictIR, ...]) -> hcm_pb2.HttpFilter | None:
    # Identity keys would need a CEL descriptor; they are quarantined, not throttled.
    clients = tuple(c for c in clients if c.client_key.source in ("header", "sourceIP"))
    clients = tuple(c for c in clients if _enforceable(c))
    if not clients:
        return None
    actions: dict[tuple[str, str, str], route_components_pb2.RateLimit] = {}
    for c in clients:
        policy = f"{c.policy.namespace}/{c.policy.name}"
        key = (policy, c.client_key.source, c.client_key.name)
        actions.setdefault(
            key,
            route_components_pb2.RateLimit(
                actions=[
                    Action(
                        generic_key=Action.GenericKey(
                            descriptor_key=VERDICT_KEY, descriptor_value=policy
                        )
                    ),
                    _client_action(c),
                ]
            ),
        )
    config = local_rate_limit_pb2.LocalRateLimit(
        stat_prefix="modelguard_extraction_throttle",
        filter_enabled=base_pb2.RuntimeFractionalPercent(
            default_value=percent_pb2.FractionalPercent(numerator=100)
        ),
        filter_enforced=base_pb2.RuntimeFractionalPercent(
            default_value=percent_pb2.FractionalPercent(numerator=100)
        ),
        enable_x_ratelimit_headers=common_rl_pb2.DRAFT_VERSION_03,
        # Only throttled clients match a descriptor; everyone else is not limited here.
        always_consume_default_token_bucket=wrappers_pb2.BoolValue(value=False),
        descriptors=[
            common_rl_pb2.LocalRateLimitDescriptor(
                entries=[
                    common_rl_pb2.RateLimitDescriptor.Entry(
                        key=VERDICT_KEY, value=f"{c.policy.namespace}/{c.policy.name}"
                    ),
                    common_rl_pb2.RateLimitDescriptor.Entry(
                        key=_client_entry_key(c),
                        value=_short(c.value) if _by_digest(c) else c.value,
                    ),
                ],
                token_bucket=token_bucket_pb2.TokenBucket(
                    max_tokens=c.requests,
                    tokens_per_fill=wrappers_pb2.UInt32Value(value=c.requests),
                    fill_interval=duration_pb2.Duration(seconds=c.window_seconds),
                ),
            )
            for c in clients
        ],
        rate_limits=list(actions.values()),
    )
    return hcm_pb2.HttpFilter(name=THROTTLE_FILTER, typed_config=pack(config))


class Verdicts(Module):
    name = "modelguard.extraction.verdicts"

    def http_filters(self, ir: SidecarIR) -> list[hcm_pb2.HttpFilter]:
        verdicts = verdicts_of(ir)
        if verdicts is None:
            return []
        filters = [
            digest_filter(verdicts.quarantined, verdicts.throttled),
            quarantine_filter(verdicts.quarantined),
            throttle_filter(verdicts.throttled),
        ]
        return [f for f in filters if f is not None]


MODULE = Verdicts()
