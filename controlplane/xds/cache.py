"""The snapshot cache: the current snapshot of every node, and who to tell when it changes.

All calls happen on the asyncio loop thread. Setting a snapshot with the version a node
already has is a no-op, so a recompile that changes nothing pushes nothing.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

from controlplane.xds.snapshot import Snapshot
from controlplane.xds.status import CHANGE_LOG, touched_since

Watcher = Callable[[Snapshot | None], None]


class SnapshotCache:
    def __init__(self) -> None:
        self._snapshots: dict[str, Snapshot] = {}
        self._watchers: dict[str, list[Watcher]] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self.generation = 0  # bumped on every change: readers cache against it
        # (generation, node id) of the latest changes (status.touched_since reads it)
        self._log: collections.deque[tuple[int, str]] = collections.deque(maxlen=CHANGE_LOG)

    def set_snapshot(self, node_id: str, snapshot: Snapshot) -> bool:
        """Publish a node's snapshot. Returns False if the node already had this version."""
        current = self._snapshots.get(node_id)
        if current is not None and current.version == snapshot.version:
            return False
        self._snapshots[node_id] = snapshot
        self._notify(node_id, snapshot)
        return True

    def touched_since(self, mark: int) -> set[str] | None:
        """Nodes whose snapshot changed after generation ``mark``; None: too long ago."""
        return touched_since(self._log, mark)

    def get(self, node_id: str) -> Snapshot | None:
        return self._snapshots.get(node_id)

    def clear(self, node_id: str) -> None:
        if self._snapshots.pop(node_id, None) is not None:
            self._notify(node_id, None)

    def node_ids(self) -> list[str]:
        return sorted(self._snapshots)

    def watch(self, node_id: str, watcher: Watcher) -> Callable[[], None]:
        """Call ``watcher`` (synchronously, must not block) on every change of the node's
        snapshot. Returns the function that stops watching."""
        self._watchers.setdefault(node_id, []).append(watcher)

        def cancel() -> None:
            watchers = self._watchers.get(node_id)
            if watchers and watcher in watchers:
                watchers.remove(watcher)
                if not watchers:
                    del self._watchers[node_id]

        return cancel

    async def wait(
        self, node_id: str, after_version: str | None = None, timeout: float | None = None
    ) -> Snapshot:
        """The node's snapshot once its version differs from ``after_version`` (None: once
        there is any). Raises TimeoutError after ``timeout`` seconds."""

        async def changed() -> Snapshot:
            while True:
                snap = self._snapshots.get(node_id)
                if snap is not None and snap.version != after_version:
                    return snap
                event = self._changed.setdefault(node_id, asyncio.Event())
                await event.wait()

        return await asyncio.wait_for(changed(), timeout)

    def _notify(self, node_id: str, snapshot: Snapshot | None) -> None:
        self.generation += 1
        self._log.append((self.generation, node_id))
        event = self._changed.pop(node_id, None)
        if event is not None:
            event.set()
        for watcher in list(self._watchers.get(node_id, ())):
            watcher(snapshot)
