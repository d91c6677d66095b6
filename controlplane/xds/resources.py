"""xDS resource types: type URLs, push order, and how names and references are read.

Kept apart from the cache and the protocol servers (as go-control-plane's ``pkg/resource``),
so the snapshot, the server and the simulated sidecar agree on one definition.
"""

from __future__ import annotations

from collections.abc import Iterator

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message

_PREFIX = "type.googleapis.com/"

CLUSTER = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = _PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
SECRET = _PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"
EXTENSION_CONFIG = _PREFIX + "envoy.config.core.v3.TypedExtensionConfig"

# Make-before-break (xds_protocol "eventual consistency considerations"): a cluster and its
# endpoints exist before a listener or route points at them. Secrets and extension configs
# are referenced by clusters and listeners, so they go first: Envoy waits for them while
# warming, and sending them early never points anything at a missing resource.
PUSH_ORDER: tuple[str, ...] = (SECRET, EXTENSION_CONFIG, CLUSTER, ENDPOINT, LISTENER, ROUTE)

# Types a sidecar asks for as a whole (an empty first request means "everything").
WILDCARD_TYPES = frozenset({CLUSTER, LISTENER})

_SHORT = {
    CLUSTER: "CDS",
    ENDPOINT: "EDS",
    LISTENER: "LDS",
    ROUTE: "RDS",
    SECRET: "SDS",
    EXTENSION_CONFIG: "ECDS",
}

HCM_TYPE = _PREFIX + hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name


def short_name(type_url: str) -> str:
    """``CDS``, ``EDS``, … for a known type URL; the message name otherwise."""
    return _SHORT.get(type_url) or type_url.rsplit(".", 1)[-1]


def type_url_of(msg: Message) -> str:
    return _PREFIX + msg.DESCRIPTOR.full_name


def resource_name(msg: Message) -> str:
    """The xDS name of a resource: ``cluster_name`` for endpoints, ``name`` otherwise."""
    if msg.DESCRIPTOR.full_name == "envoy.config.endpoint.v3.ClusterLoadAssignment":
        return str(getattr(msg, "cluster_name"))  # noqa: B009 - protobuf attribute
    return str(getattr(msg, "name"))  # noqa: B009 - protobuf attribute


def eds_service_name(cluster: cluster_pb2.Cluster) -> str | None:
    """The ClusterLoadAssignment name an EDS cluster asks for, or None if not EDS."""
    if cluster.WhichOneof("cluster_discovery_type") != "type":
        return None
    if cluster.type != cluster_pb2.Cluster.EDS:
        return None
    return str(cluster.eds_cluster_config.service_name or cluster.name)


def http_connection_managers(
    listener: listener_pb2.Listener,
) -> Iterator[hcm_pb2.HttpConnectionManager]:
    """Every HTTP connection manager in a listener (filter chains and API listener).

    Raises ``DecodeError`` if a typed_config claims to be an HCM but does not parse.
    """
    chains = list(listener.filter_chains)
    if listener.HasField("default_filter_chain"):
        chains.append(listener.default_filter_chain)
    configs: list[any_pb2.Any] = [
        f.typed_config for chain in chains for f in chain.filters if f.HasField("typed_config")
    ]
    if listener.HasField("api_listener"):
        configs.append(listener.api_listener.api_listener)
    for config in configs:
        if config.type_url != HCM_TYPE:
            continue
        hcm = hcm_pb2.HttpConnectionManager()
        if not config.Unpack(hcm):
            raise DecodeError(f"listener {listener.name!r}: cannot unpack {HCM_TYPE}")
        yield hcm


def route_config_names(listener: listener_pb2.Listener) -> list[str]:
    """RouteConfiguration names a listener's HCMs fetch over RDS, in order, deduplicated."""
    names: list[str] = []
    for hcm in http_connection_managers(listener):
        if hcm.HasField("rds") and hcm.rds.route_config_name not in names:
            names.append(hcm.rds.route_config_name)
    return names
