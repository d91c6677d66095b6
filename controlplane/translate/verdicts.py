"""VerdictsIR → the first HTTP filters of the inbound chain: quarantine, then throttle.

* Quarantine: an RBAC DENY filter with one policy per quarantined client, matching the
  policy's client key (a header's exact value, the peer's SPIFFE ID, or its address). It
  runs before everything else: a quarantined client costs nothing further.
* Throttle: a ``local_ratelimit`` filter with one descriptor (and token bucket) per
  throttled client; requests of other clients match no descriptor and pass untouched.

Both are native filters: no per-request call leaves the sidecar.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.rbac.v3 import rbac_pb2 as rbac_config_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as common_rl_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.matcher.v3 import string_pb2
from envoy.type.v3 import percent_pb2, token_bucket_pb2
from google.protobuf import duration_pb2, wrappers_pb2

from controlplane.ir import ClientVerdictIR, SidecarIR
from controlplane.translate.module import Module
from controlplane.translate.protos import pack

QUARANTINE_FILTER = "modelguard.extraction.quarantine"
THROTTLE_FILTER = "modelguard.extraction.throttle"
VERDICT_KEY = "modelguard_verdict"  # descriptor entry naming the policy of the verdict
CLIENT_KEY = "modelguard_client"

Action = route_components_pb2.RateLimit.Action


def _principal(client: ClientVerdictIR) -> rbac_config_pb2.Principal:
    source = client.client_key.source
    if source == "header":
        return rbac_config_pb2.Principal(
            header=route_components_pb2.HeaderMatcher(
                name=client.client_key.name,
                string_match=string_pb2.StringMatcher(exact=client.value),
            )
        )
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
        if _enforceable(c)
    }
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
                header_name=client.client_key.name, descriptor_key=CLIENT_KEY
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
                        key=_client_entry_key(c), value=c.value
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
        if ir.verdicts is None:
            return []
        filters = [
            quarantine_filter(ir.verdicts.quarantined),
            throttle_filter(ir.verdicts.throttled),
        ]
        return [f for f in filters if f is not None]


MODULE = Verdicts()
