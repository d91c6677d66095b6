"""The ordered registry of HTTP filters: filter order is data, visible here only.

Each module turns its part of the IR into HTTP filters of the inbound connection manager,
and may add resources of its own (secrets, extension configs). A new filter is one module
and one line in ``REGISTRY``.
"""

from __future__ import annotations

from typing import Protocol

from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf.message import Message

from controlplane.ir import SidecarIR
from controlplane.translate import rbac, router


class HttpFilterModule(Protocol):
    name: str

    def http_filters(self, ir: SidecarIR) -> list[hcm_pb2.HttpFilter]: ...

    def extra_resources(self, ir: SidecarIR) -> dict[str, list[Message]]: ...


# Access control first (a denied request costs nothing further), the router last.
REGISTRY: tuple[HttpFilterModule, ...] = (
    rbac.MODULE,
    router.MODULE,
)
