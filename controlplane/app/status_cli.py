"""``modelguard status``: sidecar sync state and policy state, read from the admin service."""

from __future__ import annotations

import argparse
import sys

import grpc

from controlplane.app.adminauth import admin_channel
from controlplane.app.cliutil import add_output_arguments, admin_call_failed, emit, plain_dict
from controlplane.gen.modelguard.admin.v1 import admin_pb2, admin_pb2_grpc

TYPES = ("CDS", "EDS", "LDS", "RDS", "SDS", "ECDS")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_output_arguments(parser)
    parser.add_argument("node", nargs="?", default="", help="only sidecars whose id contains this")


def fetch_status(
    address: str, node_filter: str = "", timeout: float = 5.0
) -> admin_pb2.StatusReport:
    with admin_channel(address) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        report: admin_pb2.StatusReport = stub.GetStatus(
            admin_pb2.GetStatusRequest(node_filter=node_filter), timeout=timeout
        )
        return report


def _table(rows: list[list[str]]) -> str:
    if not rows:
        return ""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _egress_blocked(report: admin_pb2.StatusReport) -> list[str]:
    rows = [["SIDECAR", "DESTINATION", "PROTOCOL", "VERDICT", "COUNT", "LAST SEEN", "POLICY"]]
    now = report.generated_at.ToNanoseconds()
    for sidecar in report.sidecars:
        for block in sidecar.egress_blocked:
            rows.append(
                [
                    sidecar.node_id,
                    block.destination or "-",
                    block.protocol or "-",
                    block.verdict,
                    str(block.count),
                    _ago((now - block.last_seen.ToNanoseconds()) / 1e9),
                    block.policy or "-",
                ]
            )
    if len(rows) == 1:
        return []
    return ["", "Egress blocked (recent telemetry):", _table(rows)]


def render(report: admin_pb2.StatusReport, wide: bool = False) -> str:
    used = [t for t in TYPES if any(r.type == t for s in report.sidecars for r in s.resources)]
    used = used or ["CDS", "EDS", "LDS", "RDS"]
    rows = [["SIDECAR", "SERVICE", "STREAM", *used, "VERSION"]]
    if wide:
        rows[0] += ["PEER", "IDENTITY"]
    problems = []
    for sidecar in report.sidecars:
        by_type = {r.type: r for r in sidecar.resources}
        states = [by_type[t].state if t in by_type else "-" for t in used]
        rows.append(
            [
                sidecar.node_id,
                f"{sidecar.service}.{sidecar.namespace}",
                sidecar.stream,
                *states,
                sidecar.snapshot_version[:12] or "-",
            ]
        )
        if wide:
            rows[-1] += [sidecar.peer or "-", sidecar.identity or "-"]
        for old in sidecar.replaced_streams:
            problems.append(
                f"  {sidecar.node_id}: a second stream (from {sidecar.peer}) replaced the one "
                f"from {old.peer} (connected {old.connected_at.ToDatetime().isoformat()}Z)"
            )
        for r in sidecar.resources:
            if r.last_nack_error:
                problems.append(
                    f"  {sidecar.node_id} {r.type} rejected version {r.last_nack_version}: "
                    f"{r.last_nack_error} (serving {r.acked_version or 'nothing'})"
                )
    out = [_table(rows) if report.sidecars else "no sidecars connected"]
    if problems:
        out += ["", "NACKs and replaced streams:", *problems]
    out += _egress_blocked(report)
    prows = [["POLICY", "STATE", "GEN", "SIDECARS", "SOURCE"]]
    errors = []
    conditions: list[str] = []
    warnings: list[str] = []
    for p in report.policies:
        state = (
            p.state if p.state == "Accepted" or not p.serving else f"{p.state} (last good serving)"
        )
        prows.append(
            [
                f"{p.kind} {p.namespace}/{p.name}",
                state,
                str(p.generation),
                str(len(p.sidecars)),
                p.source,
            ]
        )
        errors += [f"  {e}" for e in p.errors]
        conditions += [
            f"  {p.kind} {p.namespace}/{p.name}: {c.type}={c.status} ({c.reason}) {c.message}"
            for c in p.conditions
        ]
        warnings += [f"  {p.kind} {p.namespace}/{p.name}: {w}" for w in p.warnings]
        if p.state == "Accepted" and not p.sidecars:
            warnings.append(
                f"  {p.kind} {p.namespace}/{p.name}: its target matches no connected sidecar "
                "(check spec.targetRef)"
            )
    out += ["", _table(prows) if report.policies else "no policies"]
    if conditions:
        out += ["", "Conditions:", *conditions]
    if errors or report.source_errors:
        out += ["", "Policy errors:", *errors, *(f"  {e}" for e in report.source_errors)]
    if warnings:
        out += ["", "Warnings:", *warnings]
    plaintext = report.refused.get("plaintext_on_tls", 0)
    if plaintext:
        out += [
            "",
            f"Refused: {plaintext} plaintext connection(s) to the TLS xDS port "
            "(bootstrap with --identity-dir, or serve --insecure)",
        ]
    return "\n".join(out)


def unhealthy(report: admin_pb2.StatusReport) -> bool:
    """What makes ``status`` exit 1: a rejected policy (or policy file), or a NACK."""
    return (
        any(p.state != "Accepted" for p in report.policies)
        or bool(report.source_errors)
        or any(r.last_nack_error for s in report.sidecars for r in s.resources)
    )


def show_status(args: argparse.Namespace) -> int:
    try:
        report = fetch_status(args.admin, args.node)
    except grpc.RpcError as err:
        return admin_call_failed(args.admin, err)
    if args.output in ("json", "yaml"):
        print(emit(plain_dict(report), args.output))
    else:
        print(render(report, wide=args.output == "wide"))
    if args.node and not report.sidecars:
        print(f"no connected sidecar's id contains {args.node!r}", file=sys.stderr)
        return 1
    return 1 if unhealthy(report) else 0
