"""Delta (incremental) ADS: subscriptions, removals, per-resource versions, reconnects."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from envoy.config.core.v3 import base_pb2 as core_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.rpc import status_pb2
from xds_helpers import (
    Ads,
    RawStream,
    eds_cluster,
    http_listener,
    load_assignment,
    mesh,
    route_config,
)

from bench.lib.simclient import SimulatedSidecar
from controlplane.xds import resources as rt
from controlplane.xds.snapshot import Snapshot
from controlplane.xds.status import State, StreamKind


async def test_delta_sidecar_syncs(ads: Ads) -> None:
    snap = mesh(clusters=("model", "feed"))
    ads.cache.set_snapshot("d1", snap)
    async with SimulatedSidecar(ads.target, "d1", delta=True) as sidecar:
        await ads.status.wait_synced(snapshot_versions={"d1": snap.version}, timeout=5)
        assert [r.short_name for r in sidecar.received] == ["CDS", "EDS", "LDS", "RDS"]
        node = ads.status.node("d1")
        assert node is not None and node.kind is StreamKind.DELTA
        assert node.state is State.SYNCED
        # Per-resource versions are the resources' content versions.
        held = sidecar.holding[rt.CLUSTER].resources
        assert {n: v for n, (v, _) in held.items()} == {
            n: r.version for n, r in snap.resources(rt.CLUSTER).items()
        }
        # Only what changed goes out.
        update = mesh(clusters=("model", "feed"), port=9090)
        ads.cache.set_snapshot("d1", update)
        await ads.status.wait_synced(snapshot_versions={"d1": update.version}, timeout=5)
        assert [(r.short_name, set(r.names)) for r in sidecar.received[4:]] == [
            ("EDS", {"model", "feed"})
        ]


async def test_delta_subscribe_unsubscribe_and_missing(ads: Ads) -> None:
    ads.cache.set_snapshot("raw", mesh(clusters=("a", "b")))
    raw = RawStream(ads.target, delta=True)
    try:
        await raw.send(
            discovery_pb2.DeltaDiscoveryRequest(
                node=core_pb2.Node(id="raw"), type_url=rt.ENDPOINT,
                resource_names_subscribe=["a", "ghost"],
            )
        )
        first = await raw.recv()
        assert [r.name for r in first.resources] == ["a"]
        assert list(first.removed_resources) == ["ghost"]  # does not exist: said so once
        await raw.send(
            discovery_pb2.DeltaDiscoveryRequest(type_url=rt.ENDPOINT, response_nonce=first.nonce)
        )
        await raw.send(
            discovery_pb2.DeltaDiscoveryRequest(
                type_url=rt.ENDPOINT, resource_names_subscribe=["b"],
                resource_names_unsubscribe=["a"],
            )
        )
        second = await raw.recv()
        assert [r.name for r in second.resources] == ["b"]
        assert list(second.removed_resources) == []
        await raw.send(
            discovery_pb2.DeltaDiscoveryRequest(type_url=rt.ENDPOINT, response_nonce=second.nonce)
        )
        # "a" changes, but it is no longer subscribed: nothing to send.
        ads.cache.set_snapshot("raw", mesh(clusters=("a",), port=9090))
        third = await raw.recv()
        assert [r.name for r in third.resources] == []
        assert list(third.removed_resources) == ["b"]  # "b" is gone from the snapshot
        await raw.send(
            discovery_pb2.DeltaDiscoveryRequest(type_url=rt.ENDPOINT, response_nonce=third.nonce)
        )
        await raw.nothing()
        # "ghost" appears: it was subscribed, so it is sent.
        ads.cache.set_snapshot("raw", mesh(clusters=("a", "ghost")))
        fourth = await raw.recv()
        assert [r.name for r in fourth.resources] == ["ghost"]
    finally:
        await raw.close()


async def test_delta_removed_cluster_after_new_listener_and_routes(ads: Ads) -> None:
    ads.cache.set_snapshot("d1", mesh(clusters=("model", "legacy"), route="r1"))
    async with SimulatedSidecar(ads.target, "d1", delta=True) as sidecar:
        await ads.status.wait_synced(["d1"], timeout=5)
        before = len(sidecar.received)
        update = mesh(clusters=("model",), route="r2")
        ads.cache.set_snapshot("d1", update)
        await ads.status.wait_synced(snapshot_versions={"d1": update.version}, timeout=5)
        after = sidecar.received[before:]
        removal = next(
            i for i, r in enumerate(after) if r.type_url == rt.CLUSTER and "legacy" in r.removed
        )
        new_routes = next(
            i for i, r in enumerate(after) if r.type_url == rt.ROUTE and "r2" in r.names
        )
        assert new_routes < removal, [(r.short_name, r.names, r.removed) for r in after]
        assert sidecar.names(rt.CLUSTER) == {"model"}
        assert sidecar.names(rt.ROUTE) == {"r2"}


async def test_delta_reconnect_sends_only_what_changed(ads: Ads) -> None:
    ads.cache.set_snapshot("d1", mesh(clusters=("model", "feed", "old")))
    sidecar = SimulatedSidecar(ads.target, "d1", delta=True)
    await sidecar.start()
    try:
        await ads.status.wait_synced(["d1"], timeout=5)
        await sidecar.stop()
        # While it was away: "feed" changed (new timeout), "old" went away, "new" came.
        update = Snapshot.build(
            {
                rt.CLUSTER: [eds_cluster("model"), eds_cluster("feed", 900), eds_cluster("new")],
                rt.ENDPOINT: [load_assignment(n) for n in ("model", "feed", "new")],
                rt.LISTENER: [http_listener("inbound", "inbound")],
                rt.ROUTE: [route_config("inbound", "model", "feed", "new")],
            }
        )
        ads.cache.set_snapshot("d1", update)
        sidecar.received.clear()
        await sidecar.start()
        await ads.status.wait_synced(snapshot_versions={"d1": update.version}, timeout=5)
        cds = sidecar.of_type(rt.CLUSTER)
        assert {n for r in cds for n in r.names} == {"feed", "new"}
        assert {n for r in cds for n in r.removed} == {"old"}
        assert sidecar.names(rt.CLUSTER) == {"model", "feed", "new"}
        eds = sidecar.of_type(rt.ENDPOINT)
        assert {n for r in eds for n in r.names} == {"new"}
        lds = sidecar.of_type(rt.LISTENER)
        assert all(r.names == () for r in lds)  # the listener did not change
    finally:
        await sidecar.close()


async def test_delta_nack_is_recorded_and_not_resent(ads: Ads) -> None:
    def reject(type_url: str, resources: Sequence[any_pb2.Any]) -> str | None:
        return "bad endpoints" if type_url == rt.ENDPOINT and len(resources) == 1 else None

    good = mesh(clusters=("model", "feed"))
    ads.cache.set_snapshot("d1", good)
    async with SimulatedSidecar(ads.target, "d1", delta=True, reject=reject) as sidecar:
        await ads.status.wait_synced(["d1"], timeout=5)
        one_changed = Snapshot.build(
            {
                rt.CLUSTER: [eds_cluster("model"), eds_cluster("feed")],
                rt.ENDPOINT: [load_assignment("model", 7070), load_assignment("feed")],
                rt.LISTENER: [http_listener("inbound", "inbound")],
                rt.ROUTE: [route_config("inbound", "model", "feed")],
            }
        )
        ads.cache.set_snapshot("d1", one_changed)
        await sidecar.wait_for(lambda: any(r.nacked for r in sidecar.received))
        await asyncio.sleep(0.2)
        eds = ads.status.node("d1").types[rt.ENDPOINT]  # type: ignore[union-attr]
        assert eds.state is State.NACKED
        assert eds.last_nack is not None and eds.last_nack.message == "bad endpoints"
        assert len(sidecar.of_type(rt.ENDPOINT)) == 2


async def test_delta_stale_nonce_is_not_an_ack(ads: Ads) -> None:
    ads.cache.set_snapshot("raw", mesh())
    raw = RawStream(ads.target, delta=True)
    try:
        await raw.send(
            discovery_pb2.DeltaDiscoveryRequest(node=core_pb2.Node(id="raw"), type_url=rt.CLUSTER)
        )
        first = await raw.recv()
        await raw.send(
            discovery_pb2.DeltaDiscoveryRequest(
                type_url=rt.CLUSTER, response_nonce="not-ours",
                error_detail=status_pb2.Status(code=3, message="stale"),
            )
        )
        await raw.nothing(0.1)
        assert ads.status.node("raw").types[rt.CLUSTER].state is State.STALE  # type: ignore[union-attr]
        await raw.send(
            discovery_pb2.DeltaDiscoveryRequest(type_url=rt.CLUSTER, response_nonce=first.nonce)
        )
        await asyncio.sleep(0.05)
        assert ads.status.node("raw").types[rt.CLUSTER].state is State.SYNCED  # type: ignore[union-attr]
    finally:
        await raw.close()
