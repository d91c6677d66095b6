"""RatePolicy → RateIR: every limit of every rate policy of one sidecar.

Where a limit is counted follows from its scope and window:

* ``Local``: a token bucket in each sidecar; nothing leaves the sidecar.
* ``Global`` over a second or a minute: each request asks the rate limit service
  (request-exact, one round trip per request: the cost is accepted for short windows,
  where the quota service's 5 s usage reports would be longer than the window itself).
* ``Global`` over an hour, a day or a month: the quota service (RLQS) assigns each
  sidecar a share of the client's remaining budget, which the sidecar enforces locally;
  no request waits for the control plane.
"""

from __future__ import annotations

from collections.abc import Sequence

from controlplane.api.common import WINDOW_SECONDS, ClientKey
from controlplane.compile.feature import FeatureInputs
from controlplane.ir import ClientKeyIR
from controlplane.policies.rate.api import RatePolicy
from controlplane.policies.rate.ir import KIND as KIND  # the key of compile_feature's result
from controlplane.policies.rate.ir import RateEnforcement, RateIR, RateLimitIR

# Windows longer than this go through quota assignments instead of per-request calls.
EXACT_MAX_WINDOW_SECONDS = 60


def client_key(key: ClientKey) -> ClientKeyIR:
    # A verified API key (its id or tenant) and a JWT claim are headers the sidecar's
    # caller filter sets after dropping the caller's own x-modelguard-* headers (issue 14).
    source, name = key.read_as
    return ClientKeyIR(source, name)


def enforcement(scope: str, window_seconds: int) -> RateEnforcement:
    if scope == "Local":
        return RateEnforcement.LOCAL
    if window_seconds <= EXACT_MAX_WINDOW_SECONDS:
        return RateEnforcement.EXACT
    return RateEnforcement.QUOTA


def compile_rate(policies: Sequence[RatePolicy]) -> RateIR | None:
    limits: list[RateLimitIR] = []
    for policy in policies:
        ns, name = policy.metadata.namespace, policy.metadata.name
        for limit in policy.spec.limits:
            window = WINDOW_SECONDS[limit.per]
            limits.append(
                RateLimitIR(
                    name=f"{ns}.{name}.{limit.name}",
                    policy=f"{ns}/{name}",
                    client_key=client_key(limit.client_key),
                    requests=limit.requests,
                    window_seconds=window,
                    burst=max(limit.burst or limit.requests, limit.requests),
                    enforcement=enforcement(limit.scope, window),
                    shadow=policy.spec.shadow,
                    fail_closed=policy.spec.failure_mode == "FailClosed",
                    cost=limit.cost,
                )
            )
    return RateIR(limits=tuple(limits)) if limits else None


def compile_feature(inputs: FeatureInputs) -> RateIR | None:
    return compile_rate(inputs.of_kind(RatePolicy))
