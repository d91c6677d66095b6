"""Snapshots: one node's complete, consistent set of xDS resources, versioned by content.

Every resource is serialized once (deterministically) into an ``Any``; its version is a short
hash of those bytes. Resources with the same bytes are interned, so a thousand sidecars that
share a cluster share one ``Resource`` object, one ``Any`` and one pre-encoded wire form:
answering a client is joining bytes, never serializing (DESIGN: "serialized once").
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message

from controlplane.xds import resources as rt
from controlplane.xds.wire import wire_field

_EMPTY: Mapping[str, Resource] = MappingProxyType({})


class InconsistentSnapshot(ValueError):
    """A snapshot whose resources reference names it does not contain."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        super().__init__("inconsistent snapshot:\n  " + "\n  ".join(self.problems))


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


# Field numbers used to pre-encode response entries (envoy/service/discovery/v3).
_RESPONSE_RESOURCES = 2  # DiscoveryResponse.resources / DeltaDiscoveryResponse.resources
_DELTA_RESOURCE_VERSION = 1
_DELTA_RESOURCE_RESOURCE = 2
_DELTA_RESOURCE_NAME = 3


@dataclass(frozen=True, eq=False)
class Resource:
    """One serialized resource. Shared between every snapshot that holds the same bytes."""

    type_url: str
    name: str
    version: str
    any: any_pb2.Any = field(repr=False)
    # DiscoveryResponse.resources entry: tag + length + serialized Any.
    sotw_entry: bytes = field(repr=False)
    # DeltaDiscoveryResponse.resources entry: an envoy Resource{name, version, resource}.
    delta_entry: bytes = field(repr=False)

    @property
    def size(self) -> int:
        return len(self.any.value)


@dataclass
class InternStats:
    """How much work interning saved: read by tests and benchmarks."""

    serializations: int = 0  # Message.SerializeToString calls
    encodings: int = 0  # new Resource objects (Any + wire entries built)
    hits: int = 0  # resources found already interned


# Weak: a Resource lives as long as some snapshot holds it, no longer.
_interned: weakref.WeakValueDictionary[tuple[str, str], Resource] = weakref.WeakValueDictionary()
stats = InternStats()


def intern(type_url: str, name: str, data: bytes) -> Resource:
    """The shared Resource for these serialized bytes, building it the first time only."""
    digest = _digest(data)
    key = (type_url, digest)
    found = _interned.get(key)
    if found is not None and found.name == name:
        stats.hits += 1
        return found
    version = digest[:16]
    packed = any_pb2.Any(type_url=type_url, value=data)
    any_bytes = packed.SerializeToString(deterministic=True)
    delta = (
        wire_field(_DELTA_RESOURCE_VERSION, version.encode())
        + wire_field(_DELTA_RESOURCE_RESOURCE, any_bytes)
        + wire_field(_DELTA_RESOURCE_NAME, name.encode())
    )
    res = Resource(
        type_url=type_url,
        name=name,
        version=version,
        any=packed,
        sotw_entry=wire_field(_RESPONSE_RESOURCES, any_bytes),
        delta_entry=wire_field(_RESPONSE_RESOURCES, delta),
    )
    stats.encodings += 1
    _interned[key] = res
    return res


def version_of(resources: Mapping[str, Resource]) -> str:
    """Content version of a set of resources: the same names at the same versions, same string."""
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(resources):
        h.update(name.encode())
        h.update(b"\0")
        h.update(resources[name].version.encode())
        h.update(b"\n")
    return h.hexdigest()


def _snapshot_version(type_versions: Mapping[str, str]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for t in sorted(type_versions):
        h.update(f"{t}={type_versions[t]}\n".encode())
    return h.hexdigest()


class Snapshot:
    """An immutable set of resources for one node, grouped by type URL."""

    __slots__ = ("_by_type", "_referenced", "_type_versions", "version")

    def __init__(
        self,
        by_type: Mapping[str, Mapping[str, Resource]],
        referenced: Mapping[str, frozenset[str]] | None = None,
    ) -> None:
        self._by_type = {t: MappingProxyType(dict(r)) for t, r in by_type.items() if r}
        self._type_versions = {t: version_of(r) for t, r in self._by_type.items()}
        self._referenced = dict(referenced or {})
        self.version: str = _snapshot_version(self._type_versions)

    @classmethod
    def build(cls, resources: Mapping[str, Iterable[Message]]) -> Snapshot:
        """Serialize, version and check resources; raise InconsistentSnapshot on any problem."""
        problems: list[str] = []
        by_type: dict[str, dict[str, Resource]] = {}
        messages: dict[str, list[Message]] = {}
        for type_url, msgs in resources.items():
            out = by_type.setdefault(type_url, {})
            for msg in msgs:
                if rt.type_url_of(msg) != type_url:
                    problems.append(
                        f"{rt.short_name(type_url)}: got a {msg.DESCRIPTOR.full_name} "
                        f"under {type_url}"
                    )
                    continue
                name = rt.resource_name(msg)
                if not name:
                    problems.append(f"{rt.short_name(type_url)}: a resource has no name")
                    continue
                if name in out:
                    problems.append(f"{rt.short_name(type_url)} {name!r}: duplicate name")
                    continue
                stats.serializations += 1
                out[name] = intern(type_url, name, msg.SerializeToString(deterministic=True))
                messages.setdefault(type_url, []).append(msg)
        referenced = _check_references(messages, by_type, problems)
        if problems:
            raise InconsistentSnapshot(problems)
        return cls(by_type, referenced)

    def replace(self, serialized: Mapping[str, Mapping[str, bytes]]) -> Snapshot:
        """This snapshot with some resources replaced: type URL → name → serialized message.

        What they reference is not checked again: the caller vouches that a replacement
        points at the same names as what it replaces (``controlplane/shapes.py`` fills in
        node-specific values, never names). Raises ValueError on a name this snapshot lacks.
        """
        by_type = dict(self._by_type)
        versions = dict(self._type_versions)
        for type_url, items in serialized.items():
            current = dict(by_type.get(type_url, _EMPTY))
            for name, data in items.items():
                if name not in current:
                    raise ValueError(f"{rt.short_name(type_url)} {name!r}: nothing to replace")
                current[name] = intern(type_url, name, data)
            by_type[type_url] = MappingProxyType(current)
            versions[type_url] = version_of(current)
        return Snapshot._of(by_type, versions, self._referenced)

    @classmethod
    def _of(
        cls,
        by_type: dict[str, MappingProxyType[str, Resource]],
        type_versions: dict[str, str],
        referenced: dict[str, frozenset[str]],
    ) -> Snapshot:
        snapshot = cls.__new__(cls)
        snapshot._by_type, snapshot._type_versions = by_type, type_versions
        snapshot._referenced = referenced
        snapshot.version = _snapshot_version(type_versions)
        return snapshot

    def resources(self, type_url: str) -> Mapping[str, Resource]:
        return self._by_type.get(type_url, _EMPTY)

    def type_version(self, type_url: str) -> str:
        return self._type_versions.get(type_url) or version_of(_EMPTY)

    def type_urls(self) -> tuple[str, ...]:
        """Types with at least one resource."""
        return tuple(self._by_type)

    def referenced(self, type_url: str) -> frozenset[str]:
        """Names of ENDPOINT / ROUTE resources that this snapshot's clusters / listeners use."""
        return self._referenced.get(type_url, frozenset())

    def __len__(self) -> int:
        return sum(len(r) for r in self._by_type.values())

    def __repr__(self) -> str:
        counts = ", ".join(f"{rt.short_name(t)}={len(r)}" for t, r in self._by_type.items())
        return f"Snapshot({self.version}: {counts})"


def _check_references(
    messages: Mapping[str, list[Message]],
    by_type: Mapping[str, Mapping[str, Resource]],
    problems: list[str],
) -> dict[str, frozenset[str]]:
    """go-control-plane's Consistent(): every EDS and RDS name used must be present."""
    endpoints = by_type.get(rt.ENDPOINT, {})
    routes = by_type.get(rt.ROUTE, {})
    eds_names: set[str] = set()
    rds_names: set[str] = set()
    for msg in messages.get(rt.CLUSTER, []):
        assert isinstance(msg, cluster_pb2.Cluster)
        service = rt.eds_service_name(msg)
        if service is None:
            continue
        eds_names.add(service)
        if service not in endpoints:
            problems.append(
                f"CDS {msg.name!r}: EDS cluster needs ClusterLoadAssignment {service!r}, "
                "which the snapshot does not have"
            )
    for msg in messages.get(rt.LISTENER, []):
        assert isinstance(msg, listener_pb2.Listener)
        try:
            names = rt.route_config_names(msg)
        except DecodeError as err:
            problems.append(f"LDS {msg.name!r}: {err}")
            continue
        for name in names:
            rds_names.add(name)
            if name not in routes:
                problems.append(
                    f"LDS {msg.name!r}: HTTP connection manager needs RouteConfiguration "
                    f"{name!r}, which the snapshot does not have"
                )
    return {rt.ENDPOINT: frozenset(eds_names), rt.ROUTE: frozenset(rds_names)}
