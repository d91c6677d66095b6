"""The admin side of rate limits: usage per budget and run-time throttles (admin port),
read by ``modelguard usage`` (``controlplane.app.usage_cli``), which also ends throttles.

Clients are named as ``quarantine list`` names them: a raw header key (a secret: often an API
key) by its fingerprint ("sha256:" + 16 hex digits of the key, as traces name it), a client
the sidecar itself verified and named (a key id, a tenant, a JWT claim, a SPIFFE ID, an
address) as it is. Which a limit counts is its RatePolicy's ``clientKey``: the app hands
that lookup in (``secret_client``); without it every client is fingerprinted."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from controlplane.extraction.verdicts import digest, fingerprint_of
from controlplane.gen.modelguard.admin.v1 import ratelimit_pb2, ratelimit_pb2_grpc
from controlplane.grpcutil import decode_checked
from controlplane.ratelimit.backend import BackendError, RedisBackend
from controlplane.ratelimit.budgets import Throttle
from controlplane.ratelimit.service import RateLimitServices


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


MAX_UNTIL = 253402300799.0  # 9999-12-31T23:59:59Z


def fingerprint(client: str) -> str:
    return client if client in ("", "-") else fingerprint_of(digest(client))


# (policy "ns/name", limit "ns.name.limit") → whether that limit's clients are raw header
# values (secrets). Unknown limits (a policy since removed) count as secret.
SecretClient = Callable[[str, str], bool]


def _always_secret(policy: str, limit: str) -> bool:
    return True


def shown(client: str, secret: bool) -> str:
    """A client as usage lists it: a secret by its fingerprint, a verified name as it is."""
    return fingerprint(client) if secret else client


def _runtime(policy: str, client: str, t: Throttle) -> ratelimit_pb2.RuntimeThrottle:
    return ratelimit_pb2.RuntimeThrottle(
        policy=policy, client=fingerprint(client), requests=t.requests, per_seconds=t.per,
        until=_timestamp(t.until),
    )


class RateLimitAdmin(ratelimit_pb2_grpc.RateLimitsServicer):  # type: ignore[misc]
    def __init__(
        self, services: RateLimitServices, secret_client: SecretClient = _always_secret
    ) -> None:
        self.services = services
        self.secret_client = secret_client

    def add_to(self, server: grpc.aio.Server) -> None:
        ratelimit_pb2_grpc.add_RateLimitsServicer_to_server(self, decode_checked(server))

    async def GetUsage(
        self, request: ratelimit_pb2.GetUsageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ratelimit_pb2.UsageReport:
        budgets = self.services.budgets
        backend = budgets.backend
        report = ratelimit_pb2.UsageReport(
            backend=backend.url if isinstance(backend, RedisBackend) else "memory",
            generated_at=_timestamp(time.time()),
        )
        try:
            usage = await budgets.usage(request.limit_filter, request.top or 10)
        except BackendError as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        for limit in usage:
            entry = report.limits.add(
                limit=limit.rule.limit,
                policy=limit.rule.policy,
                requests=limit.rule.requests,
                window_seconds=limit.rule.window,
                window_start=_timestamp(limit.window_start),
                shadow=limit.rule.shadow,
            )
            secret = self.secret_client(limit.rule.policy, limit.rule.limit)
            for client in limit.clients:
                entry.clients.add(
                    client=shown(client.client, secret),
                    used=client.used,
                    remaining=client.remaining,
                    at_or_over=client.over,
                )
        for (policy, key), throttle in sorted(budgets.runtime_throttles().items()):
            report.throttles.append(_runtime(policy, key, throttle))
        return report

    async def Throttle(
        self, request: ratelimit_pb2.ThrottleRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ratelimit_pb2.ThrottleResponse:
        if not request.policy or not request.client:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "policy and client are required")
        if request.requests <= 0 or request.per_seconds <= 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "requests and per_seconds must be positive"
            )
        try:
            until = request.until.ToNanoseconds() / 1e9 if request.HasField("until") else 0.0
        except ValueError as err:  # outside what a Timestamp may hold (years 1..9999)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"until: {err}")
        if until > MAX_UNTIL:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "until is beyond year 9999")
        if until <= time.time():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "until must be in the future")
        try:
            await self.services.throttle(
                request.policy, request.client, request.requests, request.per_seconds, until
            )
        except ValueError as err:  # beyond the longest throttle allowed
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except BackendError as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        return ratelimit_pb2.ThrottleResponse()

    async def Unthrottle(
        self, request: ratelimit_pb2.UnthrottleRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ratelimit_pb2.UnthrottleResponse:
        if not request.client:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "client: required")
        before = self.services.budgets.runtime_throttles()
        try:
            gone = await self.services.unthrottle(request.client, request.policy or None)
        except BackendError as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        return ratelimit_pb2.UnthrottleResponse(
            removed=[_runtime(p, c, before[(p, c)]) for p, c in gone if (p, c) in before]
        )
