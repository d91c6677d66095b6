"""RateIR → Envoy's rate limit filters, one module per way of counting.

* ``LocalRateLimit``: ``local_ratelimit`` with one wildcard descriptor per limit, so every
  distinct client value gets its own token bucket inside the sidecar.
* ``QuotaRateLimit``: one ``rate_limit_quota`` (RLQS) filter per long-window budget. Each
  client is a bucket whose id carries the limit itself; the quota service assigns it a
  share of the remaining budget and the sidecar enforces that share locally.
  A budget of instances (``cost: instances``) also needs what each request carries, but
  RLQS counts requests only (its usage reports hold requests allowed and denied; there is
  no cost or ``hits_addend`` as in the ``ratelimit`` filter) and decides on the request
  headers. So the filter in front that reads the body, the Wasm filter
  (policies/extraction/translate.py, wasm/src/filter.c), counts its instances and sets their
  *class* as a header
  (``x-modelguard-instances``); on a sidecar without a Wasm filter a small Lua filter does
  it (the same count, one more pass over the body). The class is part of the bucket
  id, so each client has one bucket per class, and the quota service charges and sizes
  each bucket in instances: a request is charged its count rounded up to its class
  (exact up to 8 and at powers of two, at most 25% more otherwise; a 256-instance
  request costs exactly 256).
* ``ExactRateLimit``: the ``ratelimit`` filter, which asks the rate limit service about
  every request (short global windows). Its descriptors carry the limit too, so the service
  needs no copy of the policies: whatever compiled the sidecar's config also told it.
* ``RateLimitHeaders``: renames Envoy's ``x-ratelimit-*`` headers to the IETF draft's
  ``RateLimit-Limit/Remaining/Reset``.

Requests without the client key are counted together as the client ``-``: leaving the
key out never escapes a limit.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeAlias

from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2, extension_pb2, grpc_service_pb2
from envoy.config.ratelimit.v3 import rls_pb2 as rls_config_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as common_rl_pb2
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.http.rate_limit_quota.v3 import rate_limit_quota_pb2 as rlq_pb2
from envoy.extensions.filters.http.ratelimit.v3 import rate_limit_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.matching.common_inputs.network.v3 import network_inputs_pb2
from envoy.extensions.matching.common_inputs.ssl.v3 import ssl_inputs_pb2
from envoy.extensions.rate_limit_descriptors.expr.v3 import expr_pb2
from envoy.type.matcher.v3 import http_inputs_pb2
from envoy.type.metadata.v3 import metadata_pb2
from envoy.type.v3 import http_status_pb2, percent_pb2, ratelimit_strategy_pb2, token_bucket_pb2
from google.protobuf import duration_pb2, wrappers_pb2
from xds.core.v3 import extension_pb2 as xds_extension_pb2
from xds.type.matcher.v3 import matcher_pb2, regex_pb2, string_pb2

# Descriptor entry keys and bucket id keys: the rate limit service reads the same names
# (controlplane.ratelimit.rules) from this one module.
from controlplane.contracts.ratelimit import (
    ANONYMOUS,
    CLIENT_KEY,
    DOMAIN,
    LIMIT_KEY,
    POLICY_KEY,
    REMOTE_ADDRESS_KEY,
    REQUESTS_KEY,
    RULE_KEY,
    SHADOW_KEY,
    UNITS_KEY,
    WINDOW_KEY,
    rule_entry,
)
from controlplane.ir import ClientKeyIR, SidecarIR
from controlplane.policies.extraction import translate as wasm
from controlplane.policies.rate.ir import RateEnforcement, RateLimitIR
from controlplane.policies.rate.ir import of as rate_of
from controlplane.translate import names
from controlplane.translate.internal import strip_internal_headers_of
from controlplane.translate.module import Inbound, Module, Phase
from controlplane.translate.protos import pack

# Set by the Wasm filter or the instance-counting Lua filter (either replaces whatever a
# caller sent).
INSTANCES_HEADER = names.INSTANCES_HEADER

# Where the JWT filter (issue 6) leaves verified claims: payload_in_metadata = jwt_payload.
JWT_FILTER = "envoy.filters.http.jwt_authn"
JWT_PAYLOAD = "jwt_payload"
# The first URI SAN of the peer certificate is the caller's SPIFFE ID (mTLS).
IDENTITY_CEL = (
    "has(connection.uri_san_peer_certificate) ? connection.uri_san_peer_certificate : '-'"
)

# Envoy's own headers (draft 03 names) and the IETF draft names users expect.
RATELIMIT_HEADERS = (
    ("x-ratelimit-limit", "ratelimit-limit"),
    ("x-ratelimit-remaining", "ratelimit-remaining"),
    ("x-ratelimit-reset", "ratelimit-reset"),
)

# Per-client buckets kept per wildcard descriptor; the least recently used are dropped.
MAX_CLIENTS_PER_SIDECAR = 100_000
EXACT_TIMEOUT = duration_pb2.Duration(nanos=250_000_000)
REPORTING_INTERVAL = duration_pb2.Duration(seconds=5)
# How long a budget's failure mode holds once its assignment has expired (the quota service
# or its backend gone): until the service answers again, in practice. After it Envoy would
# go back to the no-assignment behaviour, which allows.
FAILURE_MODE_HOLDS = duration_pb2.Duration(seconds=365 * 86400)
BUDGET_EXHAUSTED = b"query budget exhausted\n"
# A fail-closed budget refuses with the same response when it cannot be counted: Envoy has
# one deny response per bucket, so the body names both causes.
BUDGET_EXHAUSTED_OR_UNCOUNTED = b"query budget exhausted, or the quota service is unavailable\n"

Action: TypeAlias = route_components_pb2.RateLimit.Action


def _percent(value: int) -> base_pb2.RuntimeFractionalPercent:
    return base_pb2.RuntimeFractionalPercent(
        default_value=percent_pb2.FractionalPercent(
            numerator=value, denominator=percent_pb2.FractionalPercent.HUNDRED
        )
    )


def _generic(key: str, value: str) -> Action:
    return Action(generic_key=Action.GenericKey(descriptor_key=key, descriptor_value=value))


def _client_actions(key: ClientKeyIR) -> list[list[Action]]:
    """The client entry of a descriptor: one list per alternative (present, absent)."""
    if key.source == "header":
        present = Action(
            request_headers=Action.RequestHeaders(header_name=key.name, descriptor_key=CLIENT_KEY)
        )
        absent = Action(
            header_value_match=Action.HeaderValueMatch(
                descriptor_key=CLIENT_KEY,
                descriptor_value=ANONYMOUS,
                expect_match=wrappers_pb2.BoolValue(value=False),
                headers=[route_components_pb2.HeaderMatcher(name=key.name, present_match=True)],
            )
        )
        return [[present], [absent]]
    if key.source == "sourceIP":
        return [[Action(remote_address=Action.RemoteAddress())]]
    if key.source == "jwtClaim":
        return [
            [
                Action(
                    metadata=Action.MetaData(
                        descriptor_key=CLIENT_KEY,
                        metadata_key=metadata_pb2.MetadataKey(
                            key=JWT_FILTER,
                            path=[
                                metadata_pb2.MetadataKey.PathSegment(key=part)
                                for part in [JWT_PAYLOAD, *key.name.split(".")]
                            ],
                        ),
                        default_value=ANONYMOUS,
                        source=Action.MetaData.DYNAMIC,
                    )
                )
            ]
        ]
    # identity
    expr = expr_pb2.Descriptor(descriptor_key=CLIENT_KEY, text=IDENTITY_CEL)
    return [
        [
            Action(
                extension=extension_pb2.TypedExtensionConfig(
                    name="envoy.rate_limit_descriptors.expr", typed_config=pack(expr)
                )
            )
        ]
    ]


def _client_descriptor_key(key: ClientKeyIR) -> str:
    return REMOTE_ADDRESS_KEY if key.source == "sourceIP" else CLIENT_KEY


def rate_limits(limit: RateLimitIR, *, with_rule: bool) -> list[route_components_pb2.RateLimit]:
    """The actions that build this limit's descriptor; ``with_rule`` adds the limit itself."""
    head = [_generic(LIMIT_KEY, limit.name)]
    if with_rule:
        head += [
            _generic(POLICY_KEY, limit.policy),
            _generic(REQUESTS_KEY, str(limit.requests)),
            _generic(WINDOW_KEY, str(limit.window_seconds)),
            _generic(SHADOW_KEY, "true" if limit.shadow else "false"),
        ]
    return [
        route_components_pb2.RateLimit(actions=head + client)
        for client in _client_actions(limit.client_key)
    ]


def _grpc_service() -> grpc_service_pb2.GrpcService:
    return grpc_service_pb2.GrpcService(
        envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=names.CONTROL_PLANE_CLUSTER)
    )


# --- local ---------------------------------------------------------------------------------


def local_filter(limits: Iterable[RateLimitIR], *, shadow: bool) -> hcm_pb2.HttpFilter:
    limits = list(limits)
    config = local_rate_limit_pb2.LocalRateLimit(
        stat_prefix="modelguard_local_rate_limit" + ("_shadow" if shadow else ""),
        filter_enabled=_percent(100),
        filter_enforced=_percent(0 if shadow else 100),
        enable_x_ratelimit_headers=common_rl_pb2.DRAFT_VERSION_03,
        max_dynamic_descriptors=wrappers_pb2.UInt32Value(value=MAX_CLIENTS_PER_SIDECAR),
        # A request that matches no descriptor is not limited by this filter.
        always_consume_default_token_bucket=wrappers_pb2.BoolValue(value=False),
        descriptors=[
            common_rl_pb2.LocalRateLimitDescriptor(
                entries=[
                    common_rl_pb2.RateLimitDescriptor.Entry(key=LIMIT_KEY, value=limit.name),
                    # No value: a wildcard, one bucket per distinct client.
                    common_rl_pb2.RateLimitDescriptor.Entry(
                        key=_client_descriptor_key(limit.client_key)
                    ),
                ],
                token_bucket=token_bucket_pb2.TokenBucket(
                    max_tokens=limit.burst,
                    tokens_per_fill=wrappers_pb2.UInt32Value(value=limit.requests),
                    fill_interval=duration_pb2.Duration(seconds=limit.window_seconds),
                ),
            )
            for limit in limits
        ],
        rate_limits=[rl for limit in limits for rl in rate_limits(limit, with_rule=False)],
    )
    name = "modelguard.rate.local" + (".shadow" if shadow else "")
    return hcm_pb2.HttpFilter(name=name, typed_config=pack(config))


class LocalRateLimit(Module):
    name = "envoy.filters.http.local_ratelimit"

    def http_filters(self, ir: SidecarIR) -> list[hcm_pb2.HttpFilter]:
        rate = rate_of(ir)
        limits = rate.by(RateEnforcement.LOCAL) if rate else ()
        return [
            local_filter(group, shadow=shadow)
            for shadow in (False, True)
            if (group := [limit for limit in limits if limit.shadow == shadow])
        ]


# --- quota (RLQS) --------------------------------------------------------------------------


def _client_input(key: ClientKeyIR) -> extension_pb2.TypedExtensionConfig:
    if key.source == "header":
        typed = pack(http_inputs_pb2.HttpRequestHeaderMatchInput(header_name=key.name))
    elif key.source == "sourceIP":
        typed = pack(network_inputs_pb2.SourceIPInput())
    elif key.source == "identity":
        typed = pack(ssl_inputs_pb2.UriSanInput())
    else:
        typed = pack(
            network_inputs_pb2.DynamicMetadataInput(
                filter=JWT_FILTER,
                path=[
                    network_inputs_pb2.DynamicMetadataInput.PathSegment(key=part)
                    for part in [JWT_PAYLOAD, *key.name.split(".")]
                ],
            )
        )
    return extension_pb2.TypedExtensionConfig(name=CLIENT_KEY, typed_config=typed)


# Counts a request's instances, on a sidecar without the Wasm filter (which counts them
# as it checks the body: budget_rows in wasm/src/filter.c, the same count): the length
# of the longest array that is the body itself or the value of one of its top-level
# members ({"instances": [...]} and [[...], ...] alike), whatever the member is called,
# so neither a spelling of the key (escapes) nor a duplicate key can hide instances from
# the count. Only the structural bytes are visited in Lua: plain string.find (memchr
# speed) gives the next of each; a byte-by-byte loop, or string.find with a character
# class (Lua's matcher walks the class for every byte), cost more instructions per
# request (BENCHMARKS.md has the figures). Sets the class the request is charged as:
# exact up to 8, then m * 2^k with m in 5..8 (at most 25% over the count, exact at 2^k):
# few classes, so few quota buckets per client. No body, or no array: 1.
INSTANCES_LUA = f"""
local byte, char, find, ceil, min = string.byte, string.char, string.find, math.ceil, math.min
local concat = table.concat
local HEADER = "{INSTANCES_HEADER}"

local function count(s)
  local n = #s
  local none = n + 1
  local best, depth, i = 0, 0, 1
  local kinds, counts = {{}}, {{}}
  -- The next position of each structural byte at or after i, found by plain searches
  -- (memchr speed in C); only the structural bytes themselves are visited in Lua.
  local pq, pbo, pbc, pco, pcc, pcm = 0, 0, 0, 0, 0, 0
  while true do
    if pq < i then pq = find(s, '"', i, true) or none end
    if pbo < i then pbo = find(s, '[', i, true) or none end
    if pbc < i then pbc = find(s, ']', i, true) or none end
    if pco < i then pco = find(s, '{{', i, true) or none end
    if pcc < i then pcc = find(s, '}}', i, true) or none end
    local j = min(pq, pbo, pbc, pco, pcc)
    if depth <= 2 and counts[depth] then
      if pcm < i then pcm = find(s, ',', i, true) or none end
      if pcm < j then j = pcm end
    end
    if j > n then return best end
    local b = byte(s, j)
    i = j + 1
    if b == 34 then
      while true do
        local q = find(s, '"', i, true)
        if not q then return best end
        local k = q - 1
        while k >= i and byte(s, k) == 92 do k = k - 1 end
        i = q + 1
        if (q - 1 - k) % 2 == 0 then break end
      end
    elseif b == 91 or b == 123 then
      depth = depth + 1
      kinds[depth] = b
      if b == 91 and (depth == 1 or (depth == 2 and kinds[1] == 123)) then
        counts[depth] = find(s, '^%s*%]', i) and 0 or 1
      else
        counts[depth] = false
      end
    elseif b == 93 or b == 125 then
      local c = counts[depth]
      if c and c > best then best = c end
      depth = depth - 1
      if depth < 0 then return best end
    else
      counts[depth] = counts[depth] + 1
    end
  end
end

-- JSON in UTF-16 or UTF-32 (Python's json.loads(bytes) reads both, told apart as it does:
-- a BOM, or zero bytes among the first four): the count runs over the ASCII code units,
-- every other unit replaced by "x", so no byte of a wide character (U+5B22 is 22 5B in
-- UTF-16LE) can pass for a quote or a bracket.
local function units(s)
  local b1, b2, b3, b4 = byte(s, 1, 4)
  if b1 == 255 and b2 == 254 then
    if b3 == 0 and b4 == 0 then return 4, 0, 4 end
    return 2, 0, 2
  end
  if b1 == 254 and b2 == 255 then return 2, 1, 2 end
  if b1 == 0 and b2 == 0 and b3 == 254 and b4 == 255 then return 4, 3, 4 end
  if b4 ~= nil then
    if b1 == 0 then return (b2 ~= 0) and 2 or 4, (b2 ~= 0) and 1 or 3, 0 end
    if b2 == 0 then return (b3 ~= 0 or b4 ~= 0) and 2 or 4, 0, 0 end
  end
  return 1, 0, 0
end

local function narrow(s, w, o, skip)
  local out, n = {{}}, 0
  for i = skip + 1, #s - w + 1, w do
    local c = byte(s, i + o)
    for k = 0, w - 1 do
      if k ~= o and byte(s, i + k) ~= 0 then c = 120 end
    end
    n = n + 1
    out[n] = c < 128 and char(c) or "x"
  end
  return concat(out)
end

local function class(n)
  if n <= 8 then return n end
  local step = 2
  while n > 8 * step do step = step * 2 end
  return ceil(n / step) * step
end

local function measure(s)
  local w, o, skip = units(s)
  if w > 1 then s = narrow(s, w, o, skip) end
  return count(s)
end

function envoy_on_request(handle)
  local n = 0
  local body = handle:body()
  if body ~= nil then
    local size = body:length()
    if size > 0 then
      -- If the count ever failed, the request is charged as if every byte were an
      -- instance, not as one.
      local ok, counted = pcall(measure, body:getBytes(0, size))
      n = ok and counted or size
    end
  end
  -- One instance (or none) is charged 1 without a header, as the Wasm filter does; the
  -- connection manager has dropped any class the caller wrote.
  if n > 1 then
    handle:headers():replace(HEADER, tostring(class(n)))
  end
end
"""


def instances_filter() -> hcm_pb2.HttpFilter:
    """In front of the quota filters of budgets that charge instances."""
    config = lua_pb2.Lua(default_source_code=base_pb2.DataSource(inline_string=INSTANCES_LUA))
    return hcm_pb2.HttpFilter(name="modelguard.rate.instances", typed_config=pack(config))


def _strategy(allow: bool) -> ratelimit_strategy_pb2.RateLimitStrategy:
    rule = ratelimit_strategy_pb2.RateLimitStrategy
    return rule(blanket_rule=rule.ALLOW_ALL if allow else rule.DENY_ALL)


# The instance class a budget of instances charges, as the sidecar's body check wrote it.
_UNITS = extension_pb2.TypedExtensionConfig(
    name=UNITS_KEY,
    typed_config=pack(http_inputs_pb2.HttpRequestHeaderMatchInput(header_name=INSTANCES_HEADER)),
)


def _bucket(
    limit: RateLimitIR,
    client: extension_pb2.TypedExtensionConfig | None,
    *,
    counted: bool = False,
) -> matcher_pb2.Matcher.OnMatch:
    """The bucket of a request: its limit, its client and, for a budget of instances, what
    the request costs: the instance class the sidecar's body check wrote (``counted``), or
    1 for a request that carries none (one row, or no body: the check writes a class only
    above 1, and the caller's own header never gets this far)."""
    settings = rlq_pb2.RateLimitQuotaBucketSettings
    value = settings.BucketIdBuilder.ValueBuilder
    ids = {
        RULE_KEY: value(
            string_value=rule_entry(
                limit.name, limit.policy, limit.requests, limit.window_seconds, limit.shadow
            )
        ),
        CLIENT_KEY: value(custom_value=client) if client else value(string_value=ANONYMOUS),
    }
    if limit.cost == "instances":
        ids[UNITS_KEY] = value(custom_value=_UNITS) if counted else value(string_value="1")
    bucket = settings(
        bucket_id_builder=settings.BucketIdBuilder(bucket_id_builder=ids),
        # Required, though Envoy 1.40 reports every 5 s whatever it says.
        reporting_interval=REPORTING_INTERVAL,
        deny_response_settings=settings.DenyResponseSettings(
            http_status=http_status_pb2.HttpStatus(code=http_status_pb2.TooManyRequests),
            http_body=wrappers_pb2.BytesValue(
                value=BUDGET_EXHAUSTED_OR_UNCOUNTED if limit.fail_closed else BUDGET_EXHAUSTED
            ),
            response_headers_to_add=[
                base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v))
                for k, v in (
                    ("ratelimit-limit", str(limit.requests)),
                    ("ratelimit-remaining", "0"),
                    ("ratelimit-policy", f"{limit.requests};w={limit.window_seconds}"),
                )
            ],
        ),
        # A new client's first requests pass while its first assignment is on its way, in
        # both failure modes: a DENY_ALL here refuses every new client's first requests
        # even when the quota service is up (Envoy 1.40 does not wait for the answer).
        no_assignment_behavior=settings.NoAssignmentBehavior(
            fallback_rate_limit=_strategy(allow=True)
        ),
        # The failure mode: what the sidecar does once an assignment has expired without a
        # fresh one (the quota service unreachable, or it could not count and sent an
        # assignment that expires on arrival).
        expired_assignment_behavior=settings.ExpiredAssignmentBehavior(
            fallback_rate_limit=_strategy(allow=not limit.fail_closed),
            expired_assignment_behavior_timeout=FAILURE_MODE_HOLDS,
        ),
    )
    return matcher_pb2.Matcher.OnMatch(
        action=xds_extension_pb2.TypedExtensionConfig(name=limit.name, typed_config=pack(bucket))
    )


Predicate: TypeAlias = matcher_pb2.Matcher.MatcherList.Predicate


def _present(of: extension_pb2.TypedExtensionConfig) -> Predicate:
    """The input has a value (a request header that is there, and not empty)."""
    return Predicate(
        single_predicate=Predicate.SinglePredicate(
            input=xds_extension_pb2.TypedExtensionConfig(
                name=of.name, typed_config=of.typed_config
            ),
            value_match=string_pb2.StringMatcher(
                safe_regex=regex_pb2.RegexMatcher(
                    google_re2=regex_pb2.RegexMatcher.GoogleRE2(), regex=".+"
                )
            ),
        )
    )


def _buckets(
    limit: RateLimitIR, client: extension_pb2.TypedExtensionConfig | None
) -> matcher_pb2.Matcher.OnMatch:
    """A client's bucket; for a budget of instances, one per instance class. Envoy builds a
    bucket id's header entry anew for every request (~5k instructions), so the class is
    read only when the request carries one: a request of one row, nearly all of them,
    takes the bucket whose class is the constant 1."""
    if limit.cost != "instances":
        return _bucket(limit, client)
    return matcher_pb2.Matcher.OnMatch(
        matcher=matcher_pb2.Matcher(
            matcher_list=matcher_pb2.Matcher.MatcherList(
                matchers=[
                    matcher_pb2.Matcher.MatcherList.FieldMatcher(
                        predicate=_present(_UNITS), on_match=_bucket(limit, client, counted=True)
                    )
                ]
            ),
            on_no_match=_bucket(limit, client),
        )
    )


def quota_filter(limit: RateLimitIR) -> hcm_pb2.HttpFilter:
    client = _client_input(limit.client_key)
    present = matcher_pb2.Matcher.MatcherList.FieldMatcher(
        predicate=_present(client), on_match=_buckets(limit, client)
    )
    config = rlq_pb2.RateLimitQuotaFilterConfig(
        rlqs_server=_grpc_service(),
        domain=limit.name,
        bucket_matchers=matcher_pb2.Matcher(
            matcher_list=matcher_pb2.Matcher.MatcherList(matchers=[present]),
            on_no_match=_buckets(limit, None),
        ),
    )
    return hcm_pb2.HttpFilter(name=f"modelguard.rate.quota.{limit.name}", typed_config=pack(config))


class QuotaRateLimit(Module):
    name = "envoy.filters.http.rate_limit_quota"

    @staticmethod
    def _limits(ir: SidecarIR) -> tuple[tuple[RateLimitIR, ...], bool]:
        """The sidecar's quota limits, and whether one of them charges instances."""
        rate = rate_of(ir)
        limits = tuple(rate.by(RateEnforcement.QUOTA)) if rate else ()
        return limits, any(limit.cost == "instances" for limit in limits)

    def http_filters(self, ir: SidecarIR) -> list[hcm_pb2.HttpFilter]:
        limits, counted = self._limits(ir)
        counted = counted and not wasm.counts_instances(ir)
        return [instances_filter()] * counted + [quota_filter(limit) for limit in limits]

    def patch(self, ir: SidecarIR, inbound: Inbound) -> None:
        # A request without an instance class is charged 1 (the counters write one only
        # above 1): a class the caller wrote must never reach the quota filter.
        if self._limits(ir)[1]:
            strip_internal_headers_of(inbound)


# --- exact (ratelimit service) -------------------------------------------------------------


def exact_filter(limits: Iterable[RateLimitIR], *, fail_closed: bool) -> hcm_pb2.HttpFilter:
    config = rate_limit_pb2.RateLimit(
        domain=DOMAIN,
        timeout=EXACT_TIMEOUT,
        failure_mode_deny=fail_closed,
        stat_prefix="modelguard_exact" + ("_fail_closed" if fail_closed else ""),
        rate_limit_service=rls_config_pb2.RateLimitServiceConfig(
            grpc_service=_grpc_service(),
            transport_api_version=config_source_pb2.ApiVersion.V3,
        ),
        rate_limits=[rl for limit in limits for rl in rate_limits(limit, with_rule=True)],
    )
    name = "modelguard.rate.exact" + (".fail-closed" if fail_closed else "")
    return hcm_pb2.HttpFilter(name=name, typed_config=pack(config))


class ExactRateLimit(Module):
    name = "envoy.filters.http.ratelimit"

    def http_filters(self, ir: SidecarIR) -> list[hcm_pb2.HttpFilter]:
        rate = rate_of(ir)
        limits = rate.by(RateEnforcement.EXACT) if rate else ()
        return [
            exact_filter(group, fail_closed=closed)
            for closed in (False, True)
            if (group := [limit for limit in limits if limit.fail_closed == closed])
        ]


# --- headers -------------------------------------------------------------------------------


def headers_filter() -> hcm_pb2.HttpFilter:
    mutations = [
        mutation_rules_pb2.HeaderMutation(
            append=base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=ietf, value=f"%RESP({envoy_name})%"),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                keep_empty_value=False,
            )
        )
        for envoy_name, ietf in RATELIMIT_HEADERS
    ] + [
        mutation_rules_pb2.HeaderMutation(remove=envoy_name) for envoy_name, _ in RATELIMIT_HEADERS
    ]
    config = header_mutation_pb2.HeaderMutation(
        mutations=header_mutation_pb2.Mutations(response_mutations=mutations)
    )
    return hcm_pb2.HttpFilter(name="modelguard.rate.headers", typed_config=pack(config))


class RateLimitHeaders(Module):
    """Before the rate limit filters: responses pass it after them, headers already set."""

    name = "envoy.filters.http.header_mutation"

    def http_filters(self, ir: SidecarIR) -> list[hcm_pb2.HttpFilter]:
        rate = rate_of(ir)
        return [headers_filter()] if rate and rate.by(RateEnforcement.LOCAL) else []


HEADERS = RateLimitHeaders()
LOCAL = LocalRateLimit()
QUOTA = QuotaRateLimit()
EXACT = ExactRateLimit()
# Header renaming first (responses cross it last), then the free local buckets; after the
# Wasm filter (which sets a budget's instance class), the locally enforced quota assignments
# and the per-request service last.
MODULES: tuple[tuple[int, Module], ...] = (
    (Phase.LOCAL_LIMITS, HEADERS),
    (Phase.LOCAL_LIMITS, LOCAL),
    (Phase.SHARED_LIMITS, QUOTA),
    (Phase.SHARED_LIMITS, EXACT),
)
