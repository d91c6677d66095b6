"""Status across replicas: "Programmed N of M" counts the sidecars of every replica.

Only the Lease holder writes policy status, but each replica knows only the sidecars
connected to it. Every replica therefore publishes, every ``interval``, its sidecars and,
per policy, which of them ACKed a snapshot with the policy's current version, to Redis (a
report key per replica and one for its sidecars, both expiring after ``ttl`` so a replica
that is gone stops counting). The status writer of the leader reads the union.

At thousands of sidecars per replica the report must stay cheap to write and read twice a
second: the sidecars are written only when they changed, the ACKed ones listed once (with,
per policy, whether the replica compiled its current version), and readers keep what they
parsed while it is unchanged (bench/k8s_scale.py --replicas 2).

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
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from controlplane.compile.inputs.inventory import InventoryError, Sidecar

log = logging.getLogger(__name__)

PolicyKey = tuple[str, str, str]
KEY = "modelguard:status:{replica}"
SIDECARS_KEY = "modelguard:status:{replica}:sidecars"
INDEX = "modelguard:status:replicas"


def _name(key: PolicyKey) -> str:
    return "/".join(key)


def spec_digest(spec_json: str) -> str:
    return hashlib.sha256(spec_json.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class _RemoteView:
    """The other replicas' reports, parsed: their sidecars (first report wins), and per
    policy the (version, programmed node ids) of each report."""

    sidecars: tuple[Sidecar, ...]
    programmed: Mapping[str, list[tuple[str, frozenset[str]]]]


class _Programmed(Mapping[str, bool]):
    """A policy's programmed sidecars over every replica: this replica's answer for its
    own sidecars, the reports' for the others."""

    def __init__(
        self, local: Mapping[str, bool], local_ids: frozenset[str], remote: set[str]
    ) -> None:
        self._local, self._local_ids, self._remote = local, local_ids, remote

    def get(self, node_id: str, default: Any = None) -> Any:
        if node_id in self._local_ids:
            return True if self._local.get(node_id, False) else default
        return True if node_id in self._remote else default

    def __getitem__(self, node_id: str) -> bool:
        if self.get(node_id, False):
            return True
        raise KeyError(node_id)

    def __iter__(self) -> Iterator[str]:
        yield from (n for n in self._local_ids if self._local.get(n, False))
        yield from (n for n in self._remote if n not in self._local_ids)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class VersionsOf:
    """``versions_of`` the store's current policies, computed once per policy set (the
    status writer asks once per policy and pass)."""

    def __init__(self, current: Callable[[], Any]) -> None:
        self._current = current
        self._cached: tuple[Any, dict[PolicyKey, str]] | None = None

    def __call__(self) -> dict[PolicyKey, str]:
        policy_set = self._current()
        if self._cached is None or self._cached[0] is not policy_set:
            self._cached = (policy_set, versions_of(policy_set.policies))
        return self._cached[1]


class SharedStatus:
    def __init__(
        self,
        url: str,
        replica_id: str,
        sidecars: Callable[[], tuple[Sidecar, ...]],
        programmed: Callable[[PolicyKey], Mapping[str, bool]],
        versions: Callable[[], Mapping[PolicyKey, str]],
        *,
        serving: Callable[[], Iterable[str]] | None = None,
        compiled: Callable[[PolicyKey], bool] | None = None,
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
        self._remote_view = _RemoteView((), {})
        self._parsed: dict[str, tuple[Any, Sidecar]] = {}  # node id → (metadata, parsed)
        # node id → (the sidecar object, its JSON), and the JSON of them all as last built
        self._published: dict[str, tuple[Sidecar, str]] = {}
        self._sidecars_json_cache: tuple[tuple[Sidecar, ...], str] | None = None
        self._sidecars_sent: str | None = None
        self._sidecars_counter = 0
        self._instance = uuid.uuid4().hex[:8]  # a restarted replica's versions are new ones
        self._fetched: dict[str, tuple[Any, dict[str, Any]]] = {}  # replica → (version, sidecars)
        self._local_serving, self._local_compiled = serving, compiled
        self._merged: (
            tuple[tuple[Sidecar, ...], _RemoteView, tuple[Sidecar, ...], frozenset[str]] | None
        ) = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- what the status writer reads ------------------------------------------------------
    # Twice a second, for every sidecar of every replica: the remote reports are parsed
    # once per ``step`` (in its thread), each sidecar into the same object while its
    # metadata is unchanged (the status writer tells changed sidecars by identity), and
    # nothing here builds a dict of every sidecar per policy.

    def sidecars(self) -> tuple[Sidecar, ...]:
        local = self._local_sidecars()
        remote = self._remote_view
        cached = self._merged
        if cached is not None and cached[0] is local and cached[1] is remote:
            return cached[2]
        local_ids = frozenset(s.node_id for s in local)
        # A sidecar that moved here: this replica's view is the fresh one.
        merged = (*local, *(s for s in remote.sidecars if s.node_id not in local_ids))
        self._merged = (local, remote, merged, local_ids)
        return merged

    def programmed(self, key: PolicyKey) -> Mapping[str, bool]:
        self.sidecars()  # the local ids, as of now
        assert self._merged is not None
        local_ids = self._merged[3]
        version = self._versions().get(key)
        remote: set[str] = set()
        for entry in self._remote_view.programmed.get(_name(key), ()):
            if entry[0] == version:  # a report for another version programmed nothing yet
                remote |= entry[1]
        return _Programmed(self._local_programmed(key), local_ids, remote)

    # --- publishing ---------------------------------------------------------------------------
    # A report is small: the sidecars' metadata lives under its own key, rewritten only when
    # it changed (each sidecar's JSON cached while the inventory keeps its object), and the
    # ACKed sidecars are listed once, not once per policy. Readers fetch and parse a
    # replica's sidecars again only when its report names a new ``sidecars_version``.

    def _sidecars_json(self) -> str:
        sidecars = self._local_sidecars()
        if self._sidecars_json_cache is not None and self._sidecars_json_cache[0] is sidecars:
            return self._sidecars_json_cache[1]
        published = {}
        for s in sidecars:
            known = self._published.get(s.node_id)
            if known is None or known[0] is not s:
                known = (s, f"{json.dumps(s.node_id)}: {json.dumps(s.to_metadata())}")
            published[s.node_id] = known
        self._published = published
        text = "{" + ", ".join(fragment for _, fragment in published.values()) + "}"
        self._sidecars_json_cache = (sidecars, text)
        return text

    def _report(self) -> dict[str, Any]:
        versions = self._versions()
        report: dict[str, Any] = {
            "replica": self.replica_id,
            "at": time.time(),
            "sidecars_version": f"{self._instance}-{self._sidecars_counter}",
        }
        if self._local_serving is not None and self._local_compiled is not None:
            report["serving"] = sorted(self._local_serving())
            report["programmed"] = {
                _name(key): {"version": version, "compiled": self._local_compiled(key)}
                for key, version in versions.items()
            }
        else:
            report["programmed"] = {
                _name(key): {
                    "version": version,
                    "nodes": dict.fromkeys(self._local_programmed(key), True),
                }
                for key, version in versions.items()
            }
        return report

    def step(self) -> None:
        own = KEY.format(replica=self.replica_id)
        own_sidecars = SIDECARS_KEY.format(replica=self.replica_id)
        ttl = int(self.ttl * 1000)
        text = self._sidecars_json()
        changed = text != self._sidecars_sent
        if changed:
            self._sidecars_counter += 1
        with self._redis.pipeline(transaction=False) as pipe:
            if changed:
                pipe.set(own_sidecars, text, px=ttl)
            else:
                pipe.pexpire(own_sidecars, ttl)
            pipe.set(own, json.dumps(self._report()), px=ttl)
            pipe.sadd(INDEX, self.replica_id)
            pipe.smembers(INDEX)
            *_, members = pipe.execute()
        self._sidecars_sent = text
        others = sorted(m for m in members if m != self.replica_id)
        values = self._redis.mget([KEY.format(replica=m) for m in others]) if others else []
        remote = []
        for member, value in zip(others, values, strict=True):
            if value is None:  # expired: that replica is gone
                self._redis.srem(INDEX, member)
                continue
            with contextlib.suppress(ValueError, KeyError, TypeError):
                report = json.loads(value)
                if isinstance(report["programmed"], dict):
                    remote.append((member, report))
        self._remote = [report for _, report in remote]
        self._remote_view = self._view(remote)

    def _remote_sidecars(self, member: str, report: Mapping[str, Any]) -> dict[str, Any]:
        """A replica's sidecars' metadata: inline (a report of an older replica), else from
        its key, fetched again only when its version changed."""
        inline = report.get("sidecars")
        if isinstance(inline, dict):
            return inline
        version = report.get("sidecars_version")
        cached = self._fetched.get(member)
        if cached is not None and cached[0] == version:
            return cached[1]
        text = self._redis.get(SIDECARS_KEY.format(replica=member))
        metadata = json.loads(text) if text else {}
        if not isinstance(metadata, dict):
            metadata = {}
        self._fetched[member] = (version, metadata)
        return metadata

    def _view(self, reports: list[tuple[str, dict[str, Any]]]) -> _RemoteView:
        sidecars: list[Sidecar] = []
        seen: set[str] = set()
        parsed: dict[str, tuple[Any, Sidecar]] = {}
        programmed: dict[str, list[tuple[str, frozenset[str]]]] = {}
        for member, report in reports:
            nodes = self._remote_sidecars(member, report)
            for node_id, metadata in nodes.items():
                if node_id in seen:
                    continue
                known = self._parsed.get(node_id)
                if known is None or (known[0] is not metadata and known[0] != metadata):
                    try:
                        known = (metadata, Sidecar.from_metadata(node_id, metadata))
                    except InventoryError:
                        continue
                parsed[node_id] = known
                sidecars.append(known[1])
                seen.add(node_id)
            serving = frozenset(report.get("serving") or ())
            for name, entry in report["programmed"].items():
                with contextlib.suppress(KeyError, TypeError, AttributeError):
                    if "compiled" in entry:
                        done = serving if entry["compiled"] else frozenset()
                    else:
                        done = frozenset(n for n, ok in entry["nodes"].items() if ok)
                    programmed.setdefault(name, []).append((entry["version"], done))
        self._parsed = parsed
        self._fetched = {m: v for m, v in self._fetched.items() if m in dict(reports)}
        return _RemoteView(tuple(sidecars), programmed)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="shared-status", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except (redis.RedisError, OSError) as err:
                self._remote = []  # unknown: count only what this replica sees
                self._remote_view = _RemoteView((), {})
                self._sidecars_sent = None  # written again at the next step that reaches it
                log.warning("status: %s: %s", self.url, err)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(redis.RedisError, OSError):
            self._redis.delete(
                KEY.format(replica=self.replica_id), SIDECARS_KEY.format(replica=self.replica_id)
            )
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
