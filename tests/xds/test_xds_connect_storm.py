"""A burst of sidecars connecting while the control plane's event loop is busy.

grpc.aio accepts one call per turn of the event loop; calls that arrive meanwhile wait in
gRPC core. Core cancels some of them once more than 1,000 wait, and all past 3,000, unless
the server raises those limits (controlplane/xds/server.py, SERVER_OPTIONS). A policy
rebuild or a reconnect storm keeps the loop busy for that long, so before those limits were
raised ``bench/convergence.py --sims 5000`` lost 8-18 % of its sidecars' first streams
("Internal error from Core", CANCELLED). Here the loop is blocked on purpose while 1,500
streams open, which (at the default limits) cancels about 60 of them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2 as core_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import json_format, struct_pb2

from controlplane.app.server import ControlPlaneConfig
from controlplane.compile.inputs.inventory import Sidecar
from controlplane.xds import resources as rt
from tests.resilience.conftest import PlaneThread

STREAMS = 1_500


class _PlaneThread(PlaneThread):
    """The control plane on its own loop and thread, so that this test can block that loop
    while its own loop keeps opening streams."""

    def block(self) -> threading.Event:
        """Hold the plane's loop (as a long rebuild would) until the returned event is set."""
        blocked, release = threading.Event(), threading.Event()

        def hold() -> None:
            blocked.set()
            release.wait(60)

        self.loop.call_soon_threadsafe(hold)
        assert blocked.wait(10)
        return release


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[_PlaneThread]:
    (tmp_path / "policies").mkdir()
    running = _PlaneThread(
        ControlPlaneConfig(
            policy_paths=(str(tmp_path / "policies"),), xds_port=0, admin_port=0, watch=False
        )
    )
    try:
        yield running
    finally:
        running.stop()


def _node(i: int) -> core_pb2.Node:
    sidecar = Sidecar(
        f"storm-{i}", "digits-model", "demo", "spiffe://cluster.local/ns/demo/sa/digits-model",
        18080, 15006,
    )
    node = core_pb2.Node(id=sidecar.node_id, cluster="storm")
    node.metadata.CopyFrom(json_format.ParseDict(sidecar.to_metadata(), struct_pb2.Struct()))
    return node


async def test_streams_opened_while_the_loop_is_busy_all_start(plane: _PlaneThread) -> None:
    target = f"127.0.0.1:{plane.plane.xds_port}"
    async with grpc.aio.insecure_channel(target) as channel:
        await channel.channel_ready()
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        release = plane.block()
        try:
            calls = [stub.StreamAggregatedResources() for _ in range(STREAMS)]
            # Each stream's first request: the write completes once gRPC has sent it, so
            # after this every call is waiting in the server for the blocked loop.
            await asyncio.gather(
                *(
                    call.write(discovery_pb2.DiscoveryRequest(node=_node(i), type_url=rt.CLUSTER))
                    for i, call in enumerate(calls)
                ),
                return_exceptions=True,
            )
            await asyncio.sleep(1.0)
        finally:
            release.set()

        async def first_response(call: Any) -> str | None:
            try:
                response = await asyncio.wait_for(call.read(), 90)
            except grpc.aio.AioRpcError as err:
                return f"{err.code().name}: {err.details()}"
            if response is grpc.aio.EOF:
                return f"ended: {await call.code()}"
            return None if response.type_url == rt.CLUSTER else f"got {response.type_url}"

        outcomes = await asyncio.gather(*(first_response(call) for call in calls))
        for call in calls:
            call.cancel()
    failed = [o for o in outcomes if o is not None]
    assert not failed, f"{len(failed)} of {STREAMS} streams failed to start, e.g. {failed[:3]}"
