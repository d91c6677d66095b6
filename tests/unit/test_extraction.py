"""The extraction monitor's parts: JSONPath, verdict store, staging, sinks, compile."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from monitor_policy import fixed_profile, policies

from controlplane.api.jsonpath import JsonPath, JsonPathError
from controlplane.extraction.monitor import ExtractionMonitor
from controlplane.extraction.verdicts import (
    ClientRef,
    Enforcement,
    Evidence,
    InMemoryVerdictSink,
    OtelVerdictSink,
    Verdict,
    VerdictStore,
    digest,
)
from controlplane.gen.modelguard.feed.v1 import feed_pb2
from controlplane.local.model import load_model
from controlplane.policies.extraction.verdicts_compile import compile_verdicts


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


# --- JSONPath ------------------------------------------------------------------------------------


def test_jsonpath_selects_what_policies_point_at() -> None:
    doc = {"instances": [[1, 2], [3, 4]], "predictions": [{"probabilities": [0.1, 0.9]}]}
    assert JsonPath.parse("$.instances[*]").find(doc) == [[1, 2], [3, 4]]
    assert JsonPath.parse("$.instances[-1]").find(doc) == [[3, 4]]
    assert JsonPath.parse("$.predictions[*].probabilities").find(doc) == [[0.1, 0.9]]
    assert JsonPath.parse("$['predictions'][0].probabilities").find(doc) == [[0.1, 0.9]]
    assert JsonPath.parse("$.missing[*]").find(doc) == []
    assert JsonPath.parse("$.instances[*]").find("not a dict") == []
    with pytest.raises(JsonPathError, match="position 11"):
        JsonPath.parse("$.instances?(@.x)")


# --- the verdict store ---------------------------------------------------------------------------


def quarantine(key: str, until: float, policy: str = "demo/digits-model") -> Enforcement:
    return Enforcement(
        "quarantine", ClientRef.of(policy, key, "header", "x-api-key"), until - 60, until, "prada"
    )


def keys(items: Iterable[Enforcement]) -> list[str]:
    """Which of the test's keys the enforcements are on (the store keeps digests only)."""
    names = {digest(k): k for k in ("a", "b", "q", "t", "x", "k")}
    return [names.get(e.client.key, e.client.key) for e in items]


def test_quarantines_persist_expire_and_release(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "state" / "verdicts.json"
    store = VerdictStore(path, clock)
    changes: list[int] = []
    store.subscribe(lambda: changes.append(1))
    store.put(quarantine("a", clock.now + 10))
    store.put(quarantine("b", clock.now + 100))
    assert keys(store.active()) == ["b", "a"] or keys(store.active()) == ["a", "b"]
    # A restart reads them back.
    again = VerdictStore(path, clock)
    assert again.active() == store.active()
    # Expiry by time alone: "a" is no longer active even before expire() runs...
    clock.now += 11
    assert keys(again.active()) == ["b"]
    # ... and expire() drops it from the file and tells listeners (sidecars get updated).
    assert keys(store.expire()) == ["a"]
    assert len(changes) == 3
    # The file is a log of changes (one line each), never the key itself.
    assert "\"a\"" not in path.read_text() and "\"b\"" not in path.read_text()
    assert keys(VerdictStore(path, clock).active()) == ["b"]
    assert keys(store.release("b")) == ["b"]
    assert store.release("b") == []
    assert VerdictStore(path, clock).active() == ()


def test_a_quarantine_replaces_the_clients_throttle() -> None:
    store = VerdictStore()
    client = ClientRef.of("demo/p", "k", "header", "x-api-key")
    store.put(Enforcement("throttle", client, 0, 4e9, "prada", 5, 60))
    store.put(Enforcement("quarantine", client, 0, 4e9, "prada"))
    assert [e.kind for e in store.active()] == ["quarantine"]


def test_unreadable_state_is_kept_aside_not_lost(tmp_path: Path) -> None:
    path = tmp_path / "verdicts.json"
    path.write_text("{not json")
    store = VerdictStore(path, Clock())
    assert store.active() == ()
    kept = list(tmp_path.glob("verdicts.json.unreadable-*"))
    assert len(kept) == 1 and kept[0].read_text() == "{not json"


# --- compile -------------------------------------------------------------------------------------


def test_verdicts_compile_for_the_policys_sidecars_only() -> None:
    (policy,) = policies()
    throttle = Enforcement(
        "throttle", ClientRef.of("demo/digits-model", "t", "header", "x-api-key"), 0, 4e9, "p", 5,
        60,
    )
    ir = compile_verdicts(
        [policy], [quarantine("q", 4e9), throttle, quarantine("x", 4e9, "other/policy")]
    )
    assert ir is not None
    assert [(c.value, c.client_key.name) for c in ir.quarantined] == [(digest("q"), "x-api-key")]
    assert [(c.value, c.requests, c.window_seconds) for c in ir.throttled] == [
        (digest("t"), 5, 60)
    ]
    assert compile_verdicts([policy], []) is None


# --- the monitor ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return load_model(0)


def batch(model, key: str, X: np.ndarray) -> feed_pb2.FeedBatch:  # type: ignore[no-untyped-def]
    out = feed_pb2.FeedBatch(node_id="n", policy="demo/digits-model")
    for row in X:
        proba = model.predict_proba(row[None])[0]
        out.queries.add(
            client_key=key,
            status=200,
            request_body=json.dumps({"instances": [row.tolist()]}).encode(),
            response_body=json.dumps(
                {"predictions": [{"label": int(proba.argmax()), "probabilities": proba.tolist()}]}
            ).encode(),
        )
    return out


def monitor(clock: Clock, sink=None):  # type: ignore[no-untyped-def]
    current = policies()
    return ExtractionMonitor(
        lambda: current,
        VerdictStore(clock=clock),
        sink or InMemoryVerdictSink(),
        profile=fixed_profile,
        clock=clock,
    )


def test_an_attacker_is_throttled_then_quarantined_and_benign_users_are_not(model) -> None:
    clock = Clock()
    sink = InMemoryVerdictSink()
    mon = monitor(clock, sink)
    rng = np.random.default_rng(0)
    noise = rng.uniform(0, 16, size=(120, 64)).round(1)
    for start in range(0, len(noise), 8):
        mon.report(batch(model, "attacker", noise[start : start + 8]))
        mon.report(batch(model, "benign", model.test_X[start : start + 8]))
    stages = [(v.stage, v.action, v.client.key) for v in sink.verdicts]
    assert stages == [
        ("suspicion", "throttle", digest("attacker")),
        ("detection", "quarantine", digest("attacker")),
    ]
    (detected,) = [v for v in sink.verdicts if v.stage == "detection"]
    first = detected.evidence[0]
    assert first.statistic >= first.threshold and first.queries <= 120
    kinds = [(e.kind, e.client.key) for e in mon.verdicts.active()]
    assert kinds == [("quarantine", digest("attacker"))]
    assert mon.verdicts.active()[0].until == clock.now + 3600
    # Release ends the quarantine and forgets the suspicion: the client starts afresh.
    assert [e.kind for e in mon.release("attacker")] == ["quarantine"]
    assert mon.verdicts.active() == ()


def test_gaps_in_observation_are_a_signal_never_a_quarantine(model) -> None:
    clock = Clock()
    sink = InMemoryVerdictSink()
    mon = monitor(clock, sink)
    gap = feed_pb2.FeedBatch(policy="demo/digits-model")
    gap.unobserved.add(client_key="flooder", count=500, reason="buffer_full")
    mon.report(gap)
    mon.report(gap)
    assert [(v.stage, v.evidence[0].detector) for v in sink.verdicts] == [
        ("suspicion", "unobserved")
    ]
    assert [e.kind for e in mon.verdicts.active()] == ["throttle"]
    assert mon.stats.unobserved == 1000


def test_bad_bodies_and_unknown_policies_are_counted_not_fatal(model) -> None:
    mon = monitor(Clock())
    bad = feed_pb2.FeedBatch(policy="demo/digits-model")
    bad.queries.add(client_key="k", request_body=b"{not json")
    bad.queries.add(client_key="k", request_body=b'{"instances": [["a"]]}')
    bad.queries.add(client_key="k", request_body=b'{"instances": [[1, 2, 3]]}')
    assert mon.report(bad) == 0
    assert mon.stats.unparsable == {"request_json": 1, "features": 1, "dimension": 1}
    assert mon.report(feed_pb2.FeedBatch(policy="nope/nope", queries=[bad.queries[0]])) == 0
    assert mon.stats.unknown_policy == 1


def test_client_state_is_bounded_and_expires(model) -> None:
    clock = Clock()
    mon = monitor(clock)
    mon.max_clients = 3
    for i in range(5):
        mon.report(batch(model, f"c{i}", model.test_X[:2]))
    assert mon.client_count() == 3 and mon.stats.evicted == 2
    clock.now += mon.idle_ttl + 1
    mon.report(batch(model, "late", model.test_X[:1]))
    assert mon.client_count() == 1 and mon.stats.expired == 3


def test_verdicts_are_opentelemetry_log_records_with_their_evidence() -> None:
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor

    exporter = InMemoryLogRecordExporter()
    provider = LoggerProvider()
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    verdict = Verdict(
        ClientRef.of("demo/digits-model", "secret-key", "header", "x-api-key"),
        "detection",
        "quarantine",
        (Evidence("outOfDistribution", 42.0, 5.9, 24),),
        1_700_000_000.0,
    )
    OtelVerdictSink(provider).emit(verdict)
    (record,) = [r.log_record for r in exporter.get_finished_logs()]
    assert record.event_name == "modelguard.extraction.verdict"
    attrs = dict(record.attributes or {})
    assert attrs["modelguard.detector"] == "outOfDistribution"
    assert attrs["modelguard.statistic"] == 42.0
    assert attrs["modelguard.threshold"] == 5.9
    assert attrs["modelguard.queries"] == 24
    assert attrs["modelguard.verdict.action"] == "quarantine"
    # API keys are secrets: the record names the client by a fingerprint only.
    assert "secret-key" not in json.dumps(attrs) + str(record.body)
    assert attrs["modelguard.client"].startswith("sha256:")
