"""Envoy resource names: one place, so every module and the goldens agree."""

from __future__ import annotations

from controlplane.ir import SidecarIR

# Every sidecar's bootstrap has this static cluster to the control plane. The control
# plane's sidecar-facing gRPC services (ADS, rate limits, telemetry, the query feed) are
# all served on that one port, so filters that call them name this cluster.
CONTROL_PLANE_CLUSTER = "modelguard-xds"

# The class of instances a request is charged for a budget of instances (cost: instances):
# set by the Wasm filter (translate/wasm.py) or, on a sidecar without one, the Lua counter
# (translate/ratelimit.py), replacing whatever a caller sent; the quota filter's bucket id
# reads it.
INSTANCES_HEADER = "x-modelguard-instances"


def inbound_listener(ir: SidecarIR) -> str:
    return f"inbound|{ir.inbound.port}"


def inbound_route(ir: SidecarIR) -> str:
    return f"inbound|{ir.service}.{ir.namespace}"


def inbound_cluster(ir: SidecarIR) -> str:
    return f"inbound|{ir.service}.{ir.namespace}|{ir.inbound.app_port}"
