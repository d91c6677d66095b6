"""Verdicts and what they put in force: quarantines and throttles of single clients.

The types (``ClientRef``, ``Enforcement``, ``Evidence``, ``Verdict``) are compile's inputs and
live below it, in ``controlplane.compile.inputs.verdicts``; they are re-exported here for the
monitor's own callers. This module keeps what only the monitor needs: sinks, backends, store.

The ``VerdictStore`` is an input of compile, beside the policy store and the inventory:
each active enforcement becomes an RBAC deny (quarantine) or a per-client rate limit
(throttle) in the sidecars its ExtractionPolicy targets. Enforcements expire by themselves
and are persisted to a JSON file (written atomically), so they survive a control-plane
restart. Every verdict is also emitted to a ``VerdictSink`` (OpenTelemetry log records by
default) with its evidence.

No raw client key is kept: a header key (an API key is a secret) is filed under its SHA-256
digest (``ClientRef.of``), which is also what the sidecar matches
(``policies/extraction/verdicts_translate`` hashes the header itself), so a 50 KB key costs
what a short one does. People see a
``fingerprint``; release takes the key, its digest or a fingerprint.

The store is bounded: at most ``max_per_policy`` enforcements per policy; past it the oldest
throttle goes first, then the oldest quarantine (each eviction is logged and counted).
Persistence goes through a ``VerdictBackend``: ``FileBackend`` appends one JSON line per
change (compacted now and then), never a full rewrite per verdict.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from controlplane.compile.inputs.verdicts import (
    DIGESTED as DIGESTED,
)
from controlplane.compile.inputs.verdicts import (
    FINGERPRINT_HEX as FINGERPRINT_HEX,
)
from controlplane.compile.inputs.verdicts import (
    LABEL_MAX as LABEL_MAX,
)
from controlplane.compile.inputs.verdicts import (
    VERIFIED_PREFIX as VERIFIED_PREFIX,
)
from controlplane.compile.inputs.verdicts import (
    ClientRef as ClientRef,
)
from controlplane.compile.inputs.verdicts import (
    Enforcement as Enforcement,
)
from controlplane.compile.inputs.verdicts import (
    Evidence as Evidence,
)
from controlplane.compile.inputs.verdicts import (
    KeySource as KeySource,
)
from controlplane.compile.inputs.verdicts import (
    Kind as Kind,
)
from controlplane.compile.inputs.verdicts import (
    Stage as Stage,
)
from controlplane.compile.inputs.verdicts import (
    Verdict as Verdict,
)
from controlplane.compile.inputs.verdicts import (
    digest as digest,
)
from controlplane.compile.inputs.verdicts import (
    enforcements_of as enforcements_of,
)
from controlplane.compile.inputs.verdicts import (
    fingerprint_of as fingerprint_of,
)
from controlplane.compile.inputs.verdicts import (
    matches as matches,
)

log = logging.getLogger(__name__)

# Enforcements per policy at most. Sized for a large attack (10,000 keys quarantined cost
# well under a megabyte of sidecar configuration, BENCHMARKS.md) with room for throttles.
MAX_PER_POLICY = 20_000


# --- sinks ------------------------------------------------------------------------------------


class VerdictSink(Protocol):
    def emit(self, verdict: Verdict) -> None: ...


@dataclass
class InMemoryVerdictSink:
    verdicts: list[Verdict] = field(default_factory=list)

    def emit(self, verdict: Verdict) -> None:
        self.verdicts.append(verdict)


class OtelVerdictSink:
    """Each verdict as an OpenTelemetry log record (an event named
    ``modelguard.extraction.verdict``), through the given or the global logger provider."""

    EVENT = "modelguard.extraction.verdict"

    def __init__(self, logger_provider: Any | None = None) -> None:
        from opentelemetry import _logs

        provider = logger_provider or _logs.get_logger_provider()
        self._logger = provider.get_logger("modelguard.extraction")
        self._severity = _logs.SeverityNumber

    def emit(self, verdict: Verdict) -> None:
        log.warning("%s", verdict.summary())
        self._logger.emit(
            timestamp=int(verdict.at * 1e9),
            severity_number=self._severity.WARN
            if verdict.stage == "suspicion"
            else self._severity.ERROR,
            severity_text="WARN" if verdict.stage == "suspicion" else "ERROR",
            body=verdict.summary(),
            attributes=verdict.attributes(),
            event_name=self.EVENT,
        )


# --- the store ---------------------------------------------------------------------------------

StoreKey = tuple[Kind, str, str]


class VerdictBackend(Protocol):
    """Where enforcements persist. ``FileBackend`` (the embedded default) and
    ``MemoryBackend`` here; a shared backend (Redis, for several replicas) implements the
    same four calls. Calls come under the store's lock, one change at a time."""

    def load(self) -> Iterable[Enforcement]:
        """Everything stored (expired entries too: the store drops them)."""
        ...

    def put(self, enforcement: Enforcement) -> None: ...

    def remove(self, gone: Sequence[Enforcement]) -> None: ...

    def compact(self, count: int, live: Callable[[], Sequence[Enforcement]]) -> None:
        """A hint that only the ``count`` enforcements ``live()`` returns matter now (a file
        may rewrite itself smaller); ``live`` is called only if the backend compacts."""
        ...


class MemoryBackend:
    def load(self) -> Iterable[Enforcement]:
        return ()

    def put(self, enforcement: Enforcement) -> None:
        return None

    def remove(self, gone: Sequence[Enforcement]) -> None:
        return None

    def compact(self, count: int, live: Callable[[], Sequence[Enforcement]]) -> None:
        return None


class FileBackend:
    """An append-only JSON Lines log: ``{"put": enforcement}`` or ``{"del": [kind, policy,
    key]}`` per line, so a verdict costs one short write. When the log holds more than
    twice the live entries (and ``COMPACT_MIN`` lines), it is rewritten with the live ones
    only (atomically: a reader never sees half a file). Mode 0600: it names clients."""

    COMPACT_MIN = 1024

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lines = 0

    def load(self) -> Iterable[Enforcement]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        except OSError as err:
            self._aside(err)
            return []
        if text.lstrip().startswith("{") and '"enforcements"' in text[:200]:
            return self._legacy(text)
        items: dict[StoreKey, Enforcement] = {}
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if "put" in record:
                    e = Enforcement.from_json(record["put"])
                    items[VerdictStore.key_of(e)] = e
                else:
                    kind, policy, key = record["del"]
                    items.pop((kind, policy, key), None)
            except (ValueError, TypeError, KeyError) as err:
                if number == 1 and not items:
                    self._aside(err)
                    return []
                # A torn last line (a crash mid-write) or one bad line: skip it, keep the rest.
                log.error("%s:%d: %s; skipped", self.path, number, err)
        self._lines = len(text.splitlines())
        return list(items.values())

    def _legacy(self, text: str) -> list[Enforcement]:
        """The earlier format (one JSON object, raw keys): read and digest the keys."""
        try:
            raw = json.loads(text)
        except ValueError as err:
            self._aside(err)
            return []
        out = []
        for i, item in enumerate(raw.get("enforcements", [])):
            try:
                e = Enforcement.from_json(item)
            except (TypeError, KeyError) as err:
                log.error("%s: enforcements[%d]: %s; skipped", self.path, i, err)
                continue
            c = e.client
            out.append(replace(e, client=ClientRef.of(c.policy, c.key, c.source, c.header)))
        self._lines = 0
        self.compact(len(out), lambda: out)
        return out

    def _aside(self, err: Exception) -> None:
        # Never lose the file: keep it aside for a human and start empty.
        aside = self.path.with_suffix(self.path.suffix + f".unreadable-{int(time.time())}")
        log.error("cannot read verdicts %s (%s); kept as %s", self.path, err, aside)
        os.replace(self.path, aside)

    def _append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as out:
            out.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._lines += 1

    def put(self, enforcement: Enforcement) -> None:
        self._append({"put": enforcement.to_json()})

    def remove(self, gone: Sequence[Enforcement]) -> None:
        for e in gone:
            self._append({"del": list(VerdictStore.key_of(e))})

    def compact(self, count: int, live: Callable[[], Sequence[Enforcement]]) -> None:
        if self._lines and self._lines < max(self.COMPACT_MIN, 2 * count):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".verdicts-", dir=self.path.parent)
        with os.fdopen(fd, "w") as out:  # mkstemp: 0600
            kept = live()
            for e in kept:
                out.write(json.dumps({"put": e.to_json()}, separators=(",", ":")) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        self._lines = len(kept)


class VerdictStore:
    """Active quarantines and throttles; thread-safe; listeners hear of every change."""

    def __init__(
        self,
        path: Path | None = None,
        clock: Callable[[], float] = time.time,
        *,
        backend: VerdictBackend | None = None,
        max_per_policy: int = MAX_PER_POLICY,
    ) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self.backend: VerdictBackend = backend or (
            FileBackend(path) if path is not None else MemoryBackend()
        )
        self.max_per_policy = max_per_policy
        self.evicted = 0  # enforcements dropped to stay within max_per_policy
        self._items: dict[StoreKey, Enforcement] = {}
        # Per policy and kind, keys in the order they were put: who goes first past the cap.
        self._order: dict[tuple[str, Kind], dict[str, None]] = {}
        self._listeners: list[Callable[[], None]] = []
        self._load()

    def _load(self) -> None:
        now = self._clock()
        loaded = sorted(self.backend.load(), key=lambda e: e.since)
        for e in loaded:
            if e.until > now:
                self._add(e)
        self._compact()

    def _compact(self) -> None:
        self.backend.compact(len(self._items), lambda: list(self._items.values()))

    @staticmethod
    def key_of(e: Enforcement) -> StoreKey:
        return (e.kind, e.client.policy, e.client.key)

    _key = key_of  # the name earlier callers used

    def _add(self, e: Enforcement) -> None:
        key = self.key_of(e)
        self._items[key] = e
        order = self._order.setdefault((e.client.policy, e.kind), {})
        order.pop(e.client.key, None)
        order[e.client.key] = None

    def _drop(self, key: StoreKey) -> Enforcement | None:
        e = self._items.pop(key, None)
        if e is not None:
            order = self._order.get((key[1], key[0]))
            if order is not None:
                order.pop(key[2], None)
                if not order:
                    del self._order[(key[1], key[0])]
        return e

    def _count(self, policy: str) -> int:
        return sum(len(self._order.get((policy, k), ())) for k in ("quarantine", "throttle"))

    def _evict(self, policy: str) -> list[Enforcement]:
        """Past the cap: the oldest throttles first (a throttle only slows a client down),
        then the oldest quarantines."""
        gone = []
        while self._count(policy) > self.max_per_policy:
            for kind in ("throttle", "quarantine"):
                order = self._order.get((policy, kind))
                if order:
                    oldest = next(iter(order))
                    e = self._drop((kind, policy, oldest))
                    if e is not None:
                        gone.append(e)
                    break
        if gone:
            self.evicted += len(gone)
            log.warning(
                "%s: over %d verdicts: dropped the oldest %d (%s)", policy,
                self.max_per_policy, len(gone), ", ".join(sorted({e.kind for e in gone})),
            )
        return gone

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def _notify(self) -> None:
        for listener in list(self._listeners):
            listener()

    def put(self, enforcement: Enforcement) -> None:
        with self._lock:
            self._add(enforcement)
            gone = []
            if enforcement.kind == "quarantine":
                # A quarantined client needs no throttle on top.
                client = enforcement.client
                dropped = self._drop(("throttle", client.policy, client.key))
                if dropped is not None:
                    gone.append(dropped)
            gone += self._evict(enforcement.client.policy)
            self.backend.put(enforcement)
            if gone:
                self.backend.remove(gone)
            self._compact()
        self._notify()

    def release(
        self,
        key: str,
        policy: str | None = None,
        kinds: tuple[Kind, ...] = ("quarantine", "throttle"),
    ) -> list[Enforcement]:
        """End every enforcement on a client (of one policy, or of all) named by its key,
        digest or fingerprint (``ClientRef.named_by``); returns them."""
        with self._lock:
            gone = [
                e
                for e in self._items.values()
                if e.kind in kinds
                and (policy is None or e.client.policy == policy)
                and e.client.named_by(key)
            ]
            for e in gone:
                self._drop(self.key_of(e))
            if gone:
                self.backend.remove(gone)
                self._compact()
        if gone:
            self._notify()
        return gone

    def expire(self) -> list[Enforcement]:
        """Drop what has run out; listeners hear of it so sidecars are updated."""
        now = self._clock()
        with self._lock:
            gone = [e for e in self._items.values() if e.until <= now]
            for e in gone:
                self._drop(self.key_of(e))
            if gone:
                self.backend.remove(gone)
                self._compact()
        if gone:
            self._notify()
        return gone

    def refresh(self) -> bool:
        """Read the backend again (a shared backend changed by another replica); listeners
        hear of it when anything changed. Returns whether it did."""
        now = self._clock()
        fresh = {self.key_of(e): e for e in self.backend.load() if e.until > now}
        with self._lock:
            if fresh == self._items:
                return False
            self._items, self._order = {}, {}
            for e in sorted(fresh.values(), key=lambda e: e.since):
                self._add(e)
        self._notify()
        return True

    def active(self) -> tuple[Enforcement, ...]:
        now = self._clock()
        with self._lock:
            return tuple(
                sorted(
                    (e for e in self._items.values() if e.until > now),
                    key=lambda e: (e.kind, e.client.policy, e.client.key),
                )
            )

    def count(self, policy: str | None = None) -> int:
        with self._lock:
            return len(self._items) if policy is None else self._count(policy)

    def next_expiry(self) -> float | None:
        with self._lock:
            return min((e.until for e in self._items.values()), default=None)

    def of(self, kind: Kind, policy: str, key: str) -> Enforcement | None:
        """The enforcement on a client of a policy, by the stored key (``ClientRef.key``)."""
        found = self._items.get((kind, policy, key))
        return found if found is not None and found.until > self._clock() else None


class Throttler(Protocol):
    """Slows one client down. The rate-limit service (issue 3) can implement this to budget
    throttled clients globally; until then ``CompiledThrottler`` compiles the throttle into
    a per-client local rate limit in the sidecars."""

    def throttle(self, enforcement: Enforcement) -> None: ...

    def release(self, key: str, policy: str | None = None) -> None: ...


@dataclass
class CompiledThrottler:
    store: VerdictStore

    def throttle(self, enforcement: Enforcement) -> None:
        self.store.put(enforcement)

    def release(self, key: str, policy: str | None = None) -> None:
        return None  # the store's release already ends throttles

