"""Shared verdicts and feed ownership against a real Redis (no Envoy): the edge cases the
two-replica end-to-end test does not reach — Redis gone and back, a corrupt entry, owners
moving when a replica leaves."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import pytest
import redis

from controlplane.extraction.routing import REPLICAS, FeedRouter, owner_of
from controlplane.extraction.shared import HASH, SharedVerdicts
from controlplane.extraction.verdicts import ClientRef, Enforcement, VerdictStore
from controlplane.gen.modelguard.feed.v1 import feed_pb2
from tests.conftest import Redis


def until(check: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.02)


def quarantine(key: str, seconds: float = 3600) -> Enforcement:
    now = time.time()
    return Enforcement("quarantine", ClientRef("demo/m", key), now, now + seconds, "test")


def keys(store: VerdictStore) -> set[str]:
    return {e.client.key for e in store.active()}


def test_verdicts_follow_across_replicas_and_survive_redis_going_away(
    redis_server: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    a_store, b_store = VerdictStore(), VerdictStore()
    released: list[tuple[str, str | None]] = []

    def b_release(key: str, policy: str | None) -> list[Enforcement]:
        released.append((key, policy))
        return b_store.release(key, policy)

    a = SharedVerdicts(a_store, redis_server.url, poll_interval=0.05)
    b = SharedVerdicts(b_store, redis_server.url, poll_interval=0.05, release=b_release)
    a.start()
    b.start()
    try:
        a_store.put(quarantine("mallory"))
        until(lambda: keys(b_store) == {"mallory"})
        a_store.release("mallory")
        until(lambda: keys(b_store) == set())
        # A remote release goes through the monitor's release (it forgets the client too).
        assert released == [("mallory", "demo/m")]

        # Redis gone: each replica keeps enforcing what it has; a verdict decided meanwhile
        # is written once Redis is back, and reaches the other replica then.
        b_store.put(quarantine("early"))
        until(lambda: keys(a_store) == {"early"})
        caplog.set_level(logging.INFO, logger="controlplane.extraction.shared")
        caplog.clear()
        redis_server.stop()
        a_store.put(quarantine("offline"))
        assert keys(a_store) == {"early", "offline"} and keys(b_store) == {"early"}
        time.sleep(1.5)  # ~30 retries at the 0.05 s poll interval, were each one logged
        redis_server.start()  # empty: no persistence in this test's Redis
        try:
            until(lambda: keys(b_store) == {"early", "offline"}, timeout=10)
        except AssertionError as err:
            raw = redis.Redis.from_url(redis_server.url).hgetall(HASH)
            raise AssertionError(
                f"a {keys(a_store)} b {keys(b_store)} redis {list(raw)} "
                f"a owed {a._owed} b owed {b._owed} a v {a._version} b v {b._version}"
            ) from err
        assert keys(a_store) == {"early", "offline"}
        # The outage is logged once per replica as it starts and once as it ends.
        until(lambda: len(_outage_logs(caplog, "reachable again")) == 2)
        errors = [
            r
            for r in caplog.records
            if r.name == "controlplane.extraction.shared" and r.levelno >= logging.ERROR
        ]
        assert len(errors) == 2, caplog.text  # "unreachable" or "cannot be written", once each
    finally:
        a.stop()
        b.stop()


def _outage_logs(caplog: pytest.LogCaptureFixture, words: str) -> list[str]:
    """Records of the shared verdicts at INFO or above that say ``words``."""
    return [
        message
        for r in caplog.records
        if r.name == "controlplane.extraction.shared"
        and r.levelno >= logging.INFO
        and words in (message := r.getMessage())
    ]


def test_a_restarted_replica_takes_the_shared_verdicts_and_ignores_corrupt_ones(
    redis_server: Redis,
) -> None:
    first = VerdictStore()
    shared = SharedVerdicts(first, redis_server.url)
    shared.start()
    first.put(quarantine("mallory"))
    shared.stop()
    client = redis.Redis.from_url(redis_server.url)
    client.hset(HASH, "junk", "{not json")
    client.hset(HASH, "expired", json.dumps(quarantine("old", seconds=-1).to_json()))
    # A new replica (or this one restarted) starts from Redis, not from its own memory.
    restarted = VerdictStore()
    again = SharedVerdicts(restarted, redis_server.url)
    again.start()
    try:
        assert keys(restarted) == {"mallory"}
    finally:
        again.stop()


def test_feed_owners_move_when_a_replica_leaves(redis_server: Redis) -> None:
    judged: dict[str, list[str]] = {"a": [], "b": []}

    def judge(name: str) -> Callable[[feed_pb2.FeedBatch], int]:
        def fold(batch: feed_pb2.FeedBatch) -> int:
            judged[name].extend(q.client_key for q in batch.queries)
            return len(batch.queries)

        return fold

    a = FeedRouter(redis_server.url, "a", judge("a"), heartbeat=0.1, ttl=1.0)
    b = FeedRouter(redis_server.url, "b", judge("b"), heartbeat=0.1, ttl=1.0)
    a.start()
    b.start()
    try:
        until(lambda: a.live() == ("a", "b") and b.live() == ("a", "b"))
        clients = [f"client-{i}" for i in range(40)]
        owners = {c: owner_of(c, ("a", "b")) for c in clients}
        assert set(owners.values()) == {"a", "b"}  # both own some
        batch = feed_pb2.FeedBatch(node_id="n", policy="demo/m")
        for c in clients:
            batch.queries.add(client_key=c)
        mine = a.route(batch)
        a.judge(mine)
        until(lambda: len(judged["a"]) + len(judged["b"]) == len(clients))
        assert {c for c in judged["b"]} == {c for c, o in owners.items() if o == "b"}
        assert {c for c in judged["a"]} == {c for c, o in owners.items() if o == "a"}
        # b leaves (SIGTERM): a owns every client at once.
        b.stop()
        until(lambda: a.live() == ("a",))
        assert a.route(batch) is batch
        assert redis.Redis.from_url(redis_server.url).zscore(REPLICAS, "b") is None
    finally:
        a.stop()
        b.stop()
