"""Translate: one sidecar's IR → Envoy resources, by xDS type URL.

Listeners, routes, clusters and endpoints are built here from the IR; each HTTP filter is
its own module in the ordered registry of ``httpfilters``.
"""

from __future__ import annotations

from collections import defaultdict

from google.protobuf.message import Message

from controlplane.ir import SidecarIR
from controlplane.translate import inbound
from controlplane.translate.httpfilters import REGISTRY
from controlplane.xds import resources as rt


def translate(ir: SidecarIR) -> dict[str, list[Message]]:
    out: dict[str, list[Message]] = defaultdict(list)
    http_filters = [f for module in REGISTRY for f in module.http_filters(ir)]
    out[rt.LISTENER].append(inbound.listener(ir, http_filters))
    out[rt.ROUTE].append(inbound.route_configuration(ir))
    out[rt.CLUSTER].append(inbound.cluster(ir))
    out[rt.ENDPOINT].append(inbound.load_assignment(ir))
    for module in REGISTRY:
        for type_url, extra in module.extra_resources(ir).items():
            out[type_url].extend(extra)
    return {t: sorted(msgs, key=rt.resource_name) for t, msgs in out.items()}
