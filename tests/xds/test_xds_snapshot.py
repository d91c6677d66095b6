"""Snapshots: content versions, consistency, and serializing each resource once."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from xds_helpers import eds_cluster, http_listener, load_assignment, mesh, route_config

from controlplane.xds import resources as rt
from controlplane.xds import snapshot as snapshot_module
from controlplane.xds.snapshot import InconsistentSnapshot, Snapshot


def test_versions_are_content_hashes() -> None:
    a, b = mesh(), mesh()
    assert a.version == b.version
    assert a.type_version(rt.CLUSTER) == b.type_version(rt.CLUSTER)
    changed = mesh(port=9090)  # only the endpoints differ
    assert changed.version != a.version
    assert changed.type_version(rt.ENDPOINT) != a.type_version(rt.ENDPOINT)
    for type_url in (rt.CLUSTER, rt.LISTENER, rt.ROUTE):
        assert changed.type_version(type_url) == a.type_version(type_url)
    res = a.resources(rt.CLUSTER)["model"]
    assert (res.name, res.any.type_url) == ("model", rt.CLUSTER)
    assert cluster_pb2.Cluster.FromString(res.any.value) == eds_cluster("model")


def test_empty_snapshot_is_allowed() -> None:
    empty = Snapshot.build({})
    assert len(empty) == 0
    assert empty.resources(rt.CLUSTER) == {}
    assert empty.version == Snapshot.build({rt.CLUSTER: []}).version


def test_identical_content_is_serialized_once_across_nodes() -> None:
    def build() -> Snapshot:
        return Snapshot.build(
            {rt.CLUSTER: [eds_cluster("shared")], rt.ENDPOINT: [load_assignment("shared")]}
        )

    before = snapshot_module.stats.serializations
    one = build()
    assert snapshot_module.stats.serializations - before == 2
    encodings = snapshot_module.stats.encodings
    # Every node's translation builds its own (equal) messages: one Resource for all of them,
    # with its Any and wire entries built once.
    nodes = [build() for _ in range(50)]
    assert snapshot_module.stats.encodings == encodings
    first = one.resources(rt.CLUSTER)["shared"]
    for snap in nodes:
        res = snap.resources(rt.CLUSTER)["shared"]
        assert res is first
        assert res.any is first.any
        assert res.sotw_entry is first.sotw_entry


def test_inconsistent_snapshot_lists_every_problem() -> None:
    with pytest.raises(InconsistentSnapshot) as caught:
        Snapshot.build(
            {
                rt.CLUSTER: [eds_cluster("a"), eds_cluster("b"), eds_cluster("c")],
                rt.ENDPOINT: [load_assignment("a"), load_assignment("a")],
                rt.LISTENER: [http_listener("in", "routes-in"), http_listener("out", "routes-out")],
                rt.ROUTE: [route_config("routes-in", "a"), load_assignment("x")],
            }
        )
    assert caught.value.problems == (
        "EDS 'a': duplicate name",
        "RDS: got a envoy.config.endpoint.v3.ClusterLoadAssignment under " + rt.ROUTE,
        "CDS 'b': EDS cluster needs ClusterLoadAssignment 'b', which the snapshot does not have",
        "CDS 'c': EDS cluster needs ClusterLoadAssignment 'c', which the snapshot does not have",
        "LDS 'out': HTTP connection manager needs RouteConfiguration 'routes-out', "
        "which the snapshot does not have",
    )


def test_referenced_names_and_helpers() -> None:
    snap = mesh(clusters=("a", "b"), route="r")
    assert snap.referenced(rt.ENDPOINT) == {"a", "b"}
    assert snap.referenced(rt.ROUTE) == {"r"}
    assert rt.route_config_names(http_listener("l", "r")) == ["r"]
    assert [rt.short_name(t) for t in rt.PUSH_ORDER][2:] == ["CDS", "EDS", "LDS", "RDS"]
    assert rt.resource_name(load_assignment("a")) == "a"
