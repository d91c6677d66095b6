"""State-of-the-World ADS against a real grpc.aio server, with Envoy-like simulated sidecars."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
import pytest
from envoy.config.core.v3 import base_pb2 as core_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.rpc import status_pb2
from xds_helpers import Ads, RawStream, eds_cluster, load_assignment, mesh

from bench.lib.simclient import SimulatedSidecar
from controlplane.xds import resources as rt
from controlplane.xds.server import RejectNode
from controlplane.xds.snapshot import Snapshot
from controlplane.xds.status import State, StreamKind

ALL = (rt.CLUSTER, rt.ENDPOINT, rt.LISTENER, rt.ROUTE)


def states(ads: Ads, node_id: str) -> dict[str, State]:
    node = ads.status.node(node_id)
    assert node is not None
    return {rt.short_name(t): s.state for t, s in node.types.items()}


async def test_sidecar_syncs_all_types_in_order(ads: Ads) -> None:
    snap = mesh(clusters=("model", "feed"))
    ads.cache.set_snapshot("n1", snap)
    async with SimulatedSidecar(ads.target, "n1") as sidecar:
        await ads.status.wait_synced(snapshot_versions={"n1": snap.version}, timeout=5)
        assert states(ads, "n1") == dict.fromkeys(["CDS", "EDS", "LDS", "RDS"], State.SYNCED)
        assert [r.short_name for r in sidecar.received] == ["CDS", "EDS", "LDS", "RDS"]
        assert sidecar.names(rt.ENDPOINT) == {"model", "feed"}
        assert sidecar.names(rt.ROUTE) == {"inbound"}
        for type_url in ALL:
            assert sidecar.version(type_url) == snap.type_version(type_url)
        node = ads.status.node("n1")
        assert node is not None and node.kind is StreamKind.SOTW and node.peer
        counters = ads.status.counters()
        assert counters[rt.CLUSTER].responses == 1 and counters[rt.CLUSTER].acks == 1
        assert counters[rt.CLUSTER].bytes_sent > 0
        # Nothing changes, nothing is sent.
        ads.cache.set_snapshot("n1", mesh(clusters=("model", "feed")))
        await asyncio.sleep(0.1)
        assert len(sidecar.received) == 4
    await asyncio.sleep(0.05)
    assert ads.connected == ["n1"] and ads.disconnected == ["n1"]
    assert ads.status.nodes() == []


async def test_stream_waits_for_a_snapshot_made_after_connect(
    ads: Ads, on_connect: list[object]
) -> None:
    loop = asyncio.get_running_loop()
    on_connect.append(
        lambda node: loop.call_later(0.05, ads.cache.set_snapshot, node.id, mesh())
    )
    async with SimulatedSidecar(ads.target, "late") as sidecar:
        await sidecar.wait_for(lambda: sidecar.names(rt.ROUTE) == {"inbound"})
        await ads.status.wait_synced(["late"], timeout=5)


async def test_nack_keeps_version_and_is_not_resent(ads: Ads) -> None:
    def reject(type_url: str, resources: Sequence[any_pb2.Any]) -> str | None:
        if type_url == rt.CLUSTER and len(resources) > 1:
            return "cluster 'bad': connect_timeout too large"
        return None

    good = mesh(clusters=("model",))
    ads.cache.set_snapshot("n1", good)
    async with SimulatedSidecar(ads.target, "n1", reject=reject) as sidecar:
        await ads.status.wait_synced(["n1"], timeout=5)
        bad = mesh(clusters=("model", "bad"))
        ads.cache.set_snapshot("n1", bad)
        await sidecar.wait_for(lambda: any(r.nacked for r in sidecar.received))
        await asyncio.sleep(0.2)  # room for a (wrong) resend loop
        cds = ads.status.node("n1").types[rt.CLUSTER]  # type: ignore[union-attr]
        assert cds.state is State.NACKED
        assert cds.acked_version == good.type_version(rt.CLUSTER)  # last good is kept
        assert cds.last_nack is not None
        assert cds.last_nack.version == bad.type_version(rt.CLUSTER)
        assert cds.last_nack.message == "cluster 'bad': connect_timeout too large"
        assert len(sidecar.of_type(rt.CLUSTER)) == 2  # never re-sent
        assert ads.status.node("n1").state is State.NACKED  # type: ignore[union-attr]
        assert ads.status.counters()[rt.CLUSTER].nacks == 1
        assert sidecar.version(rt.CLUSTER) == good.type_version(rt.CLUSTER)
        # Listeners did not change, so they were not sent again.
        assert len(sidecar.of_type(rt.LISTENER)) == 1
        # A fixed snapshot goes out, and is accepted.
        fixed = mesh(clusters=("model", "bad"), timeout_ms=100)
        reject_calls = len(sidecar.of_type(rt.CLUSTER))
        sidecar.reject = None
        ads.cache.set_snapshot("n1", fixed)
        await ads.status.wait_synced(snapshot_versions={"n1": fixed.version}, timeout=5)
        assert len(sidecar.of_type(rt.CLUSTER)) == reject_calls + 1
        assert ads.status.node("n1").types[rt.CLUSTER].last_nack is not None  # type: ignore[union-attr]


async def test_stale_nonce_is_ignored(ads: Ads) -> None:
    ads.cache.set_snapshot("raw", mesh())
    raw = RawStream(ads.target)
    try:
        node = core_pb2.Node(id="raw")
        await raw.send(discovery_pb2.DiscoveryRequest(node=node, type_url=rt.CLUSTER))
        first = await raw.recv()
        assert isinstance(first, discovery_pb2.DiscoveryResponse)
        # An answer to a nonce we never sent (or no longer the latest): not an ACK, not a NACK.
        await raw.send(
            discovery_pb2.DiscoveryRequest(
                type_url=rt.CLUSTER, response_nonce="stale", version_info="x",
                error_detail=status_pb2.Status(code=3, message="old news"),
            )
        )
        await raw.nothing()
        cds = ads.status.node("raw").types[rt.CLUSTER]  # type: ignore[union-attr]
        assert cds.state is State.STALE and cds.last_nack is None
        await raw.send(
            discovery_pb2.DiscoveryRequest(
                type_url=rt.CLUSTER, response_nonce=first.nonce, version_info=first.version_info
            )
        )
        await asyncio.sleep(0.05)
        assert states(ads, "raw")["CDS"] is State.SYNCED
        # A new snapshot: a fresh nonce; the old one is stale from now on.
        ads.cache.set_snapshot("raw", mesh(clusters=("model", "other")))
        second = await raw.recv()
        assert isinstance(second, discovery_pb2.DiscoveryResponse)
        assert second.nonce != first.nonce
        await raw.send(
            discovery_pb2.DiscoveryRequest(
                type_url=rt.CLUSTER, response_nonce=first.nonce, version_info=first.version_info
            )
        )
        await raw.nothing()
        assert states(ads, "raw")["CDS"] is State.STALE
    finally:
        await raw.close()


async def test_resource_requested_before_it_exists_is_sent_when_it_appears(ads: Ads) -> None:
    ads.cache.set_snapshot("raw", mesh(clusters=("model",)))
    raw = RawStream(ads.target)
    try:
        await raw.send(
            discovery_pb2.DiscoveryRequest(
                node=core_pb2.Node(id="raw"), type_url=rt.ENDPOINT, resource_names=["later"]
            )
        )
        await raw.nothing()
        assert states(ads, "raw")["EDS"] is State.NOT_SENT
        ads.cache.set_snapshot("raw", mesh(clusters=("model", "later")))
        response = await raw.recv()
        assert isinstance(response, discovery_pb2.DiscoveryResponse)
        assert response.type_url == rt.ENDPOINT
        assert [a.type_url for a in response.resources] == [rt.ENDPOINT]
        assert len(response.resources) == 1  # only what was asked for, not "model"
    finally:
        await raw.close()


async def test_update_goes_out_cds_eds_lds_rds(ads: Ads) -> None:
    ads.cache.set_snapshot("n1", mesh(clusters=("model",), route="r1"))
    async with SimulatedSidecar(ads.target, "n1") as sidecar:
        await ads.status.wait_synced(["n1"], timeout=5)
        before = len(sidecar.received)
        # Every type changes: a new cluster (with endpoints), new listener and route names.
        update = mesh(clusters=("model", "canary"), route="r2", port=9090)
        ads.cache.set_snapshot("n1", update)
        await ads.status.wait_synced(snapshot_versions={"n1": update.version}, timeout=5)
        order = [r.short_name for r in sidecar.received[before:]]
        first = {t: order.index(t) for t in ("CDS", "EDS", "LDS", "RDS")}
        assert first["CDS"] < first["EDS"] < first["LDS"] < first["RDS"], order
        # The listener went out only after the new cluster's endpoints had.
        canary_eds = next(
            i for i, r in enumerate(sidecar.received[before:])
            if r.type_url == rt.ENDPOINT and "canary" in r.names
        )
        assert canary_eds < first["LDS"], order
        assert sidecar.names(rt.ROUTE) == {"r2"}
        assert sidecar.names(rt.CLUSTER) == {"model", "canary"}


async def test_dropped_cluster_is_removed_after_new_listeners_and_routes(ads: Ads) -> None:
    ads.cache.set_snapshot("n1", mesh(clusters=("model", "legacy"), route="r1"))
    async with SimulatedSidecar(ads.target, "n1") as sidecar:
        await ads.status.wait_synced(["n1"], timeout=5)
        before = len(sidecar.received)
        update = mesh(clusters=("model",), route="r2")
        ads.cache.set_snapshot("n1", update)
        await ads.status.wait_synced(snapshot_versions={"n1": update.version}, timeout=5)
        after = sidecar.received[before:]
        pruned = next(
            i for i, r in enumerate(after) if r.type_url == rt.CLUSTER and "legacy" not in r.names
        )
        new_routes = next(
            i for i, r in enumerate(after) if r.type_url == rt.ROUTE and "r2" in r.names
        )
        new_listener = next(i for i, r in enumerate(after) if r.type_url == rt.LISTENER)
        assert new_listener < new_routes < pruned, [(r.short_name, r.names) for r in after]
        # Until then the sidecar kept the legacy cluster.
        assert all("legacy" in r.names for r in after[:pruned] if r.type_url == rt.CLUSTER)
        assert sidecar.names(rt.CLUSTER) == {"model"}
        assert sidecar.names(rt.ENDPOINT) == {"model"}
        assert states(ads, "n1") == dict.fromkeys(["CDS", "EDS", "LDS", "RDS"], State.SYNCED)


async def test_many_sidecars_share_one_serialization(ads: Ads) -> None:
    snaps = {f"n{i}": mesh(clusters=("model", "feed")) for i in range(8)}
    for node_id, snap in snaps.items():
        ads.cache.set_snapshot(node_id, snap)
    first = snaps["n0"].resources(rt.CLUSTER)["model"]
    assert all(s.resources(rt.CLUSTER)["model"] is first for s in snaps.values())
    sidecars = [SimulatedSidecar(ads.target, n) for n in snaps]
    await asyncio.gather(*(s.start() for s in sidecars))
    try:
        await ads.status.wait_synced(
            snapshot_versions={n: s.version for n, s in snaps.items()}, timeout=5
        )
        got = {s.resource(rt.CLUSTER, "model").value for s in sidecars}  # type: ignore[union-attr]
        assert got == {first.any.value}
        assert len({s.bytes_received for s in sidecars}) == 1
    finally:
        await asyncio.gather(*(s.close() for s in sidecars))


async def test_reconnect_with_current_version_sends_nothing_new(ads: Ads) -> None:
    snap = mesh()
    ads.cache.set_snapshot("n1", snap)
    sidecar = SimulatedSidecar(ads.target, "n1")
    await sidecar.start()
    try:
        await ads.status.wait_synced(["n1"], timeout=5)
        await sidecar.stop()
        sidecar.received.clear()
        await sidecar.start()
        await ads.status.wait_synced(["n1"], timeout=5)
        assert sidecar.received == []
        update = mesh(port=9999)
        ads.cache.set_snapshot("n1", update)
        await ads.status.wait_synced(snapshot_versions={"n1": update.version}, timeout=5)
        assert [r.short_name for r in sidecar.received] == ["EDS"]
    finally:
        await sidecar.close()


async def test_reject_node_aborts_the_stream(ads: Ads, on_connect: list[object]) -> None:
    def refuse(node: core_pb2.Node) -> None:
        if node.id == "intruder":
            raise RejectNode("node 'intruder': metadata.modelguard is missing")

    on_connect.append(refuse)
    # One request, then read: a second write racing the server's abort can fail on the
    # client with gRPC core's own INTERNAL before the server's status is read.
    raw = RawStream(ads.target)
    try:
        first = discovery_pb2.DiscoveryRequest(type_url=rt.CLUSTER)
        first.node.id = "intruder"
        await raw.send(first)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await raw.recv(timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "metadata.modelguard is missing" in (err.value.details() or "")
        assert ads.status.nodes() == [] and ads.disconnected == []
    finally:
        await raw.close()


async def test_first_request_without_node_is_rejected(ads: Ads) -> None:
    raw = RawStream(ads.target)
    try:
        await raw.send(discovery_pb2.DiscoveryRequest(type_url=rt.CLUSTER))
        try:
            await raw.recv()
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        else:
            raise AssertionError("stream without a node was served")
    finally:
        await raw.close()


async def test_unknown_type_is_logged_and_the_stream_goes_on(ads: Ads, caplog: object) -> None:
    ads.cache.set_snapshot("raw", Snapshot.build({rt.CLUSTER: [eds_cluster("c")],
                                                  rt.ENDPOINT: [load_assignment("c")]}))
    raw = RawStream(ads.target)
    try:
        await raw.send(
            discovery_pb2.DiscoveryRequest(
                node=core_pb2.Node(id="raw"), type_url="type.googleapis.com/no.such.Type"
            )
        )
        await raw.send(discovery_pb2.DiscoveryRequest(type_url=""))
        await raw.nothing()
        await raw.send(discovery_pb2.DiscoveryRequest(type_url=rt.CLUSTER))
        response = await raw.recv()
        assert isinstance(response, discovery_pb2.DiscoveryResponse)
        assert response.type_url == rt.CLUSTER
        assert "unknown type" in caplog.text  # type: ignore[attr-defined]
    finally:
        await raw.close()


async def test_an_authentication_still_pending_waits_instead_of_refusing() -> None:
    """A token review in flight (cluster mode) must not cost the sidecar a refused stream."""
    from controlplane.xds.cache import SnapshotCache
    from controlplane.xds.server import AdsServer
    from controlplane.xds.status import SyncStatus

    answers = iter([True, True, False])  # pending twice, then decided

    def authenticate(node: core_pb2.Node, metadata: object) -> None:
        if next(answers, False):
            raise RejectNode("review pending", grpc.StatusCode.UNAUTHENTICATED, pending=True)

    cache, status = SnapshotCache(), SyncStatus()
    server = grpc.aio.server()
    AdsServer(cache, status, authenticate=authenticate).add_to(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        snap = mesh(clusters=("model",))
        cache.set_snapshot("n1", snap)
        async with SimulatedSidecar(f"127.0.0.1:{port}", "n1"):
            await status.wait_synced(snapshot_versions={"n1": snap.version}, timeout=5)
        assert "unauthenticated" not in status.drops()
    finally:
        await server.stop(0)
