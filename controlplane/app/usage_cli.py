"""``modelguard usage``: each global limit's top clients, by fingerprint, and ``usage
unthrottle``, through the admin API (``ratelimit.admin.RateLimitAdmin`` answers)."""

from __future__ import annotations

import argparse
import sys

import grpc

from controlplane.app.adminauth import admin_channel
from controlplane.app.cliutil import (
    add_output_arguments,
    admin_call_failed,
    emit,
    plain_dict,
    positive_int,
)
from controlplane.gen.modelguard.admin.v1 import ratelimit_pb2, ratelimit_pb2_grpc


def fetch_usage(
    address: str, limit_filter: str = "", top: int = 10, timeout: float = 5.0
) -> ratelimit_pb2.UsageReport:
    with admin_channel(address) as channel:
        stub = ratelimit_pb2_grpc.RateLimitsStub(channel)
        report: ratelimit_pb2.UsageReport = stub.GetUsage(
            ratelimit_pb2.GetUsageRequest(limit_filter=limit_filter, top=top), timeout=timeout
        )
        return report


def render(report: ratelimit_pb2.UsageReport, limit_filter: str = "", wide: bool = False) -> str:
    if not report.limits and limit_filter:
        return (
            f"no global limit whose name contains {limit_filter!r} has been asked about "
            f"(backend: {report.backend})"
        )
    if not report.limits and not report.throttles:
        return (
            f"no global limit has been asked about yet (backend: {report.backend}); "
            "Local limits are counted inside each sidecar"
        )
    blocks = []
    for limit in report.limits:
        head = (
            f"{limit.limit}  {limit.requests} per {limit.window_seconds}s"
            f"{'  (shadow)' if limit.shadow else ''}  window since "
            f"{limit.window_start.ToDatetime().isoformat()}Z"
            + (f"  policy {limit.policy}" if wide else "")
        )
        rows = [["CLIENT", "USED", "REMAINING", "STATE"]]
        rows += [
            [c.client, str(c.used), str(c.remaining), "AT/OVER LIMIT" if c.at_or_over else "ok"]
            for c in limit.clients
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        table = "\n".join(
            "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
            for r in rows
        )
        blocks.append(f"{head}\n{table}")
    return "\n\n".join(blocks + render_throttles(report)) + f"\n\nbackend: {report.backend}"


def render_throttles(report: ratelimit_pb2.UsageReport) -> list[str]:
    if not report.throttles:
        return []
    rows = [["THROTTLED CLIENT", "POLICY", "LIMIT", "UNTIL"]]
    rows += [
        [t.client, t.policy, f"{t.requests}/{t.per_seconds}s",
         t.until.ToDatetime().isoformat(timespec="seconds") + "Z"]
        for t in report.throttles
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return [
        "run-time throttles (end one: modelguard usage unthrottle CLIENT [--policy P])\n"
        + "\n".join(
            "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
            for r in rows
        )
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--top", type=positive_int, default=10, help="clients per limit")
    add_output_arguments(parser)  # wide: the policy of each limit
    parser.add_argument(
        "limit", nargs="?", default="",
        help="only limits whose name has this; or 'unthrottle' to end a run-time throttle",
    )
    parser.add_argument(
        "client", nargs="?", default="",
        help="with unthrottle: the client key, its SHA-256 or its fingerprint",
    )
    parser.add_argument("--policy", default="", help="with unthrottle: only this RatePolicy's")


def unthrottle(args: argparse.Namespace) -> int:
    if not args.client:
        print("modelguard usage unthrottle: which client? (key or fingerprint)", file=sys.stderr)
        return 2
    try:
        with admin_channel(args.admin) as channel:  # with the admin token, as every command
            removed = ratelimit_pb2_grpc.RateLimitsStub(channel).Unthrottle(
                ratelimit_pb2.UnthrottleRequest(client=args.client, policy=args.policy),
                timeout=5,
            )
    except grpc.RpcError as err:
        return admin_call_failed(args.admin, err)
    if not removed.removed:
        print("modelguard usage unthrottle: no run-time throttle matches", file=sys.stderr)
        return 1
    for t in removed.removed:
        print(f"unthrottled {t.client} ({t.policy})")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.limit == "unthrottle":
        return unthrottle(args)
    try:
        report = fetch_usage(args.admin, args.limit, args.top)
    except grpc.RpcError as err:
        return admin_call_failed(args.admin, err)
    if args.output in ("json", "yaml"):
        print(emit(plain_dict(report), args.output))
    else:
        found = bool(report.limits) or not args.limit
        print(
            render(report, args.limit, wide=args.output == "wide"),
            file=sys.stdout if found else sys.stderr,
        )
    return 1 if args.limit and not report.limits else 0
