"""The admin side of verdicts: list and release quarantines (``modelguard quarantine``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Protocol

import grpc
from google.protobuf import json_format, timestamp_pb2

from controlplane.app.adminauth import admin_channel
from controlplane.app.cliutil import add_output_arguments, emit, policy_ref
from controlplane.extraction.hardened import Hardened
from controlplane.extraction.verdicts import Enforcement, digest, fingerprint_of
from controlplane.gen.modelguard.admin.v1 import admin_pb2, admin_pb2_grpc
from controlplane.grpcutil import decode_checked

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # the CLI imports this module: keep numpy out of its start-up
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


# --- the CLI ----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="quarantine_command", required=True)
    p = sub.add_parser(
        "list",
        help="quarantined clients (and, with --all, throttled ones), and the monitor's counters",
    )
    p.add_argument(
        "--all",
        action="store_true",
        help="throttles, hardened clients and every client's extraction-risk estimate too",
    )
    add_output_arguments(p)  # wide: when each verdict began, and where the key is read
    p = sub.add_parser("release", help="end a client's quarantine and throttle now")
    p.add_argument(
        "key", help="the client key (e.g. the API key), its SHA-256 or its fingerprint"
    )
    p.add_argument(
        "--policy", default="", type=policy_ref, help="namespace/name: only this policy's"
    )


def _remaining(until: timestamp_pb2.Timestamp) -> str:
    seconds = max(0, int(until.ToNanoseconds() / 1e9 - time.time()))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _kind(e: admin_pb2.QuarantineEntry) -> str:
    if e.kind == "harden":
        return f"harden {e.tier}"
    if e.kind in ("quarantine", "estimate"):
        return str(e.kind)
    return f"{e.kind} {e.requests}/{e.per_seconds}s"


def _fidelity(e: admin_pb2.QuarantineEntry) -> str:
    if not e.HasField("fidelity"):
        return "-"
    return f"{e.fidelity:.2f} ({e.distinct_queries:,} q)"


def render(entries: list[admin_pb2.QuarantineEntry], wide: bool = False) -> str:
    if not entries:
        return "no clients quarantined"
    risk = any(e.HasField("fidelity") or e.kind in ("harden", "estimate") for e in entries)
    rows = [["KIND", "POLICY", "CLIENT", "REMAINING", "REASON"] + (["FIDELITY"] if risk else [])]
    if wide:
        rows[0] += ["SINCE", "KEY SOURCE"]
    for e in entries:
        remaining = _remaining(e.until) if e.kind != "estimate" else "-"
        row = [_kind(e), e.policy, e.client_key, remaining, e.reason or "-"]
        rows.append(row + ([_fidelity(e)] if risk else []))
        if wide:
            rows[-1] += [e.since.ToDatetime().isoformat(timespec="seconds") + "Z", e.key_source]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{reason} {n:,}" for reason, n in sorted(counts.items()))


def render_stats(s: admin_pb2.MonitorStats) -> str:
    """The monitor's counters in three lines: what it saw, what it could not, what it did."""
    unobserved = f"{s.unobserved:,} unobserved"
    if s.unobserved_by_reason:
        unobserved += f" ({_counts(s.unobserved_by_reason)})"
    unparsable = sum(s.unparsable.values())
    unread = f"{unparsable:,} unreadable"
    if s.unparsable:
        unread += f" ({_counts(s.unparsable)})"
    if s.unknown_policy:
        unread += f", {s.unknown_policy:,} for an unknown policy"
    verdicts = sum(s.verdicts.values())
    clients = (
        f"{s.clients_tracked:,} of at most {s.clients_max:,} clients tracked "
        f"({s.clients_evicted:,} evicted, {s.clients_expired:,} expired"
        + (f", {s.long_keys:,} long keys by digest" if s.long_keys else "")
        + ")"
    )
    if s.clients_evicted_by_tenant:
        top = sorted(s.clients_evicted_by_tenant.items(), key=lambda kv: -kv[1])[:5]
        clients += "; evicted by tenant: " + ", ".join(f"{t} {n:,}" for t, n in top)
    return "\n".join(
        [
            f"monitor: {s.queries:,} queries observed in {s.batches:,} batches, {unobserved}",
            f"         {unread}"
            + (f", {s.refused_batches:,} batches refused" if s.refused_batches else ""),
            f"         {verdicts:,} verdicts"
            + (f" ({_counts(s.verdicts)})" if s.verdicts else "")
            + f", {clients}",
        ]
    )


def _stats(stub: admin_pb2_grpc.QuarantinesStub) -> admin_pb2.MonitorStats | None:
    try:
        stats: admin_pb2.MonitorStats = stub.GetMonitorStats(
            admin_pb2.MonitorStatsRequest(), timeout=5
        )
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.UNIMPLEMENTED:  # an older control plane
            return None
        raise
    return stats


def run(args: argparse.Namespace) -> int:
    try:
        with admin_channel(args.admin) as channel:
            stub = admin_pb2_grpc.QuarantinesStub(channel)
            if args.quarantine_command == "list":
                request = admin_pb2.ListQuarantinesRequest(
                    include_throttles=args.all, include_estimates=args.all
                )
                listed = stub.ListQuarantines(request, timeout=5)
                stats = _stats(stub)
                if args.output in ("json", "yaml"):
                    out = json_format.MessageToDict(listed)
                    if stats is not None:
                        out["monitor"] = json_format.MessageToDict(
                            stats, always_print_fields_with_no_presence=True
                        )
                    print(emit(out, args.output))
                else:
                    print(render(list(listed.entries), wide=args.output == "wide"))
                    if stats is not None:
                        print("\n" + render_stats(stats))
                return 0
            released = stub.ReleaseQuarantine(
                admin_pb2.ReleaseQuarantineRequest(client_key=args.key, policy=args.policy),
                timeout=5,
            )
    except grpc.RpcError as err:
        print(f"cannot reach the control plane at {args.admin}: {err.details()}", file=sys.stderr)
        return 2
    if not released.released:
        print(f"{args.key}: not quarantined or throttled", file=sys.stderr)  # what was typed
        return 1
    for e in released.released:
        print(f"released {e.kind} of {e.client_key} ({e.policy})")
    return 0
