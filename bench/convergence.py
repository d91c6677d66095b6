"""Convergence at scale: policy change → every sidecar ACKed; Delta vs SotW bytes; memory.

The control plane runs in this process with a few real Envoy sidecars; N simulated sidecars
(ADS clients that subscribe and ACK like Envoy, ``bench/lib/simclient.py``) run in
1-2 other processes. The simulated sidecars are the pods of one Deployment: same service,
same ports, only the node id differs — what injection gives every replica in a cluster.

Three measurements:

* **Convergence** (once with SotW streams, once with Delta): each round edits the
  AccessPolicy file that targets every sidecar (the worst case: all of them get a new
  listener) and measures, in the control plane, from the file write to each sidecar's ACK
  of the snapshot that edit produced (``NodeSync.synced_at``). Reported: p50/p99 over every
  sidecar of every round, and p50/p99 over rounds of the time to the *last* ACK. It
  includes the file watcher (50 ms) and the debounce (100 ms quiet), as a user sees it.
* **Memory**: the control plane's resident set (``VmRSS``) before any sidecar connects
  and once all are in sync, divided by the number of sidecars.
* **Bytes for one changed resource** (Delta vs SotW): a mesh with identity on (mTLS, every
  sidecar holds one cluster and one ClusterLoadAssignment per other service); one service
  gets one more replica, which changes exactly one resource — that service's
  ClusterLoadAssignment — in every other sidecar. Bytes are read per sidecar from the
  server's counters, half of the sidecars on SotW, half on Delta, in the same run.

    .venv/bin/python bench/convergence.py [--sims 1000] [--envoys 2] [--procs 2]
        [--rounds 10] [--services 50,200] [--replicas 1] [--json out.json]

``--replicas R`` runs R control planes, each in its own process, watching one policy folder:
sidecar i connects to replica i mod R (the real Envoys to the first), ``--procs`` simulator
processes are shared out among them, and memory is the replicas' resident sets together.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import gc
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controlplane.app.server import ControlPlane, ControlPlaneConfig  # noqa: E402
from controlplane.compile.inputs.inventory import Sidecar  # noqa: E402
from controlplane.identity.service import IdentityConfig  # noqa: E402
from controlplane.identity.tokens import TOKEN_METADATA  # noqa: E402
from controlplane.local.envoy import EnvoyProcess  # noqa: E402
from controlplane.netutil import free_port  # noqa: E402
from controlplane.pipeline import Rebuild  # noqa: E402
from controlplane.sidecar.bootstrap import build_bootstrap  # noqa: E402
from controlplane.xds import resources as rt  # noqa: E402
from controlplane.xds.status import StreamKind  # noqa: E402

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

# One sidecar to configure, as (node id, node metadata, gRPC call metadata, delta).
SimSpec = tuple[str, dict[str, Any], list[tuple[str, str]], bool]

# MG_BENCH_PROFILE=FILE: cProfile the control plane over the measured rounds, written to
# FILE.sotw / FILE.delta (read with `python -m pstats`). Off by default: it slows the run.
PROFILE = os.environ.get("MG_BENCH_PROFILE", "")


def _replica(node_id: str) -> Sidecar:
    """A pod of the digits-model Deployment: the ports every replica shares."""
    return Sidecar(
        node_id=node_id,
        service="digits-model",
        namespace="demo",
        identity="spiffe://cluster.local/ns/demo/sa/digits-model",
        app_port=18080,
        inbound_port=15006,
        inbound_address="0.0.0.0",
    )


def _envoy_sidecar(node_id: str) -> Sidecar:
    """A real Envoy on this machine: it needs a free port of its own."""
    return dataclasses.replace(
        _replica(node_id), inbound_port=free_port(), inbound_address="127.0.0.1"
    )


def _start_envoys(
    n: int, xds_port: int, delta: bool, workdir: Path, running: list[EnvoyProcess]
) -> None:
    """Starts ``n`` real Envoys against the xDS server on ``xds_port``, each added to
    ``running`` as soon as it runs (the caller stops them, even after a failed start)."""
    for i in range(n):
        admin = free_port()
        envoy = EnvoyProcess(
            build_bootstrap(
                _envoy_sidecar(f"envoy-{i}"),
                xds_host="127.0.0.1",
                xds_port=xds_port,
                admin_port=admin,
                delta=delta,
            ),
            admin_port=admin,
            log_path=workdir / f"envoy-{i}.log",
        )
        envoy.start()
        running.append(envoy)


def _sim_specs(sims: int, delta: bool) -> list[SimSpec]:
    return [(f"sim-{i}", _replica(f"sim-{i}").to_metadata(), [], delta) for i in range(sims)]


def _run_sims(
    target: str,
    specs: Sequence[SimSpec],
    ready: Any,
    stop: Any,
) -> None:
    from bench.lib.simclient import SimulatedSidecar

    async def main() -> None:
        sims = [
            SimulatedSidecar(
                target, node_id, delta=delta, record=False, metadata=meta, call_metadata=call
            )
            for node_id, meta, call, delta in specs
        ]
        for sim in sims:
            await sim.start()
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        for sim in sims:
            await sim.close()

    asyncio.run(main())


class SimProcesses:
    """Simulated sidecars spread over ``procs`` processes (spawned, so they share nothing)."""

    def __init__(self, target: str, specs: Sequence[SimSpec], procs: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._procs = []
        self._ready = []
        for i in range(max(1, procs)):
            part = list(specs[i::procs])
            if not part:
                continue
            ready = ctx.Event()
            proc = ctx.Process(target=_run_sims, args=(target, part, ready, self._stop))
            proc.start()
            self._procs.append(proc)
            self._ready.append(ready)

    def wait_started(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        for ready in self._ready:
            if not ready.wait(max(0.0, deadline - time.monotonic())):
                raise RuntimeError("simulated sidecars did not start")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the simulator processes so far."""
        ticks = 0
        for proc in self._procs:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self._stop.set()
        for proc in self._procs:
            proc.join(60)
            if proc.is_alive():
                proc.kill()


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class _GcClock:
    """CPU time spent in the cyclic collector, per generation (gc.callbacks)."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.runs = [0, 0, 0]
        self.collected = 0  # objects found to be cyclic garbage
        self._started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.thread_time()
        else:
            self.seconds[info["generation"]] += time.thread_time() - self._started
            self.runs[info["generation"]] += 1
            self.collected += info["collected"]


class _Rebuilds:
    """Pipeline observer: the latest rebuild, and an event when one finishes."""

    def __init__(self) -> None:
        self.last: Rebuild | None = None
        self.event = asyncio.Event()

    def __call__(self, rebuild: Rebuild) -> None:
        self.last = rebuild
        self.event.set()

    async def next(self, after_revision: int, timeout: float = 30) -> Rebuild:
        async def wait() -> Rebuild:
            while self.last is None or self.last.revision <= after_revision:
                self.event.clear()
                await self.event.wait()
            return self.last

        return await asyncio.wait_for(wait(), timeout)


async def _all_synced(plane: ControlPlane, expected: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(plane.cache.node_ids()) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(plane.cache.node_ids())} of {expected} connected")
        await asyncio.sleep(0.05)
    versions = {n: plane.cache.get(n).version for n in plane.cache.node_ids()}  # type: ignore[union-attr]
    await plane.sync_status.wait_synced(
        snapshot_versions=versions, timeout=max(1.0, deadline - time.monotonic())
    )


async def converge(sims: int, envoys: int, procs: int, rounds: int, delta: bool) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="mg-bench-"))
    policies = workdir / "policies"
    policies.mkdir()
    (policies / "access.yaml").write_text(ACCESS.format(round=0))
    plane = ControlPlane(
        ControlPlaneConfig(policy_paths=(str(policies),), xds_port=0, admin_port=0)
    )
    rebuilds = _Rebuilds()
    plane.pipeline.observers.append(rebuilds)
    await plane.start()
    target = f"127.0.0.1:{plane.xds_port}"
    procs_: SimProcesses | None = None
    running: list[EnvoyProcess] = []
    try:
        gc.collect()
        rss_before = _rss_bytes()
        _start_envoys(envoys, plane.xds_port, delta, workdir, running)
        specs = _sim_specs(sims, delta)
        if specs:
            procs_ = SimProcesses(target, specs, procs)
            # Off the event loop: it is the control plane's loop, which must accept the
            # sidecars' streams (calls it is slow to accept wait in gRPC core; past the
            # server's pending-call limits they were cancelled: bench/connect_storm.py).
            await asyncio.to_thread(procs_.wait_started)
        expected = sims + envoys
        await _all_synced(plane, expected, timeout=300)
        gc.collect()
        rss_after = _rss_bytes()

        per_sidecar: list[float] = []
        last_ack: list[float] = []
        rebuild_ms: list[float] = []
        cpu: list[float] = []  # the control plane's CPU time from the edit to the last ACK
        sims_cpu: list[float] = []  # the simulated sidecars' CPU time, the same span
        counters_before = plane.sync_status.counters()
        gc_clock = _GcClock()
        profiler = cProfile.Profile() if PROFILE else None
        if profiler is not None:
            profiler.enable()
        for r in range(1, rounds + 1):
            revision = plane.store.current().revision
            started, cpu_started = time.time(), time.process_time()
            sims_cpu_started = procs_.cpu_seconds() if procs_ is not None else 0.0
            (policies / "access.yaml").write_text(ACCESS.format(round=r))
            done = await rebuilds.next(revision)
            if len(done.changed) != expected:
                raise RuntimeError(f"round {r}: {len(done.changed)} of {expected} changed")
            rebuild_ms.append(done.seconds * 1e3)
            versions = {n: plane.cache.get(n).version for n in done.changed}  # type: ignore[union-attr]
            await plane.sync_status.wait_synced(snapshot_versions=versions, timeout=60)
            cpu.append(time.process_time() - cpu_started)
            if procs_ is not None:
                sims_cpu.append(procs_.cpu_seconds() - sims_cpu_started)
            times = []
            for node_id in done.changed:
                at = plane.sync_status.synced_at(node_id)
                assert at is not None
                times.append(at - started)
            per_sidecar.extend(times)
            last_ack.append(max(times))
            await asyncio.sleep(0.3)  # the watcher settles; the next edit is a new event
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(f"{PROFILE}.{'delta' if delta else 'sotw'}")
        counters_after = plane.sync_status.counters()
        sent = sum(c.bytes_sent for c in counters_after.values()) - sum(
            c.bytes_sent for c in counters_before.values()
        )
        return {
            "stream": "Delta" if delta else "SotW",
            "sidecars": expected,
            "real_envoys": envoys,
            "simulated": sims,
            "processes": procs if sims else 0,
            "rounds": rounds,
            "p50_ms": round(statistics.median(per_sidecar) * 1e3, 1),
            "p99_ms": round(_percentile(per_sidecar, 0.99) * 1e3, 1),
            "last_ack_p50_ms": round(statistics.median(last_ack) * 1e3, 1),
            "last_ack_p99_ms": round(_percentile(last_ack, 0.99) * 1e3, 1),
            "rebuild_ms": round(statistics.median(rebuild_ms), 1),
            "cpu_ms_per_edit": round(statistics.median(cpu) * 1e3, 1),
            "sims_cpu_ms_per_edit": round(statistics.median(sims_cpu or [0.0]) * 1e3, 1),
            "gc_ms_per_edit": [round(g / rounds * 1e3, 1) for g in gc_clock.seconds],
            "gc_runs_per_edit": [round(n / rounds, 1) for n in gc_clock.runs],
            "gc_collected_per_edit": round(gc_clock.collected / rounds),
            "bytes_per_sidecar_per_edit": round(sent / rounds / expected),
            "rss_before_mb": round(rss_before / 2**20, 1),
            "rss_after_mb": round(rss_after / 2**20, 1),
            "mb_per_sidecar": round((rss_after - rss_before) / expected / 2**20, 3),
        }
    finally:
        if procs_ is not None:
            procs_.stop()
        for envoy in running:
            envoy.stop()
        await plane.stop(grace=0)
        shutil.rmtree(workdir, ignore_errors=True)


def _replica_main(policies: str, commands: Any, results: Any) -> None:
    """One control-plane replica in its own process (``--replicas``): it watches the shared
    policy folder like the others and answers the driver's commands with its own figures."""

    async def main() -> None:
        plane = ControlPlane(ControlPlaneConfig(policy_paths=(policies,), xds_port=0, admin_port=0))
        rebuilds = _Rebuilds()
        plane.pipeline.observers.append(rebuilds)
        await plane.start()
        gc.collect()
        results.put({"port": plane.xds_port, "rss_before": _rss_bytes()})
        revision, cpu_started = 0, 0.0
        gc_clock = _GcClock()
        try:
            while True:
                command, arg = await asyncio.to_thread(commands.get)
                if command == "stop":
                    return
                if command == "synced":  # arg: how many sidecars this replica serves
                    await _all_synced(plane, arg, timeout=600)
                    gc.collect()
                    results.put({"rss_after": _rss_bytes()})
                elif command == "arm":  # before the driver edits the policy
                    revision = plane.store.current().revision
                    cpu_started = time.process_time()
                    gc_clock.seconds = [0.0, 0.0, 0.0]
                    results.put({})
                elif command == "measure":  # arg: wall-clock time of the edit
                    done = await rebuilds.next(revision, timeout=120)
                    versions = {n: plane.cache.get(n).version for n in done.changed}  # type: ignore[union-attr]
                    await plane.sync_status.wait_synced(snapshot_versions=versions, timeout=120)
                    times = []
                    for node_id in done.changed:
                        at = plane.sync_status.synced_at(node_id)
                        assert at is not None
                        times.append(at - arg)
                    results.put(
                        {
                            "changed": len(done.changed),
                            "times": times,
                            "rebuild_ms": done.seconds * 1e3,
                            "cpu": time.process_time() - cpu_started,
                            "gc": list(gc_clock.seconds),
                        }
                    )
        finally:
            await plane.stop(grace=0)

    asyncio.run(main())


async def converge_replicas(
    sims: int, envoys: int, procs: int, rounds: int, delta: bool, replicas: int
) -> dict[str, Any]:
    """``converge`` with the sidecars spread over ``replicas`` control planes, each in its
    own process (as replicas of the Deployment behind one Service are): sidecar i connects
    to replica i mod R, the real Envoys to the first. One policy edit, seen by every
    replica's file watcher; convergence is to the last sidecar's ACK on any replica."""
    workdir = Path(tempfile.mkdtemp(prefix="mg-bench-"))
    policies = workdir / "policies"
    policies.mkdir()
    (policies / "access.yaml").write_text(ACCESS.format(round=0))
    ctx = multiprocessing.get_context("spawn")
    channels = []
    running: list[EnvoyProcess] = []
    sim_procs: list[SimProcesses] = []
    try:
        for _ in range(replicas):
            commands, results = ctx.Queue(), ctx.Queue()
            proc = ctx.Process(target=_replica_main, args=(str(policies), commands, results))
            proc.start()
            channels.append((proc, commands, results))

        async def ask(i: int, command: str, arg: Any = None) -> dict[str, Any]:
            _, commands, results = channels[i]
            commands.put((command, arg))
            answer: dict[str, Any] = await asyncio.to_thread(results.get, True, 900)
            return answer

        async def every(command: str, args: Sequence[Any]) -> list[dict[str, Any]]:
            return list(await asyncio.gather(*(ask(i, command, a) for i, a in enumerate(args))))

        started_answers = [await asyncio.to_thread(ch[2].get, True, 120) for ch in channels]
        ports = [a["port"] for a in started_answers]
        _start_envoys(envoys, ports[0], delta, workdir, running)
        specs = _sim_specs(sims, delta)
        per_procs = max(1, procs // replicas)
        for r in range(replicas):
            part = specs[r::replicas]
            if part:
                sim_procs.append(SimProcesses(f"127.0.0.1:{ports[r]}", part, per_procs))
        for group in sim_procs:
            await asyncio.to_thread(group.wait_started)
        served = [len(specs[r::replicas]) + (envoys if r == 0 else 0) for r in range(replicas)]
        after = await every("synced", served)

        per_sidecar: list[float] = []
        last_ack: list[float] = []
        rebuild_ms: list[float] = []
        cpu: list[float] = []
        gc_seconds = [0.0, 0.0, 0.0]
        sims_cpu: list[float] = []
        for r in range(1, rounds + 1):
            await every("arm", [None] * replicas)
            sims_cpu_started = sum(group.cpu_seconds() for group in sim_procs)
            started = time.time()
            (policies / "access.yaml").write_text(ACCESS.format(round=r))
            answers = await every("measure", [started] * replicas)
            for i, answer in enumerate(answers):
                if answer["changed"] != served[i]:
                    raise RuntimeError(
                        f"round {r}, replica {i}: {answer['changed']} of {served[i]} changed"
                    )
            times = [t for a in answers for t in a["times"]]
            per_sidecar.extend(times)
            last_ack.append(max(times))
            rebuild_ms.append(max(a["rebuild_ms"] for a in answers))
            cpu.append(sum(a["cpu"] for a in answers))
            sims_cpu.append(sum(group.cpu_seconds() for group in sim_procs) - sims_cpu_started)
            for a in answers:
                gc_seconds = [x + y for x, y in zip(gc_seconds, a["gc"], strict=True)]
            await asyncio.sleep(0.3)
        rss_before = sum(a["rss_before"] for a in started_answers)
        rss_after = sum(a["rss_after"] for a in after)
        expected = sims + envoys
        return {
            "stream": "Delta" if delta else "SotW",
            "sidecars": expected,
            "replicas": replicas,
            "real_envoys": envoys,
            "simulated": sims,
            "processes": per_procs * len(sim_procs),
            "rounds": rounds,
            "p50_ms": round(statistics.median(per_sidecar) * 1e3, 1),
            "p99_ms": round(_percentile(per_sidecar, 0.99) * 1e3, 1),
            "last_ack_p50_ms": round(statistics.median(last_ack) * 1e3, 1),
            "last_ack_p99_ms": round(_percentile(last_ack, 0.99) * 1e3, 1),
            "rebuild_ms": round(statistics.median(rebuild_ms), 1),
            "cpu_ms_per_edit": round(statistics.median(cpu) * 1e3, 1),
            "sims_cpu_ms_per_edit": round(statistics.median(sims_cpu) * 1e3, 1),
            "gc_ms_per_edit": [round(g / rounds * 1e3, 1) for g in gc_seconds],
            "bytes_per_sidecar_per_edit": 0,  # not counted across processes
            "rss_before_mb": round(rss_before / 2**20, 1),
            "rss_after_mb": round(rss_after / 2**20, 1),
            "mb_per_sidecar": round((rss_after - rss_before) / expected / 2**20, 3),
        }
    finally:
        for group in sim_procs:
            group.stop()
        for envoy in running:
            envoy.stop()
        for _proc, commands, _ in channels:
            commands.put(("stop", None))
        for proc, _, _ in channels:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def _mesh_sidecar(service: int, replica: str, address: str, mesh_port: int) -> Sidecar:
    name = f"svc-{service}"
    return Sidecar(
        node_id=f"{name}-{replica}",
        service=name,
        namespace="mesh",
        identity=f"spiffe://cluster.local/ns/mesh/sa/{name}",
        app_port=8080,
        inbound_port=15006,
        inbound_address=address,  # the pod IP: what other sidecars connect to
        mesh_port=mesh_port,
    )


async def one_resource_bytes(services: int, procs: int) -> dict[str, Any]:
    """Bytes a sidecar receives when exactly one of its resources changes, SotW vs Delta."""
    workdir = Path(tempfile.mkdtemp(prefix="mg-bench-mesh-"))
    (workdir / "policies").mkdir()
    plane = ControlPlane(
        ControlPlaneConfig(
            policy_paths=(str(workdir / "policies"),),
            xds_port=0,
            admin_port=0,
            identity=IdentityConfig(directory=str(workdir / "identity"), xds_tls=False),
        )
    )
    await plane.start()
    assert plane.identity is not None
    target = f"127.0.0.1:{plane.xds_port}"
    procs_: SimProcesses | None = None
    extra = None
    try:
        specs: list[SimSpec] = []
        for s in range(services):
            for k, delta in enumerate((False, True)):
                sidecar = _mesh_sidecar(s, "delta" if delta else "sotw", f"10.0.{s}.{k + 1}", 15001)
                token = plane.identity.tokens.issue(sidecar.node_id, sidecar.identity)
                specs.append(
                    (sidecar.node_id, sidecar.to_metadata(), [(TOKEN_METADATA, token)], delta)
                )
        procs_ = SimProcesses(target, specs, procs)
        await asyncio.to_thread(procs_.wait_started)  # off the control plane's loop
        await _all_synced(plane, len(specs), timeout=300)
        before = {n.node_id: n for n in plane.sync_status.nodes()}

        # One more replica of svc-0: its ClusterLoadAssignment changes everywhere else.
        from bench.lib.simclient import SimulatedSidecar

        sidecar = _mesh_sidecar(0, "extra", "10.0.0.3", 15001)
        token = plane.identity.tokens.issue(sidecar.node_id, sidecar.identity)
        extra = SimulatedSidecar(
            target,
            sidecar.node_id,
            record=False,
            metadata=sidecar.to_metadata(),
            call_metadata=[(TOKEN_METADATA, token)],
        )
        await extra.start()
        await _all_synced(plane, len(specs) + 1, timeout=60)
        after = {n.node_id: n for n in plane.sync_status.nodes()}

        per_kind: dict[StreamKind, list[int]] = {StreamKind.SOTW: [], StreamKind.DELTA: []}
        per_type: dict[StreamKind, dict[str, int]] = {StreamKind.SOTW: {}, StreamKind.DELTA: {}}
        held: dict[str, int] = {}
        for node_id, node in before.items():
            if node.node_id.startswith("svc-0-"):
                continue  # a service never holds a cluster of itself: nothing changed there
            total = 0
            for type_url, ts in after[node_id].types.items():
                old = node.types.get(type_url)
                diff = ts.bytes_sent - (old.bytes_sent if old else 0)
                total += diff
                if diff:
                    name = rt.short_name(type_url)
                    per_type[node.kind][name] = per_type[node.kind].get(name, 0) + diff
            per_kind[node.kind].append(total)
        snap = plane.cache.get("svc-1-sotw")
        assert snap is not None
        for type_url in snap.type_urls():
            held[rt.short_name(type_url)] = len(snap.resources(type_url))
        sotw, delta = per_kind[StreamKind.SOTW], per_kind[StreamKind.DELTA]
        return {
            "services": services,
            "sidecars": len(specs) + 1,
            "resources_per_sidecar": held,
            "sotw_bytes_per_sidecar": round(statistics.mean(sotw)),
            "delta_bytes_per_sidecar": round(statistics.mean(delta)),
            "delta_over_sotw": round(statistics.mean(delta) / statistics.mean(sotw), 4),
            "sotw_bytes_by_type": {k: v // len(sotw) for k, v in per_type[StreamKind.SOTW].items()},
            "delta_bytes_by_type": {
                k: v // len(delta) for k, v in per_type[StreamKind.DELTA].items()
            },
        }
    finally:
        if extra is not None:
            await extra.close()
        if procs_ is not None:
            procs_.stop()
        await plane.stop(grace=0)
        shutil.rmtree(workdir, ignore_errors=True)


def _phase(args: argparse.Namespace, phase: str, services: str = "0") -> dict[str, Any]:
    """Run one measurement in a fresh process, so one's memory does not blur the next's."""
    import subprocess

    command = [
        sys.executable,
        __file__,
        "--phase",
        phase,
        "--sims",
        str(args.sims),
        "--envoys",
        str(args.envoys),
        "--procs",
        str(args.procs),
        "--rounds",
        str(args.rounds),
        "--services",
        services,
        "--replicas",
        str(args.replicas),
    ]
    out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sims", type=int, default=1000)
    parser.add_argument("--envoys", type=int, default=2, help="real Envoy sidecars")
    parser.add_argument("--procs", type=int, default=2, help="processes for the simulated ones")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--services", default="50,200", help="mesh sizes for the bytes test (comma-separated)"
    )
    parser.add_argument(
        "--replicas", type=int, default=1, help="control planes, each in its own process"
    )
    parser.add_argument("--skip-bytes", action="store_true")
    parser.add_argument("--phase", choices=("sotw", "delta", "bytes"), help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.phase == "bytes":
        print(json.dumps(asyncio.run(one_resource_bytes(int(args.services), args.procs))))
        return 0
    if args.phase is not None:
        delta = args.phase == "delta"
        if args.replicas > 1:
            result = asyncio.run(
                converge_replicas(
                    args.sims, args.envoys, args.procs, args.rounds, delta, args.replicas
                )
            )
        else:
            result = asyncio.run(converge(args.sims, args.envoys, args.procs, args.rounds, delta))
        print(json.dumps(result))
        return 0
    runs = [_phase(args, "sotw"), _phase(args, "delta")]
    print(
        f"{'stream':>6} {'sidecars':>8} {'p50 ms':>7} {'p99 ms':>7} {'last p50':>9} "
        f"{'last p99':>9} {'rebuild':>8} {'CP CPU':>7} {'B/sidecar':>10} {'MB/sidecar':>11}"
    )
    for r in runs:
        print(
            f"{r['stream']:>6} {r['sidecars']:>8} {r['p50_ms']:>7} {r['p99_ms']:>7} "
            f"{r['last_ack_p50_ms']:>9} {r['last_ack_p99_ms']:>9} {r['rebuild_ms']:>8} "
            f"{r['cpu_ms_per_edit']:>7} "
            f"{r['bytes_per_sidecar_per_edit']:>10} {r['mb_per_sidecar']:>11}"
        )
    results: dict[str, Any] = {"convergence": runs}
    if not args.skip_bytes:
        results["one_resource"] = []
        for services in args.services.split(","):
            mesh = _phase(args, "bytes", services=services)
            results["one_resource"].append(mesh)
            print(
                f"one changed resource, {mesh['services']} services: SotW "
                f"{mesh['sotw_bytes_per_sidecar']} B/sidecar, Delta "
                f"{mesh['delta_bytes_per_sidecar']} B/sidecar = "
                f"{mesh['delta_over_sotw']:.2%} of SotW"
            )
    print(json.dumps(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
