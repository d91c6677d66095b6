"""Translate once per shape: a filled-in template must equal translating the sidecar itself.

Every golden case is the input: its IR under other node ids and certificates must give, byte
for byte, the snapshot that translating that IR gives — through the template, not around it.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from controlplane.ir import SidecarIR
from controlplane.shapes import ShapeCache
from controlplane.translate import translate
from controlplane.xds.snapshot import Snapshot

sys.path.insert(0, str(Path(__file__).parent.parent / "golden"))
import test_translate as golden

CASES = sorted(p.name for p in golden.CASES.iterdir() if (p / "in.yaml").exists())
NODE_IDS = ["pod-7.ml", "Other_Node:1/x@y", "n", "digits-model-5d8f7c9b4-x2x9q.demo"]


def _case_ir(case: str, monkeypatch: pytest.MonkeyPatch) -> SidecarIR:
    seen: list[SidecarIR] = []
    monkeypatch.setattr(golden, "translate", lambda ir: seen.append(ir) or translate(ir))
    golden._case_resources(golden.CASES / case)
    monkeypatch.undo()
    return seen[0]


def _variant(ir: SidecarIR, node_id: str, i: int) -> SidecarIR:
    out = dataclasses.replace(ir, node_id=node_id)
    if ir.mtls is not None:
        cert = dataclasses.replace(
            ir.mtls.certificate,
            certificate_pem=ir.mtls.certificate.certificate_pem.replace(
                "\n-----END", f"{i}\n-----END"
            ),
            private_key_pem=f"key of {node_id}\n",
        )
        out = dataclasses.replace(out, mtls=dataclasses.replace(ir.mtls, certificate=cert))
    return out


def _bytes(snapshot: Snapshot) -> dict[tuple[str, str], bytes]:
    return {
        (t, n): r.any.value for t in snapshot.type_urls() for n, r in snapshot.resources(t).items()
    }


@pytest.mark.parametrize("case", CASES)
def test_template_reproduces_translation(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ir = _case_ir(case, monkeypatch)
    shapes = ShapeCache(translate)
    shapes.begin()
    for i, node_id in enumerate([ir.node_id, *NODE_IDS]):
        replica = _variant(ir, node_id, i)
        got = shapes.snapshot(replica)
        want = Snapshot.build(translate(replica))
        assert _bytes(got) == _bytes(want), node_id
        assert got.version == want.version
    shapes.end()
    # The first sidecar and the shape were translated; every other one was filled in.
    assert (shapes.translations, shapes.filled) == (2, len(NODE_IDS))


def test_a_module_that_transforms_the_node_id_is_translated_one_by_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ir = _case_ir("no-policy", monkeypatch)

    def shouting(ir: SidecarIR) -> dict[str, list[object]]:
        return translate(dataclasses.replace(ir, service=ir.node_id.upper()))  # type: ignore[return-value]

    shapes = ShapeCache(shouting)  # type: ignore[arg-type]
    for node_id in NODE_IDS:
        replica = dataclasses.replace(ir, node_id=node_id)
        assert _bytes(shapes.snapshot(replica)) == _bytes(Snapshot.build(shouting(replica)))  # type: ignore[arg-type]
    assert shapes.filled == 0


def test_unused_shapes_are_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    ir = _case_ir("no-policy", monkeypatch)
    shapes = ShapeCache(translate)
    for round_ in range(3):
        shapes.begin()
        for node_id in NODE_IDS:
            shapes.snapshot(
                dataclasses.replace(
                    ir,
                    inbound=dataclasses.replace(ir.inbound, port=20000 + round_),
                    node_id=node_id,
                )
            )
        shapes.end()
        assert len(shapes._templates) == 1


# -- the pipeline: replicas, rebuilds that let pushes out, the debouncer --


# Node ids of many lengths (each length has its own flat form) and with characters that
# escaping changes (a value that cannot be embedded in a longer string).
ODD_IDS = ("r", "replica-7", "réplica-ü", 'quote"d', "x" * 40, "y" * 200, "tab\tid", "z" * 9)


def _pipeline(  # type: ignore[no-untyped-def]
    tmp_path: Path, sidecars: int, ports: bool = False, ids: tuple[str, ...] = ()
):
    from controlplane.inventory import Inventory, Sidecar
    from controlplane.pipeline import Pipeline
    from controlplane.sources.files import FileSource
    from controlplane.store import PolicyStore
    from controlplane.telemetry.settings import TelemetrySettings
    from controlplane.xds.cache import SnapshotCache

    (tmp_path / "access.yaml").write_text(ACCESS.format(path="/v1/predict"))
    store, inventory = PolicyStore(), Inventory()
    files = FileSource((str(tmp_path),), store)
    files.sync()
    pipeline = Pipeline(store, inventory, SnapshotCache(), telemetry=TelemetrySettings())
    for i in range(sidecars):
        inventory.observe(
            Sidecar(
                node_id=ids[i] if i < len(ids) else f"replica-{i}",
                service="digits-model",
                namespace="demo",
                identity="spiffe://cluster.local/ns/demo/sa/digits-model",
                app_port=18080,
                inbound_port=15006 + (i if ports else 0),
            )
        )
    return pipeline, files


ACCESS = """\
apiVersion: modelguard.io/v1alpha1
kind: AccessPolicy
metadata: {{name: digits-model, namespace: demo}}
spec:
  targetRef: {{service: digits-model}}
  defaultAction: Deny
  rules:
  - action: Allow
    to: {{methods: [POST], paths: ["{path}"]}}
"""


def _translated(pipeline, node_id: str) -> dict[tuple[str, str], bytes]:  # type: ignore[no-untyped-def]
    return _bytes(Snapshot.build(translate(pipeline.ir(node_id))))


@pytest.mark.parametrize(("ports", "ids"), [(False, ()), (True, ()), (False, ODD_IDS)])
def test_every_replica_gets_exactly_its_own_translation(
    tmp_path: Path, ports: bool, ids: tuple[str, ...]
) -> None:
    from controlplane.compile import compile_sidecar

    pipeline, files = _pipeline(tmp_path, 20, ports, ids)
    pipeline.rebuild()
    (tmp_path / "access.yaml").write_text(ACCESS.format(path="/v2/predict"))
    files.sync()
    before = pipeline.shapes.translations
    pipeline.rebuild()
    for sidecar in pipeline.inventory.snapshot():
        ir = pipeline.ir(sidecar.node_id)
        assert ir == compile_sidecar(sidecar, pipeline.store.current().policies, pipeline.telemetry)
        assert "/v2/predict" in str(ir)
        snapshot = pipeline.cache.get(sidecar.node_id)
        assert snapshot is not None
        assert _bytes(snapshot) == _translated(pipeline, sidecar.node_id)
    # Replicas: the first one and the shape; sidecars on ports of their own: one each.
    if not ids:
        assert pipeline.shapes.translations - before == (20 if ports else 2)


async def test_debouncer_never_runs_two_async_rebuilds_at_once() -> None:
    import asyncio

    from controlplane.pipeline import Debouncer

    running, runs, overlaps = 0, 0, 0
    release = asyncio.Event()

    async def rebuild() -> None:
        nonlocal running, runs, overlaps
        running += 1
        runs += 1
        overlaps += running > 1
        await release.wait()
        running -= 1

    debouncer = Debouncer(rebuild, asyncio.get_running_loop(), quiet=0.01, max_delay=0.05)
    debouncer.trigger()
    while runs < 1:
        await asyncio.sleep(0.005)
    debouncer.trigger()  # while the first still runs: it must run once more, after
    await asyncio.sleep(0.1)
    assert runs == 1
    release.set()
    while runs < 2:
        await asyncio.sleep(0.005)
    assert overlaps == 0


@pytest.mark.parametrize("case", ["extraction-tiers", "no-policy", "mtls-strict-mesh"])
def test_values_that_escaping_changes_get_their_own_translation(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node id inside a JSON document (the Wasm filter's config) that escaping would
    change cannot be filled in as it is; replicas of other lengths share flat forms."""
    ir = _case_ir(case, monkeypatch)
    shapes = ShapeCache(translate)
    shapes.begin()
    ids = [ir.node_id, "pod-1", 'quo"te', "tab\tid", "pod-22", "é-pod", "pod-3", "p" * 300]
    for i, node_id in enumerate(ids):
        replica = _variant(ir, node_id, i)
        assert _bytes(shapes.snapshot(replica)) == _bytes(Snapshot.build(translate(replica))), (
            node_id
        )
    assert shapes.filled >= 4  # the plain ids at least
