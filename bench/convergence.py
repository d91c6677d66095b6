"""Convergence: time from a policy file change to the moment every sidecar has ACKed it.

Runs the control plane in this process, with (a) one real Envoy sidecar and (b) N simulated
sidecars (ADS clients that ACK like Envoy) in a separate process, so the control plane
has a core of its own. Each round edits the AccessPolicy file and measures, in the control
plane, the time until every connected sidecar has ACKed the snapshot that edit produced.
The figure includes the file watcher and the pipeline's debounce (100 ms quiet), as users
experience it.

    .venv/bin/python bench/convergence.py [--sims 200] [--rounds 20] [--delta] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controlplane.bootstrap import build_bootstrap  # noqa: E402
from controlplane.inventory import Sidecar  # noqa: E402
from controlplane.local.envoy import EnvoyProcess  # noqa: E402
from controlplane.netutil import free_port  # noqa: E402
from controlplane.server import ControlPlane, ControlPlaneConfig  # noqa: E402

ACCESS = """\
apiVersion: modelguard.io/v1alpha1
kind: AccessPolicy
metadata: {{name: digits-model, namespace: demo}}
spec:
  targetRef: {{service: digits-model}}
  defaultAction: Deny
  rules:
  - action: Allow
    to: {{methods: [POST], paths: [/v1/predict, /v1/round-{round}]}}
"""


def _sidecar(node_id: str) -> Sidecar:
    return Sidecar(
        node_id=node_id,
        service="digits-model",
        namespace="demo",
        identity="spiffe://cluster.local/ns/demo/sa/digits-model",
        app_port=18080,
        inbound_port=free_port(),
        inbound_address="127.0.0.1",
    )


def _run_sims(
    target: str, count: int, delta: bool, ready: multiprocessing.Event, stop: multiprocessing.Event
) -> None:  # type: ignore[valid-type]
    from controlplane.xds.simclient import SimulatedSidecar

    async def main() -> None:
        sims = [
            SimulatedSidecar(
                target,
                f"sim-{i}",
                delta=delta,
                record=False,
                metadata=_sidecar(f"sim-{i}").to_metadata(),
            )
            for i in range(count)
        ]
        for sim in sims:
            await sim.start()
        ready.set()  # type: ignore[attr-defined]
        while not stop.is_set():  # type: ignore[attr-defined]
            await asyncio.sleep(0.1)
        for sim in sims:
            await sim.close()

    asyncio.run(main())


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _converged(plane: ControlPlane, before: dict[str, str]) -> bool:
    nodes = plane.cache.node_ids()
    for node_id in nodes:
        snap = plane.cache.get(node_id)
        if snap is None or snap.version == before.get(node_id):
            return False
        if not plane.sync_status.is_synced(node_id, snap.version):
            return False
    return True


async def measure(sims: int, rounds: int, delta: bool, real_envoy: bool) -> dict[str, object]:
    workdir = Path(tempfile.mkdtemp(prefix="mg-bench-"))
    policies = workdir / "policies"
    policies.mkdir()
    (policies / "access.yaml").write_text(ACCESS.format(round=0))
    plane = ControlPlane(
        ControlPlaneConfig(policy_paths=(str(policies),), xds_port=0, admin_port=0)
    )
    await plane.start()
    target = f"127.0.0.1:{plane.xds_port}"
    envoy = None
    proc = None
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    expected = 0
    try:
        if real_envoy:
            admin = free_port()
            envoy = EnvoyProcess(
                build_bootstrap(
                    _sidecar("envoy-0"),
                    xds_host="127.0.0.1",
                    xds_port=plane.xds_port,
                    admin_port=admin,
                ),
                admin_port=admin,
                log_path=workdir / "envoy.log",
            )
            envoy.start()
            expected += 1
        if sims:
            ready = ctx.Event()
            proc = ctx.Process(target=_run_sims, args=(target, sims, delta, ready, stop))
            proc.start()
            if not ready.wait(120):
                raise RuntimeError("simulated sidecars did not start")
            expected += sims
        deadline = time.monotonic() + 60
        while len(plane.cache.node_ids()) < expected or not await _converged(plane, {}):
            if time.monotonic() > deadline:
                raise RuntimeError("sidecars did not sync initially")
            await asyncio.sleep(0.05)
        times: list[float] = []
        for r in range(1, rounds + 1):
            before = {n: plane.cache.get(n).version for n in plane.cache.node_ids()}  # type: ignore[union-attr]
            started = time.perf_counter()
            (policies / "access.yaml").write_text(ACCESS.format(round=r))
            while not await _converged(plane, before):
                if time.perf_counter() - started > 30:
                    raise RuntimeError(f"round {r} did not converge")
                await asyncio.sleep(0.002)
            times.append(time.perf_counter() - started)
            await asyncio.sleep(0.3)  # let the watcher settle between rounds
        counters = plane.sync_status.counters()
        return {
            "sidecars": expected,
            "real_envoy": real_envoy,
            "simulated": sims,
            "stream": "Delta" if delta else "SotW",
            "rounds": rounds,
            "p50_ms": round(statistics.median(times) * 1e3, 1),
            "p99_ms": round(_percentile(times, 0.99) * 1e3, 1),
            "max_ms": round(max(times) * 1e3, 1),
            "last_rebuild_ms": round(plane.pipeline.last_rebuild_seconds * 1e3, 1),
            "bytes_sent": sum(c.bytes_sent for c in counters.values()),
        }
    finally:
        stop.set()
        if proc is not None:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
        if envoy is not None:
            envoy.stop()
        await plane.stop(grace=0)
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sims", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--delta", action="store_true", help="simulated sidecars use Delta xDS")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = [
        asyncio.run(measure(0, args.rounds, args.delta, real_envoy=True)),
        asyncio.run(measure(args.sims, args.rounds, args.delta, real_envoy=True)),
    ]
    print(
        f"{'sidecars':>9} {'stream':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'rebuild':>8}"
    )
    for r in results:
        print(
            f"{r['sidecars']:>9} {r['stream']:>6} {r['p50_ms']:>8} {r['p99_ms']:>8} "
            f"{r['max_ms']:>8} {r['last_rebuild_ms']:>8}"
        )
    print(json.dumps(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
