"""The rate-limit descriptor and RLQS bucket-id keys.

``controlplane.translate.ratelimit`` writes the limit itself (name, policy, size, window,
shadow flag, the client, the instance count) into every descriptor (classic path) and bucket
id (RLQS); ``controlplane.ratelimit.rules`` reads the same entries back, so the services
need no copy of the policies and every control-plane replica answers the same way.
"""

from __future__ import annotations

from typing import Final

LIMIT_KEY: Final = "limit"
POLICY_KEY: Final = "policy"
REQUESTS_KEY: Final = "requests"
WINDOW_KEY: Final = "window"
SHADOW_KEY: Final = "shadow"
CLIENT_KEY: Final = "client"
# Envoy's own key for the remote_address action (a client keyed by source IP).
REMOTE_ADDRESS_KEY: Final = "remote_address"
# A budget that charges instances: the request's instance class (what one request of this
# bucket costs), computed by the sidecar from the body before the quota filter.
UNITS_KEY: Final = "instances"
# RLQS bucket ids carry the limit in one entry instead of five (name, policy, size, window,
# shadow): Envoy builds and hashes a request's bucket id entry by entry, ~2k instructions
# an entry a request (bench/policy_tax.py). Descriptors keep the five keys.
RULE_KEY: Final = "rule"
_RULE_SEPARATOR: Final = "|"  # never in a limit or policy name (DNS labels, "." and "/")
ANONYMOUS: Final = "-"  # the client entry of a request that carries no client key
DOMAIN: Final = "modelguard"  # the rate limit service's domain


def rule_entry(limit: str, policy: str, requests: int, window: int, shadow: bool) -> str:
    """The RULE_KEY value: ``<limit>|<policy>|<requests>|<window seconds>|<0 or 1>``."""
    return _RULE_SEPARATOR.join((limit, policy, str(requests), str(window), str(int(shadow))))


def parse_rule_entry(value: str) -> dict[str, str] | None:
    """The descriptor entries a RULE_KEY value stands for; None if it is not one."""
    parts = value.split(_RULE_SEPARATOR)
    if len(parts) != 5 or parts[4] not in ("0", "1"):
        return None
    limit, policy, requests, window, shadow = parts
    return {
        LIMIT_KEY: limit,
        POLICY_KEY: policy,
        REQUESTS_KEY: requests,
        WINDOW_KEY: window,
        SHADOW_KEY: "true" if shadow == "1" else "false",
    }
