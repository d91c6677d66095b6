"""The router: always last in the chain."""

from __future__ import annotations

from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from controlplane.ir import SidecarIR
from controlplane.translate.module import Module
from controlplane.translate.protos import pack


class Router(Module):
    name = "envoy.filters.http.router"

    def http_filters(self, ir: SidecarIR) -> list[hcm_pb2.HttpFilter]:
        return [hcm_pb2.HttpFilter(name=self.name, typed_config=pack(router_pb2.Router()))]


MODULE = Router()
