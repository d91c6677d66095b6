"""Harden verdicts: clients answered with a stricter output tier because of what they could
have learned (``actions.onRisk``, ``controlplane.extraction.risk``).

A ``Hardened`` record is the harden counterpart of a quarantine or throttle ``Enforcement``:
an input of compile, which puts it into the Wasm filter configuration (``riskOverrides``) of
the sidecars its ExtractionPolicy targets; it expires by itself and is released with the
client's other verdicts. Kept in memory, like the estimate it follows from: after a restart
a client's estimate is rebuilt from its next queries, and its step reached again.

No numpy here: compile and the CLI import this module.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from controlplane.compile.inputs.verdicts import ClientRef as ClientRef
from controlplane.compile.inputs.verdicts import Hardened as Hardened


class HardenStore:
    """Active harden records; thread-safe; listeners hear of every change."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._items: dict[tuple[str, str], Hardened] = {}
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def _notify(self) -> None:
        for listener in list(self._listeners):
            listener()

    def put(self, record: Hardened) -> None:
        with self._lock:
            self._items[(record.client.policy, record.client.key)] = record
        self._notify()

    def release(self, key: str, policy: str | None = None) -> list[Hardened]:
        with self._lock:
            gone = [
                h
                for h in self._items.values()
                # By the key itself, its digest or fingerprint, or its label (as verdicts).
                if h.client.named_by(key) and (policy is None or h.client.policy == policy)
            ]
            for h in gone:
                del self._items[(h.client.policy, h.client.key)]
        if gone:
            self._notify()
        return gone

    def expire(self) -> list[Hardened]:
        now = self._clock()
        with self._lock:
            gone = [h for h in self._items.values() if h.until <= now]
            for h in gone:
                del self._items[(h.client.policy, h.client.key)]
        if gone:
            self._notify()
        return gone

    def next_expiry(self) -> float | None:
        with self._lock:
            return min((h.until for h in self._items.values()), default=None)

    def active(self) -> tuple[Hardened, ...]:
        now = self._clock()
        with self._lock:
            return tuple(
                sorted(
                    (h for h in self._items.values() if h.until > now),
                    key=lambda h: (h.client.policy, h.client.key),
                )
            )

    def of(self, policy: str, key: str) -> Hardened | None:
        found = self._items.get((policy, key))
        return found if found is not None and found.until > self._clock() else None
