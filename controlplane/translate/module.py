"""What a translation module is: hooks over one sidecar's inbound resources."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf.message import Message

from controlplane.ir import SidecarIR


@dataclass
class Inbound:
    """The inbound resources of one sidecar while modules patch them."""

    listener: Any  # envoy.config.listener.v3.Listener
    manager: Any  # HttpConnectionManager, packed into the listener at the end
    route_config: Any  # envoy.config.route.v3.RouteConfiguration
    cluster: Any  # the workload's cluster
    load_assignment: Any


class Module:
    """A translation module; every hook defaults to doing nothing."""

    name = ""

    def http_filters(self, ir: SidecarIR) -> list[hcm_pb2.HttpFilter]:
        return []

    def patch(self, ir: SidecarIR, inbound: Inbound) -> None:
        return None

    def extra_resources(self, ir: SidecarIR) -> dict[str, list[Message]]:
        return {}


class Phase(IntEnum):
    """Where a module's HTTP filters go in the inbound chain: the filter order, in one place.
    Modules of one phase keep the order their kind lists them in; a new kind picks a phase
    (or a number between two) in its ``translate.MODULES``."""

    CALLER = 10  # who the caller is (x-modelguard-* dropped, verified ids set), first
    VERDICTS = 20  # quarantined and throttled clients: they may key on the verified key id
    ACCESS = 30  # access control: a denied request costs nothing further
    LOCAL_LIMITS = 40  # rate limits' header renaming (responses cross it last), local buckets
    # Request limits, output hardening and the query feed. Before the quota filters: it
    # holds each request until its body is checked and sets a budget's instance class
    # (cost: instances) from it, so no second filter reads the body for that. What the
    # filters behind it refuse the model never sees: the Wasm filter neither feeds nor
    # hardens those answers (wasm/src/filter.c, from_model).
    HARDENING = 50
    SHARED_LIMITS = 60  # the locally enforced quota assignments, the per-request service
    TELEMETRY = 70  # patches the connection manager only (tracer, access log)
    ROUTER = 80  # the router, last of the chain
    OUTBOUND = 90  # adds the outbound listener only: order-free
    MESH = 100  # the inbound listener's TLS, SDS secrets, the mesh listener: order-free

