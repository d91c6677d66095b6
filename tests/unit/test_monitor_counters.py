"""The extraction monitor's counters on the admin API and in ``modelguard quarantine list``;
client keys and other per-client input in bounded memory."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from monitor_policy import fixed_profile, policies

from controlplane.app.cli import main as cli
from controlplane.extraction.admin import QuarantineAdmin
from controlplane.extraction.feed import QueryFeedService
from controlplane.extraction.monitor import KEY_LIMIT, ExtractionMonitor, tracking_key
from controlplane.extraction.verdicts import InMemoryVerdictSink, VerdictStore
from controlplane.gen.modelguard.admin.v1 import admin_pb2, admin_pb2_grpc
from controlplane.gen.modelguard.feed.v1 import feed_pb2, feed_pb2_grpc
from controlplane.local.model import load_model


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return load_model(0)


def new_monitor(max_clients: int = 2048) -> ExtractionMonitor:
    loaded = policies()
    return ExtractionMonitor(
        lambda: loaded,
        VerdictStore(),
        InMemoryVerdictSink(),
        profile=fixed_profile,
        max_clients=max_clients,
    )


def add(batch: feed_pb2.FeedBatch, model: Any, key: str, X: np.ndarray) -> None:
    for row in X:
        proba = model.predict_proba(row[None])[0]
        batch.queries.add(
            client_key=key,
            request_body=json.dumps({"instances": [row.tolist()]}).encode(),
            response_body=json.dumps({"predictions": [{"probabilities": proba.tolist()}]}).encode(),
        )


class Served:
    """The feed and the quarantine admin on a real grpc.aio server, on a loop thread."""

    def __init__(self, monitor: ExtractionMonitor) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.feed = QueryFeedService(monitor)
        self.server, self.port = self.run(self._start(monitor))

    async def _start(self, monitor: ExtractionMonitor) -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        self.feed.add_to(server)
        QuarantineAdmin(monitor).add_to(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self.run(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def served() -> Iterator[tuple[ExtractionMonitor, Served]]:
    monitor = new_monitor(max_clients=3)
    s = Served(monitor)
    try:
        yield monitor, s
    finally:
        s.close()


def test_counters_on_the_admin_api_and_in_quarantine_list(
    served: tuple[ExtractionMonitor, Served], model: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    _, s = served
    address = f"127.0.0.1:{s.port}"
    batch = feed_pb2.FeedBatch(node_id="n", policy="demo/digits-model")
    add(batch, model, "alice", model.test_X[:3])
    add(batch, model, "bob", model.test_X[3:4])
    batch.queries.add(client_key="bob", request_body=b"{not json")
    batch.queries.add(
        client_key="bob",
        request_body=json.dumps({"instances": [model.test_X[5].tolist()]}).encode(),
        response_body=b"<html>busy</html>",
    )
    batch.unobserved.add(client_key="carol", count=7, reason="buffer_full")
    batch.unobserved.add(client_key="dave", count=2, reason="x" * 10_000)  # not a reason
    with grpc.insecure_channel(address) as channel:
        feed = feed_pb2_grpc.QueryFeedStub(channel)
        assert feed.Report(batch, timeout=30).accepted == 5
        feed.Report(feed_pb2.FeedBatch(policy="nope/nope", queries=[batch.queries[0]]), timeout=30)
        # A fourth client evicts the least recently seen of at most three.
        gap = feed_pb2.FeedBatch(policy="demo/digits-model")
        gap.unobserved.add(client_key="erin", count=500, reason="call_failed")
        feed.Report(gap, timeout=30)
        feed.Report(gap, timeout=30)  # mostly unobserved: suspected
        stats = admin_pb2_grpc.QuarantinesStub(channel).GetMonitorStats(
            admin_pb2.MonitorStatsRequest(), timeout=10
        )
    assert stats.batches == 4
    assert stats.queries == 5
    assert stats.unobserved == 1009
    assert dict(stats.unobserved_by_reason) == {
        "buffer_full": 7,
        "other": 2,
        "call_failed": 1000,
    }
    assert dict(stats.unparsable) == {"request_json": 1, "response_json": 1}
    assert stats.unknown_policy == 1
    assert dict(stats.verdicts) == {"suspicion:throttle": 1}
    assert (stats.clients_tracked, stats.clients_max, stats.clients_evicted) == (3, 3, 2)
    assert stats.long_keys == 0 and stats.refused_batches == 0

    assert cli(["quarantine", "--admin", address, "list"]) == 0
    out = capsys.readouterr().out
    assert "no clients quarantined" in out
    assert "monitor: 5 queries observed in 4 batches, 1,009 unobserved" in out
    assert "buffer_full 7, call_failed 1,000, other 2" in out
    assert "2 unreadable (request_json 1, response_json 1), 1 for an unknown policy" in out
    assert "1 verdicts (suspicion:throttle 1), 3 of at most 3 clients tracked (2 evicted" in out

    assert cli(["quarantine", "--admin", address, "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["monitor"]["queries"] == 5  # uint64 as a number (protobuf's JSON: "5")
    assert listed["monitor"]["unparsable"] == {"request_json": 1, "response_json": 1}
    assert listed["monitor"]["longKeys"] == 0  # camelCase, as every --json


def test_a_long_client_key_is_tracked_by_digest_detected_and_enforced_as_sent(
    model: Any,
) -> None:
    monitor = new_monitor()
    long_key = "k" * 50_000
    other = "k" * 49_999 + "j"  # same first 200 characters: still another client
    rng = np.random.default_rng(0)
    noise = rng.uniform(0, 16, size=(160, 64)).round(1)
    for start in range(0, len(noise), 8):
        batch = feed_pb2.FeedBatch(policy="demo/digits-model")
        add(batch, model, long_key, noise[start : start + 8])
        add(batch, model, other, model.test_X[start : start + 8])
        monitor.report(batch)
    # Detection works for it as for any client, and the quarantine names the key by the
    # digest the sidecar computes of the header: 64 hex digits, however long the key.
    (quarantine,) = [e for e in monitor.verdicts.active() if e.kind == "quarantine"]
    assert quarantine.client.key == hashlib.sha256(long_key.encode()).hexdigest()
    # In memory the monitor files both under bounded, distinct names.
    filed = [key for _, key in monitor._clients]
    assert len(filed) == 2 and len(set(filed)) == 2
    assert all(KEY_LIMIT < len(key.encode()) <= 200 * 4 + 72 for key in filed)
    assert monitor.stats.long_keys == 2
    # Release by the key as the operator knows it reaches the state filed by digest.
    assert [e.kind for e in monitor.release(long_key)] == ["quarantine"]
    assert [key for _, key in monitor._clients] == [tracking_key(other)]


def test_tracking_keys_are_the_key_up_to_the_limit_and_never_collide() -> None:
    short = "é" * (KEY_LIMIT // 2)  # 256 bytes in UTF-8: at the limit, kept as it is
    assert tracking_key(short) == short
    assert tracking_key("") == ""
    over = "é" * (KEY_LIMIT // 2 + 1)  # 129 characters, 258 bytes
    assert tracking_key(over) != over and len(tracking_key(over).encode()) > KEY_LIMIT
    assert tracking_key(over) == tracking_key("é" * (KEY_LIMIT // 2 + 1))
    # No short key can name a long key's state: a filed digest is itself over the limit.
    assert tracking_key(tracking_key(over)) != tracking_key(over)


def test_unobserved_reasons_are_a_closed_set(model: Any) -> None:
    monitor = new_monitor()
    gap = feed_pb2.FeedBatch(policy="demo/digits-model")
    for i in range(1000):
        gap.unobserved.add(client_key="c", count=1, reason=f"made-up-{i}")
    gap.unobserved.add(client_key="c", count=1, reason="body_too_large")
    monitor.report(gap)
    assert dict(monitor.stats.unobserved_by_reason) == {"other": 1000, "body_too_large": 1}


def test_values_the_float32_state_cannot_hold_are_junk_not_infinities(model: Any) -> None:
    monitor = new_monitor()
    batch = feed_pb2.FeedBatch(policy="demo/digits-model")
    row = model.test_X[0].tolist()
    batch.queries.add(
        client_key="big", request_body=json.dumps({"instances": [[1e39, *row[1:]]]}).encode()
    )
    batch.queries.add(
        client_key="big", request_body=json.dumps({"instances": [[10**400, *row[1:]]]}).encode()
    )
    batch.queries.add(client_key="big", request_body=json.dumps({"instances": [row]}).encode())
    assert monitor.report(batch) == 1
    assert monitor.stats.unparsable == {"features": 2}
    (tracked,) = monitor._clients.values()
    assert np.isfinite(tracked.state.history).all() and tracked.state.stored == 1


def test_scores_of_several_lengths_keep_their_instances_order(model: Any) -> None:
    """Classes come from each instance's own scores, whatever lengths are mixed in a batch."""
    monitor = new_monitor()
    X = model.test_X[:2]
    batch = feed_pb2.FeedBatch(policy="demo/digits-model")
    for scores in ([[0, 0, 1], [1] + [0] * 9], [[0] * 9 + [1], [0, 1, 0]]):
        batch.queries.add(
            client_key="mixed",
            request_body=json.dumps({"instances": X.tolist()}).encode(),
            response_body=json.dumps(
                {"predictions": [{"probabilities": s} for s in scores]}
            ).encode(),
        )
    matrix, clients = monitor._read(monitor._policy("demo/digits-model"), 64, batch.queries)  # type: ignore[arg-type]
    assert clients["mixed"].labels == [2, 0, 9, 1]
    assert matrix.shape == (4, 64) and clients["mixed"].rows == [0, 1, 2, 3]
