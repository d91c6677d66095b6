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
ANONYMOUS: Final = "-"  # the client entry of a request that carries no client key
DOMAIN: Final = "modelguard"  # the rate limit service's domain
