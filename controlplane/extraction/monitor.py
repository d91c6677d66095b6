"""The extraction monitor: per-client detector state, verdicts and their staged actions.

For each batch a sidecar ships, the monitor extracts the query vectors (the policy's
``request.features``) and the model's unhardened scores (``response.scores``), folds them
into each client's bounded state, and moves the client along its stages:

- a detector's statistic reaches its threshold → **suspicion**: an alert, and the policy's
  ``onSuspicion`` throttle;
- at least ``CONFIRM_MIN`` new distinct queries later, a second detector at its
  threshold, a statistic at twice its threshold, or the same evidence still there
  ``confirm`` queries on → **detection**: an alert, and the policy's ``onDetection``
  quarantine. A client that stops when throttled is not quarantined.

A client whose requests mostly reach the monitor as "unobserved" (the sidecar could not
ship them) is suspected too: a gap in observation is a signal. It is never quarantined on
that alone, since there is no evidence about its queries.

Client state is bounded (``max_clients``, least recently seen evicted first) and expires
after ``idle_ttl`` seconds without a query.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from controlplane.api import ExtractionPolicy, Policy
from controlplane.api.common import WINDOW_SECONDS
from controlplane.api.jsonpath import JsonPath
from controlplane.extraction.calibrate import BATCH, Profile
from controlplane.extraction.detectors import ClientState, DetectorName, Finding
from controlplane.extraction.verdicts import (
    ClientRef,
    CompiledThrottler,
    Enforcement,
    Evidence,
    KeySource,
    Throttler,
    Verdict,
    VerdictSink,
    VerdictStore,
)
from controlplane.gen.modelguard.feed.v1 import feed_pb2

log = logging.getLogger(__name__)

DEFAULT_THROTTLE_SECONDS = 3600  # a throttle without a quarantine duration to follow
UNOBSERVED_MIN = 50  # unobserved requests before a gap counts as a signal
ESCALATE = 2.0  # a statistic this many times its threshold confirms a suspicion
EVALUATE_EVERY = BATCH  # queries between two looks at a client's statistics
CONFIRM_MIN = 8  # new distinct queries after a suspicion before it can be confirmed


@dataclass(frozen=True)
class WatchedPolicy:
    """What the monitor needs of one ExtractionPolicy."""

    key: str  # namespace/name
    key_source: KeySource
    key_header: str | None
    features: JsonPath
    scores: JsonPath
    detectors: tuple[DetectorName, ...]
    sensitivity: str
    throttle: tuple[int, int] | None  # requests per seconds
    quarantine_seconds: int | None

    @classmethod
    def of(cls, policy: ExtractionPolicy) -> WatchedPolicy | None:
        spec = policy.spec
        if spec.detection is None:
            return None
        actions = spec.actions
        on_suspicion = actions.on_suspicion if actions else None
        on_detection = actions.on_detection if actions else None
        return cls(
            key=f"{policy.metadata.namespace}/{policy.metadata.name}",
            key_source=spec.client_key.source,
            key_header=spec.client_key.header,
            features=JsonPath.parse(spec.request.features),
            scores=JsonPath.parse(spec.response.scores),
            detectors=tuple(spec.detection.detectors),
            sensitivity=spec.detection.sensitivity,
            throttle=(
                on_suspicion.throttle.requests,
                WINDOW_SECONDS[on_suspicion.throttle.per],
            )
            if on_suspicion
            else None,
            quarantine_seconds=on_detection.quarantine.seconds if on_detection else None,
        )


@dataclass
class Tracked:
    state: ClientState
    stage: Literal["watching", "suspected", "detected"] = "watching"
    suspected_at: int = 0  # distinct queries when suspected
    evaluated: int = 0  # queries (observed or not) at the last evaluation
    last_seen: float = 0.0


@dataclass
class MonitorStats:
    batches: int = 0
    queries: int = 0
    unobserved: int = 0
    unparsable: Counter[str] = field(default_factory=Counter)  # reason → count
    unknown_policy: int = 0
    evicted: int = 0
    expired: int = 0
    verdicts: Counter[str] = field(default_factory=Counter)


_NUMBER_TYPES = frozenset((int, float))


def _numbers(value: Any) -> npt.NDArray[np.float64] | None:
    """A non-empty flat row of finite numbers, or None."""
    if type(value) is not list or not value:
        return None
    # numpy would read booleans and numeric strings as numbers: a client's junk must not.
    # json.loads makes only exact ints, floats, bools, strs, lists and dicts, so the set of
    # exact types says it all (bool is not int here), in C rather than per element.
    if not _NUMBER_TYPES.issuperset(map(type, value)):
        return None
    try:
        row = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):  # an integer beyond float range
        return None
    if row.ndim != 1 or not np.isfinite(row).all():
        return None
    return row


class ExtractionMonitor:
    def __init__(
        self,
        policies: Callable[[], Iterable[Policy]],
        verdicts: VerdictStore,
        sink: VerdictSink,
        *,
        profile: Callable[[WatchedPolicy], Profile | None],
        throttler: Throttler | None = None,
        max_clients: int = 2048,
        idle_ttl: float = 3600.0,
        confirm: int = 16,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._policies = policies
        self.verdicts = verdicts
        self.sink = sink
        self._profile = profile
        self.throttler: Throttler = throttler or CompiledThrottler(verdicts)
        self.max_clients = max_clients
        self.idle_ttl = idle_ttl
        self.confirm = confirm
        self._clock = clock
        self._clients: OrderedDict[tuple[str, str], Tracked] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = MonitorStats()
        self._watched: dict[str, WatchedPolicy] = {}
        self._watched_from: tuple[Policy, ...] = ()

    # --- policies ---------------------------------------------------------------------------

    def _policy(self, key: str) -> WatchedPolicy | None:
        current = tuple(self._policies())
        if current != self._watched_from:
            watched = {}
            for policy in current:
                if isinstance(policy, ExtractionPolicy):
                    w = WatchedPolicy.of(policy)
                    if w is not None:
                        watched[w.key] = w
            self._watched, self._watched_from = watched, current
        return self._watched.get(key)

    # --- the feed ---------------------------------------------------------------------------

    def report(self, batch: feed_pb2.FeedBatch) -> int:
        """Fold one batch from a sidecar into client state; returns the queries accepted."""
        with self._lock:
            return self._report(batch)

    def _report(self, batch: feed_pb2.FeedBatch) -> int:
        now = self._clock()
        self.stats.batches += 1
        self._expire(now)
        policy = self._policy(batch.policy)
        if policy is None:
            self.stats.unknown_policy += len(batch.queries)
            return 0
        profile = self._profile(policy)
        rows: dict[str, list[npt.NDArray[np.float64]]] = {}
        labels: dict[str, list[int]] = {}
        for query in batch.queries:
            got = self._extract(policy, query)
            if got is None:
                continue
            vectors, classes = got
            rows.setdefault(query.client_key, []).extend(vectors)
            labels.setdefault(query.client_key, []).extend(classes)
        accepted = 0
        if profile is None:
            for vectors in rows.values():
                self.stats.unparsable["no_profile"] += len(vectors)
        else:
            accepted = self._observe(policy, profile, rows, labels, now)
        for gap in batch.unobserved:
            self.stats.unobserved += gap.count
            dim = profile.reference.dim if profile else 1
            tracked = self._tracked(policy.key, gap.client_key, dim, now)
            tracked.state.unobserved += gap.count
            self._judge(policy, profile, gap.client_key, tracked, now)
        self.stats.queries += accepted
        return accepted

    def _observe(
        self,
        policy: WatchedPolicy,
        profile: Profile,
        rows: dict[str, list[npt.NDArray[np.float64]]],
        labels: dict[str, list[int]],
        now: float,
    ) -> int:
        """Fold each client's rows of one batch into its state.

        Each client's queries are first matched against its own history; the reference's
        values of the fresh ones (novelty: a distance matrix against every reference point;
        residual) are then computed for the whole batch at once: a batch mixes many clients
        with a query or two each, and one matrix product per batch costs far less than one
        per client. Repeats (most of a what-if user's traffic) never reach the reference.
        """
        dim = profile.reference.dim
        clients: list[tuple[str, npt.NDArray[np.float32], npt.NDArray[np.int16]]] = []
        for client_key, vectors in rows.items():
            keep = [i for i, v in enumerate(vectors) if len(v) == dim]
            if len(keep) < len(vectors):
                self.stats.unparsable["dimension"] += len(vectors) - len(keep)
            if not keep:
                continue
            X = np.asarray([vectors[i] for i in keep], dtype=np.float32)
            y = np.asarray([labels[client_key][i] for i in keep], dtype=np.int16)
            clients.append((client_key, X, y))
        if not clients:
            return 0
        thresholds = profile.thresholds[policy.sensitivity]
        matched = []
        for client_key, X, y in clients:
            tracked = self._tracked(policy.key, client_key, dim, now)
            matched.append((client_key, tracked, tracked.state.match(X, y, thresholds)))
        fresh = [F for _, _, F in matched if len(F)]
        if fresh:
            everything = np.concatenate(fresh)
            novelty = profile.reference.novelty(everything)
            residual = profile.reference.residual(everything)
        start = 0
        for client_key, tracked, F in matched:
            if len(F):
                end = start + len(F)
                tracked.state.fold(novelty[start:end], residual[start:end], thresholds)
                start = end
            self._judge(policy, profile, client_key, tracked, now)
        return sum(len(X) for _, X, _ in clients)

    def _extract(
        self, policy: WatchedPolicy, query: feed_pb2.Query
    ) -> tuple[list[npt.NDArray[np.float64]], list[int]] | None:
        try:
            request = json.loads(query.request_body)
        except (UnicodeDecodeError, ValueError, RecursionError):  # junk, or nested too deep
            self.stats.unparsable["request_json"] += 1
            return None
        vectors = [_numbers(v) for v in policy.features.find(request)]
        if not vectors or any(v is None for v in vectors):
            self.stats.unparsable["features"] += 1
            return None
        classes = [-1] * len(vectors)
        try:
            response = json.loads(query.response_body) if query.response_body else None
        except (UnicodeDecodeError, ValueError, RecursionError):
            response = None
        if response is not None:
            scores = [_numbers(s) for s in policy.scores.find(response)]
            if len(scores) == len(vectors) and all(s is not None for s in scores):
                classes = [int(np.argmax(s)) for s in scores if s is not None]
            else:
                # Still worth watching: PRADA then treats all queries as one class.
                self.stats.unparsable["scores"] += 1
        return [v for v in vectors if v is not None], classes

    def _tracked(self, policy: str, client_key: str, dim: int, now: float) -> Tracked:
        key = (policy, client_key)
        tracked = self._clients.get(key)
        if tracked is None:
            tracked = Tracked(ClientState(dim=dim))
            self._clients[key] = tracked
            while len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)
                self.stats.evicted += 1
        else:
            self._clients.move_to_end(key)
        tracked.last_seen = now
        return tracked

    def _expire(self, now: float) -> None:
        while self._clients:
            key, oldest = next(iter(self._clients.items()))
            if now - oldest.last_seen < self.idle_ttl:
                return
            del self._clients[key]
            self.stats.expired += 1

    # --- verdicts ---------------------------------------------------------------------------

    def _judge(
        self,
        policy: WatchedPolicy,
        profile: Profile | None,
        client_key: str,
        tracked: Tracked,
        now: float,
    ) -> None:
        if tracked.stage == "detected":
            return
        state = tracked.state
        # Statistics are looked at every EVALUATE_EVERY queries of a client, the grain they
        # were calibrated at: more looks would mean more false positives (and more CPU).
        if state.queries + state.unobserved < tracked.evaluated + EVALUATE_EVERY:
            return
        tracked.evaluated = state.queries + state.unobserved
        findings: list[Finding] = []
        if profile is not None:
            thresholds = profile.thresholds[policy.sensitivity]
            findings = [f for f in state.findings(thresholds, policy.detectors) if f.fired]
        evidence = [Evidence(f.detector, f.statistic, f.threshold, f.queries) for f in findings]
        if tracked.stage == "watching":
            seen = state.queries + state.unobserved
            if state.unobserved >= UNOBSERVED_MIN and state.unobserved * 2 > seen:
                evidence.append(
                    Evidence("unobserved", state.unobserved / seen, 0.5, state.queries)
                )
            if evidence:
                tracked.stage, tracked.suspected_at = "suspected", state.stored
                self._suspicion(policy, client_key, tuple(evidence), now)
            return
        # The throttle comes first: only a client that goes on sending new queries after
        # its suspicion (repeats do not count) can be confirmed — by a second detector, by a
        # statistic far past its threshold, or by the same evidence ``confirm`` queries on.
        since = state.stored - tracked.suspected_at
        confirmed = since >= CONFIRM_MIN and (
            len(findings) >= 2
            or any(f.statistic >= ESCALATE * f.threshold for f in findings)
            or since >= self.confirm
        )
        if findings and confirmed:
            tracked.stage = "detected"
            self._detection(policy, client_key, tuple(evidence), now)

    def _ref(self, policy: WatchedPolicy, client_key: str) -> ClientRef:
        return ClientRef(policy.key, client_key, policy.key_source, policy.key_header)

    def _emit(self, verdict: Verdict) -> None:
        self.stats.verdicts[f"{verdict.stage}:{verdict.action}"] += 1
        try:
            self.sink.emit(verdict)
        except Exception:  # a broken exporter must never stop enforcement
            log.exception("could not emit verdict %s", verdict.summary())

    def _suspicion(
        self, policy: WatchedPolicy, client_key: str, evidence: tuple[Evidence, ...], now: float
    ) -> None:
        client = self._ref(policy, client_key)
        # An absent client key cannot be told apart at the sidecar: alert only.
        enforce = policy.throttle is not None and client_key != ""
        self._emit(Verdict(client, "suspicion", "throttle" if enforce else "alert", evidence, now))
        if enforce and policy.throttle is not None:
            requests, per = policy.throttle
            self.throttler.throttle(
                Enforcement(
                    kind="throttle",
                    client=client,
                    since=now,
                    until=now + (policy.quarantine_seconds or DEFAULT_THROTTLE_SECONDS),
                    reason=evidence[0].detector,
                    requests=requests,
                    per_seconds=per,
                )
            )

    def _detection(
        self, policy: WatchedPolicy, client_key: str, evidence: tuple[Evidence, ...], now: float
    ) -> None:
        client = self._ref(policy, client_key)
        enforce = policy.quarantine_seconds is not None and client_key != ""
        self._emit(
            Verdict(client, "detection", "quarantine" if enforce else "alert", evidence, now)
        )
        if enforce and policy.quarantine_seconds is not None:
            self.verdicts.put(
                Enforcement(
                    kind="quarantine",
                    client=client,
                    since=now,
                    until=now + policy.quarantine_seconds,
                    reason=", ".join(e.detector for e in evidence),
                )
            )

    # --- admin ------------------------------------------------------------------------------

    def release(self, key: str, policy: str | None = None) -> list[Enforcement]:
        """End a client's quarantine and throttle, and forget what it was suspected of."""
        with self._lock:
            for client in [c for c in self._clients if c[1] == key]:
                if policy is None or client[0] == policy:
                    del self._clients[client]
        self.throttler.release(key, policy)
        return self.verdicts.release(key, policy)

    def client_count(self) -> int:
        return len(self._clients)
