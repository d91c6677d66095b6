"""The rate limit and quota services sidecars call, and the backends that count.

* ``RateLimitService``: Envoy's ``envoy.service.ratelimit.v3`` (one call per request;
  short global windows where the answer must be exact).
* ``QuotaService``: Envoy's ``envoy.service.rate_limit_quota.v3`` (RLQS): sidecars report
  usage in batches and enforce the quota assigned to each client locally (budgets, of
  requests or of instances). Assignments are sized from every replica's holders of a
  client's budget, so together they never exceed it.
* ``Budgets``: what both share: the counting backend (memory or Redis), run-time throttles,
  and the usage report of the admin service.
"""

from controlplane.ratelimit.backend import Backend, BackendError, MemoryBackend, RedisBackend
from controlplane.ratelimit.budgets import Budgets, ClientUsage, LimitUsage, Throttle
from controlplane.ratelimit.rules import Rule
from controlplane.ratelimit.service import (
    QuotaService,
    RateLimitService,
    RateLimitServices,
    backend_from_url,
)

__all__ = [
    "Backend",
    "BackendError",
    "Budgets",
    "ClientUsage",
    "LimitUsage",
    "MemoryBackend",
    "QuotaService",
    "RateLimitService",
    "RateLimitServices",
    "RedisBackend",
    "Rule",
    "Throttle",
    "backend_from_url",
]
