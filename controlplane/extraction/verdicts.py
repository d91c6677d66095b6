"""Verdicts and what they put in force: quarantines and throttles of single clients.

The ``VerdictStore`` is an input of compile, beside the policy store and the inventory:
each active enforcement becomes an RBAC deny (quarantine) or a per-client rate limit
(throttle) in the sidecars its ExtractionPolicy targets. Enforcements expire by themselves
and are persisted to a JSON file (written atomically), so they survive a control-plane
restart. Every verdict is also emitted to a ``VerdictSink`` (OpenTelemetry log records by
default) with its evidence.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

log = logging.getLogger(__name__)

Stage = Literal["suspicion", "detection", "risk"]  # risk: an onRisk step reached
KeySource = Literal["header", "identity", "jwtClaim", "sourceIP"]
Kind = Literal["quarantine", "throttle"]


@dataclass(frozen=True)
class Evidence:
    detector: str  # prada, nearDuplicate, outOfDistribution, coverage, unobserved
    statistic: float
    threshold: float
    queries: int  # the client's queries the statistic was computed over


@dataclass(frozen=True)
class ClientRef:
    """One client of one ExtractionPolicy, as the sidecar can recognise it again."""

    policy: str  # namespace/name of the ExtractionPolicy
    key: str  # the client key's value (API key, SPIFFE ID, IP address...)
    source: KeySource = "header"
    header: str | None = None  # for source "header": which header carries the key

    @property
    def fingerprint(self) -> str:
        """What logs and events name the client by: API keys are secrets."""
        return "sha256:" + hashlib.sha256(self.key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Verdict:
    client: ClientRef
    stage: Stage
    action: Literal["alert", "throttle", "quarantine", "harden"]
    evidence: tuple[Evidence, ...]
    at: float  # unix seconds
    fidelity: float | None = None  # the client's estimated extraction fidelity (risk.py)

    def attributes(self) -> dict[str, Any]:
        first = self.evidence[0]
        return {
            "modelguard.policy": self.client.policy,
            "modelguard.client": self.client.fingerprint,
            "modelguard.client_key.source": self.client.source,
            "modelguard.verdict.stage": self.stage,
            "modelguard.verdict.action": self.action,
            "modelguard.detector": first.detector,
            "modelguard.statistic": first.statistic,
            "modelguard.threshold": first.threshold,
            "modelguard.queries": first.queries,
            "modelguard.detectors": [e.detector for e in self.evidence],
            "modelguard.statistics": [e.statistic for e in self.evidence],
            "modelguard.thresholds": [e.threshold for e in self.evidence],
        } | ({} if self.fidelity is None else {"modelguard.risk.fidelity": self.fidelity})

    def summary(self) -> str:
        parts = ", ".join(
            f"{e.detector} {e.statistic:.3g} ≥ {e.threshold:.3g} after {e.queries} queries"
            for e in self.evidence
        )
        return (
            f"extraction {self.stage} for {self.client.fingerprint} of {self.client.policy}: "
            f"{parts} → {self.action}"
        )


@dataclass(frozen=True)
class Enforcement:
    """A quarantine or throttle of one client, in force until ``until`` (unix seconds)."""

    kind: Kind
    client: ClientRef
    since: float
    until: float
    reason: str
    requests: int = 0  # throttle only: this many requests per ``per_seconds``
    per_seconds: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Enforcement:
        return cls(**{**raw, "client": ClientRef(**raw["client"])})


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


class VerdictStore:
    """Active quarantines and throttles; thread-safe; listeners hear of every change."""

    def __init__(self, path: Path | None = None, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._items: dict[tuple[Kind, str, str], Enforcement] = {}
        self._listeners: list[Callable[[], None]] = []
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as err:
            # Never lose the file: keep it aside for a human and start empty.
            aside = path.with_suffix(path.suffix + f".unreadable-{int(self._clock())}")
            log.error("cannot read verdicts %s (%s); kept as %s", path, err, aside)
            os.replace(path, aside)
            return
        now = self._clock()
        for i, item in enumerate(raw.get("enforcements", [])):
            try:
                enforcement = Enforcement.from_json(item)
            except (TypeError, KeyError) as err:
                log.error("%s: enforcements[%d]: %s; skipped", path, i, err)
                continue
            if enforcement.until > now:
                self._items[self._key(enforcement)] = enforcement

    @staticmethod
    def _key(e: Enforcement) -> tuple[Kind, str, str]:
        return (e.kind, e.client.policy, e.client.key)

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"enforcements": [e.to_json() for e in self._items.values()]}
        fd, tmp = tempfile.mkstemp(prefix=".verdicts-", dir=self.path.parent)
        with os.fdopen(fd, "w") as out:
            json.dump(payload, out, indent=1)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def _notify(self) -> None:
        for listener in list(self._listeners):
            listener()

    def put(self, enforcement: Enforcement) -> None:
        with self._lock:
            self._items[self._key(enforcement)] = enforcement
            if enforcement.kind == "quarantine":
                # A quarantined client needs no throttle on top.
                client = enforcement.client
                self._items.pop(("throttle", client.policy, client.key), None)
            self._save()
        self._notify()

    def release(self, key: str, policy: str | None = None) -> list[Enforcement]:
        """End every enforcement on a client key (of one policy, or of all); returns them."""
        with self._lock:
            gone = [
                e
                for e in self._items.values()
                if e.client.key == key and (policy is None or e.client.policy == policy)
            ]
            for e in gone:
                del self._items[self._key(e)]
            if gone:
                self._save()
        if gone:
            self._notify()
        return gone

    def expire(self) -> list[Enforcement]:
        """Drop what has run out; listeners hear of it so sidecars are updated."""
        now = self._clock()
        with self._lock:
            gone = [e for e in self._items.values() if e.until <= now]
            for e in gone:
                del self._items[self._key(e)]
            if gone:
                self._save()
        if gone:
            self._notify()
        return gone

    def active(self) -> tuple[Enforcement, ...]:
        now = self._clock()
        with self._lock:
            return tuple(
                sorted(
                    (e for e in self._items.values() if e.until > now),
                    key=lambda e: (e.kind, e.client.policy, e.client.key),
                )
            )

    def next_expiry(self) -> float | None:
        with self._lock:
            return min((e.until for e in self._items.values()), default=None)

    def of(self, kind: Kind, policy: str, key: str) -> Enforcement | None:
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


def enforcements_of(items: Iterable[Enforcement], kind: Kind) -> list[Enforcement]:
    return [e for e in items if e.kind == kind]
