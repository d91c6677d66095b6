"""Translate: one sidecar's IR → Envoy resources, by xDS type URL.

The inbound path (listener → routes → cluster → workload) is built by ``inbound``; every
feature is a module of the ordered registry in ``httpfilters`` that adds HTTP filters,
patches the inbound resources, and may add resources of its own.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, cast

from envoy.config.listener.v3 import listener_pb2
from google.protobuf.message import Message

from controlplane.ir import SidecarIR
from controlplane.translate import inbound
from controlplane.translate.module import Inbound, Module
from controlplane.xds import resources as rt


def _registry() -> tuple[Module, ...]:
    """The ordered modules (``httpfilters.REGISTRY``), imported on first use rather than
    above: the kinds' translate modules import this package's shared modules (module,
    protos, names), and the registry imports the kinds' modules. Kept as this package's
    ``REGISTRY`` once read, so a test may replace it there."""
    registry = globals().get("REGISTRY")
    if registry is None:
        from controlplane.translate.httpfilters import REGISTRY as registry

        globals()["REGISTRY"] = registry
    return cast("tuple[Module, ...]", registry)


def __getattr__(name: str) -> Any:
    if name == "REGISTRY":
        return _registry()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def translate(ir: SidecarIR) -> dict[str, list[Message]]:
    parts = Inbound(
        listener=inbound.listener(ir),
        manager=inbound.connection_manager(ir),
        route_config=inbound.route_configuration(ir),
        cluster=inbound.cluster(ir),
        load_assignment=inbound.load_assignment(ir),
    )
    out: dict[str, list[Message]] = defaultdict(list)
    for module in _registry():
        parts.manager.http_filters.extend(module.http_filters(ir))
        module.patch(ir, parts)
        for type_url, extra in module.extra_resources(ir).items():
            out[type_url].extend(extra)
    inbound.attach(parts.listener, parts.manager)
    out[rt.LISTENER].append(parts.listener)
    out[rt.ROUTE].append(parts.route_config)
    out[rt.CLUSTER].append(parts.cluster)
    out[rt.ENDPOINT].append(parts.load_assignment)
    for listener in out[rt.LISTENER]:
        assert isinstance(listener, listener_pb2.Listener)
        # Envoy binds listeners with SO_REUSEPORT by default on Linux, so a second sidecar
        # given the same port shares it silently and takes half the connections. Without
        # it the bind fails, the listener is NACKed and `modelguard status` says so.
        listener.enable_reuse_port.value = False
    return {t: sorted(msgs, key=rt.resource_name) for t, msgs in out.items()}
