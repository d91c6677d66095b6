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
