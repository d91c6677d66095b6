"""The push pipeline: store + inventory → compile → translate → snapshot cache.

Changes are debounced and coalesced (quiet period, bounded by a maximum delay) so a burst
of edits or of sidecars connecting costs one rebuild. A sidecar whose IR did not change is
not translated again; a snapshot whose content did not change is not pushed.

Compile and translate run in a worker thread, off the event loop that serves ADS and the
admin API: a policy set near the size limits takes seconds to compile, and on the loop
(even in 50 ms slices between sidecars) one big sidecar alone stalled every stream for as
long as it took. bench/rebuild_stall.py measures what the loop still sees (BENCHMARKS.md).
A thread rather than a process: with a core free, the loop waits for the GIL a switch
interval (5 ms) per wake-up; a process would have to pickle the policies in and every
snapshot and IR back out, onto the loop. What still stops the loop is a full garbage
collection (it stops every thread, and would stop the loop in either design).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import MappingProxyType

from controlplane.api import Policy
from controlplane.compile import compile_sidecar
from controlplane.compile.mesh import MeshInputs
from controlplane.extraction.hardened import Hardened
from controlplane.extraction.verdicts import Enforcement
from controlplane.inventory import Inventory, Sidecar
from controlplane.ir import SidecarIR, evolve
from controlplane.shapes import ShapeCache
from controlplane.store import PolicyStore
from controlplane.telemetry.settings import TelemetrySettings
from controlplane.translate import translate
from controlplane.xds.cache import SnapshotCache
from controlplane.xds.snapshot import InconsistentSnapshot, Snapshot

log = logging.getLogger(__name__)

# The longest a finished sidecar waits in the worker before it is handed to the loop to be
# published (seconds): pushes go out while the rest of a long rebuild compiles.
PUBLISH_INTERVAL = 0.05


class Debouncer:
    """Calls ``action`` once things have been quiet for ``quiet`` s, at most ``max_delay`` late.

    ``trigger`` may be called from any thread. An ``action`` that returns an awaitable runs
    as a task, never two at once: what is triggered meanwhile runs once it has finished.
    """

    def __init__(
        self,
        action: Callable[[], Awaitable[None] | None],
        loop: asyncio.AbstractEventLoop,
        quiet: float = 0.1,
        max_delay: float = 1.0,
    ) -> None:
        self._action, self._loop = action, loop
        self.quiet, self.max_delay = quiet, max_delay
        self._first: float | None = None
        self._last = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._running: asyncio.Future[None] | None = None
        self._again = False

    def trigger(self) -> None:
        self._loop.call_soon_threadsafe(self._on_event)

    def _on_event(self) -> None:
        now = time.monotonic()
        self._last = now
        if self._first is None:
            self._first = now
        self._schedule()

    def _schedule(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        assert self._first is not None
        due = min(self._last + self.quiet, self._first + self.max_delay)
        self._handle = self._loop.call_at(
            self._loop.time() + max(0.0, due - time.monotonic()), self._fire
        )

    def _fire(self) -> None:
        self._first, self._handle = None, None
        if self._running is not None:
            self._again = True
            return
        try:
            result = self._action()
        except Exception:
            log.exception("rebuild failed; sidecars keep their last snapshot")
            return
        if result is not None:
            self._running = asyncio.ensure_future(result, loop=self._loop)
            self._running.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Future[None]) -> None:
        self._running = None
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "rebuild failed; sidecars keep their last snapshot", exc_info=task.exception()
            )
        if self._again:
            self._again = False
            self._fire()


class _Replicas:
    """Within one rebuild, replicas — sidecars that differ only in their node id — compile to
    the same IR but for their node id and certificate: one is compiled, the others copy it.

    Trusted only once a second replica, compiled in full, equals the copy made for it; so a
    compile module that reads anything else of a sidecar's node id costs speed, not
    correctness.
    """

    def __init__(self, mesh: MeshInputs | None) -> None:
        self._mesh = mesh
        self._first: dict[tuple[Sidecar, bool], SidecarIR] = {}
        self._trusted: dict[tuple[Sidecar, bool], bool] = {}

    def _key(self, sidecar: Sidecar) -> tuple[Sidecar, bool]:
        certified = self._mesh is not None and sidecar.node_id in self._mesh.certificates
        return evolve(sidecar, node_id=""), certified

    def _copy(self, ir: SidecarIR, node_id: str) -> SidecarIR:
        if ir.mtls is not None and self._mesh is not None:
            cert = self._mesh.certificates[node_id]
            return evolve(ir, node_id=node_id, mtls=evolve(ir.mtls, certificate=cert))
        return evolve(ir, node_id=node_id)

    def ir(self, sidecar: Sidecar) -> SidecarIR | None:
        """The sidecar's IR copied from a replica's, or None: compile it, then ``compiled``."""
        key = self._key(sidecar)
        if self._trusted.get(key):
            return self._copy(self._first[key], sidecar.node_id)
        return None

    def compiled(self, sidecar: Sidecar, ir: SidecarIR) -> None:
        key = self._key(sidecar)
        first = self._first.get(key)
        if first is None:
            self._first[key] = ir
        elif key not in self._trusted:
            self._trusted[key] = self._copy(first, sidecar.node_id) == ir
            if not self._trusted[key]:
                log.warning("replicas of %s compile differently: compiled one by one", ir.service)


class _Comparer:
    """``a == b`` for IRs, field by field, each distinct pair of field values compared once
    per rebuild: replicas' IRs share their field values, so a thousand comparisons of
    replicas cost one deep comparison and a thousand identity checks."""

    _FIELDS = tuple(f.name for f in dataclasses.fields(SidecarIR))

    def __init__(self) -> None:
        self._memo: dict[tuple[int, int], bool] = {}

    def same(self, a: SidecarIR, b: SidecarIR) -> bool:
        for name in self._FIELDS:
            x, y = getattr(a, name), getattr(b, name)
            if x is y:
                continue
            key = (id(x), id(y))  # both objects outlive the rebuild: their ids are stable
            equal = self._memo.get(key)
            if equal is None:
                equal = self._memo[key] = bool(x == y)
            if not equal:
                return False
        return True


@dataclass(frozen=True)
class Rebuild:
    """What one rebuild did, for observers (telemetry, Kubernetes status)."""

    revision: int  # the store revision it compiled
    sidecars: int
    changed: tuple[str, ...]  # nodes that got a new snapshot
    started_ns: int  # wall clock, time.time_ns()
    seconds: float


@dataclass(frozen=True)
class _Inputs:
    """Everything one rebuild compiles from, taken at its start on the event loop.

    Frozen values or private copies only (a PolicySet is never mutated, the store replaces
    it; sidecars, verdicts and mesh inputs are fresh tuples and dicts): the worker reads
    them while the store, the inventory and the verdicts go on changing, and every sidecar
    the rebuild configures is compiled from the same inputs.
    """

    revision: int
    policies: tuple[Policy, ...]
    sidecars: tuple[Sidecar, ...]
    mesh: MeshInputs | None
    verdicts: tuple[Enforcement, ...]
    hardened: tuple[Hardened, ...]
    telemetry: TelemetrySettings | None
    xff_num_trusted_hops: int
    previous: Mapping[str, SidecarIR]  # the IR each sidecar's snapshot was made from


@dataclass(frozen=True)
class _Outcome:
    """One sidecar's result: a new IR and its snapshot, or why it keeps its last one."""

    node_id: str
    ir: SidecarIR | None
    snapshot: Snapshot | None
    error: str | None = None


class _Superseded(Exception):
    """A newer rebuild (or shutdown) took over: this one publishes nothing more."""


@dataclass
class Pipeline:
    store: PolicyStore
    inventory: Inventory
    cache: SnapshotCache
    # The last IR each sidecar was translated from: an unchanged IR is not translated again.
    _irs: dict[str, SidecarIR] = field(default_factory=dict)
    rebuilds: int = 0
    last_rebuild_seconds: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)  # node id → why its snapshot is old
    telemetry: TelemetrySettings | None = None  # what every sidecar records
    xff_num_trusted_hops: int = 0  # X-Forwarded-For hops every sidecar believes
    # Certificates, API-key digests and mesh services from the identity box (None: no CA).
    mesh_inputs: Callable[[tuple[Sidecar, ...]], MeshInputs] | None = None
    # Quarantines and throttles in force (the extraction monitor's verdicts).
    verdicts: Callable[[], Sequence[Enforcement]] | None = None
    # Clients answered with a stricter output tier (the extraction-risk estimate's onRisk).
    hardened: Callable[[], Sequence[Hardened]] | None = None
    # The store revision the last finished rebuild compiled: every sidecar's snapshot
    # reflects at least this revision once it has ACKed it.
    compiled_revision: int = -1
    observers: list[Callable[[Rebuild], None]] = field(default_factory=list)
    # Replicas of a Deployment share one translation, filled in per sidecar. Used by one
    # rebuild at a time (the worker's), never by the event loop.
    shapes: ShapeCache = field(default_factory=lambda: ShapeCache(translate))
    # How a sidecar is compiled (a seam for tests that pace the worker).
    compile: Callable[..., SidecarIR] = field(default_factory=lambda: compile_sidecar)
    _generation: int = 0  # rebuilds started: a newer one supersedes a running one
    _worker: ThreadPoolExecutor | None = None
    _lock: asyncio.Lock | None = None

    def rebuild(self) -> None:
        """One rebuild, here and now, in the caller's thread (tests, tools)."""
        self._generation += 1
        generation, started = self._generation, _started()
        inputs = self._inputs()
        outcomes = self._compute(inputs, generation, lambda _chunk: None, batch=0)
        changed = self._publish(outcomes)
        self._finish(inputs, changed, started)

    async def rebuild_async(self, batch: int = 64) -> None:
        """``rebuild`` with compile and translate in a worker thread, off the event loop:
        however big the policies, ADS and the admin API keep answering meanwhile.

        Results come back to the loop in chunks (every ``batch`` changed sidecars, or every
        PUBLISH_INTERVAL s) and are published there, so the first sidecars' pushes and ACKs
        overlap the compiling of the others. Each sidecar gets one snapshot, whole and
        consistent, compiled from the inputs taken when the rebuild started; one whose
        compile fails keeps its last good snapshot. Rebuilds run one at a time: one that
        starts while another runs supersedes it (the running one stops at its next
        sidecar and publishes nothing more; the newer one, on newer inputs, covers all).
        """
        self._generation += 1
        generation = self._generation
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._generation != generation:
                log.debug("rebuild superseded before it started")
                return
            loop = asyncio.get_running_loop()
            if self._worker is None:
                self._worker = ThreadPoolExecutor(1, thread_name_prefix="rebuild")
            started = _started()
            inputs = self._inputs()
            changed: list[str] = []

            def hand_over(chunk: list[_Outcome]) -> None:  # in the worker
                loop.call_soon_threadsafe(publish, chunk)

            def publish(chunk: list[_Outcome]) -> None:  # on the loop
                if self._generation == generation:
                    changed.extend(self._publish(chunk))

            try:
                last = await loop.run_in_executor(
                    self._worker, self._compute, inputs, generation, hand_over, batch
                )
            except _Superseded:
                log.debug("rebuild superseded by a newer one")
                return
            # Chunks handed over earlier were queued on the loop before this resumed.
            publish(last)
            if self._generation == generation:
                self._finish(inputs, changed, started)

    def close(self) -> None:
        """Stop a running rebuild at its next sidecar and release the worker thread."""
        self._generation += 1
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)
            self._worker = None

    def _inputs(self) -> _Inputs:
        policy_set = self.store.current()
        sidecars = self.inventory.snapshot()
        live = {s.node_id for s in sidecars}
        for node_id in [n for n in self._irs if n not in live]:
            del self._irs[node_id]
            self.errors.pop(node_id, None)
            self.cache.clear(node_id)
        return _Inputs(
            revision=policy_set.revision,
            policies=policy_set.policies,
            sidecars=sidecars,
            mesh=self.mesh_inputs(sidecars) if self.mesh_inputs is not None else None,
            verdicts=tuple(self.verdicts()) if self.verdicts is not None else (),
            hardened=tuple(self.hardened()) if self.hardened is not None else (),
            telemetry=self.telemetry,
            xff_num_trusted_hops=self.xff_num_trusted_hops,
            previous=MappingProxyType(dict(self._irs)),
        )

    def _compute(
        self,
        inputs: _Inputs,
        generation: int,
        hand_over: Callable[[list[_Outcome]], None],
        batch: int,
    ) -> list[_Outcome]:
        """Compile and translate every sidecar whose IR changed (in the worker thread).

        Reads only ``inputs`` and the shape cache; hands finished chunks to ``hand_over``
        and returns the rest. Raises _Superseded once a newer rebuild has started.
        """
        chunk: list[_Outcome] = []
        self.shapes.begin()
        replicas = _Replicas(inputs.mesh)
        same_ir = _Comparer().same
        handed = time.perf_counter()
        for sidecar in inputs.sidecars:
            if self._generation != generation:
                raise _Superseded
            outcome = self._outcome(sidecar, inputs, replicas, same_ir)
            if outcome is not None:
                chunk.append(outcome)
            if chunk and batch and (
                len(chunk) >= batch or time.perf_counter() - handed > PUBLISH_INTERVAL
            ):
                hand_over(chunk)
                chunk, handed = [], time.perf_counter()
        self.shapes.end()
        return chunk

    def _outcome(
        self,
        sidecar: Sidecar,
        inputs: _Inputs,
        replicas: _Replicas,
        same_ir: Callable[[SidecarIR, SidecarIR], bool],
    ) -> _Outcome | None:
        """The sidecar's new IR and snapshot; None when its IR did not change."""
        try:
            ir = replicas.ir(sidecar)
            if ir is None:
                ir = self.compile(
                    sidecar,
                    inputs.policies,
                    telemetry=inputs.telemetry,
                    mesh=inputs.mesh,
                    verdicts=inputs.verdicts,
                    hardened=inputs.hardened,
                    xff_num_trusted_hops=inputs.xff_num_trusted_hops,
                )
                replicas.compiled(sidecar, ir)
            previous = inputs.previous.get(sidecar.node_id)
            if previous is not None and same_ir(previous, ir):
                return None
            return _Outcome(sidecar.node_id, ir, self.shapes.snapshot(ir))
        except InconsistentSnapshot as err:
            # A bug of ours, never the user's: keep serving the last good snapshot.
            log.error("snapshot for %s is inconsistent: %s", sidecar.node_id, err)
            return _Outcome(sidecar.node_id, None, None, str(err))
        except Exception as err:  # likewise: one sidecar's failure is not everyone's
            log.exception("compiling %s failed; it keeps its last snapshot", sidecar.node_id)
            return _Outcome(sidecar.node_id, None, None, f"compile failed: {err}")

    def _publish(self, outcomes: list[_Outcome]) -> list[str]:
        """Put outcomes in the snapshot cache (on the event loop); the nodes that changed."""
        changed = []
        for outcome in outcomes:
            node_id = outcome.node_id
            if outcome.snapshot is None or outcome.ir is None:
                self.errors[node_id] = outcome.error or "no snapshot"
                continue
            if self.inventory.get(node_id) is None:
                continue  # gone while it compiled: the next rebuild clears it
            self.errors.pop(node_id, None)
            self._irs[node_id] = outcome.ir
            if self.cache.set_snapshot(node_id, outcome.snapshot):
                changed.append(node_id)
        return changed

    def _finish(self, inputs: _Inputs, changed: list[str], started: tuple[float, int]) -> None:
        self.rebuilds += 1
        self.compiled_revision = inputs.revision
        self.last_rebuild_seconds = time.perf_counter() - started[0]
        log.debug(
            "rebuilt %d sidecars in %.1f ms", len(inputs.sidecars), self.last_rebuild_seconds * 1e3
        )
        done = Rebuild(
            inputs.revision, len(inputs.sidecars), tuple(changed), started[1],
            self.last_rebuild_seconds,
        )
        for observer in list(self.observers):
            try:
                observer(done)
            except Exception:  # an observer must never stop the pipeline
                log.exception("rebuild observer failed")

    def ir(self, node_id: str) -> SidecarIR | None:
        return self._irs.get(node_id)


def _started() -> tuple[float, int]:
    return time.perf_counter(), time.time_ns()
