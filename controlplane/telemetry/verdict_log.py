"""The extraction monitor's recent verdicts, kept for the live page and counted for /metrics.

It sits between the monitor and its sink (OTel events): every verdict still goes to the
sink first, unchanged; this only keeps the last few (bounded) and counts them by policy,
stage and action — bounded labels, never the client.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Protocol


class _Sink(Protocol):
    def emit(self, verdict: Any) -> None: ...


class VerdictLog:
    KEEP = 200  # verdicts kept for the page: its table shows the latest per client

    def __init__(self, inner: _Sink) -> None:
        self.inner = inner
        self._recent: collections.deque[Any] = collections.deque(maxlen=self.KEEP)
        self._counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self._lock = threading.Lock()  # the monitor emits from the feed's worker thread

    def emit(self, verdict: Any) -> None:
        try:
            self.inner.emit(verdict)
        finally:  # counted even when the exporter failed: the verdict was taken
            with self._lock:
                self._recent.append(verdict)
                self._counts[verdict.client.policy, verdict.stage, verdict.action] += 1

    def counts(self) -> dict[tuple[str, str, str], int]:
        with self._lock:
            return dict(self._counts)

    def recent(self) -> list[Any]:
        """Oldest first."""
        with self._lock:
            return list(self._recent)

    @classmethod
    def around(cls, monitor: Any) -> VerdictLog:
        """Put a log between ``monitor`` and its sink; returns it."""
        log = cls(monitor.sink)
        monitor.sink = log
        return log
