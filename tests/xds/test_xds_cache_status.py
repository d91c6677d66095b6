"""The snapshot cache's change notifications and the status waiters."""

from __future__ import annotations

import asyncio

import pytest
from xds_helpers import Ads, mesh

from bench.lib.simclient import SimulatedSidecar
from controlplane.xds import resources as rt
from controlplane.xds.cache import SnapshotCache
from controlplane.xds.status import State, StreamKind, SyncStatus


async def test_cache_wait_and_watch() -> None:
    cache = SnapshotCache()
    seen: list[str | None] = []
    cancel = cache.watch("n1", lambda s: seen.append(s.version if s else None))
    waiter = asyncio.create_task(cache.wait("n1"))
    await asyncio.sleep(0)
    first = mesh()
    assert cache.set_snapshot("n1", first)
    assert (await waiter) is first
    assert not cache.set_snapshot("n1", mesh())  # same content: no change, no notification
    with pytest.raises(TimeoutError):
        await cache.wait("n1", after_version=first.version, timeout=0.05)
    cache.clear("n1")
    cancel()
    cache.set_snapshot("n1", first)
    assert seen == [first.version, None]
    assert cache.node_ids() == ["n1"]


async def test_status_states_and_wait_timeout() -> None:
    status = SyncStatus()
    node = status.connect("n1", StreamKind.SOTW, "ipv4:127.0.0.1:1")
    status.set_target(node, "snap-1")
    status.set_type_target(node, rt.CLUSTER, "v1")
    assert node.types[rt.CLUSTER].state is State.NOT_SENT
    status.sent(node, rt.CLUSTER, "v1", "a", 10)
    assert node.state is State.STALE
    with pytest.raises(TimeoutError, match="n1=STALE"):
        await status.wait_synced(["n1"], timeout=0.05)
    waiting = asyncio.create_task(status.wait_synced(snapshot_versions={"n1": "snap-1"}))
    await asyncio.sleep(0)
    status.acked(node, rt.CLUSTER, "v1", "a")
    await asyncio.wait_for(waiting, 1)
    assert status.nodes()[0].state is State.SYNCED
    status.set_type_target(node, rt.CLUSTER, "v2")
    status.sent(node, rt.CLUSTER, "v2", "b", 10)
    status.nacked(node, rt.CLUSTER, "v1", "b", "bad cluster")
    copy = status.node("n1")
    assert copy is not None and copy.types[rt.CLUSTER].state is State.NACKED
    assert copy.types[rt.CLUSTER].acked_version == "v1"
    counters = status.counters()[rt.CLUSTER]
    assert (counters.responses, counters.acks, counters.nacks, counters.bytes_sent) == (2, 1, 1, 20)
    status.disconnect(node)
    assert status.nodes() == []


async def test_a_push_stops_waiting_for_a_sidecar_that_left() -> None:
    """The push span waits for the sidecars connected when it started; one that disconnects
    is not behind (it gets the newest snapshot when it comes back), so the wait ends with
    the others' ACKs, not after its timeout. A plain wait still waits for a node to come."""
    status = SyncStatus()
    stays = status.connect("stays", StreamKind.SOTW, "ipv4:127.0.0.1:1")
    leaves = status.connect("leaves", StreamKind.SOTW, "ipv4:127.0.0.1:2")
    for node in (stays, leaves):
        status.set_target(node, "snap-1")
        status.set_type_target(node, rt.CLUSTER, "v1")
        status.sent(node, rt.CLUSTER, "v1", "a", 10)
    versions = {"stays": "snap-1", "leaves": "snap-1"}
    push = asyncio.create_task(status.wait_synced(snapshot_versions=versions, gone_is_done=True))
    plain = asyncio.create_task(status.wait_synced(snapshot_versions=versions, timeout=0.3))
    await asyncio.sleep(0)
    status.disconnect(leaves)
    status.acked(stays, rt.CLUSTER, "v1", "a")
    await asyncio.wait_for(push, 1)
    with pytest.raises(TimeoutError, match="leaves=DISCONNECTED"):
        await plain


async def test_wait_synced_needs_every_type_the_snapshot_uses(ads: Ads) -> None:
    snap = mesh()
    ads.cache.set_snapshot("n1", snap)
    async with SimulatedSidecar(ads.target, "n1") as sidecar:
        await ads.status.wait_synced(snapshot_versions={"n1": snap.version}, timeout=5)
        # Synced means the sidecar really holds all of it, routes included.
        assert sidecar.names(rt.ROUTE) == {"inbound"}
        assert sidecar.names(rt.ENDPOINT) == {"model"}
