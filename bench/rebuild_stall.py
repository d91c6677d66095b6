"""How long a big rebuild holds the event loop that serves ADS and the admin API.

A policy set near the size limits (``--policies`` AccessPolicies of ``--rules`` rules each,
spread over ``--sidecars`` distinct services) is applied to the store, and one rebuild
compiles it while a probe on the event loop sleeps 1 ms at a time and records how late it
wakes up. The longest lateness is the longest stall: what an admin call or an xDS push
waiting on that loop would have waited at worst.

Same run, same inputs, as the baseline: the probe on an idle loop, and the same rebuild run
synchronously on the loop (``Pipeline.rebuild``, what a rebuild cost the loop before it was
time-sliced or moved off it).

    nice .venv/bin/python bench/rebuild_stall.py                 # 20 × 1,000 rules, 2 sidecars
    nice .venv/bin/python bench/rebuild_stall.py --policies 40 --sidecars 8

Also measures the store: ``--applies N`` single-file applies into a store of N files.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from controlplane.api import LoadedPolicy
from controlplane.api.kinds import KINDS
from controlplane.inventory import Inventory, Sidecar
from controlplane.pipeline import Pipeline
from controlplane.store import PolicyStore, UnitContent
from controlplane.xds.cache import SnapshotCache

PROBE_SLEEP = 0.001


def access_policy(name: str, service: str, rules: int, namespace: str = "demo") -> dict[str, Any]:
    return {
        "apiVersion": "modelguard.io/v1alpha1",
        "kind": "AccessPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "targetRef": {"service": service},
            "defaultAction": "Deny",
            "rules": [
                {"action": "Allow", "to": {"methods": ["POST"], "paths": [f"/v1/predict/{i}"]}}
                for i in range(rules)
            ],
        },
    }


def big_unit(
    policies: int, rules: int, services: int | Sequence[str], unit: str = "big.yaml"
) -> UnitContent:
    """What the file source hands the store for one big file (validated like a parsed one):
    ``policies`` AccessPolicies of ``rules`` rules, over ``services`` (names, or svc0…)."""
    names = [f"svc{i}" for i in range(services)] if isinstance(services, int) else services
    loaded = tuple(
        LoadedPolicy(
            KINDS["AccessPolicy"].model_validate(
                access_policy(f"p{i}", names[i % len(names)], rules)
            ),
            unit,
            i,
        )
        for i in range(policies)
    )
    return UnitContent(loaded, ())


def sidecar(i: int) -> Sidecar:
    return Sidecar(
        node_id=f"node-{i}",
        service=f"svc{i}",
        namespace="demo",
        identity=f"spiffe://cluster.local/ns/demo/sa/svc{i}",
        app_port=18080,
        inbound_port=15006,
    )


@dataclass
class Stall:
    seconds: float  # the rebuild's wall time
    longest: float  # the probe's longest lateness
    p99: float
    wakeups: int
    gc_pause: float  # the longest garbage collection meanwhile (it stops every thread)

    def line(self, what: str) -> str:
        return (
            f"{what:<34} rebuild {self.seconds * 1e3:8.0f} ms   longest stall "
            f"{self.longest * 1e3:7.1f} ms   p99 {self.p99 * 1e3:6.1f} ms   "
            f"longest gc {self.gc_pause * 1e3:6.1f} ms   ({self.wakeups} probe wake-ups)"
        )


async def _probe(stop: asyncio.Event, late: list[float]) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.sleep(PROBE_SLEEP)
        late.append(time.perf_counter() - started - PROBE_SLEEP)


async def _measured(run: Any) -> Stall:
    late: list[float] = []
    pauses: list[float] = []
    gc_started = [0.0]

    def on_gc(phase: str, _info: dict[str, int]) -> None:
        if phase == "start":
            gc_started[0] = time.perf_counter()
        else:
            pauses.append(time.perf_counter() - gc_started[0])

    stop = asyncio.Event()
    probe = asyncio.create_task(_probe(stop, late))
    await asyncio.sleep(0.05)  # the probe is running
    late.clear()
    gc.callbacks.append(on_gc)
    started = time.perf_counter()
    try:
        result = run()
        if asyncio.iscoroutine(result):
            await result
        seconds = time.perf_counter() - started
        await asyncio.sleep(0.01)  # the wake-up a synchronous run delayed is counted
    finally:
        gc.callbacks.remove(on_gc)
    stop.set()
    await probe
    ordered = sorted(late) or [0.0]
    p99 = ordered[max(0, int(len(ordered) * 0.99) - 1)]
    return Stall(seconds, ordered[-1], p99, len(late), max(pauses, default=0.0))


def _pipeline(args: argparse.Namespace) -> tuple[Pipeline, UnitContent]:
    store = PolicyStore()
    inventory = Inventory()
    for i in range(args.sidecars):
        inventory.observe(sidecar(i))
    return Pipeline(store, inventory, SnapshotCache()), big_unit(
        args.policies, args.rules, args.sidecars
    )


async def stalls(args: argparse.Namespace) -> None:
    idle = await _measured(lambda: asyncio.sleep(0.5))
    print(idle.line("idle loop (0.5 s)"))
    for round_ in range(args.rounds):
        for mode in ("rebuild_async", "rebuild (sync, on the loop)"):
            pipeline, unit = _pipeline(args)
            pipeline.rebuild()  # the small starting set
            pipeline.store.apply({"big.yaml": unit})
            run = pipeline.rebuild_async if mode == "rebuild_async" else pipeline.rebuild
            stall = await _measured(run)
            assert pipeline.compiled_revision == pipeline.store.current().revision
            print(stall.line(f"[{round_}] {mode}"))


def applies(count: int) -> None:
    """``count`` single-file applies into a store that grows to ``count`` files, then
    ``count`` edits of one file in it: what each change costs as the store grows."""
    store = PolicyStore()
    units = [
        UnitContent(
            (
                LoadedPolicy(
                    KINDS["AccessPolicy"].model_validate(access_policy(f"p{i}", f"svc{i}", 3)),
                    f"file-{i:05d}.yaml",
                    0,
                ),
            ),
            (),
        )
        for i in range(count)
    ]
    started = time.perf_counter()
    for i, unit in enumerate(units):
        store.apply({f"file-{i:05d}.yaml": unit})
    grow = time.perf_counter() - started
    edited = [
        UnitContent(
            (
                LoadedPolicy(
                    KINDS["AccessPolicy"].model_validate(access_policy("p0", "svc0", 3 + i % 2)),
                    "file-00000.yaml",
                    0,
                ),
            ),
            (),
        )
        for i in range(count)
    ]
    started = time.perf_counter()
    for unit in edited:
        store.apply({"file-00000.yaml": unit})
    edit = time.perf_counter() - started
    print(
        f"store: {count:,} applies of one new file each {grow:.2f} s "
        f"({grow / count * 1e3:.2f} ms per apply); {count:,} edits of one file among "
        f"{count:,}: {edit:.2f} s ({edit / count * 1e3:.2f} ms per edit)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", type=int, default=20)
    parser.add_argument("--rules", type=int, default=1000)
    parser.add_argument("--sidecars", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--applies", type=int, default=0, help="measure the store instead")
    args = parser.parse_args()
    if args.applies:
        applies(args.applies)
        return
    print(
        f"{args.policies} AccessPolicies × {args.rules:,} rules over {args.sidecars} "
        f"sidecars (distinct services)"
    )
    asyncio.run(stalls(args))


if __name__ == "__main__":
    main()
