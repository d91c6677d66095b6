"""Envoy resource names: one place, so every module and the goldens agree."""

from __future__ import annotations

from controlplane.ir import SidecarIR


def inbound_listener(ir: SidecarIR) -> str:
    return f"inbound|{ir.inbound.port}"


def inbound_route(ir: SidecarIR) -> str:
    return f"inbound|{ir.service}.{ir.namespace}"


def inbound_cluster(ir: SidecarIR) -> str:
    return f"inbound|{ir.service}.{ir.namespace}|{ir.inbound.app_port}"
