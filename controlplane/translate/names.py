"""Envoy resource names: one place, so every module and the goldens agree."""

from __future__ import annotations

from controlplane.ir import SidecarIR

# Every sidecar's bootstrap has this static cluster to the control plane. The control
# plane's sidecar-facing gRPC services (ADS, rate limits, telemetry, the query feed) are
# all served on that one port, so filters that call them name this cluster.
CONTROL_PLANE_CLUSTER = "modelguard-xds"


def inbound_listener(ir: SidecarIR) -> str:
    return f"inbound|{ir.inbound.port}"


def inbound_route(ir: SidecarIR) -> str:
    return f"inbound|{ir.service}.{ir.namespace}"


def inbound_cluster(ir: SidecarIR) -> str:
    return f"inbound|{ir.service}.{ir.namespace}|{ir.inbound.app_port}"
