"""RatePolicy's part of one sidecar's IR: its limits (``of`` reads it)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from controlplane.ir import ClientKeyIR, SidecarIR

KIND: Final = "RatePolicy"  # the key of this kind's feature in SidecarIR.features


class RateEnforcement(StrEnum):
    """Where a rate limit is counted (compile decides from scope and window)."""

    LOCAL = "Local"  # a token bucket in each sidecar (local_ratelimit)
    EXACT = "Exact"  # every request asks the rate limit service (ratelimit filter)
    QUOTA = "Quota"  # the quota service assigns buckets, the sidecar enforces (RLQS)


@dataclass(frozen=True)
class RateLimitIR:
    """One limit of a RatePolicy, per client: ``requests`` per ``window_seconds``."""

    name: str  # <ns>.<policy>.<limit>: unique within the sidecar; names buckets and stats
    policy: str  # <ns>/<policy>: what run-time throttles of the rate limit service name
    client_key: ClientKeyIR
    requests: int
    window_seconds: int
    burst: int  # bucket size of a Local limit (>= requests)
    enforcement: RateEnforcement
    shadow: bool = False  # count and report, never reject
    fail_closed: bool = False  # reject while the rate limit service is unreachable
    cost: str = "requests"  # "instances": a request costs its instance count (budgets only)


@dataclass(frozen=True)
class RateIR:
    """Every rate limit of one sidecar's inbound traffic; all that apply are checked."""

    limits: tuple[RateLimitIR, ...]

    def by(self, enforcement: RateEnforcement) -> tuple[RateLimitIR, ...]:
        return tuple(limit for limit in self.limits if limit.enforcement == enforcement)


def of(ir: SidecarIR) -> RateIR | None:
    value = ir.feature(KIND)
    return value if isinstance(value, RateIR) else None
