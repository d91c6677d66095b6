"""Helpers for the xDS tests: a real ADS server on 127.0.0.1:0 and real Envoy resources."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2
from envoy.config.core.v3 import base_pb2 as core_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2, duration_pb2

from controlplane.xds import resources as rt
from controlplane.xds.cache import SnapshotCache
from controlplane.xds.server import AdsServer
from controlplane.xds.snapshot import Snapshot
from controlplane.xds.status import SyncStatus


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def eds_cluster(name: str, timeout_ms: int = 250) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads()),
        connect_timeout=duration_pb2.Duration(nanos=timeout_ms * 1_000_000),
    )


def load_assignment(name: str, port: int = 8080) -> endpoint_pb2.ClusterLoadAssignment:
    address = address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)
    )
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(address=address)
                    )
                ]
            )
        ],
    )


def http_listener(name: str, route_name: str, port: int = 15006) -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=name,
        rds=hcm_pb2.Rds(config_source=_ads(), route_config_name=route_name),
        http_filters=[
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=_pack(router_pb2.Router())
            )
        ],
    )
    return listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="0.0.0.0", port_value=port)
        ),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=_pack(hcm),
                    )
                ]
            )
        ],
    )


def route_config(name: str, *clusters: str) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name="model",
                domains=["*"],
                routes=[
                    route_components_pb2.Route(
                        match=route_components_pb2.RouteMatch(prefix=f"/{cluster}"),
                        route=route_components_pb2.RouteAction(cluster=cluster),
                    )
                    for cluster in clusters
                ],
            )
        ],
    )


def _pack(msg: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(msg)  # type: ignore[arg-type]
    return packed


def mesh(
    clusters: Iterable[str] = ("model",),
    route: str = "inbound",
    listener: str = "inbound",
    port: int = 8080,
    timeout_ms: int = 250,
) -> Snapshot:
    """A snapshot as translate would make one: clusters with endpoints, one listener whose HCM
    fetches one route config over ADS, that route sending to every cluster."""
    names = list(clusters)
    return Snapshot.build(
        {
            rt.CLUSTER: [eds_cluster(n, timeout_ms) for n in names],
            rt.ENDPOINT: [load_assignment(n, port) for n in names],
            rt.LISTENER: [http_listener(listener, route)],
            rt.ROUTE: [route_config(route, *names)],
        }
    )


@dataclass
class Ads:
    cache: SnapshotCache
    status: SyncStatus
    server: AdsServer
    target: str
    connected: list[str]
    disconnected: list[str]


@pytest.fixture
def on_connect() -> list[Callable[[core_pb2.Node], None]]:
    """Tests append hooks here; each is called with the Node of every new stream."""
    return []


@pytest.fixture
async def ads(on_connect: list[Callable[[core_pb2.Node], None]]) -> AsyncIterator[Ads]:
    cache, status = SnapshotCache(), SyncStatus()
    connected: list[str] = []
    disconnected: list[str] = []

    def connect(node: core_pb2.Node) -> None:
        connected.append(node.id)
        for hook in on_connect:
            hook(node)

    ads_server = AdsServer(cache, status, on_connect=connect, on_disconnect=disconnected.append)
    server = grpc.aio.server()
    ads_server.add_to(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield Ads(cache, status, ads_server, f"127.0.0.1:{port}", connected, disconnected)
    finally:
        await server.stop(0)


class RawStream:
    """A hand-driven ADS stream, for the protocol corners an Envoy-like client never hits.

    Responses are read by a background task: cancelling a grpc.aio ``read()`` (as a timeout
    would) cancels the whole call.
    """

    def __init__(self, target: str, *, delta: bool = False) -> None:
        import asyncio

        from envoy.service.discovery.v3 import ads_pb2_grpc

        self.channel = grpc.aio.insecure_channel(target)
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self.call = stub.DeltaAggregatedResources() if delta else stub.StreamAggregatedResources()
        self.responses: asyncio.Queue[object] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for response in self.call:
                self.responses.put_nowait(response)
        except grpc.aio.AioRpcError as err:
            self.responses.put_nowait(err)

    async def send(self, request: object) -> None:
        await self.call.write(request)

    async def recv(self, timeout: float = 2.0) -> Any:
        """The next response; raises the AioRpcError the stream ended with, if it did."""
        import asyncio

        got = await asyncio.wait_for(self.responses.get(), timeout)
        if isinstance(got, grpc.aio.AioRpcError):
            raise got
        return got

    async def nothing(self, within: float = 0.2) -> None:
        """Assert no response arrives within ``within`` seconds."""
        import asyncio

        await asyncio.sleep(within)
        assert self.responses.empty(), f"unexpected response: {self.responses.get_nowait()}"

    async def close(self) -> None:
        self.call.cancel()
        self._reader.cancel()
        await self.channel.close(None)
