"""Status across replicas (``SharedStatus``) over a real Redis, and the status writer's
workload grouping: the counts stay right while passes reuse what did not change.
"""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.api import validate_document
from controlplane.cluster_status import SharedStatus
from controlplane.compile.inputs.inventory import Sidecar
from controlplane.sources.kubernetes.status import Workloads
from tests.conftest import Redis

KEY = ("AccessPolicy", "demo", "digits")


def sidecar(name: str, service: str = "digits", **labels: str) -> Sidecar:
    return Sidecar(
        f"{name}.demo",
        service,
        "demo",
        f"spiffe://cluster.local/ns/demo/sa/{service}",
        8080,
        15006,
        labels=tuple(sorted({"app": service, **labels}.items())),
    )


class Replica:
    """What a replica hands its SharedStatus: its sidecars, what they ACKed, the versions."""

    def __init__(self, url: str, name: str, compact: bool = True) -> None:
        self.sidecars: tuple[Sidecar, ...] = ()
        self.programmed: dict[str, bool] = {}
        self.version = "v1"
        # compact: the ACKed sidecars once, plus per policy whether it compiled; else (as
        # replicas before it) the programmed sidecars per policy.
        self.status = SharedStatus(
            url,
            name,
            lambda: self.sidecars,
            lambda key: self.programmed,
            lambda: {KEY: self.version},
            serving=(lambda: [n for n, ok in self.programmed.items() if ok]) if compact else None,
            compiled=(lambda key: True) if compact else None,
        )


@pytest.fixture
def redis_url(redis_server: Redis) -> str:
    return redis_server.url


@pytest.mark.parametrize("report", ["compact", "per-policy"])
def test_every_replicas_sidecars_count_and_are_parsed_once(redis_url: str, report: str) -> None:
    a, b = Replica(redis_url, "a"), Replica(redis_url, "b", compact=report == "compact")
    try:
        a.sidecars = (sidecar("a1"), sidecar("a2"))
        a.programmed = {"a1.demo": True}
        b.sidecars = (sidecar("b1"), sidecar("b2"), sidecar("a2"))  # a2 moved to b
        b.programmed = {"b1.demo": True, "b2.demo": True, "a2.demo": True}
        b.status.step()
        a.status.step()

        seen = a.status.sidecars()
        assert sorted(s.node_id for s in seen) == ["a1.demo", "a2.demo", "b1.demo", "b2.demo"]
        programmed = a.status.programmed(KEY)
        # a2 is a's own: a's answer (not ACKed) wins over b's report.
        assert {n: programmed.get(n, False) for n in sorted(s.node_id for s in seen)} == {
            "a1.demo": True,
            "a2.demo": False,
            "b1.demo": True,
            "b2.demo": True,
        }

        # Unchanged reports give the very same sidecar objects: the status writer's
        # grouping recognises them by identity and does no work for them.
        a.status.step()
        again = a.status.sidecars()
        assert {s.node_id: id(s) for s in again} == {s.node_id: id(s) for s in seen}

        # b serves another version of the policy than a: b's sidecars have not
        # programmed the version a judges by.
        b.version = "v2"
        b.status.step()
        a.status.step()
        programmed = a.status.programmed(KEY)
        assert not programmed.get("b1.demo", False)
        assert programmed.get("a1.demo", False)

        # b relabels a sidecar: a new object for that one only.
        b.sidecars = (sidecar("b1", tier="gold"), sidecar("b2"), sidecar("a2"))
        b.status.step()
        a.status.step()
        after = {s.node_id: s for s in a.status.sidecars()}
        assert after["b1.demo"].label_map["tier"] == "gold"
        assert [n for n in after if id(after[n]) != {s.node_id: id(s) for s in again}[n]] == [
            "b1.demo"
        ]
    finally:
        a.status.stop()
        b.status.stop()


def policy(name: str, target: dict[str, Any]) -> Any:
    loaded, violations = validate_document(
        {
            "apiVersion": "modelguard.io/v1alpha1",
            "kind": "AccessPolicy",
            "metadata": {"name": name, "namespace": "demo"},
            "spec": {"targetRef": target},
        },
        "test",
        0,
    )
    assert loaded is not None, violations
    return loaded.policy


def test_workloads_follow_sidecars_that_come_go_and_change() -> None:
    by_service = policy("by-service", {"service": "digits"})
    gold = policy("gold", {"selector": {"matchLabels": {"tier": "gold"}}})
    workloads = Workloads()
    s1, s2, s3 = sidecar("s1"), sidecar("s2", tier="gold"), sidecar("s3", "other", tier="gold")
    elsewhere = Sidecar("x.prod", "digits", "prod", "spiffe://cluster.local/ns/prod/sa/d", 1, 2)

    def targeted(*sidecars: Sidecar) -> tuple[list[str], list[str]]:
        workloads.update(tuple(sidecars))
        return (
            sorted(workloads.targeted(("AccessPolicy", "demo", "by-service"), by_service)),
            sorted(workloads.targeted(("AccessPolicy", "demo", "gold"), gold)),
        )

    assert targeted(s1, s2, s3, elsewhere) == (["s1.demo", "s2.demo"], ["s2.demo", "s3.demo"])
    # s1 becomes gold, s3 leaves
    s1_gold = sidecar("s1", tier="gold")
    assert targeted(s1_gold, s2, elsewhere) == (["s1.demo", "s2.demo"], ["s1.demo", "s2.demo"])
    # s2 moves to Service "other" and loses its tier
    assert targeted(s1_gold, sidecar("s2", "other"), elsewhere) == (["s1.demo"], ["s1.demo"])
    assert targeted() == ([], [])


def test_a_report_of_an_older_replica_still_counts(redis_url: str) -> None:
    """Mid-rollout, a replica of the version before writes its sidecars inline and its
    programmed sidecars per policy: they count all the same."""
    import json

    import redis

    from controlplane.cluster_status import INDEX
    from controlplane.cluster_status import KEY as REPORT

    old = sidecar("o1")
    client = redis.Redis.from_url(redis_url)
    client.set(
        REPORT.format(replica="old"),
        json.dumps(
            {
                "replica": "old",
                "at": 0,
                "sidecars": {old.node_id: old.to_metadata()},
                "programmed": {"/".join(KEY): {"version": "v1", "nodes": {old.node_id: True}}},
            }
        ),
        px=5000,
    )
    client.sadd(INDEX, "old")
    a = Replica(redis_url, "a")
    try:
        a.sidecars = (sidecar("a1"),)
        a.status.step()
        assert sorted(s.node_id for s in a.status.sidecars()) == ["a1.demo", "o1.demo"]
        assert a.status.programmed(KEY).get("o1.demo", False)
    finally:
        a.status.stop()
        client.close()


def mark_synced(plane: Any, node_id: str) -> None:
    """As the ADS server records it: the node was sent its snapshot and ACKed every type."""
    from controlplane.xds.status import StreamKind

    snapshot = plane.cache.get(node_id)
    node = plane.sync_status.connect(node_id, StreamKind.SOTW, "test")
    plane.sync_status.set_target(node, snapshot.version)
    for type_url in snapshot.type_urls():
        version = snapshot.type_version(type_url)
        plane.sync_status.set_type_target(node, type_url, version)
        plane.sync_status.sent(node, type_url, version, "n1", 0)
        plane.sync_status.acked(node, type_url, version, "n1")
    return node


@pytest.mark.parametrize("log", [None, 3], ids=["log", "log-overflows"])
async def test_the_acked_set_kept_from_changes_is_the_one_computed_afresh(
    log: int | None,
) -> None:
    import collections

    from controlplane.app.server import ControlPlane, ControlPlaneConfig
    from controlplane.sources.kubernetes.status import ProgramTracker

    plane = ControlPlane(ControlPlaneConfig(policy_paths=(), xds_port=0, admin_port=0))
    if log is not None:  # a log shorter than the changes between two looks: recomputed
        plane.sync_status._log = collections.deque(maxlen=log)
        plane.cache._log = collections.deque(maxlen=log)
    names = [f"s{i}" for i in range(6)]
    for name in names:
        plane.inventory.observe(sidecar(name))
    plane.pipeline.rebuild()
    streams = {f"{n}.demo": mark_synced(plane, f"{n}.demo") for n in names[:4]}
    tracker = ProgramTracker(plane.store, plane.pipeline, plane.sync_status, plane.cache)

    def fresh() -> frozenset[str]:
        return ProgramTracker(plane.store, plane.pipeline, plane.sync_status, plane.cache).serving()

    assert tracker.serving() == fresh() == {f"{n}.demo" for n in names[:4]}
    some_type = plane.cache.get("s0.demo").type_urls()[0]  # type: ignore[union-attr]
    plane.sync_status.nacked(streams["s0.demo"], some_type, "v", "n1", "no")  # a NACK
    plane.sync_status.disconnect(streams["s1.demo"])  # one leaves
    mark_synced(plane, "s4.demo")  # a node ACKs (changes enough to overflow a short log)
    assert tracker.serving() == fresh() == {"s2.demo", "s3.demo", "s4.demo"}
    # s2 gets a new snapshot (it now backs another Service): not ACKed yet, not serving it
    plane.inventory.observe(sidecar("s2", "other"))
    plane.pipeline.rebuild()
    assert plane.cache.get("s2.demo").version != plane.sync_status.node("s2.demo").snapshot_version  # type: ignore[union-attr]
    assert tracker.serving() == fresh() == {"s3.demo", "s4.demo"}
    mark_synced(plane, "s2.demo")
    plane.pipeline.errors["s3.demo"] = "inconsistent"  # an error keeps a node out
    assert tracker.serving() == fresh() == {"s2.demo", "s4.demo"}
