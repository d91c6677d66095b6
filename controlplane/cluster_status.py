"""Status across replicas: "Programmed N of M" counts the sidecars of every replica.

Only the Lease holder writes policy status, but each replica knows only the sidecars
connected to it. Every replica therefore publishes, every ``interval``, its sidecars and,
per policy, which of them ACKed a snapshot with the policy's current version, to Redis (one
key per replica, expiring after ``ttl`` so a replica that is gone stops counting). The
status writer of the leader reads the union.

A replica that has not seen a policy's newest version yet has not programmed it: its
report names the version (a digest of the spec) it judged against, and a report for
another version counts its sidecars as targeted but not programmed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import redis

from controlplane.compile.inputs.inventory import InventoryError, Sidecar

log = logging.getLogger(__name__)

PolicyKey = tuple[str, str, str]
KEY = "modelguard:status:{replica}"
INDEX = "modelguard:status:replicas"


def _name(key: PolicyKey) -> str:
    return "/".join(key)


def spec_digest(spec_json: str) -> str:
    return hashlib.sha256(spec_json.encode()).hexdigest()[:16]


class SharedStatus:
    def __init__(
        self,
        url: str,
        replica_id: str,
        sidecars: Callable[[], tuple[Sidecar, ...]],
        programmed: Callable[[PolicyKey], Mapping[str, bool]],
        versions: Callable[[], Mapping[PolicyKey, str]],
        *,
        interval: float = 0.5,
        ttl: float = 5.0,
        timeout: float = 0.5,
    ) -> None:
        self.url, self.replica_id = url, replica_id
        self._local_sidecars, self._local_programmed = sidecars, programmed
        self._versions = versions  # policy → digest of the spec this replica serves
        self.interval, self.ttl = interval, ttl
        self._redis = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=True
        )
        self._remote: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- what the status writer reads ------------------------------------------------------

    def sidecars(self) -> tuple[Sidecar, ...]:
        local = self._local_sidecars()
        seen = {s.node_id for s in local}
        out = list(local)
        for report in self._remote:
            for node_id, metadata in report["sidecars"].items():
                if node_id in seen:
                    continue  # it moved here: this replica's view is the fresh one
                try:
                    out.append(Sidecar.from_metadata(node_id, metadata))
                except InventoryError:
                    continue
                seen.add(node_id)
        return tuple(out)

    def programmed(self, key: PolicyKey) -> dict[str, bool]:
        out: dict[str, bool] = {}
        version = self._versions().get(key)
        for report in self._remote:
            entry = report["programmed"].get(_name(key))
            for node_id in report["sidecars"]:
                out[node_id] = bool(
                    entry is not None
                    and entry["version"] == version
                    and entry["nodes"].get(node_id, False)
                )
        out.update(self._local_programmed(key))
        return out

    # --- publishing ---------------------------------------------------------------------------

    def _report(self) -> dict[str, Any]:
        sidecars = self._local_sidecars()
        return {
            "replica": self.replica_id,
            "at": time.time(),
            "sidecars": {s.node_id: s.to_metadata() for s in sidecars},
            "programmed": {
                _name(key): {"version": version, "nodes": dict(self._local_programmed(key))}
                for key, version in self._versions().items()
            },
        }

    def step(self) -> None:
        own = KEY.format(replica=self.replica_id)
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(own, json.dumps(self._report()), px=int(self.ttl * 1000))
            pipe.sadd(INDEX, self.replica_id)
            pipe.smembers(INDEX)
            *_, members = pipe.execute()
        others = sorted(m for m in members if m != self.replica_id)
        values = self._redis.mget([KEY.format(replica=m) for m in others]) if others else []
        remote = []
        for member, value in zip(others, values, strict=True):
            if value is None:  # expired: that replica is gone
                self._redis.srem(INDEX, member)
                continue
            with contextlib.suppress(ValueError, KeyError, TypeError):
                report = json.loads(value)
                if isinstance(report["sidecars"], dict) and isinstance(report["programmed"], dict):
                    remote.append(report)
        self._remote = remote

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="shared-status", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except (redis.RedisError, OSError) as err:
                self._remote = []  # unknown: count only what this replica sees
                log.warning("status: %s: %s", self.url, err)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(redis.RedisError, OSError):
            self._redis.delete(KEY.format(replica=self.replica_id))
            self._redis.srem(INDEX, self.replica_id)
        self._redis.close()


def versions_of(policies: Iterable[Any]) -> dict[PolicyKey, str]:
    """Policy → digest of the spec being served (what ``ProgramTracker`` fingerprints)."""
    return {
        p.ref: spec_digest(
            p.spec.model_dump_json(by_alias=True)
        )
        for p in policies
    }
