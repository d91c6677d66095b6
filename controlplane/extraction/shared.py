"""One set of verdicts for every control-plane replica: the ``VerdictStore`` kept in step
with a Redis hash.

Each replica keeps its own ``VerdictStore`` (compile reads it, the admin API lists it), and
this module mirrors it both ways:

* a local change (the monitor's verdict, an admin release, an expiry) is written to the hash
  at once, the version counter is bumped and a message is published;
* every replica re-reads the hash when a message arrives, and also when the version counter
  moved (polled every ``poll_interval``: pub/sub messages are lost while a connection is
  down), and applies the difference to its store. Its sidecars then get the verdict through
  the ordinary debounced push, well within a second.

Redis is the truth: a replica (re)starting takes the hash (plus what its own file held,
where it has one), so verdicts survive restarts and Lease moves, and a release made on
any replica ends the verdict everywhere (a remote release goes through the same
``release`` callable as a local one, so the monitor also forgets what the client was
suspected of). While Redis is unreachable each
replica keeps enforcing what it has and retries the write it owes.

Why Redis and not a ``ClientQuarantine`` Kubernetes kind: verdicts are decided at query
speed by a detector and must reach every replica within a second; the API server is not
built for high-churn objects written from the data path, and a kind would put client keys
(API-key ids, IP addresses) into etcd, readable by anyone allowed to ``get`` it. Redis is
already the budgets' shared store, so one backend flag (``--rate-limit-backend``) gives
one consistent place for everything that decides enforcement. ``modelguard quarantine
list/release`` (through ``kubectl port-forward``) is the operator's view.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from controlplane.extraction.verdicts import Enforcement, VerdictStore

log = logging.getLogger(__name__)

KEY_PREFIX = "modelguard:verdicts"
HASH = KEY_PREFIX  # field (kind, policy, client key) → the Enforcement as JSON
VERSION = f"{KEY_PREFIX}:version"  # bumped on every write
CHANNEL = f"{KEY_PREFIX}:changed"  # a message on every write
MAX_RETRY_SECONDS = 2.0  # the longest wait between attempts while Redis is unreachable


def field_of(e: Enforcement) -> str:
    return "\x1f".join((e.kind, e.client.policy, e.client.key))


class SharedVerdicts:
    """Mirrors one replica's ``VerdictStore`` into the hash every replica shares."""

    def __init__(
        self,
        store: VerdictStore,
        url: str,
        *,
        release: Callable[[str, str | None], object] | None = None,
        poll_interval: float = 0.2,
        timeout: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.url = url
        self._release = release or store.release
        self.poll_interval = poll_interval
        self._clock = clock
        self._redis = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=True
        )
        # What the hash held when this replica last read or wrote it. A local enforcement
        # missing from a fresh read was released elsewhere; one missing from ``_synced``
        # is a local change still to write.
        self._synced: dict[str, Enforcement] = {}
        self._version: str | None = None
        self._owed = False  # a local change Redis has not taken (it was unreachable)
        self._applying = False
        # Re-entrant: applying a remote change calls store.put/release, whose listener
        # (``_local_changed``) runs in the same thread.
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.applied = 0  # remote reads that changed this replica's store (for tests)
        # When Redis became unreachable (None: reachable). An outage is logged once when it
        # starts and once when it ends, not on every retry (every poll_interval: a flood).
        self._down_since: float | None = None

    def _unreachable(self, what: str, err: Exception) -> None:
        with self._lock:  # the follow thread and a local change may fail at once
            first = self._down_since is None
            if first:
                self._down_since = time.monotonic()
        if first:
            log.error("verdicts: %s %s (%s); retrying until it is back", self.url, what, err)
        else:
            log.debug("verdicts: %s still %s (%s)", self.url, what, err)

    def _reachable(self) -> None:
        with self._lock:
            down_since, self._down_since = self._down_since, None
        if down_since is not None:
            log.warning(
                "verdicts: %s reachable again after %.1f s",
                self.url,
                time.monotonic() - down_since,
            )

    # --- local → Redis ---------------------------------------------------------------------

    def _local_changed(self) -> None:
        with self._lock:
            if self._applying:
                return
            self._push()

    def _push(self) -> None:
        local = {field_of(e): e for e in self.store.active()}
        changed = {f: e for f, e in local.items() if self._synced.get(f) != e}
        gone = [f for f in self._synced if f not in local]
        if not changed and not gone:
            self._owed = False
            return
        try:
            with self._redis.pipeline(transaction=True) as pipe:
                if changed:
                    pipe.hset(
                        HASH, mapping={f: json.dumps(e.to_json()) for f, e in changed.items()}
                    )
                if gone:
                    pipe.hdel(HASH, *gone)
                pipe.incr(VERSION)
                pipe.publish(CHANNEL, "1")
                pipe.execute()
        except (redis.RedisError, OSError) as err:
            self._owed = True
            # What Redis holds is unknown now (it may come back empty): the retry writes
            # every local verdict, not only this change. Keeping a verdict someone released
            # meanwhile is the safe side; releasing one nobody released is not.
            self._synced = {}
            self._unreachable("cannot be written", err)
            return
        self._owed = False
        self._synced = local
        # ``_version`` stays: another replica may have written just before us, and the
        # next poll reads the hash (an idempotent no-op when nothing else changed).

    # --- Redis → local ---------------------------------------------------------------------

    def _read(self) -> tuple[str | None, dict[str, Enforcement]]:
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.get(VERSION)
            pipe.hgetall(HASH)
            version, raw = pipe.execute()
        now = self._clock()
        remote: dict[str, Enforcement] = {}
        for name, value in raw.items():
            try:
                e = Enforcement.from_json(json.loads(value))
            except (ValueError, TypeError, KeyError) as err:
                log.error("verdicts: %s field %r: %s; ignored", HASH, name, err)
                continue
            if e.until > now:
                remote[field_of(e)] = e
        return version, remote

    def pull(self, *, force: bool = False) -> bool:
        """Apply what other replicas wrote; True if this replica's store changed."""
        with self._lock:
            if self._owed:
                self._push()
                if self._owed:
                    return False  # never overwrite a local change Redis has not seen
            if (
                not force
                and self._version is not None
                and self._redis.get(VERSION) == self._version
            ):
                return False
            version, remote = self._read()
            if version is None and self._version is not None:
                # Redis lost its data (restarted without persistence, flushed, failed over
                # to an empty replica): write back what this replica enforces, then read.
                log.warning("verdicts: %s came back empty; writing ours back", self.url)
                self._synced = {}
                self._push()
                version, remote = self._read()
            local = {field_of(e): e for e in self.store.active()}
            # Only what Redis had and lost was released elsewhere; a local verdict Redis has
            # not seen yet (its listener waits for this lock) is a change still to write,
            # and so is a local release of something Redis still has.
            synced = self._synced
            released = {
                (e.client.key, e.client.policy)
                for f, e in local.items()
                if f not in remote and f in synced
            }
            added = [
                e
                for f, e in remote.items()
                if local.get(f) != e and not (f in synced and f not in local)
            ]
            self._applying = True
            try:
                for key, policy in sorted(released):
                    self._release(key, policy)
                # A release ends both kinds of a client: put back what the hash still holds.
                current = {field_of(e): e for e in self.store.active()}
                keep_released = {f for f in synced if f not in local}
                for name, e in remote.items():
                    if current.get(name) != e and name not in keep_released:
                        self.store.put(e)
            finally:
                self._applying = False
            self._synced = remote
            self._version = version
            changed = bool(released or added)
            self.applied += changed
            return changed

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Take the shared verdicts, add this replica's own (from its file, if any), then
        follow them."""
        try:
            self.pull(force=True)
            with self._lock:
                self._push()  # verdicts this replica had before (its file) join the others
        except (redis.RedisError, OSError) as err:
            self._unreachable("unreachable at start", err)
        self.store.subscribe(self._local_changed)
        self._thread = threading.Thread(target=self._follow, name="shared-verdicts", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        pubsub: Any = None
        retry = self.poll_interval
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self._redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
                    pubsub.subscribe(CHANNEL)
                    self.pull(force=True)  # what was written while not subscribed
                pubsub.get_message(timeout=self.poll_interval)
                self.pull()
                if not self._owed:
                    self._reachable()
                retry = self.poll_interval
            except (redis.RedisError, OSError) as err:
                self._unreachable("unreachable", err)
                if pubsub is not None:
                    with contextlib.suppress(redis.RedisError, OSError):
                        pubsub.close()
                    pubsub = None
                # Back off while it stays down (each attempt may wait a connect timeout);
                # at most MAX_RETRY_SECONDS between attempts, so a return is seen soon.
                self._stop.wait(retry)
                retry = min(retry * 2, MAX_RETRY_SECONDS)
        if pubsub is not None:
            with contextlib.suppress(redis.RedisError, OSError):
                pubsub.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._redis.close()
