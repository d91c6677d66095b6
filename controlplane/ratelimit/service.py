"""The two gRPC services sidecars call, served on the control plane's xDS port.

``RateLimitService`` answers each request (``ratelimit`` filter). ``QuotaService`` never
sits on a request's path: sidecars stream batched usage reports (every 5 s, and at once
for a new client) and it answers with an assignment per client bucket, which the sidecar
enforces by itself: a token bucket holding this sidecar's share of what is left of the
client's budget, or deny-all once it is spent. Throttles pushed at run time reach the
sidecars through the same streams, without a configuration push.

Budgets of instances (``cost: instances``): RLQS reports count requests only, so the
sidecar puts each request's instance *class* into the bucket id (one bucket per client and
class, see ``controlplane.policies.rate.translate``). A bucket of class c is charged c per
answered request (refused ones cost nothing) and assigned whole requests of c: a request
costs its count rounded up to its class (at most 25% more; exact at 256).

Across replicas: every bucket of a client on any sidecar of any replica is a holder of
its budget; ``Backend.grant`` sizes a holder's assignment atomically from all live holders
(Redis, or memory for one control plane): its fair share, never more than the others'
assignments leave free. The overshoot of a budget of N is therefore bounded by what each
holder serves before its first assignment arrives and while a report's answer is in
flight (the README's rate-limit section has the bound and the measurement).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.rate_limit_quota.v3 import rlqs_pb2, rlqs_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from envoy.type.v3 import ratelimit_strategy_pb2, token_bucket_pb2
from google.protobuf import duration_pb2, wrappers_pb2

from controlplane.contracts.ratelimit import UNITS_KEY
from controlplane.grpcutil import decode_checked
from controlplane.ratelimit.backend import Backend, BackendError, MemoryBackend, RedisBackend
from controlplane.ratelimit.budgets import Budgets, Decision, Throttle, tightest
from controlplane.ratelimit.rules import Rule, units

log = logging.getLogger(__name__)

_UNITS = {
    1: rls_pb2.RateLimitResponse.RateLimit.SECOND,
    60: rls_pb2.RateLimitResponse.RateLimit.MINUTE,
    3600: rls_pb2.RateLimitResponse.RateLimit.HOUR,
    86400: rls_pb2.RateLimitResponse.RateLimit.DAY,
}
# Outlives a few 5 s reports; when no fresh one arrives (service or backend down), the
# sidecar falls back to the policy's failure mode. A server setting (``serve
# --quota-assignment-ttl``), not a policy field: it is how long a sidecar trusts an answer.
ASSIGNMENT_TTL_SECONDS = 15
# Envoy 1.40 reports every bucket's usage every 5 s whatever reporting_interval says, and
# each report renews its assignments: a TTL at or under it lapses while all is well.
REPORT_INTERVAL_SECONDS = 5

Strategy = ratelimit_strategy_pb2.RateLimitStrategy


def ratelimit_headers(decision: Decision) -> list[base_pb2.HeaderValue]:
    """IETF draft RateLimit-* headers for the binding decision."""
    return [
        base_pb2.HeaderValue(key="ratelimit-limit", value=str(decision.limit)),
        base_pb2.HeaderValue(key="ratelimit-remaining", value=str(decision.remaining)),
        base_pb2.HeaderValue(key="ratelimit-reset", value=str(decision.reset)),
    ]


class RateLimitService(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    """``envoy.service.ratelimit.v3``: one answer per request, every limit counted."""

    def __init__(self, budgets: Budgets) -> None:
        self.budgets = budgets

    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> rls_pb2.RateLimitResponse:
        response = rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK)
        hits = request.hits_addend or 1
        binding: list[Decision] = []
        for descriptor in request.descriptors:
            parsed = Rule.parse({e.key: e.value for e in descriptor.entries})
            if parsed is None:
                response.statuses.add(code=rls_pb2.RateLimitResponse.OK)
                continue
            rule, client = parsed
            try:
                decision = await self.budgets.hit(rule, client, hits)
            except BackendError as err:
                # Envoy applies the policy's failure mode (failure_mode_deny).
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
            refused = decision.over and not rule.shadow
            status = response.statuses.add(
                code=rls_pb2.RateLimitResponse.OVER_LIMIT
                if refused
                else rls_pb2.RateLimitResponse.OK,
                limit_remaining=decision.remaining,
                duration_until_reset=duration_pb2.Duration(seconds=decision.reset),
            )
            unit = _UNITS.get(decision.window)
            if unit is not None:
                status.current_limit.requests_per_unit = decision.limit
                status.current_limit.unit = unit
            if refused:
                response.overall_code = rls_pb2.RateLimitResponse.OVER_LIMIT
            binding.append(
                Decision(refused, decision.limit, decision.remaining, decision.reset, rule.window)
            )
        if binding:
            response.response_headers_to_add.extend(ratelimit_headers(tightest(binding)))
        return response


@dataclass(eq=False)
class _Stream:
    """One sidecar's RLQS stream: the buckets it reported and what to send it."""

    peer: str
    holder: str  # this stream's name among a budget's holders (unique across replicas)
    outbox: asyncio.Queue[rlqs_pb2.RateLimitQuotaResponse | None] = field(
        default_factory=asyncio.Queue
    )
    # (limit, client, units) → (rule, bucket id as the sidecar sent it)
    buckets: dict[tuple[str, str, int], tuple[Rule, rlqs_pb2.BucketId]] = field(
        default_factory=dict
    )
    # Buckets this stream has had a counted assignment for, with its size in requests.
    assigned: dict[tuple[str, str, int], int] = field(default_factory=dict)


class QuotaService(rlqs_pb2_grpc.RateLimitQuotaServiceServicer):  # type: ignore[misc]
    """``envoy.service.rate_limit_quota.v3`` (RLQS): budgets enforced by the sidecars.

    Each sidecar bucket of a client (one per instance class for budgets that charge
    instances) is a *holder* of the client's budget, on whichever replica its stream
    reached. At each of its reports a holder gets its fair share of what the client has
    left (what remains over the number of holders, across all replicas), but never more
    than the other holders' live assignments leave free: the assignments handed out never
    add up to more than the budget, so replicas sharing a backend cannot overshoot it by
    their number. The backend keeps the holders, each until its assignment lapses (the
    assignment TTL), so a dead replica's holders vanish with their assignments.
    """

    def __init__(self, budgets: Budgets, *, assignment_ttl: int = ASSIGNMENT_TTL_SECONDS) -> None:
        # Whole seconds: Envoy reads only the seconds of assignment_time_to_live.
        if assignment_ttl <= REPORT_INTERVAL_SECONDS:
            raise ValueError(
                f"the quota assignment TTL must be longer than the sidecars' "
                f"{REPORT_INTERVAL_SECONDS} s usage reports, got {assignment_ttl} s"
            )
        self.budgets = budgets
        self.assignment_ttl = assignment_ttl
        # Names this replica's holders apart from every other replica's.
        self.replica = uuid.uuid4().hex[:12]
        self._streams: set[_Stream] = set()
        self._serial = itertools.count(1)
        budgets.on_throttle(self._push_throttle)

    async def StreamRateLimitQuotas(
        self,
        request_iterator: AsyncIterator[rlqs_pb2.RateLimitQuotaUsageReports],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[rlqs_pb2.RateLimitQuotaResponse]:
        stream = _Stream(peer=context.peer(), holder=f"{self.replica}/{next(self._serial)}")
        self._streams.add(stream)
        reader = asyncio.create_task(self._read(request_iterator, stream))
        try:
            while (response := await stream.outbox.get()) is not None:
                yield response
        finally:
            reader.cancel()
            self._streams.discard(stream)
            await self._release(stream)

    async def _release(self, stream: _Stream) -> None:
        """The stream's assignments no longer count against its clients' budgets (Envoy
        drops a stream's assignments with it); if the backend is gone they lapse anyway."""
        for (_, client, cost), (rule, _) in stream.buckets.items():
            try:
                await self.budgets.release(rule, client, f"{stream.holder}/{cost}")
            except Exception as err:  # they lapse with their TTL anyway
                log.debug("holder %s not released: %s", stream.holder, err)
                return

    async def _read(
        self,
        reports: AsyncIterator[rlqs_pb2.RateLimitQuotaUsageReports],
        stream: _Stream,
    ) -> None:
        try:
            async for report in reports:
                response = await self._assign(report, stream)
                if response.bucket_action:
                    stream.outbox.put_nowait(response)
        except (asyncio.CancelledError, grpc.RpcError):
            pass
        finally:
            stream.outbox.put_nowait(None)

    async def _assign(
        self, report: rlqs_pb2.RateLimitQuotaUsageReports, stream: _Stream
    ) -> rlqs_pb2.RateLimitQuotaResponse:
        response = rlqs_pb2.RateLimitQuotaResponse()
        for usage in report.bucket_quota_usages:
            entries = dict(usage.bucket_id.bucket)
            parsed = Rule.parse(entries)
            if parsed is None:
                continue
            rule, client = parsed
            cost = units(entries)
            key = (rule.limit, client, cost)
            stream.buckets[key] = (rule, usage.bucket_id)
            # A budget of instances charges each answered request its instance class;
            # a refused one returned nothing. A budget of requests counts every request.
            if UNITS_KEY in entries:
                hits = usage.num_requests_allowed * cost
            else:
                hits = usage.num_requests_allowed + usage.num_requests_denied
            try:
                if rule.shadow:
                    await self.budgets.add(rule, client, hits)
                    tokens = 0
                else:
                    holder = f"{stream.holder}/{cost}"
                    granted = await self.budgets.grant(
                        rule, client, holder, hits=hits, units=cost, ttl=self.assignment_ttl
                    )
                    tokens = granted.tokens
            except BackendError as err:
                # A client key may be an API key: logs name it by fingerprint only.
                log.warning(
                    "quota for %s/%s not assigned: %s", rule.limit, _fingerprint(client), err
                )
                if key not in stream.assigned:
                    # A bucket that never had an assignment would stay under the sidecar's
                    # no-assignment behaviour (allow, for both failure modes): expire it at
                    # once so the policy's failure mode applies now. One that had an
                    # assignment keeps it until it expires.
                    response.bucket_action.append(self._expired_action(usage.bucket_id))
                continue
            if tokens > 0 and stream.assigned.get(key, 0) > 0 and not rule.shadow:
                # Envoy 1.40 keeps a token bucket's state across token-bucket assignments
                # (measured: a grant shrunk from 29 to 5 let 3 requests through, not 5; a
                # lifted throttle's drained bucket stayed at 0), so a new grant would not
                # be what the sidecar serves. A deny-all first, in the same response, makes
                # it start the grant's bucket anew, full; deny, not allow, so nothing slips
                # through in between.
                response.bucket_action.append(self._blanket_action(usage.bucket_id, allow=False))
            stream.assigned[key] = tokens
            response.bucket_action.append(self._action(rule, client, usage.bucket_id, tokens))
        return response

    def _blanket_action(
        self, bucket_id: rlqs_pb2.BucketId, *, allow: bool
    ) -> rlqs_pb2.RateLimitQuotaResponse.BucketAction:
        action = rlqs_pb2.RateLimitQuotaResponse.BucketAction(bucket_id=bucket_id)
        action.quota_assignment_action.rate_limit_strategy.blanket_rule = (
            Strategy.ALLOW_ALL if allow else Strategy.DENY_ALL
        )
        action.quota_assignment_action.assignment_time_to_live.FromSeconds(self.assignment_ttl)
        return action

    def _action(
        self, rule: Rule, client: str, bucket_id: rlqs_pb2.BucketId, tokens: int
    ) -> rlqs_pb2.RateLimitQuotaResponse.BucketAction:
        throttle = self.budgets.throttle_for(rule.policy, client)
        if rule.shadow:
            strategy = Strategy(blanket_rule=Strategy.ALLOW_ALL)
        elif tokens <= 0:
            strategy = Strategy(blanket_rule=Strategy.DENY_ALL)
        else:
            # A full bucket of this holder's grant; the next report (5 s) resizes it, so
            # the refill hardly matters (fill intervals under 1 s would disable it).
            bucket = token_bucket_pb2.TokenBucket(
                max_tokens=tokens,
                tokens_per_fill=wrappers_pb2.UInt32Value(value=1),
                fill_interval=duration_pb2.Duration(seconds=rule.window),
            )
            if throttle is not None:
                bucket = token_bucket_pb2.TokenBucket(
                    max_tokens=min(tokens, throttle.requests),
                    tokens_per_fill=wrappers_pb2.UInt32Value(value=throttle.requests),
                    fill_interval=duration_pb2.Duration(seconds=throttle.per),
                )
            strategy = Strategy(token_bucket=bucket)
        action = rlqs_pb2.RateLimitQuotaResponse.BucketAction(bucket_id=bucket_id)
        action.quota_assignment_action.rate_limit_strategy.CopyFrom(strategy)
        action.quota_assignment_action.assignment_time_to_live.FromSeconds(self.assignment_ttl)
        return action

    @staticmethod
    def _expired_action(
        bucket_id: rlqs_pb2.BucketId,
    ) -> rlqs_pb2.RateLimitQuotaResponse.BucketAction:
        """An assignment that expires on arrival: the sidecar applies the bucket's
        expired-assignment behaviour, i.e. the policy's failure mode (the RLQS protocol's
        way for a server to send clients to their fallback)."""
        action = rlqs_pb2.RateLimitQuotaResponse.BucketAction(bucket_id=bucket_id)
        assignment = action.quota_assignment_action
        assignment.rate_limit_strategy.blanket_rule = Strategy.ALLOW_ALL
        assignment.assignment_time_to_live.FromSeconds(0)
        return action

    async def _push_throttle(self, policy: str, client: str) -> None:
        lifted = self.budgets.throttle_for(policy, client) is None
        for stream in list(self._streams):
            held = [
                (key, rule, bucket_id)
                for key, (rule, bucket_id) in stream.buckets.items()
                if key[1] == client and rule.policy == policy and key in stream.assigned
            ]
            if lifted and held:
                # Envoy keeps a token bucket's drained tokens across token-bucket assignments
                # (measured: a lifted 1/day throttle stayed 429), so a lifted throttle first
                # goes through an allow-all assignment, and the budget's bucket starts anew.
                stream.outbox.put_nowait(
                    rlqs_pb2.RateLimitQuotaResponse(
                        bucket_action=[self._allow_action(b) for _, _, b in held]
                    )
                )
            actions = [
                self._action(rule, key[1], bucket_id, stream.assigned.get(key, 0))
                for key, rule, bucket_id in held
            ]
            if actions:
                stream.outbox.put_nowait(rlqs_pb2.RateLimitQuotaResponse(bucket_action=actions))

    def _allow_action(
        self, bucket_id: rlqs_pb2.BucketId
    ) -> rlqs_pb2.RateLimitQuotaResponse.BucketAction:
        action = rlqs_pb2.RateLimitQuotaResponse.BucketAction(bucket_id=bucket_id)
        action.quota_assignment_action.rate_limit_strategy.blanket_rule = Strategy.ALLOW_ALL
        action.quota_assignment_action.assignment_time_to_live.FromSeconds(self.assignment_ttl)
        return action


def _fingerprint(client: str) -> str:
    from controlplane.extraction.verdicts import digest, fingerprint_of

    return fingerprint_of(digest(client))


class RateLimitServices:
    """Both services over one set of budgets: a sidecar service of the control plane."""

    def __init__(
        self,
        backend: Backend | None = None,
        *,
        assignment_ttl: int = ASSIGNMENT_TTL_SECONDS,
        **budget_options: Any,
    ) -> None:
        self.budgets = Budgets(backend or MemoryBackend(), **budget_options)
        self.ratelimit = RateLimitService(self.budgets)
        self.quota = QuotaService(self.budgets, assignment_ttl=assignment_ttl)

    def add_to(self, server: grpc.aio.Server) -> None:
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(self.ratelimit, decode_checked(server))
        rlqs_pb2_grpc.add_RateLimitQuotaServiceServicer_to_server(self.quota, server)

    async def start(self) -> None:
        await self.budgets.start()

    async def stop(self) -> None:
        await self.budgets.stop()

    async def throttle(
        self, policy: str, client: str, requests: int, per: str | int, until: float
    ) -> None:
        """Throttle one client of one policy at run time (see ``Budgets.throttle``)."""
        await self.budgets.throttle(policy, client, requests, per, until)

    def runtime_throttles(self) -> dict[tuple[str, str], Throttle]:
        return self.budgets.runtime_throttles()

    async def unthrottle(self, client: str, policy: str | None = None) -> list[tuple[str, str]]:
        """End run-time throttles of a client (see ``Budgets.unthrottle``)."""
        return await self.budgets.unthrottle(client, policy)


def backend_from_url(url: str) -> Backend:
    """``memory`` (or empty): counted in this process; ``redis://host:port/db``: shared."""
    if url in ("", "memory"):
        return MemoryBackend()
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisBackend(url)
    raise ValueError(f"rate limit backend must be 'memory' or a redis:// URL, got {url!r}")
