"""Policy status: ``Accepted`` and ``Programmed`` conditions, written by the Lease holder."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from controlplane.api import Policy
from controlplane.api.kinds import NAMES
from controlplane.compile.inputs.inventory import Sidecar, targets
from controlplane.compile.inputs.store import ACCEPTED, PolicyKey, PolicySet, PolicyStore
from controlplane.sources.kubernetes.lease import utc_now
from controlplane.sources.kubernetes.watch import (
    GROUP,
    SOURCE,
    VERSION,
    KubernetesSource,
    ObservedPolicy,
)

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


_Group = tuple[str, str, tuple[tuple[str, str], ...]]  # namespace, service, labels


class Workloads:
    """Sidecars grouped by what targeting reads (namespace, service, labels), so that which
    sidecars a policy targets is one ``targets`` call per group, not per sidecar.

    Kept up to date by comparing each inventory snapshot with the last by identity: a
    sidecar object that did not change is the same object (the inventory keeps it), so a
    pass over thousands of sidecars touches only the few that changed.
    """

    def __init__(self) -> None:
        self._last: tuple[Sidecar, ...] | None = None
        self._seen: dict[str, Sidecar] = {}
        self._groups: dict[_Group, dict[str, Sidecar]] = {}
        self._in_namespace: dict[str, set[_Group]] = {}
        # policy key → (the policy object it was judged for, group → targeted)
        self._judged: dict[PolicyKey, tuple[Policy, dict[_Group, bool]]] = {}

    @staticmethod
    def _group(sidecar: Sidecar) -> _Group:
        return (sidecar.namespace, sidecar.service, sidecar.labels)

    def update(self, sidecars: tuple[Sidecar, ...]) -> None:
        if sidecars is self._last:
            return
        self._last = sidecars
        for sidecar in sidecars:
            old = self._seen.get(sidecar.node_id)
            if old is sidecar:
                continue
            if old is not None:
                self._remove(old)
            self._add(sidecar)
        if len(self._seen) > len(sidecars):  # some left
            live = {s.node_id for s in sidecars}
            for node_id in [n for n in self._seen if n not in live]:
                self._remove(self._seen[node_id])

    def _add(self, sidecar: Sidecar) -> None:
        group = self._group(sidecar)
        self._seen[sidecar.node_id] = sidecar
        members = self._groups.get(group)
        if members is None:
            members = self._groups[group] = {}
            self._in_namespace.setdefault(sidecar.namespace, set()).add(group)
        members[sidecar.node_id] = sidecar

    def _remove(self, sidecar: Sidecar) -> None:
        group = self._group(sidecar)
        del self._seen[sidecar.node_id]
        members = self._groups.get(group)
        if members is None:
            return
        members.pop(sidecar.node_id, None)
        if not members:
            del self._groups[group]
            for _, verdicts in self._judged.values():  # a group gone is never asked again
                verdicts.pop(group, None)
            groups = self._in_namespace[sidecar.namespace]
            groups.discard(group)
            if not groups:
                del self._in_namespace[sidecar.namespace]

    def targeted(self, key: PolicyKey, policy: Policy) -> list[str]:
        """Node ids of the sidecars ``policy`` targets."""
        judged = self._judged.get(key)
        if judged is None or judged[0] is not policy:
            judged = self._judged[key] = (policy, {})
        verdicts = judged[1]
        out: list[str] = []
        for group in self._in_namespace.get(policy.metadata.namespace, ()):
            members = self._groups[group]
            hit = verdicts.get(group)
            if hit is None:
                hit = verdicts[group] = targets(policy, next(iter(members.values())))
            if hit:
                out.extend(members)
        return out

    def forget_policies(self, keep: Mapping[PolicyKey, Policy]) -> None:
        for key in [k for k in self._judged if k not in keep]:
            del self._judged[key]


class StatusWriter:
    """Computes each policy's conditions and, while leader, writes the ones that changed."""

    def __init__(
        self,
        api_client: Any,
        source: KubernetesSource,
        is_leader: Callable[[], bool],
        programmed: Callable[[PolicyKey], Mapping[str, bool]],
        sidecars: Callable[[], tuple[Sidecar, ...]],
        clock: Callable[[], dt.datetime] = utc_now,
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
        self._workloads = Workloads()

    def desired(self) -> dict[PolicyKey, dict[str, Any]]:
        """The status every observed policy should have (lastTransitionTime kept when a
        condition's status did not change)."""
        store = self.source.store
        statuses = {s.key: s for s in store.statuses()}
        serving: dict[PolicyKey, Policy] = {
            p.ref: p for p in store.current().policies
        }
        self._workloads.update(self.sidecars())
        self._workloads.forget_policies(serving)
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
            targeted = self._workloads.targeted(key, policy) if policy is not None else []
            programmed = self.programmed(key) if targeted else {}
            done = sum(1 for node_id in targeted if programmed.get(node_id, False))
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
        """Recompute on the loop (where sync status lives), write from a thread. A pass is
        incremental (``Workloads``, ``ProgramTracker``'s serving set): a few ms of CPU at
        5,000 sidecars, where a full rescan cost hundreds (bench/k8s_scale.py)."""
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


# What ``ProgramTracker`` reads of the pipeline, the sync status and the snapshot cache,
# as structural types: sources/ may not import the pipeline or xds/ (import-linter), and
# the tracker is handed the parts it reads, never the whole control plane.
class CompileProgress(Protocol):
    """The pipeline's side: what the last rebuild compiled, and for which nodes."""

    @property
    def compiled_revision(self) -> int: ...

    @property
    def errors(self) -> Mapping[str, str]: ...  # node id → why its snapshot is old

    def ir(self, node_id: str) -> object | None: ...


class SyncLog(Protocol):
    """The xDS sync status: which node ACKed which snapshot version, with a change log."""

    @property
    def changes(self) -> int: ...

    def touched_since(self, mark: int) -> set[str] | None: ...

    def synced_versions(self) -> Mapping[str, str | None]: ...

    def is_synced(self, node_id: str, snapshot_version: str | None = None) -> bool: ...


class _Versioned(Protocol):
    @property
    def version(self) -> str: ...


class SnapshotLog(Protocol):
    """The snapshot cache: each node's current snapshot, with a change log."""

    @property
    def generation(self) -> int: ...

    def touched_since(self, mark: int) -> set[str] | None: ...

    def get(self, node_id: str) -> _Versioned | None: ...


class ProgramTracker:
    """Which sidecars serve (ACKed) a snapshot that includes a policy's current version.

    Recompiling to compare IRs would need every input of the pipeline (telemetry, mesh,
    verdicts); revisions need none. The store revision a policy version entered with is
    recorded from the store; the pipeline records the revision each rebuild compiled.
    """

    def __init__(
        self,
        store: PolicyStore,
        pipeline: CompileProgress,
        sync_status: SyncLog,
        cache: SnapshotLog,
    ) -> None:
        self.pipeline = pipeline
        self.sync_status = sync_status
        self.cache = cache
        self._applied: dict[PolicyKey, tuple[int, str]] = {}
        self._lock = threading.Lock()
        # (change marks of the sync status and the cache, errors, serving nodes)
        self._serving_cache: (
            tuple[tuple[int, int], frozenset[str], frozenset[str]] | None
        ) = None
        self._serving_lock = threading.Lock()
        store.subscribe(self._on_policies)
        self._on_policies(store.current())

    def _on_policies(self, policy_set: PolicySet) -> None:
        with self._lock:
            for policy in policy_set.policies:
                key = policy.ref
                fingerprint = policy.spec.model_dump_json(by_alias=True)
                if self._applied.get(key, (0, ""))[1] != fingerprint:
                    self._applied[key] = (policy_set.revision, fingerprint)

    def nodes(self, key: PolicyKey) -> Mapping[str, bool]:
        """Node id → whether it has ACKed a snapshot compiled with ``key``'s current version
        (absent: it has not)."""
        return _Programmed(self.serving() if self.compiled(key) else frozenset())

    def compiled(self, key: PolicyKey) -> bool:
        """Whether the pipeline has compiled ``key``'s current version."""
        with self._lock:
            needed = self._applied.get(key, (None, ""))[0]
        return needed is not None and self.pipeline.compiled_revision >= needed

    def serving(self) -> frozenset[str]:
        """Sidecars that ACKed the snapshot the cache holds for them, which has no error:
        the part of ``nodes`` that is the same for every policy. Kept up to date from the
        nodes whose sync status or snapshot changed since the last call (their change
        logs), so a status pass costs what changed, not what is connected."""
        sync, cache = self.sync_status, self.cache
        with self._serving_lock:
            # Marks first: whatever changes while this runs is looked at again next time.
            marks = (sync.changes, cache.generation)
            errors = frozenset(self.pipeline.errors)
            cached = self._serving_cache
            if cached is not None and cached[1] == errors:
                if cached[0] == marks:
                    return cached[2]
                in_sync = sync.touched_since(cached[0][0])
                in_cache = cache.touched_since(cached[0][1])
                if in_sync is not None and in_cache is not None:
                    serving = set(cached[2])
                    for node in in_sync | in_cache:
                        if self._serves(node, errors):
                            serving.add(node)
                        else:
                            serving.discard(node)
                    result = frozenset(serving)
                    self._serving_cache = (marks, errors, result)
                    return result
            result = frozenset(n for n in sync.synced_versions() if self._serves(n, errors))
            self._serving_cache = (marks, errors, result)
            return result

    def _serves(self, node: str, errors: frozenset[str]) -> bool:
        snapshot = self.cache.get(node)
        return (
            snapshot is not None
            and self.sync_status.is_synced(node, snapshot.version)
            and node not in errors
            and self.pipeline.ir(node) is not None
        )


class _Programmed(Mapping[str, bool]):
    """``ProgramTracker.nodes``: the programmed sidecars as a mapping to True, without a
    dict of every sidecar per policy."""

    __slots__ = ("_nodes",)

    def __init__(self, nodes: frozenset[str]) -> None:
        self._nodes = nodes

    def __getitem__(self, node_id: str) -> bool:
        if node_id in self._nodes:
            return True
        raise KeyError(node_id)

    def get(self, node_id: str, default: Any = None) -> Any:
        return True if node_id in self._nodes else default

    def __iter__(self) -> Iterator[str]:
        return iter(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)
