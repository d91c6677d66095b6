"""Sync status of every connected sidecar, per resource type — what ``istioctl proxy-status``
shows: SYNCED, STALE (sent, not yet ACKed), NACKED (rejected; the last ACKed version stays)
or NOT_SENT.

The ADS server writes here; the admin API, the CLI, tests and benchmarks read plain copies.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import enum
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from controlplane.xds import resources as rt


class State(enum.StrEnum):
    SYNCED = "SYNCED"
    STALE = "STALE"
    NACKED = "NACKED"
    NOT_SENT = "NOT_SENT"


class StreamKind(enum.StrEnum):
    SOTW = "SotW"
    DELTA = "Delta"


@dataclass(frozen=True)
class Nack:
    version: str  # the version that was rejected
    nonce: str
    message: str
    at: float  # time.time()


@dataclass
class TypeSync:
    """One resource type of one node's stream."""

    type_url: str
    target_version: str | None = None  # what the node should end up with, for its snapshot
    sent_version: str | None = None
    sent_nonce: str | None = None
    sent_at: float | None = None
    acked_version: str | None = None
    acked_nonce: str | None = None
    acked_at: float | None = None  # time.time() of the latest ACK
    last_nack: Nack | None = None
    responses: int = 0
    bytes_sent: int = 0

    @property
    def short_name(self) -> str:
        return rt.short_name(self.type_url)

    @property
    def state(self) -> State:
        if self.sent_nonce is None:
            return State.NOT_SENT
        if self.last_nack is not None and self.last_nack.nonce == self.sent_nonce:
            return State.NACKED
        if self.acked_nonce == self.sent_nonce and self.acked_version == self.target_version:
            return State.SYNCED
        return State.STALE


_WORST = (State.NACKED, State.STALE, State.NOT_SENT, State.SYNCED)


@dataclass
class NodeSync:
    """One connected node (its latest stream)."""

    node_id: str
    kind: StreamKind
    peer: str
    connected_at: float
    snapshot_version: str | None = None  # the snapshot the stream is working towards
    types: dict[str, TypeSync] = field(default_factory=dict)
    # Earlier streams of this node id that this one replaced: (peer, connected_at), newest
    # first, at most REPLACED_KEPT (a second stream with a connected node id is audited).
    replaced: list[tuple[str, float]] = field(default_factory=list)

    @property
    def state(self) -> State:
        """The worst state over its types; NOT_SENT before anything was tracked."""
        states = {t.state for t in self.types.values()}
        return next((s for s in _WORST if s in states), State.NOT_SENT)

    @property
    def synced(self) -> bool:
        return bool(self.types) and all(t.state is State.SYNCED for t in self.types.values())

    @property
    def synced_at(self) -> float | None:
        """When the node got in sync: the time of the ACK that completed its snapshot (the
        latest ACK of any type), or None while it is not SYNCED. Convergence figures read it."""
        if not self.synced:
            return None
        times = [t.acked_at for t in self.types.values() if t.acked_at is not None]
        return max(times) if times else None

    def type(self, type_url: str) -> TypeSync:
        ts = self.types.get(type_url)
        if ts is None:
            ts = self.types[type_url] = TypeSync(type_url)
        return ts


@dataclass
class TypeCounters:
    responses: int = 0
    acks: int = 0
    nacks: int = 0
    bytes_sent: int = 0


REPLACED_KEPT = 4


CHANGE_LOG = 1 << 15  # changes kept for readers (~3 MB): beyond, a reader computes afresh


def touched_since(log: collections.deque[tuple[int, str]], mark: int) -> set[str] | None:
    """Node ids in ``log`` (of (change number, node id)) after ``mark``; None if the log has
    dropped changes after ``mark``, or changed under a reader in another thread (then the
    reader computes afresh). Reads from the newest back to ``mark`` only."""
    out: set[str] = set()
    try:
        for number, node_id in reversed(log):
            if number <= mark:
                return out
            out.add(node_id)
    except RuntimeError:  # appended to meanwhile (the loop thread)
        return None
    # The whole log is newer than ``mark``: complete only if nothing was dropped.
    return out if len(log) < (log.maxlen or 0) or (log and log[0][0] == mark + 1) else None


class SyncStatus:
    """Registry of connected nodes. Written from the asyncio loop thread only."""

    def __init__(self) -> None:
        self._nodes: dict[str, NodeSync] = {}
        self._counters: dict[str, TypeCounters] = {}
        # Streams refused and requests ignored, by reason: junk is dropped, never silently.
        self._dropped: Counter[str] = Counter()
        self._changed = asyncio.Event()
        # Each waiter's set of nodes changed since it last looked: re-checking only those
        # keeps waiting for a thousand sidecars linear, not quadratic.
        self._waiters: list[set[str]] = []
        # Node id → the snapshot version it is SYNCED at, kept as each node changes: the
        # status writer asks about every sidecar twice a second, which must not mean
        # walking every node's types each time.
        self._synced_versions: dict[str, str | None] = {}
        self.changes = 0  # bumped on every change of any node: readers cache against it
        # (change number, node id) of the latest changes: a reader that computed something
        # over every node updates it from the nodes changed since, unless the log overflowed.
        self._log: collections.deque[tuple[int, str]] = collections.deque(maxlen=CHANGE_LOG)

    # -- written by the ADS server (each stream holds its own NodeSync) --

    def connect(self, node_id: str, kind: StreamKind, peer: str) -> NodeSync:
        node = NodeSync(node_id=node_id, kind=kind, peer=peer, connected_at=time.time())
        self._nodes[node_id] = node  # a reconnect replaces the older stream's entry
        self._touch(node_id)
        return node

    def replaced(self, node: NodeSync, previous: NodeSync) -> None:
        """``node``'s stream replaced ``previous`` (same node id): keep both in status."""
        node.replaced = [(previous.peer, previous.connected_at), *previous.replaced][
            :REPLACED_KEPT
        ]
        self._touch(node.node_id)

    def disconnect(self, node: NodeSync) -> None:
        if self._nodes.get(node.node_id) is node:
            del self._nodes[node.node_id]
            self._touch(node.node_id)

    def set_target(self, node: NodeSync, snapshot_version: str | None) -> None:
        if node.snapshot_version != snapshot_version:
            node.snapshot_version = snapshot_version
            self._touch(node.node_id)

    def set_type_target(self, node: NodeSync, type_url: str, version: str) -> None:
        ts = node.type(type_url)
        if ts.target_version != version:
            ts.target_version = version
            self._touch(node.node_id)

    def sent(self, node: NodeSync, type_url: str, version: str, nonce: str, nbytes: int) -> None:
        ts = node.type(type_url)
        ts.sent_version, ts.sent_nonce, ts.sent_at = version, nonce, time.time()
        ts.responses += 1
        ts.bytes_sent += nbytes
        c = self._counter(type_url)
        c.responses += 1
        c.bytes_sent += nbytes
        self._touch(node.node_id)

    def already_has(self, node: NodeSync, type_url: str, version: str) -> None:
        """The node reconnected already holding ``version``: nothing needed sending."""
        ts = node.type(type_url)
        ts.sent_version = ts.acked_version = version
        ts.sent_nonce = ts.acked_nonce = ""
        self._touch(node.node_id)

    def acked(self, node: NodeSync, type_url: str, version: str, nonce: str) -> None:
        ts = node.type(type_url)
        ts.acked_version, ts.acked_nonce, ts.acked_at = version, nonce, time.time()
        self._counter(type_url).acks += 1
        self._touch(node.node_id)

    def nacked(
        self, node: NodeSync, type_url: str, version: str, nonce: str, message: str
    ) -> None:
        node.type(type_url).last_nack = Nack(version, nonce, message, time.time())
        self._counter(type_url).nacks += 1
        self._touch(node.node_id)

    def dropped(self, reason: str) -> None:
        self._dropped[reason] += 1

    # -- read side --

    def drops(self) -> dict[str, int]:
        """Refused streams and ignored requests since start, by reason."""
        return dict(self._dropped)

    def nodes(self) -> list[NodeSync]:
        """Copies of every connected node's status, by node id."""
        return [copy.deepcopy(self._nodes[n]) for n in sorted(self._nodes)]

    def node(self, node_id: str) -> NodeSync | None:
        node = self._nodes.get(node_id)
        return copy.deepcopy(node) if node is not None else None

    def node_ids(self) -> list[str]:
        """Connected nodes, by id: ``[n.node_id for n in nodes()]`` without copying a
        thousand statuses."""
        return sorted(self._nodes)

    def synced_at(self, node_id: str) -> float | None:
        """``NodeSync.synced_at`` of a connected node, without copying its status."""
        node = self._nodes.get(node_id)
        return node.synced_at if node is not None else None

    def counters(self) -> dict[str, TypeCounters]:
        """Totals per type URL since start: responses, ACKs, NACKs, bytes sent."""
        return {t: copy.copy(c) for t, c in self._counters.items()}

    def is_synced(self, node_id: str, snapshot_version: str | None = None) -> bool:
        if node_id not in self._synced_versions:
            return False
        return snapshot_version is None or self._synced_versions[node_id] == snapshot_version

    def touched_since(self, mark: int) -> set[str] | None:
        """Nodes changed after change number ``mark`` (``changes`` when a reader looked),
        or None when the log no longer reaches back that far. Safe from another thread."""
        return touched_since(self._log, mark)

    def synced_versions(self) -> dict[str, str | None]:
        """Node id → snapshot version, of every SYNCED node. A copy, safe to take from
        another thread (one C-level dict copy under the GIL)."""
        return self._synced_versions.copy()

    async def wait_synced(
        self,
        node_ids: Iterable[str] | None = None,
        snapshot_versions: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        gone_is_done: bool = False,
    ) -> None:
        """Wait until every given node (default: the keys of ``snapshot_versions``, else every
        connected node) is connected and SYNCED on all its types — at the given snapshot
        version where one is given. Raises TimeoutError naming the nodes still behind.

        ``gone_is_done``: a node that disconnects stops being waited for (a push to the
        sidecars connected now: one that leaves is not behind, and gets the newest snapshot
        when it comes back). Otherwise a node not yet connected is waited for."""
        versions = dict(snapshot_versions or {})
        if node_ids is not None:
            pending = set(node_ids)
        elif versions:
            pending = set(versions)
        else:
            pending = set(self._nodes)

        dirty = set(pending)

        async def until_synced() -> None:
            while True:
                check = dirty & pending
                dirty.clear()
                pending.difference_update(
                    [
                        n
                        for n in check
                        if self.is_synced(n, versions.get(n))
                        or (gone_is_done and n not in self._nodes)
                    ]
                )
                if not pending:
                    return
                await self._changed.wait()

        self._waiters.append(dirty)
        try:
            await asyncio.wait_for(until_synced(), timeout)
        except TimeoutError:
            detail = ", ".join(
                f"{n}={self._nodes[n].state if n in self._nodes else 'DISCONNECTED'}"
                for n in sorted(pending)[:20]
            )
            raise TimeoutError(f"{len(pending)} node(s) not synced: {detail}") from None
        finally:
            # By identity: list.remove compares sets by value and would take another
            # waiter's equal (say, empty) set, which then stops seeing changes.
            self._waiters = [w for w in self._waiters if w is not dirty]

    def _counter(self, type_url: str) -> TypeCounters:
        c = self._counters.get(type_url)
        if c is None:
            c = self._counters[type_url] = TypeCounters()
        return c

    def _touch(self, node_id: str) -> None:
        node = self._nodes.get(node_id)
        if node is not None and node.synced:
            self._synced_versions[node_id] = node.snapshot_version
        else:
            self._synced_versions.pop(node_id, None)
        self.changes += 1
        self._log.append((self.changes, node_id))
        for dirty in self._waiters:
            dirty.add(node_id)
        # Wake every waiter; the next one to wait gets a fresh event.
        self._changed.set()
        self._changed = asyncio.Event()
