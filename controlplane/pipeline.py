"""The push pipeline: store + inventory → compile → translate → snapshot cache.

Changes are debounced and coalesced (quiet period, bounded by a maximum delay) so a burst
of edits or of sidecars connecting costs one rebuild. A sidecar whose IR did not change is
not translated again; a snapshot whose content did not change is not pushed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from controlplane.compile import compile_sidecar
from controlplane.compile.mesh import MeshInputs
from controlplane.extraction.verdicts import Enforcement
from controlplane.inventory import Inventory, Sidecar
from controlplane.ir import SidecarIR
from controlplane.shapes import ShapeCache
from controlplane.store import PolicyStore
from controlplane.telemetry.settings import TelemetrySettings
from controlplane.translate import translate
from controlplane.xds.cache import SnapshotCache
from controlplane.xds.snapshot import InconsistentSnapshot

log = logging.getLogger(__name__)


class Debouncer:
    """Calls ``action`` once things have been quiet for ``quiet`` s, at most ``max_delay`` late.

    ``trigger`` may be called from any thread.
    """

    def __init__(
        self,
        action: Callable[[], None],
        loop: asyncio.AbstractEventLoop,
        quiet: float = 0.1,
        max_delay: float = 1.0,
    ) -> None:
        self._action, self._loop = action, loop
        self.quiet, self.max_delay = quiet, max_delay
        self._first: float | None = None
        self._last = 0.0
        self._handle: asyncio.TimerHandle | None = None

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
        try:
            self._action()
        except Exception:
            log.exception("rebuild failed; sidecars keep their last snapshot")


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
    # Certificates, API-key digests and mesh services from the identity box (None: no CA).
    mesh_inputs: Callable[[tuple[Sidecar, ...]], MeshInputs] | None = None
    # Quarantines and throttles in force (the extraction monitor's verdicts).
    verdicts: Callable[[], Sequence[Enforcement]] | None = None
    # The store revision the last finished rebuild compiled: every sidecar's snapshot
    # reflects at least this revision once it has ACKed it.
    compiled_revision: int = -1
    observers: list[Callable[[Rebuild], None]] = field(default_factory=list)
    # Replicas of a Deployment share one translation, filled in per sidecar.
    shapes: ShapeCache = field(default_factory=lambda: ShapeCache(translate))

    def rebuild(self) -> None:
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
        self.shapes.begin()
        for sidecar in sidecars:
            ir = compile_sidecar(
                sidecar, policies, telemetry=self.telemetry, mesh=mesh, verdicts=verdicts
            )
            if self._irs.get(sidecar.node_id) == ir:
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
