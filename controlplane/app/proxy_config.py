"""``modelguard proxy-config SIDECAR listeners|clusters|routes|stats``, like istioctl's.

It asks the control plane (``status``) where the sidecar's Envoy admin interface listens —
each bootstrap announces it in the node metadata — and reads that interface. The admin
interface is bound to the sidecar's loopback, so this works on the sidecar's host (the
embedded default, a sidecar you run yourself); ``--envoy-admin`` names it directly.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import grpc

from controlplane.app.cliutil import add_output_arguments, admin_call_failed, emit, table
from controlplane.netutil import http_request

SECTIONS = ("listeners", "clusters", "routes", "stats")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sidecar", help="the sidecar's id (as `modelguard status` lists it)")
    parser.add_argument("section", choices=SECTIONS, help="what to show")
    parser.add_argument(
        "--envoy-admin",
        default="",
        metavar="HOST:PORT",
        help="the sidecar's Envoy admin address (default: as the control plane knows it)",
    )
    parser.add_argument("--filter", default="", help="stats: only those whose name contains this")
    add_output_arguments(parser)  # json|yaml: Envoy's own dump of the section


def envoy_admin_of(admin: str, sidecar: str) -> str:
    """The Envoy admin address a connected sidecar announced; LookupError if unknown."""
    from controlplane.app.status_cli import fetch_status

    report = fetch_status(admin, sidecar)
    exact = [s for s in report.sidecars if s.node_id == sidecar]
    matches = exact or list(report.sidecars)
    if not matches:
        known = ", ".join(s.node_id for s in fetch_status(admin).sidecars) or "none"
        raise LookupError(f"no connected sidecar {sidecar!r} (connected: {known})")
    if len(matches) > 1:
        names = ", ".join(s.node_id for s in matches)
        raise LookupError(f"{sidecar!r} names several sidecars ({names}): give the whole id")
    if not matches[0].envoy_admin:
        raise LookupError(
            f"sidecar {matches[0].node_id!r} did not announce its Envoy admin address "
            "(an older bootstrap): pass --envoy-admin HOST:PORT"
        )
    address: str = matches[0].envoy_admin
    return address


def _get_json(address: str, path: str) -> Any:
    status, _, body = http_request("GET", f"http://{address}{path}", timeout=5)
    if status != 200:
        raise OSError(f"GET {path}: HTTP {status}: {body[:200].decode('utf-8', 'replace')}")
    return json.loads(body)


def _listeners(address: str) -> tuple[Any, str]:
    data = _get_json(address, "/listeners?format=json")
    rows = [["NAME", "ADDRESS", "PORT"]]
    for listener in data.get("listener_statuses", []):
        socket = listener.get("local_address", {}).get("socket_address", {})
        rows.append(
            [
                listener.get("name", "-"),
                socket.get("address", "-"),
                str(socket.get("port_value", "-")),
            ]
        )
    return data, table(rows)


def _clusters(address: str) -> tuple[Any, str]:
    data = _get_json(address, "/clusters?format=json")
    rows = [["NAME", "ENDPOINTS", "HEALTHY", "FROM"]]
    for cluster in data.get("cluster_statuses", []):
        hosts = cluster.get("host_statuses", [])
        healthy = sum(
            1
            for h in hosts
            if h.get("health_status", {}).get("eds_health_status", "HEALTHY") == "HEALTHY"
        )
        rows.append(
            [
                cluster.get("name", "-"),
                str(len(hosts)),
                str(healthy),
                "xDS" if cluster.get("added_via_api") else "bootstrap",
            ]
        )
    return data, table(rows)


def _routes(address: str) -> tuple[Any, str]:
    data = _get_json(address, "/config_dump?resource=dynamic_route_configs")
    rows = [["NAME", "VIRTUAL HOST", "DOMAINS", "ROUTES"]]
    for config in data.get("configs", []):
        route_config = config.get("route_config", {})
        for vhost in route_config.get("virtual_hosts", []):
            rows.append(
                [
                    route_config.get("name", "-"),
                    vhost.get("name", "-"),
                    ",".join(vhost.get("domains", [])) or "-",
                    str(len(vhost.get("routes", []))),
                ]
            )
    return data, table(rows)


def _stats(address: str, name_filter: str) -> tuple[Any, str]:
    data = _get_json(address, "/stats?format=json")
    stats = [
        s
        for s in data.get("stats", [])
        if "name" in s and "value" in s and name_filter in s["name"]
    ]
    return {"stats": stats}, "\n".join(f"{s['name']}: {s['value']}" for s in stats)


def run(args: argparse.Namespace) -> int:
    try:
        address = args.envoy_admin or envoy_admin_of(args.admin, args.sidecar)
    except grpc.RpcError as err:
        return admin_call_failed(args.admin, err)
    except LookupError as err:
        print(str(err), file=sys.stderr)
        return 1
    try:
        if args.section == "stats":
            data, text = _stats(address, args.filter)
        else:
            data, text = {"listeners": _listeners, "clusters": _clusters, "routes": _routes}[
                args.section
            ](address)
    except (OSError, ValueError) as err:
        print(f"cannot read {args.sidecar}'s Envoy admin at {address}: {err}", file=sys.stderr)
        return 2
    print(emit(data, args.output) if args.output in ("json", "yaml") else text)
    return 0
