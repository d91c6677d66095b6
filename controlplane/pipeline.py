"""The push pipeline: store + inventory → compile → translate → snapshot cache.

Changes are debounced and coalesced (quiet period, bounded by a maximum delay) so a burst
of edits or of sidecars connecting costs one rebuild. A sidecar whose IR did not change is
not translated again; a snapshot whose content did not change is not pushed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field

from controlplane.compile import compile_sidecar
from controlplane.compile.inputs.inventory import Inventory, Sidecar
from controlplane.compile.inputs.store import PolicyStore
from controlplane.compile.inputs.verdicts import Enforcement, Hardened
from controlplane.compile.mesh import MeshInputs
from controlplane.ir import SidecarIR, evolve
from controlplane.shapes import ShapeCache
from controlplane.telemetry.settings import TelemetrySettings
from controlplane.translate import translate
from controlplane.xds.cache import SnapshotCache
from controlplane.xds.snapshot import InconsistentSnapshot

log = logging.getLogger(__name__)

# The longest stretch a rebuild holds the event loop (seconds) before it lets others run.
REBUILD_SLICE = 0.05


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
    # Replicas of a Deployment share one translation, filled in per sidecar.
    shapes: ShapeCache = field(default_factory=lambda: ShapeCache(translate))
    _generation: int = 0  # rebuilds started: a newer one supersedes a suspended one

    def rebuild(self) -> None:
        for _ in self._rebuild(batch=0):
            pass

    async def rebuild_async(self, batch: int = 64) -> None:
        """``rebuild``, letting the event loop run every ``batch`` changed sidecars: their
        pushes go out, and their ACKs come back, while the others are still compiled.

        Superseded by any rebuild that starts meanwhile: it stops, the newer one covers all.
        """
        generation = self._generation + 1
        for _ in self._rebuild(batch):
            await asyncio.sleep(0)
            if self._generation != generation:
                log.debug("rebuild superseded by a newer one")
                return

    def _rebuild(self, batch: int) -> Iterator[None]:
        self._generation += 1
        started, started_ns = time.perf_counter(), time.time_ns()
        policy_set = self.store.current()
        policies = policy_set.policies
        changed: list[str] = []
        sidecars = self.inventory.snapshot()
        live = {s.node_id for s in sidecars}
        for node_id in [n for n in self._irs if n not in live]:
            del self._irs[node_id]
            self.errors.pop(node_id, None)
            self.cache.clear(node_id)
        mesh = self.mesh_inputs(sidecars) if self.mesh_inputs is not None else None
        verdicts = self.verdicts() if self.verdicts is not None else ()
        hardened = self.hardened() if self.hardened is not None else ()
        self.shapes.begin()
        replicas = _Replicas(mesh)
        same_ir = _Comparer().same
        sliced = time.perf_counter()
        for sidecar in sidecars:
            if batch and time.perf_counter() - sliced > REBUILD_SLICE:
                # Large policies (up to api.limits) take tens of ms per distinct sidecar:
                # let ADS and the admin API run between slices, not only every ``batch``.
                yield
                sliced = time.perf_counter()
            ir = replicas.ir(sidecar)
            if ir is None:
                ir = compile_sidecar(
                    sidecar,
                    policies,
                    telemetry=self.telemetry,
                    mesh=mesh,
                    verdicts=verdicts,
                    hardened=hardened,
                    xff_num_trusted_hops=self.xff_num_trusted_hops,
                )
                replicas.compiled(sidecar, ir)
            previous = self._irs.get(sidecar.node_id)
            if previous is not None and same_ir(previous, ir):
                continue
            try:
                snapshot = self.shapes.snapshot(ir)
            except InconsistentSnapshot as err:
                # A bug of ours, never the user's: keep serving the last good snapshot.
                log.error("snapshot for %s is inconsistent: %s", sidecar.node_id, err)
                self.errors[sidecar.node_id] = str(err)
                continue
            self.errors.pop(sidecar.node_id, None)
            self._irs[sidecar.node_id] = ir
            if self.cache.set_snapshot(sidecar.node_id, snapshot):
                changed.append(sidecar.node_id)
                if batch and len(changed) % batch == 0:
                    yield
                    sliced = time.perf_counter()
        self.shapes.end()
        self.rebuilds += 1
        self.compiled_revision = policy_set.revision
        self.last_rebuild_seconds = time.perf_counter() - started
        log.debug("rebuilt %d sidecars in %.1f ms", len(sidecars), self.last_rebuild_seconds * 1e3)
        done = Rebuild(
            policy_set.revision, len(sidecars), tuple(changed), started_ns,
            self.last_rebuild_seconds,
        )
        for observer in list(self.observers):
            try:
                observer(done)
            except Exception:  # an observer must never stop the pipeline
                log.exception("rebuild observer failed")

    def ir(self, node_id: str) -> SidecarIR | None:
        return self._irs.get(node_id)
