"""The admin side of verdicts: the Quarantines service that lists and releases quarantines
(``modelguard quarantine``, in ``controlplane.app.quarantine_cli``, is its client)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Protocol

import grpc
from google.protobuf import timestamp_pb2

from controlplane.extraction.hardened import Hardened
from controlplane.extraction.verdicts import Enforcement, digest, fingerprint_of
from controlplane.gen.modelguard.admin.v1 import admin_pb2, admin_pb2_grpc
from controlplane.grpcutil import decode_checked

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # the admin service needs none of the monitor at import: no numpy here
    from controlplane.extraction.monitor import ExtractionMonitor


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


MAX_ESTIMATES = 100  # clients listed for their estimate alone (quarantine list --all)


def harden_entry(h: Hardened) -> admin_pb2.QuarantineEntry:
    return admin_pb2.QuarantineEntry(
        kind="harden",
        policy=h.client.policy,
        client_key=h.client.shown,
        fingerprint=h.client.fingerprint,
        key_source=h.client.source,
        since=_timestamp(h.since),
        until=_timestamp(h.until),
        reason="risk",
        tier=", ".join(f"{mine or '*'}→{to or mine or 'own'}" for mine, to in h.tiers)
        if len(h.tiers) > 1
        else h.tier,
    )


def entry(e: Enforcement) -> admin_pb2.QuarantineEntry:
    return admin_pb2.QuarantineEntry(
        kind=e.kind,
        policy=e.client.policy,
        client_key=e.client.shown,
        fingerprint=e.client.fingerprint,
        key_source=e.client.source,
        since=_timestamp(e.since),
        until=_timestamp(e.until),
        reason=e.reason,
        requests=e.requests,
        per_seconds=e.per_seconds,
    )


class RuntimeThrottles(Protocol):
    """Run-time throttles set through the rate limit admin API (``RateLimits.Throttle``):
    ``quarantine list --all`` shows them and ``quarantine release`` ends them too."""

    def runtime_throttles(self) -> Mapping[tuple[str, str], object]: ...

    def unthrottle(
        self, client: str, policy: str | None = None
    ) -> Awaitable[list[tuple[str, str]]]: ...


def _runtime_entry(policy: str, client: str, throttle: object) -> admin_pb2.QuarantineEntry:
    until = float(getattr(throttle, "until", 0.0))
    return admin_pb2.QuarantineEntry(
        kind="runtime-throttle",
        policy=policy,  # the RatePolicy's namespace/name
        client_key=fingerprint_of(digest(client)),
        fingerprint=fingerprint_of(digest(client)),
        key_source="rateLimit",
        until=_timestamp(until),
        reason="run-time throttle (RateLimits.Throttle)",
        requests=int(getattr(throttle, "requests", 0)),
        per_seconds=int(getattr(throttle, "per", 0)),
    )


class QuarantineAdmin(admin_pb2_grpc.QuarantinesServicer):  # type: ignore[misc]
    def __init__(
        self, monitor: ExtractionMonitor, throttles: RuntimeThrottles | None = None
    ) -> None:
        self.monitor = monitor
        self.throttles = throttles

    def add_to(self, server: grpc.aio.Server) -> None:
        admin_pb2_grpc.add_QuarantinesServicer_to_server(self, decode_checked(server))

    async def ListQuarantines(
        self,
        request: admin_pb2.ListQuarantinesRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.ListQuarantinesRequest, admin_pb2.QuarantineList
        ],
    ) -> admin_pb2.QuarantineList:
        entries = [
            entry(e)
            for e in self.monitor.verdicts.active()
            if request.include_throttles or e.kind == "quarantine"
        ]
        if request.include_throttles:
            entries += [harden_entry(h) for h in self.monitor.hardened.active()]
        if request.include_throttles and self.throttles is not None:
            for (policy, client), t in sorted(self.throttles.runtime_throttles().items()):
                entries.append(_runtime_entry(policy, client, t))
        return admin_pb2.QuarantineList(entries=with_estimates(self.monitor, entries, request))

    async def ReleaseQuarantine(
        self,
        request: admin_pb2.ReleaseQuarantineRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.ReleaseQuarantineRequest, admin_pb2.ReleaseQuarantineResponse
        ],
    ) -> admin_pb2.ReleaseQuarantineResponse:
        if not request.client_key:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "client_key: required")
        gone = await asyncio.to_thread(
            self.monitor.release, request.client_key, request.policy or None
        )
        for e in gone:  # a release is as much an event as a verdict
            log.warning(
                "%s of %s (%s) released by an admin request",
                e.kind,
                e.client.fingerprint,
                e.client.policy,
            )
        released = [entry(e) for e in gone]
        if self.throttles is not None:
            # A released client is not left throttled by hand either (issue 18, item 10).
            before = dict(self.throttles.runtime_throttles())
            for policy, client in await self.throttles.unthrottle(
                request.client_key, request.policy or None
            ):
                released.append(_runtime_entry(policy, client, before.get((policy, client))))
        return admin_pb2.ReleaseQuarantineResponse(released=released)

    async def GetMonitorStats(
        self,
        request: admin_pb2.MonitorStatsRequest,
        context: grpc.aio.ServicerContext[admin_pb2.MonitorStatsRequest, admin_pb2.MonitorStats],
    ) -> admin_pb2.MonitorStats:
        return monitor_stats(self.monitor)


def with_estimates(
    monitor: ExtractionMonitor,
    entries: list[admin_pb2.QuarantineEntry],
    request: admin_pb2.ListQuarantinesRequest,
) -> list[admin_pb2.QuarantineEntry]:
    """Each entry with its client's risk estimate; with ``include_estimates``, the other
    clients that have one (highest first) as kind ``estimate``."""
    listed = set()
    risks = {(policy, key): (f, n) for policy, key, f, n in monitor.risks()}
    for e in entries:
        found = risks.get((e.policy, e.client_key))
        if found is not None:
            e.fidelity, e.distinct_queries = found
        listed.add((e.policy, e.client_key))
    if request.include_estimates:
        others = [(k, v) for k, v in risks.items() if k not in listed][:MAX_ESTIMATES]
        entries += [
            admin_pb2.QuarantineEntry(
                kind="estimate", policy=policy, client_key=key, fidelity=f, distinct_queries=n
            )
            for (policy, key), (f, n) in others
        ]
    return entries


def monitor_stats(monitor: ExtractionMonitor) -> admin_pb2.MonitorStats:
    stats, tracked = monitor.counters()
    return admin_pb2.MonitorStats(
        batches=stats.batches,
        queries=stats.queries,
        unobserved=stats.unobserved,
        unobserved_by_reason=dict(stats.unobserved_by_reason),
        unparsable=dict(stats.unparsable),
        unknown_policy=stats.unknown_policy,
        verdicts=dict(stats.verdicts),
        clients_tracked=tracked,
        clients_max=monitor.max_clients,
        clients_evicted=stats.evicted,
        clients_expired=stats.expired,
        long_keys=stats.long_keys,
        refused_batches=stats.refused_batches,
        clients_evicted_by_tenant=dict(stats.evicted_by_tenant),
    )
