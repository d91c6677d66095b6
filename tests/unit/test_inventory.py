"""The inventory: sidecars kept in node-id order as they come and go, as announced and as
a corrector (the cluster's view) sees them, re-corrected only where asked."""

from __future__ import annotations

import dataclasses

from controlplane.compile.inputs.inventory import Inventory, Sidecar


def sidecar(node_id: str, service: str = "svc") -> Sidecar:
    return Sidecar(node_id, service, "demo", "spiffe://cluster.local/ns/demo/sa/s", 8080, 15006)


def test_snapshot_is_in_node_id_order_through_arrivals_changes_and_departures() -> None:
    inventory = Inventory()
    for node_id in ["m.demo", "c.demo", "x.demo", "a.demo", "k.demo"]:
        inventory.observe(sidecar(node_id))
    inventory.forget("c.demo")
    inventory.forget("nobody.demo")
    inventory.observe(sidecar("k.demo", "other"))
    inventory.observe(sidecar("b.demo"))
    snapshot = inventory.snapshot()
    assert [s.node_id for s in snapshot] == ["a.demo", "b.demo", "k.demo", "m.demo", "x.demo"]
    assert inventory.get("k.demo") == sidecar("k.demo", "other")
    assert inventory.snapshot() is snapshot  # unchanged: the same tuple, not a new sort


def test_the_corrector_sees_what_was_announced_and_runs_only_where_asked() -> None:
    inventory = Inventory()
    notified: list[int] = []
    inventory.subscribe(lambda: notified.append(1))
    seen: list[str] = []
    renamed: dict[str, str] = {}

    def correct(announced: Sidecar) -> Sidecar:
        seen.append(announced.node_id)
        assert announced.service == "svc"  # always the sidecar's own word, never a correction
        service = renamed.get(announced.node_id)
        return dataclasses.replace(announced, service=service) if service else announced

    for node_id in ["a.demo", "b.demo", "c.demo"]:
        inventory.observe(sidecar(node_id))
    inventory.correct_with(correct)
    assert sorted(seen) == ["a.demo", "b.demo", "c.demo"]

    seen.clear()
    notified.clear()
    renamed["b.demo"] = "backend"
    assert inventory.recorrect(["b.demo", "gone.demo"]) == 1
    assert seen == ["b.demo"] and len(notified) == 1
    assert inventory.get("b.demo").service == "backend"  # type: ignore[union-attr]

    # The correction is undone when the cluster no longer says so.
    del renamed["b.demo"]
    inventory.recorrect(["b.demo"])
    assert inventory.get("b.demo").service == "svc"  # type: ignore[union-attr]

    # Nothing changed: no one is told.
    notified.clear()
    assert inventory.recorrect(["a.demo", "c.demo"]) == 0
    assert notified == []

    # A sidecar connecting is corrected as it arrives.
    renamed["d.demo"] = "backend"
    inventory.observe(sidecar("d.demo"))
    assert inventory.get("d.demo").service == "backend"  # type: ignore[union-attr]
