"""``modelguard traces``: recent spans and access-log records from the control plane's store.

Filters by service, client (a key hash, its prefix, or the plain key — hashed here, never
sent), status and verdict; ``--follow`` streams new records as they arrive. ``--json``
prints one JSON object per line (also while following).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import json_format

from controlplane.adminauth import admin_channel
from controlplane.gen.modelguard.admin.v1 import telemetry_pb2, telemetry_pb2_grpc
from controlplane.telemetry.records import hash_secret


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin", default="127.0.0.1:18001", help="admin address of the control plane"
    )
    parser.add_argument("--service", default="", help="only this service")
    parser.add_argument("--client", default="", help="only this client: API key or its hash")
    parser.add_argument("--status", default="", help="HTTP status: 403, or a class: 4xx")
    parser.add_argument(
        "--verdict",
        default="",
        choices=[
            *("", "allowed", "denied", "rate_limited", "hardened", "audit_denied"),
            *("blocked", "would-block"),  # egress: outbound destinations
        ],
        help="only requests with this policy verdict",
    )
    parser.add_argument("--kind", default="", choices=["", "span", "log"], help="spans or logs")
    parser.add_argument(
        "--source", default="", choices=["", "sidecar", "control-plane"], help="who sent it"
    )
    parser.add_argument("--trace", default="", help="only this trace id")
    parser.add_argument("-n", "--limit", type=int, default=50, help="how many recent records")
    parser.add_argument("-f", "--follow", action="store_true", help="stream new records")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")


def build_query(args: argparse.Namespace) -> telemetry_pb2.TelemetryQuery:
    client = args.client
    # A plain key is hashed before it leaves this process; a hash or its prefix is kept.
    if client and not client.startswith("sha256:"):
        client = hash_secret(client)
    return telemetry_pb2.TelemetryQuery(
        service=args.service,
        client=client,
        status=args.status,
        verdict=args.verdict,
        kind=args.kind,
        source=args.source,
        trace_id=args.trace,
        limit=max(args.limit, 1),
    )


def to_json(record: telemetry_pb2.TelemetryRecord) -> str:
    data: dict[str, Any] = json_format.MessageToDict(
        record, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    data["seq"], data["time_unix_nano"] = record.seq, record.time_unix_nano
    return json.dumps(data, sort_keys=True)


HEADER = ("TIME", "KIND", "SERVICE", "STATUS", "VERDICT", "RULE", "CLIENT", "WHAT", "TRACE")


def row(record: telemetry_pb2.TelemetryRecord) -> tuple[str, ...]:
    when = datetime.datetime.fromtimestamp(record.time_unix_nano / 1e9).strftime("%H:%M:%S.%f")[:-3]
    what = record.name
    if record.kind == "span" and record.duration_ms:
        what = f"{what} ({record.duration_ms:.1f} ms)"
    return (
        when,
        record.kind,
        record.service or "-",
        str(record.status) if record.status else "-",
        record.verdict or "-",
        record.rule or "-",
        record.client.removeprefix("sha256:")[:12] or "-",
        what,
        record.trace_id[:16] or "-",
    )


def render(records: Iterable[telemetry_pb2.TelemetryRecord], header: bool = True) -> str:
    rows: list[tuple[str, ...]] = [HEADER] if header else []
    rows += [row(r) for r in records]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))] if rows else []
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def show_traces(args: argparse.Namespace) -> int:
    query = build_query(args)
    try:
        with admin_channel(args.admin) as channel:
            stub = telemetry_pb2_grpc.TelemetryStub(channel)
            listing: telemetry_pb2.TelemetryList = stub.ListTelemetry(query, timeout=10)
            _print(listing.records, args.json, header=True)
            if not args.follow:
                if not listing.records and not args.json:
                    print("no records match", file=sys.stderr)
                return 0
            query.after_seq = listing.last_seq
            widths_known = bool(listing.records)
            for record in stub.WatchTelemetry(query):
                _print([record], args.json, header=not widths_known)
                widths_known = True
    except KeyboardInterrupt:
        return 0
    except grpc.RpcError as err:
        print(f"cannot read telemetry from {args.admin}: {err.details()}", file=sys.stderr)
        return 2
    return 0


def _print(records: Iterable[telemetry_pb2.TelemetryRecord], as_json: bool, header: bool) -> None:
    records = list(records)
    if as_json:
        for record in records:
            print(to_json(record), flush=True)
    elif records:
        print(render(records, header=header), flush=True)
