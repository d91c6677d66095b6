"""TagIR → the inbound route configuration's response headers."""

from __future__ import annotations

from controlplane.policies.tag.ir import of
from envoy.config.core.v3 import base_pb2

from controlplane.ir import SidecarIR
from controlplane.translate.module import Inbound, Module, Phase


class Tags(Module):
    name = "modelguard.tags"

    def patch(self, ir: SidecarIR, inbound: Inbound) -> None:
        tags = of(ir)
        if tags is None:
            return
        for name, value in tags.headers:
            inbound.route_config.response_headers_to_add.append(
                base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=name, value=value))
            )


MODULE = Tags()
MODULES: tuple[tuple[int, Module], ...] = ((Phase.TELEMETRY, MODULE),)
