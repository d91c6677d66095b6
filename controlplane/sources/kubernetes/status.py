"""Policy status: ``Accepted`` and ``Programmed`` conditions, written by the Lease holder."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from controlplane.api import Policy
from controlplane.compile import targets
from controlplane.crdgen import NAMES
from controlplane.inventory import Sidecar
from controlplane.sources.kubernetes.lease import _now
from controlplane.sources.kubernetes.watch import (
    GROUP,
    SOURCE,
    VERSION,
    KubernetesSource,
    ObservedPolicy,
)
from controlplane.store import ACCEPTED, PolicyKey

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Condition:
    type: str
    status: str  # "True" | "False"
    reason: str
    message: str


def _strip_subject(error: str, key: PolicyKey) -> str:
    kind, namespace, name = key
    head = f"{SOURCE} {kind} {namespace}/{name}: "
    return error[len(head) :] if error.startswith(head) else error


class StatusWriter:
    """Computes each policy's conditions and, while leader, writes the ones that changed."""

    def __init__(
        self,
        api_client: Any,
        source: KubernetesSource,
        is_leader: Callable[[], bool],
        programmed: Callable[[PolicyKey], Mapping[str, bool]],
        sidecars: Callable[[], tuple[Sidecar, ...]],
        clock: Callable[[], dt.datetime] = _now,
    ) -> None:
        from kubernetes import client

        self.api = client.CustomObjectsApi(api_client)
        self.source = source
        self.is_leader = is_leader
        # policy → (node id → serves a snapshot with the policy's current version)
        self.programmed = programmed
        self.sidecars = sidecars
        self.clock = clock
        self._written: dict[PolicyKey, dict[str, Any]] = {}
        self.writes = 0
        # More conditions of a policy from other boxes (e.g. an ExtractionPolicy's
        # Calibrated, from the extraction monitor), after Accepted and Programmed.
        self.extra_conditions: Callable[[PolicyKey], list[Condition]] = lambda key: []

    def desired(self) -> dict[PolicyKey, dict[str, Any]]:
        """The status every observed policy should have (lastTransitionTime kept when a
        condition's status did not change)."""
        store = self.source.store
        statuses = {s.key: s for s in store.statuses()}
        serving: dict[PolicyKey, Policy] = {
            (p.kind, p.metadata.namespace, p.metadata.name): p for p in store.current().policies
        }
        sidecars = self.sidecars()
        out = {}
        for key, seen in self.source.observed().items():
            status = statuses.get(key)
            if status is None:
                # Observed, not yet through the store: saying Accepted now could be a lie.
                continue
            conditions = []
            if status.state == ACCEPTED:
                conditions.append(Condition("Accepted", "True", "Accepted", "valid"))
            else:
                errors = "; ".join(_strip_subject(e, key) for e in status.errors)
                if status.serving:
                    errors += " (the last accepted version keeps serving)"
                conditions.append(Condition("Accepted", "False", "Invalid", errors))
            policy = serving.get(key)
            targeted = [s for s in sidecars if policy is not None and targets(policy, s)]
            programmed = self.programmed(key) if targeted else {}
            done = sum(1 for s in targeted if programmed.get(s.node_id, False))
            accepted = conditions[0].status == "True"
            if not accepted:
                programmed_condition = Condition(
                    "Programmed", "False", "Invalid", "the current generation is not valid"
                )
            elif not targeted:
                message = "no sidecar targeted"
                ref = policy.spec.target_ref if policy is not None else None
                if (
                    ref is not None
                    and ref.service
                    and not self.source.cluster.has_service(key[1], ref.service)
                ):
                    message += f"; Service {key[1]}/{ref.service} not found"
                programmed_condition = Condition("Programmed", "False", "NoSidecars", message)
            else:
                programmed_condition = Condition(
                    "Programmed",
                    "True" if done == len(targeted) else "False",
                    "Programmed" if done == len(targeted) else "Pending",
                    f"{done} of {len(targeted)} targeted sidecars ACKed",
                )
            conditions.append(programmed_condition)
            if accepted:
                conditions += self.extra_conditions(key)
            out[key] = self._status(seen, conditions, done, len(targeted))
        return out

    def _status(
        self, seen: ObservedPolicy, conditions: list[Condition], done: int, targeted: int
    ) -> dict[str, Any]:
        before = {c.get("type"): c for c in seen.status.get("conditions") or []}
        now = self.clock().replace(microsecond=0).isoformat().replace("+00:00", "Z")
        rendered = []
        for c in conditions:
            old = before.get(c.type) or {}
            since = old.get("lastTransitionTime") if old.get("status") == c.status else None
            rendered.append(
                {
                    "type": c.type,
                    "status": c.status,
                    "observedGeneration": seen.generation,
                    "lastTransitionTime": since or now,
                    "reason": c.reason,
                    "message": c.message[:32768],
                }
            )
        return {
            "observedGeneration": seen.generation,
            "targetedSidecars": targeted,
            "programmedSidecars": done,
            "conditions": rendered,
        }

    def changes(self) -> list[tuple[PolicyKey, dict[str, Any]]]:
        """Statuses that differ from what the object has and from what was last written."""
        observed = self.source.observed()
        out = []
        for key, status in self.desired().items():
            if status == dict(observed[key].status) or status == self._written.get(key):
                continue
            out.append((key, status))
        return out

    def write(self, changes: list[tuple[PolicyKey, dict[str, Any]]]) -> None:
        from kubernetes.client.exceptions import ApiException

        for key, status in changes:
            if not self.is_leader():
                return
            kind, namespace, name = key
            try:
                self.api.patch_namespaced_custom_object_status(
                    GROUP,
                    VERSION,
                    namespace,
                    NAMES[kind].plural,
                    name,
                    {"status": status},
                    _content_type="application/merge-patch+json",
                    _request_timeout=(5, 10),
                )
            except ApiException as err:
                if err.status != 404:  # deleted meanwhile: nothing to report on
                    log.warning("status of %s %s/%s: %s", kind, namespace, name, err.reason)
                continue
            self._written[key] = status
            self.writes += 1

    async def run(self, stop: asyncio.Event, interval: float = 0.5) -> None:
        """Recompute on the loop (where sync status lives), write from a thread."""
        while not stop.is_set():
            try:
                if self.is_leader():
                    changes = self.changes()
                    if changes:
                        await asyncio.to_thread(self.write, changes)
                else:
                    self._written.clear()  # a new leader must not trust another's writes
            except Exception:
                log.exception("status write failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


class ProgramTracker:
    """Which sidecars serve (ACKed) a snapshot that includes a policy's current version.

    Recompiling to compare IRs would need every input of the pipeline (telemetry, mesh,
    verdicts); revisions need none. The store revision a policy version entered with is
    recorded from the store; the pipeline records the revision each rebuild compiled.
    """

    def __init__(self, plane: Any) -> None:
        self.plane = plane
        self._applied: dict[PolicyKey, tuple[int, str]] = {}
        self._lock = threading.Lock()
        plane.store.subscribe(self._on_policies)
        self._on_policies(plane.store.current())

    def _on_policies(self, policy_set: Any) -> None:
        with self._lock:
            for policy in policy_set.policies:
                key = (policy.kind, policy.metadata.namespace, policy.metadata.name)
                fingerprint = policy.spec.model_dump_json(by_alias=True)
                if self._applied.get(key, (0, ""))[1] != fingerprint:
                    self._applied[key] = (policy_set.revision, fingerprint)

    def nodes(self, key: PolicyKey) -> dict[str, bool]:
        """Node id → whether it has ACKed a snapshot compiled with ``key``'s current version."""
        with self._lock:
            needed = self._applied.get(key, (None, ""))[0]
        compiled = needed is not None and self.plane.pipeline.compiled_revision >= needed
        plane, out = self.plane, {}
        for sidecar in plane.inventory.snapshot():
            node = sidecar.node_id
            snapshot = plane.cache.get(node)
            out[node] = bool(
                compiled
                and snapshot is not None
                and plane.pipeline.ir(node) is not None
                and node not in plane.pipeline.errors
                and plane.sync_status.is_synced(node, snapshot.version)
            )
        return out
