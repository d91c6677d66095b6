"""The bounded in-memory store of recent spans and access-log records.

Bounded by count and by bytes (each record's measured size): when either is exceeded the
oldest records go first, so a flood of telemetry never grows memory past the bounds. What
was evicted is counted. Watchers (``modelguard traces --follow``) get new records through
bounded queues: a watcher that does not keep up loses records, counted, and never holds
memory for the store.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from controlplane.telemetry.records import Record, hash_secret


@dataclass(frozen=True)
class Query:
    """Which records to return; empty fields match everything."""

    service: str = ""
    client: str = ""  # a key hash (or its prefix), or the plain key (hashed here to compare)
    status: str = ""  # "403", or a class: "4xx"
    verdict: str = ""
    kind: str = ""  # "span" | "log"
    trace_id: str = ""
    source: str = ""  # "sidecar" | "control-plane"
    after_seq: int = 0  # only records that arrived after this one

    def matches(self, record: Record) -> bool:
        if record.seq <= self.after_seq:
            return False
        if self.service and record.service != self.service:
            return False
        if self.kind and record.kind != self.kind:
            return False
        if self.source and record.source != self.source:
            return False
        if self.verdict and record.verdict != self.verdict:
            return False
        if self.trace_id and record.trace_id != self.trace_id:
            return False
        if self.client and not (
            record.client.startswith(self.client) or record.client == hash_secret(self.client)
        ):
            return False
        if self.status:
            code = str(record.status) if record.status else ""
            if self.status.lower().endswith("xx"):
                if not code.startswith(self.status[0]):
                    return False
            elif code != self.status:
                return False
        return True


@dataclass(frozen=True)
class StoreStats:
    records: int
    bytes: int
    max_records: int
    max_bytes: int
    received: int  # records ever added
    evicted: int  # dropped to stay within the bounds
    watcher_dropped: int  # records a slow watcher missed


class Watch:
    """A subscription to new records: ``await watch.get()``; close() when done."""

    def __init__(self, store: TelemetryStore, query: Query, maxsize: int) -> None:
        self.store, self.query = store, query
        self.queue: asyncio.Queue[Record] = asyncio.Queue(maxsize)
        self.loop = asyncio.get_running_loop()
        self.dropped = 0

    def offer(self, records: Sequence[Record]) -> None:
        for record in records:
            if not self.query.matches(record):
                continue
            if self.queue.full():
                self.dropped += 1
                self.store.note_watcher_drop()
                continue
            self.queue.put_nowait(record)

    async def get(self) -> Record:
        return await self.queue.get()

    def close(self) -> None:
        self.store.unwatch(self)


class TelemetryStore:
    """Thread-safe: records arrive from the receiver (loop thread) and from the control
    plane's own instrumentation (any thread)."""

    def __init__(self, max_records: int, max_bytes: int) -> None:
        self.max_records, self.max_bytes = max_records, max_bytes
        self._records: deque[Record] = deque()
        self._bytes = 0
        self._seq = 0
        self._evicted = 0
        self._received = 0
        self._watcher_dropped = 0
        self._lock = threading.Lock()
        self._watches: list[Watch] = []

    def add(self, records: Iterable[Record]) -> list[Record]:
        added: list[Record] = []
        # Runs once per record received (an access-log record per sidecar request): the
        # counters are locals until the end.
        max_records, max_bytes = self.max_records, self.max_bytes
        kept = self._records
        with self._lock:
            seq, held, evicted, received = self._seq, self._bytes, self._evicted, self._received
            for record in records:
                received += 1
                size = record.size
                if size > max_bytes:
                    evicted += 1  # larger than the whole store: never kept
                    continue
                seq += 1
                stored = record.with_seq(seq)
                kept.append(stored)
                held += size
                added.append(stored)
                while held > max_bytes or len(kept) > max_records:
                    held -= kept.popleft().size
                    evicted += 1
            self._seq, self._bytes, self._evicted, self._received = seq, held, evicted, received
            watches = list(self._watches)
        for watch in watches:
            watch.loop.call_soon_threadsafe(watch.offer, added)
        return added

    def query(self, query: Query, limit: int = 100) -> list[Record]:
        """The newest ``limit`` matching records, oldest first."""
        with self._lock:
            snapshot = list(self._records)
        out: list[Record] = []
        for record in reversed(snapshot):
            if query.matches(record):
                out.append(record)
                if len(out) >= limit:
                    break
        out.reverse()
        return out

    def watch(self, query: Query, maxsize: int = 1000) -> Watch:
        watch = Watch(self, query, maxsize)
        with self._lock:
            self._watches.append(watch)
        return watch

    def unwatch(self, watch: Watch) -> None:
        with self._lock:
            if watch in self._watches:
                self._watches.remove(watch)

    def note_watcher_drop(self) -> None:
        with self._lock:
            self._watcher_dropped += 1

    @property
    def last_seq(self) -> int:
        with self._lock:
            return self._seq

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(
                records=len(self._records),
                bytes=self._bytes,
                max_records=self.max_records,
                max_bytes=self.max_bytes,
                received=self._received,
                evicted=self._evicted,
                watcher_dropped=self._watcher_dropped,
            )
