"""``modelguard traces``: recent spans and access-log records from the control plane's store.

Filters by service, client (a key hash, its prefix, or the plain key — hashed here, never
sent), status and verdict; ``--follow`` streams new records as they arrive, in columns of
fixed width. ``-o json`` (``--json``) prints one JSON object per line (also while following),
``-o yaml`` one document per record, ``-o wide`` whole trace ids and client hashes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
from google.protobuf import json_format

from controlplane.app.adminauth import admin_channel
from controlplane.app.cliutil import (
    add_output_arguments,
    admin_call_failed,
    emit,
    http_status,
    positive_int,
)
from controlplane.gen.modelguard.admin.v1 import telemetry_pb2, telemetry_pb2_grpc
from controlplane.telemetry.conventions import INT_ATTRIBUTES
from controlplane.telemetry.records import hash_secret


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--service", default="", help="only this service")
    parser.add_argument("--client", default="", help="only this client: API key or its hash")
    parser.add_argument(
        "--status", default="", type=http_status, help="HTTP status: 403, or a class: 4xx"
    )
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
    parser.add_argument(
        "-n", "--limit", type=positive_int, default=50, help="how many recent records (1 or more)"
    )
    parser.add_argument("-f", "--follow", action="store_true", help="stream new records")
    # json: one object per line (also while following); yaml: one document per record;
    # wide: whole trace ids and client hashes.
    add_output_arguments(parser)


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


def to_dict(record: telemetry_pb2.TelemetryRecord) -> dict[str, Any]:
    """camelCase keys, the API's (as every --json of the CLI); 64-bit counts as numbers, and
    the attributes the receiver types as integers as integers again: the admin API carries
    attribute values as strings, and the README promises status codes, sizes and ports as
    numbers."""
    data: dict[str, Any] = json_format.MessageToDict(
        record, always_print_fields_with_no_presence=True
    )
    data["seq"], data["timeUnixNano"] = record.seq, record.time_unix_nano
    attributes = data.get("attributes", {})
    for name in INT_ATTRIBUTES:
        value = attributes.get(name)
        if isinstance(value, str) and value.isascii() and value.isdigit():
            attributes[name] = int(value)
    return data


def to_json(record: telemetry_pb2.TelemetryRecord) -> str:
    return json.dumps(to_dict(record), sort_keys=True)


HEADER = ("TIME", "KIND", "SERVICE", "STATUS", "VERDICT", "RULE", "CLIENT", "WHAT", "TRACE")


# Widths of the columns while following: records arrive one at a time, and a table sized to
# each would lose its alignment. Wider values push their own line only.
FOLLOW_WIDTHS = (12, 4, 16, 6, 12, 24, 12, 28, 16)


def row(record: telemetry_pb2.TelemetryRecord, wide: bool = False) -> tuple[str, ...]:
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
        (record.client if wide else record.client.removeprefix("sha256:")[:12]) or "-",
        what,
        (record.trace_id if wide else record.trace_id[:16]) or "-",
    )


def render(
    records: Iterable[telemetry_pb2.TelemetryRecord],
    header: bool = True,
    wide: bool = False,
    widths: Sequence[int] | None = None,
) -> str:
    rows: list[tuple[str, ...]] = [HEADER] if header else []
    rows += [row(r, wide) for r in records]
    if widths is None:
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
            # Following: one fixed set of widths for the listing and every streamed line.
            widths = _follow_widths(listing.records, args.output) if args.follow else None
            _print(listing.records, args.output, header=True, widths=widths)
            if not args.follow:
                if not listing.records and args.output in ("table", "wide"):
                    print(f"no records match {_asked(args)}", file=sys.stderr)
                return 0
            query.after_seq = listing.last_seq
            header_shown = bool(listing.records)
            for record in stub.WatchTelemetry(query):
                _print([record], args.output, header=not header_shown, widths=widths)
                header_shown = True
    except KeyboardInterrupt:
        return 0
    except grpc.RpcError as err:
        return admin_call_failed(args.admin, err)
    return 0


def _asked(args: argparse.Namespace) -> str:
    filters = [
        f"--{name} {getattr(args, attr)}"
        for name, attr in (
            ("service", "service"),
            ("client", "client"),
            ("status", "status"),
            ("verdict", "verdict"),
            ("kind", "kind"),
            ("source", "source"),
            ("trace", "trace"),
        )
        if getattr(args, attr)
    ]
    return " ".join(filters) if filters else "(no filter: the store holds no records yet)"


def _follow_widths(records: Iterable[telemetry_pb2.TelemetryRecord], output: str) -> list[int]:
    wide = output == "wide"
    rows = [HEADER, *(row(r, wide) for r in records)]
    base = (*FOLLOW_WIDTHS[:6], 71 if wide else 12, FOLLOW_WIDTHS[7], 32 if wide else 16)
    return [max(base[i], *(len(r[i]) for r in rows)) for i in range(len(HEADER))]


def _print(
    records: Iterable[telemetry_pb2.TelemetryRecord],
    output: str,
    header: bool,
    widths: Sequence[int] | None = None,
) -> None:
    records = list(records)
    if output == "json":
        for record in records:
            print(to_json(record), flush=True)
    elif output == "yaml":
        for record in records:
            print("---\n" + emit(to_dict(record), "yaml"), flush=True)
    elif records:
        print(render(records, header=header, wide=output == "wide", widths=widths), flush=True)
