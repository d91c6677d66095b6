"""The inbound path: listener → route configuration → cluster → the local workload."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import duration_pb2

from controlplane.ir import SidecarIR
from controlplane.translate import names
from controlplane.translate.protos import ads_source, pack, socket_address

HCM_FILTER = "envoy.filters.network.http_connection_manager"


def connection_manager(ir: SidecarIR) -> hcm_pb2.HttpConnectionManager:
    """The inbound HTTP connection manager, before the filter modules add to it."""
    return hcm_pb2.HttpConnectionManager(
        stat_prefix=f"inbound_{ir.inbound.port}",
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=ads_source(), route_config_name=names.inbound_route(ir)),
        # The sidecar answers for the workload: never trust a caller's forwarding headers.
        use_remote_address={"value": True},
        # Behind an ingress (or N proxies) the caller's address is the Nth entry from the
        # right of X-Forwarded-For; 0 keeps the TCP peer and ignores what a caller writes.
        xff_num_trusted_hops=ir.inbound.xff_num_trusted_hops,
    )


def listener(ir: SidecarIR) -> listener_pb2.Listener:
    """The inbound listener with one filter chain; its HCM is packed in at the end."""
    return listener_pb2.Listener(
        name=names.inbound_listener(ir),
        address=socket_address(ir.inbound.listen_address, ir.inbound.port),
        traffic_direction=base_pb2.INBOUND,
        filter_chains=[listener_components_pb2.FilterChain()],
    )


def attach(listener: listener_pb2.Listener, manager: hcm_pb2.HttpConnectionManager) -> None:
    for chain in listener.filter_chains:
        chain.filters.append(
            listener_components_pb2.Filter(name=HCM_FILTER, typed_config=pack(manager))
        )


def route_configuration(ir: SidecarIR) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(
        name=names.inbound_route(ir),
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name=f"{ir.service}.{ir.namespace}",
                domains=["*"],
                routes=[
                    route_components_pb2.Route(
                        name="default",
                        match=route_components_pb2.RouteMatch(prefix="/"),
                        route=route_components_pb2.RouteAction(
                            cluster=names.inbound_cluster(ir),
                            timeout=duration_pb2.Duration(seconds=30),
                        ),
                    )
                ],
            )
        ],
    )


def cluster(ir: SidecarIR) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=names.inbound_cluster(ir),
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads_source()),
        connect_timeout=duration_pb2.Duration(seconds=1),
    )


def load_assignment(ir: SidecarIR) -> endpoint_pb2.ClusterLoadAssignment:
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=names.inbound_cluster(ir),
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(
                            address=socket_address(ir.inbound.app_address, ir.inbound.app_port)
                        )
                    )
                ]
            )
        ],
    )
