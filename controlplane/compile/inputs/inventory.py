"""Sidecar inventory: what each Envoy sidecar says about itself.

A sidecar describes itself in its bootstrap's node metadata (``modelguard bootstrap``
writes it). The xDS server records each node it sees here; compile reads it. In a
cluster, Pods and EndpointSlices correct it (``Inventory.correct_with``).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from controlplane.api.base import PolicyBase
from controlplane.api.common import TargetRef

# Keys of the node metadata Struct, under one namespace so they never clash with others'.
METADATA_KEY = "modelguard"


class InventoryError(ValueError):
    """Node metadata that does not describe a sidecar we can configure."""


@dataclass(frozen=True)
class Sidecar:
    """One sidecar, as its node metadata describes it."""

    node_id: str
    service: str
    namespace: str
    identity: str  # SPIFFE ID of the workload, spiffe://<td>/ns/<ns>/sa/<sa>
    app_port: int  # where the workload listens (behind the sidecar)
    inbound_port: int  # where the sidecar accepts traffic for the workload
    app_address: str = "127.0.0.1"
    inbound_address: str = "0.0.0.0"
    labels: tuple[tuple[str, str], ...] = ()
    # Where the sidecar captures the workload's outbound traffic (egress control); None:
    # the workload's outbound traffic does not pass through the sidecar.
    outbound_port: int | None = None
    # Where the workload reaches other mesh services over mTLS (Host: <service>.<namespace>);
    # None: no mesh listener.
    mesh_port: int | None = None

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    def to_metadata(self) -> dict[str, Any]:
        """The node metadata a bootstrap carries for this sidecar."""
        return {
            METADATA_KEY: {
                "service": self.service,
                "namespace": self.namespace,
                "identity": self.identity,
                "app_port": self.app_port,
                "app_address": self.app_address,
                "inbound_port": self.inbound_port,
                "inbound_address": self.inbound_address,
                "labels": dict(self.labels),
                **({"outbound_port": self.outbound_port} if self.outbound_port else {}),
                **({"mesh_port": self.mesh_port} if self.mesh_port else {}),
            }
        }

    @classmethod
    def from_metadata(cls, node_id: str, metadata: Mapping[str, Any]) -> Sidecar:
        """Parse node metadata (already converted from a protobuf Struct to a dict)."""
        if not node_id:
            raise InventoryError("node.id is empty")
        raw = metadata.get(METADATA_KEY)
        if not isinstance(raw, Mapping):
            raise InventoryError(f"node {node_id!r}: metadata.{METADATA_KEY} is missing")
        problems: list[str] = []

        def text(key: str, default: str | None = None) -> str:
            value = raw.get(key, default)
            if not isinstance(value, str) or not value:
                problems.append(f"metadata.{METADATA_KEY}.{key}: must be a non-empty string")
                return ""
            return value

        def port(key: str) -> int:
            value = raw.get(key)
            # Struct carries numbers as floats.
            if isinstance(value, bool) or not isinstance(value, int | float):
                problems.append(f"metadata.{METADATA_KEY}.{key}: must be a port number")
                return 0
            if value != int(value) or not 0 < int(value) < 65536:
                problems.append(f"metadata.{METADATA_KEY}.{key}: must be a port number")
                return 0
            return int(value)

        service = text("service")
        namespace = text("namespace", "default")
        identity = raw.get("identity") or f"spiffe://cluster.local/ns/{namespace}/sa/{service}"
        labels_raw = raw.get("labels") or {}
        if not isinstance(labels_raw, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels_raw.items()
        ):
            problems.append(f"metadata.{METADATA_KEY}.labels: must map strings to strings")
            labels_raw = {}
        sidecar = cls(
            node_id=node_id,
            service=service,
            namespace=namespace,
            identity=str(identity),
            app_port=port("app_port"),
            inbound_port=port("inbound_port"),
            app_address=text("app_address", "127.0.0.1"),
            inbound_address=text("inbound_address", "0.0.0.0"),
            labels=tuple(sorted(labels_raw.items())),
            outbound_port=port("outbound_port") if raw.get("outbound_port") is not None else None,
            mesh_port=port("mesh_port") if raw.get("mesh_port") is not None else None,
        )
        if problems:
            raise InventoryError(f"node {node_id!r}: " + "; ".join(problems))
        return sidecar


Listener = Callable[[], None]
# What a source that knows more than the sidecar (the cluster: its pod's live labels, the
# Services it backs) makes of what a sidecar announced. Must be cheap: it runs per sidecar.
Corrector = Callable[[Sidecar], Sidecar]


@dataclass
class Inventory:
    """The sidecars known now. Thread-safe; listeners hear of every change.

    Each sidecar is kept as it announced itself and as the ``corrector`` (if any) sees it;
    readers get the corrected one. A source re-corrects only the sidecars an event touched
    (``recorrect``), never all of them: at thousands of sidecars a rescan per Pod event
    or per connect was the control plane's largest cost.
    """

    _sidecars: dict[str, Sidecar] = field(default_factory=dict)
    _announced: dict[str, Sidecar] = field(default_factory=dict)
    _listeners: list[Listener] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _corrector: Corrector | None = None
    # The sorted tuple ``snapshot`` returns, kept until the next change: readers (compile,
    # status) ask far more often than sidecars change. Node ids are kept in order as they
    # come and go, so a change costs no sort of thousands of sidecars.
    _sorted: tuple[Sidecar, ...] | None = None
    _order: list[str] = field(default_factory=list)

    def observe(self, sidecar: Sidecar) -> None:
        with self._lock:
            self._announced[sidecar.node_id] = sidecar
            if not self._store(self._corrected(sidecar)):
                return
        self._notify()

    def forget(self, node_id: str) -> None:
        with self._lock:
            self._announced.pop(node_id, None)
            if self._sidecars.pop(node_id, None) is None:
                return
            del self._order[bisect.bisect_left(self._order, node_id)]
            self._sorted = None
        self._notify()

    def correct_with(self, corrector: Corrector | None) -> None:
        """Install the corrector and apply it to every sidecar known now."""
        with self._lock:
            self._corrector = corrector
        self.recorrect(list(self._announced))

    def recorrect(self, node_ids: Iterable[str]) -> int:
        """Apply the corrector again to these sidecars (the unknown are skipped); listeners
        hear once if any changed. Returns how many changed."""
        changed = 0
        with self._lock:
            for node_id in node_ids:
                announced = self._announced.get(node_id)
                if announced is not None and self._store(self._corrected(announced)):
                    changed += 1
        if changed:
            self._notify()
        return changed

    def _corrected(self, sidecar: Sidecar) -> Sidecar:
        return self._corrector(sidecar) if self._corrector is not None else sidecar

    def _store(self, sidecar: Sidecar) -> bool:
        """Keep ``sidecar`` (lock held); whether it differs from what was kept."""
        before = self._sidecars.get(sidecar.node_id)
        if before == sidecar:
            return False
        if before is None:
            bisect.insort(self._order, sidecar.node_id)
        self._sidecars[sidecar.node_id] = sidecar
        self._sorted = None
        return True

    def snapshot(self) -> tuple[Sidecar, ...]:
        with self._lock:
            if self._sorted is None:
                self._sorted = tuple(map(self._sidecars.__getitem__, self._order))
            return self._sorted

    def get(self, node_id: str) -> Sidecar | None:
        with self._lock:
            return self._sidecars.get(node_id)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _notify(self) -> None:
        for listener in list(self._listeners):
            listener()


def targets(policy: PolicyBase, sidecar: Sidecar) -> bool:
    """Whether a policy applies to a sidecar: same namespace, and service or labels match."""
    if policy.metadata.namespace != sidecar.namespace:
        return False
    # Every kind's spec has a targetRef (api/common.TargetRef); PolicyBase types no spec,
    # and importing the kinds here would tie the inventory to every kind's model.
    ref: TargetRef = getattr(policy, "spec").target_ref  # noqa: B009
    if ref.service is not None:
        return ref.service == sidecar.service
    if ref.selector is not None:
        labels = sidecar.label_map
        return all(labels.get(k) == v for k, v in ref.selector.match_labels.items())
    return False
