"""The router: always last in the chain."""

from __future__ import annotations

from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf.message import Message

from controlplane.ir import SidecarIR
from controlplane.translate.protos import pack


class Router:
    name = "envoy.filters.http.router"

    def http_filters(self, ir: SidecarIR) -> list[hcm_pb2.HttpFilter]:
        return [hcm_pb2.HttpFilter(name=self.name, typed_config=pack(router_pb2.Router()))]

    def extra_resources(self, ir: SidecarIR) -> dict[str, list[Message]]:
        return {}


MODULE = Router()
