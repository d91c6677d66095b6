"""What a translation module is: hooks over one sidecar's inbound resources."""

from __future__ import annotations

from dataclasses import dataclass
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
