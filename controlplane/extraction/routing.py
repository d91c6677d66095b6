"""One judgement per client across replicas: each client's queries go to one owner replica.

A sidecar's query feed reaches whichever replica its connection reached, so a client whose
requests are spread over sidecars on two replicas would be judged twice, on half of its
queries each (measured: 48 queries to a quarantine instead of 24). The detectors keep
per-client state that is expensive to share query by query (reference distances, coverage
grids), so instead every client gets one owner replica, chosen by rendezvous (highest
random weight) hashing of its key over the live replicas, and a replica hands the queries
it does not own to their owner.

* Membership: each replica refreshes its id in a Redis sorted set (score: last heartbeat);
  live replicas are those seen within ``ttl``. Rendezvous hashing moves only the clients of
  a replica that joins or leaves.
* Hand-off: through Redis too (one list per replica, the feed batch as protobuf bytes),
  not through a new gRPC port: Redis is already shared, password-protected and admitted by
  the NetworkPolicy, so no new endpoint has to tell a peer from a forger that wants
  someone else quarantined. The owner folds forwarded batches into its monitor exactly as
  its own sidecars' batches.
* Bounds: when the owner changes (a replica starts or stops), the new owner starts the
  client's detector state afresh; verdicts already decided are kept (shared verdicts).
  While Redis is unreachable every replica judges what it receives itself, as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import cast

import redis

from controlplane.gen.modelguard.feed.v1 import feed_pb2

log = logging.getLogger(__name__)

REPLICAS = "modelguard:replicas"  # sorted set: replica id → last heartbeat (unix s)
INBOX = "modelguard:feed:{replica}"  # list of forwarded FeedBatch messages
INBOX_TTL = 30  # s: batches for a replica that went away are dropped, not judged late


def owner_of(client_key: str, replicas: Iterable[str]) -> str:
    """Rendezvous hashing: the replica with the highest hash of (replica, key)."""
    return max(
        replicas,
        key=lambda replica: hashlib.sha256(f"{replica}\0{client_key}".encode()).digest(),
    )


class FeedRouter:
    def __init__(
        self,
        url: str,
        replica_id: str,
        judge: Callable[[feed_pb2.FeedBatch], int],
        *,
        ttl: float = 5.0,
        heartbeat: float = 1.0,
        timeout: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url, self.replica_id, self.judge = url, replica_id, judge
        self.ttl, self.heartbeat = ttl, heartbeat
        self._clock = clock
        self._redis = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        # The inbox is read with a blocking pop: its own connection, a longer timeout.
        self._inbox_redis = redis.Redis.from_url(
            url, socket_timeout=timeout + 2.0, socket_connect_timeout=timeout
        )
        self._live: tuple[str, ...] = ()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.forwarded = 0  # queries handed to their owner (for tests and status)
        self.received = 0  # queries other replicas handed to this one

    # --- membership ------------------------------------------------------------------------

    def _beat(self) -> None:
        now = self._clock()
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.zadd(REPLICAS, {self.replica_id: now})
            pipe.zremrangebyscore(REPLICAS, "-inf", now - 10 * self.ttl)  # long gone
            pipe.zrangebyscore(REPLICAS, now - self.ttl, "+inf")
            *_, live = pipe.execute()
        self._live = tuple(sorted(r.decode() for r in live))

    def live(self) -> tuple[str, ...]:
        return self._live

    # --- routing ---------------------------------------------------------------------------

    def route(self, batch: feed_pb2.FeedBatch) -> feed_pb2.FeedBatch:
        """Forward the queries of clients another replica owns; returns this replica's part."""
        live = self._live
        if len(live) < 2 or self.replica_id not in live:
            return batch  # alone, or cut off from Redis: judge everything here
        mine = feed_pb2.FeedBatch(node_id=batch.node_id, policy=batch.policy)
        mine.sequence = batch.sequence
        theirs: dict[str, feed_pb2.FeedBatch] = {}
        owners: dict[str, str] = {}

        def part(client_key: str) -> feed_pb2.FeedBatch:
            owner = owners.get(client_key)
            if owner is None:
                owner = owners[client_key] = owner_of(client_key, live)
            if owner == self.replica_id:
                return mine
            if owner not in theirs:
                theirs[owner] = feed_pb2.FeedBatch(node_id=batch.node_id, policy=batch.policy)
            return theirs[owner]

        for query in batch.queries:
            part(query.client_key).queries.append(query)
        for gap in batch.unobserved:
            part(gap.client_key).unobserved.append(gap)
        if not theirs:
            return batch
        try:
            with self._redis.pipeline(transaction=False) as pipe:
                for owner, forwarded in theirs.items():
                    inbox = INBOX.format(replica=owner)
                    pipe.rpush(inbox, forwarded.SerializeToString())
                    pipe.expire(inbox, INBOX_TTL)
                pipe.execute()
        except (redis.RedisError, OSError) as err:
            log.warning("feed: cannot hand queries to their owners (%s); judging them here", err)
            return batch
        self.forwarded += sum(len(b.queries) for b in theirs.values())
        return mine

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        with contextlib.suppress(redis.RedisError, OSError):
            self._beat()
        for target, name in ((self._membership, "feed-members"), (self._inbox, "feed-inbox")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _membership(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                self._beat()
            except (redis.RedisError, OSError) as err:
                self._live = ()  # cut off: judge locally rather than forward into the void
                log.warning("feed: %s: %s", self.url, err)

    def _inbox(self) -> None:
        inbox = INBOX.format(replica=self.replica_id)
        while not self._stop.is_set():
            try:
                item = self._inbox_redis.blpop([inbox], timeout=1)
            except (redis.RedisError, OSError) as err:
                log.warning("feed: %s: %s", self.url, err)
                self._stop.wait(self.heartbeat)
                continue
            if item is None:
                continue
            batch = feed_pb2.FeedBatch()
            try:
                batch.ParseFromString(cast(bytes, item[1]))  # no decode_responses
            except Exception as err:  # a corrupt entry must not stop the inbox
                log.error("feed: unreadable forwarded batch: %s", err)
                continue
            self.received += len(batch.queries)
            try:
                self.judge(batch)
            except Exception:
                log.exception("feed: judging a forwarded batch failed")

    def stop(self) -> None:
        """Leave the membership first, so the others take this replica's clients at once."""
        self._stop.set()
        with contextlib.suppress(redis.RedisError, OSError):
            self._redis.zrem(REPLICAS, self.replica_id)
        for thread in self._threads:
            thread.join(timeout=5)
        self._redis.close()
        self._inbox_redis.close()
