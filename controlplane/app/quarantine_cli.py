"""``modelguard quarantine``: list and release quarantines, throttles and hardened clients
through the admin API (``extraction.admin.QuarantineAdmin`` answers)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping

import grpc
from google.protobuf import timestamp_pb2

from controlplane.app.adminauth import admin_channel
from controlplane.app.cliutil import (
    add_output_arguments,
    admin_call_failed,
    emit,
    plain_dict,
    policy_ref,
)
from controlplane.gen.modelguard.admin.v1 import admin_pb2, admin_pb2_grpc


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
                    out = plain_dict(listed)
                    if stats is not None:
                        out["monitor"] = plain_dict(stats)
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
        return admin_call_failed(args.admin, err)
    if not released.released:
        print(f"{args.key}: not quarantined or throttled", file=sys.stderr)  # what was typed
        return 1
    for e in released.released:
        print(f"released {e.kind} of {e.client_key} ({e.policy})")
    return 0
