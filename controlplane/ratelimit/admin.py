"""The admin side of rate limits: usage per budget and run-time throttles (admin port),
and ``modelguard usage``, which reads the former and ends throttles (``usage unthrottle``).

Clients are named by fingerprint ("sha256:" + 16 hex digits of the key, as traces and
``quarantine list`` name them): a client key is often an API key, a secret."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import grpc
from google.protobuf import json_format, timestamp_pb2

from controlplane.app.adminauth import admin_channel
from controlplane.app.cliutil import add_output_arguments, emit, positive_int
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


def _runtime(policy: str, client: str, t: Throttle) -> ratelimit_pb2.RuntimeThrottle:
    return ratelimit_pb2.RuntimeThrottle(
        policy=policy, client=fingerprint(client), requests=t.requests, per_seconds=t.per,
        until=_timestamp(t.until),
    )


class RateLimitAdmin(ratelimit_pb2_grpc.RateLimitsServicer):  # type: ignore[misc]
    def __init__(self, services: RateLimitServices) -> None:
        self.services = services

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
            for client in limit.clients:
                entry.clients.add(
                    client=fingerprint(client.client),
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


# --- `modelguard usage` --------------------------------------------------------------------


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
        with grpc.insecure_channel(args.admin) as channel:
            removed = ratelimit_pb2_grpc.RateLimitsStub(channel).Unthrottle(
                ratelimit_pb2.UnthrottleRequest(client=args.client, policy=args.policy),
                timeout=5,
            )
    except grpc.RpcError as err:
        print(f"modelguard usage: {args.admin}: {err.details() or err.code()}", file=sys.stderr)
        return 1
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
        print(f"modelguard usage: {args.admin}: {err.details() or err.code()}", file=sys.stderr)
        return 1
    if args.output in ("json", "yaml"):
        print(emit(json_format.MessageToDict(report), args.output))
    else:
        found = bool(report.limits) or not args.limit
        print(
            render(report, args.limit, wide=args.output == "wide"),
            file=sys.stdout if found else sys.stderr,
        )
    return 1 if args.limit and not report.limits else 0
