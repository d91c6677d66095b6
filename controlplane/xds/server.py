"""The ADS server: State-of-the-World and Delta streams over one gRPC service.

Each stream has one coroutine that owns all its state and is the only writer: the request
reader and the snapshot cache only put events on its queue. So a slow sidecar stalls its own
stream and nothing else, and per-type flow control is simple: at most one response per type
is in flight, the next one goes out after the ACK or NACK (changes in between coalesce).

Responses are joined from the pre-encoded entries of interned resources (see snapshot.py),
so a resource is serialized once per version however many sidecars receive it.

Ordering (xds_protocol "eventual consistency considerations"), per stream:
  * a pass sends in PUSH_ORDER: CDS, EDS, then LDS, RDS;
  * LDS and RDS wait while a CDS or EDS response is in flight, and while the sidecar has not
    yet subscribed to the endpoints of the clusters it was sent (unless it rejected them);
  * clusters and endpoints dropped by a new snapshot are kept in what the sidecar is sent
    until the sidecar has ACKed the new snapshot's listeners and routes; only then does the
    pruned CDS (SotW) or the ``removed_resources`` (Delta) go out.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2 as core_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError

from controlplane.xds import resources as rt
from controlplane.xds.cache import SnapshotCache
from controlplane.xds.snapshot import Resource, Snapshot, version_of
from controlplane.xds.status import NodeSync, StreamKind, SyncStatus
from controlplane.xds.wire import wire_field

log = logging.getLogger(__name__)

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
KNOWN_TYPES = frozenset(rt.PUSH_ORDER)

# DiscoveryResponse / DeltaDiscoveryResponse field numbers (envoy/service/discovery/v3).
_SOTW_VERSION, _SOTW_TYPE_URL, _SOTW_NONCE = 1, 4, 5
_DELTA_VERSION, _DELTA_TYPE_URL, _DELTA_NONCE, _DELTA_REMOVED = 1, 4, 5, 6

_END = object()  # the sidecar closed its side of the stream
_SNAPSHOT_CHANGED = object()
_MALFORMED = object()  # bytes that are not a discovery request
_REPLACED = object()  # a newer stream of the same node id took over

# Bounds on what one stream may make the server hold. Envoy subscribes to a few thousand
# names at most and its NACK messages are a few lines; beyond these it is junk or abuse.
MAX_NAMES_PER_TYPE = 65_536
MAX_ERROR_DETAIL = 4096  # characters of a NACK message kept in status and logs

Request = discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest

_GATES = frozenset({rt.CLUSTER, rt.ENDPOINT, rt.LISTENER})
_GATED = frozenset({rt.LISTENER, rt.ROUTE})


def _error_detail(request: Any) -> str | None:
    if not request.HasField("error_detail"):
        return None
    message = str(request.error_detail.message)
    if len(message) > MAX_ERROR_DETAIL:
        message = f"{message[:MAX_ERROR_DETAIL]}... ({len(message)} characters)"
    return message


# gRPC core (1.60 on) cancels calls that arrive while over 1,000 others wait for the
# application to accept them, with a chance rising to certainty at 3,000: its shield for an
# overloaded server. grpc.aio accepts one call per turn of its event loop, so while the
# control plane's loop is busy (a rebuild, thousands of connects) a reconnect storm of a few
# thousand sidecars waits there, past those limits, and loses streams: their first writes
# fail with INTERNAL "Internal error from Core" or CANCELLED (8-18 % at 2 x 2,500 sidecars in
# bench/connect_storm.py; 0 with these limits). A replica must be able to take the whole
# fleet it is sized for (10,000 sidecars) at once when another one goes away, so that many
# wait without loss. A waiting call holds ~15 KB (measured), so the hard limit bounds a
# flood of unaccepted streams at ~300 MB.
MAX_PENDING_STREAMS = 10_000
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.server.max_pending_requests", MAX_PENDING_STREAMS),
    ("grpc.server.max_pending_requests_hard_limit", 2 * MAX_PENDING_STREAMS),
]


# How long a stream waits for an authentication that is still being decided.
AUTHENTICATION_WAIT = 3.0


class RejectNode(Exception):
    """Raised by ``on_connect`` to refuse a sidecar; the stream ends with ``code``
    (INVALID_ARGUMENT; UNAUTHENTICATED for a sidecar that failed to prove who it is)."""

    def __init__(
        self,
        message: str,
        code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT,
        *,
        pending: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        # Not decided yet (e.g. a token review in flight): the stream waits and asks again
        # instead of being refused, without blocking the event loop.
        self.pending = pending


@dataclass
class _TypeState:
    """What one stream knows about one resource type."""

    type_url: str
    requested: bool = False
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    nonce: str | None = None  # of the latest response
    in_flight: bool = False  # latest response not yet ACKed or NACKed
    nacked: bool = False  # latest response was rejected
    sent_version: str | None = None
    initial_version: str = ""  # SotW: version_info of the first request (a reconnect)
    client: dict[str, str] = field(default_factory=dict)  # name -> version the sidecar holds
    sent: dict[str, Resource] = field(default_factory=dict)  # what we sent it, per name
    told_missing: set[str] = field(default_factory=set)  # Delta: reported as not existing


class _Stream:
    """Protocol state of one ADS stream; subclasses speak SotW or Delta."""

    kind: StreamKind

    def __init__(self, node_id: str, status: SyncStatus, node: NodeSync) -> None:
        self.node_id = node_id
        self.status = status
        self.node = node
        self.snapshot: Snapshot | None = None
        self.types: dict[str, _TypeState] = {}
        # Resources the current snapshot dropped but the sidecar still needs (make-before-break).
        self.retained: dict[str, dict[str, Resource]] = {rt.CLUSTER: {}, rt.ENDPOINT: {}}
        # Content versions of views, valid until the snapshot or the retained set changes.
        self._versions: dict[tuple[str, bool, frozenset[str]], str] = {}
        self._nonce_prefix = secrets.token_hex(3)
        self._nonce_count = 0
        # Types whose response (or expected version) may have changed since the last pass:
        # a pass looks at these only, so an ACK costs the work of its own type.
        self.dirty: set[str] = set(rt.PUSH_ORDER)

    # -- events --

    def set_snapshot(self, snapshot: Snapshot | None) -> None:
        if snapshot is None or snapshot is self.snapshot:
            return  # a cleared node keeps what it has until a new snapshot arrives
        old, self.snapshot = self.snapshot, snapshot
        self._versions.clear()
        for type_url in rt.PUSH_ORDER:
            if (
                old is None
                or old.type_version(type_url) != snapshot.type_version(type_url)
                or old.referenced(type_url) != snapshot.referenced(type_url)
            ):
                self.dirty.add(type_url)
        for type_url, keep in self.retained.items():
            ts = self.types.get(type_url)
            now = snapshot.resources(type_url)
            if ts is not None:
                for name in ts.client:
                    if name not in now and name in ts.sent:
                        keep.setdefault(name, ts.sent[name])
            for name in [n for n in keep if n in now]:
                del keep[name]
            if keep:
                self.dirty.add(type_url)
        self.status.set_target(self.node, snapshot.version)

    def handle(self, request: Any) -> None:
        raise NotImplementedError

    # -- planning --

    def plan(self) -> list[bytes]:
        """Every response due now, in push order."""
        if self.snapshot is None or not self.dirty:
            return []
        self._maybe_prune()
        dirty, self.dirty = self.dirty, set()
        # Listeners and routes wait on clusters and endpoints (and prune on both): whatever
        # changes those may release them. Routes also follow the listeners that name them.
        if dirty & _GATES:
            dirty |= _GATED
        out: list[bytes] = []
        for type_url in rt.PUSH_ORDER:
            if type_url not in dirty:
                continue
            ts = self.types.get(type_url)
            if ts is None or not ts.requested:
                self._expect(type_url)
                continue
            self.status.set_type_target(self.node, type_url, self._version(ts, retained=False))
            if ts.in_flight:
                continue
            if type_url in (rt.LISTENER, rt.ROUTE) and not self._clusters_ready():
                continue
            data = self._respond(ts, self._view(ts, retained=True))
            if data is not None:
                out.append(data)
        return out

    def _respond(self, ts: _TypeState, view: Mapping[str, Resource]) -> bytes | None:
        raise NotImplementedError

    def _sent(self, ts: _TypeState, version: str, nonce: str, data: bytes) -> None:
        ts.nonce, ts.sent_version, ts.in_flight, ts.nacked = nonce, version, True, False
        self.status.sent(self.node, ts.type_url, version, nonce, len(data))

    def _next_nonce(self) -> str:
        self._nonce_count += 1
        return f"{self._nonce_prefix}-{self._nonce_count}"

    def _view(self, ts: _TypeState, *, retained: bool) -> dict[str, Resource]:
        """What this sidecar should hold of the type now."""
        assert self.snapshot is not None
        current = self.snapshot.resources(ts.type_url)
        extra = self.retained.get(ts.type_url, {}) if retained else {}
        if ts.wildcard:
            return {**extra, **current}
        view: dict[str, Resource] = {}
        for name in ts.names:
            res = current.get(name) or extra.get(name)
            if res is not None:
                view[name] = res
        return view

    def _version(self, ts: _TypeState, *, retained: bool) -> str:
        """``version_of(self._view(ts, retained=retained))``, remembered."""
        assert self.snapshot is not None
        if ts.wildcard and not (retained and self.retained.get(ts.type_url)):
            return self.snapshot.type_version(ts.type_url)
        key = (ts.type_url, retained, frozenset(ts.names))
        version = self._versions.get(key)
        if version is None:
            version = self._versions[key] = version_of(self._view(ts, retained=retained))
        return version

    def _expect(self, type_url: str) -> None:
        """Track a type the snapshot needs but the sidecar has not asked for yet, so the
        node does not look SYNCED before it has it."""
        assert self.snapshot is not None
        current = self.snapshot.resources(type_url)
        if type_url in rt.WILDCARD_TYPES:
            if current:
                version = self.snapshot.type_version(type_url)
                self.status.set_type_target(self.node, type_url, version)
        elif type_url in (rt.ENDPOINT, rt.ROUTE):
            names = self.snapshot.referenced(type_url)
            if names:
                view = {n: current[n] for n in names if n in current}
                self.status.set_type_target(self.node, type_url, version_of(view))

    def _settled(self, type_url: str) -> bool:
        """The sidecar holds, and accepted, what it should of this type."""
        assert self.snapshot is not None
        ts = self.types.get(type_url)
        if ts is None or not ts.requested:
            if type_url == rt.ROUTE:
                lds = self.types.get(rt.LISTENER)
                return not (lds and lds.requested and self.snapshot.referenced(rt.ROUTE))
            return True
        if ts.in_flight or ts.nacked:
            return False
        view = self._view(ts, retained=True)
        if {n: r.version for n, r in view.items()} != ts.client:
            return False
        return ts.wildcard or self.snapshot.referenced(type_url) <= ts.names

    def _maybe_prune(self) -> None:
        if any(self.retained.values()) and self._settled(rt.LISTENER) and self._settled(rt.ROUTE):
            log.debug("node %s: listeners and routes ACKed, removing stale clusters", self.node_id)
            for keep in self.retained.values():
                keep.clear()
            self._versions.clear()
            self.dirty.update(self.retained)

    def _clusters_ready(self) -> bool:
        """Clusters and their endpoints are out before listeners or routes point at them."""
        assert self.snapshot is not None
        cds, eds = self.types.get(rt.CLUSTER), self.types.get(rt.ENDPOINT)
        if (cds and cds.in_flight) or (eds and eds.in_flight):
            return False
        if cds is None or not cds.requested or cds.nacked:
            return True
        subscribed = eds.names if eds is not None and eds.requested else set()
        return self.snapshot.referenced(rt.ENDPOINT) <= subscribed

    def _answered(self, ts: _TypeState, nonce: str, error: str | None) -> None:
        """The sidecar answered our latest response of this type."""
        ts.in_flight = False
        version = ts.sent_version or ""
        if error is not None:
            ts.nacked = True
            self.status.nacked(self.node, ts.type_url, version, nonce, error)
            log.warning(
                "node %s NACKed %s version %s: %s",
                self.node_id, rt.short_name(ts.type_url), version, error,
            )
        else:
            self.status.acked(self.node, ts.type_url, version, nonce)

    def _forget(self, ts: _TypeState, names: Iterable[str]) -> None:
        for name in names:
            ts.client.pop(name, None)
            ts.sent.pop(name, None)


class _SotwStream(_Stream):
    kind = StreamKind.SOTW

    def handle(self, request: discovery_pb2.DiscoveryRequest) -> None:
        ts = self.types.get(request.type_url)
        if ts is None:
            ts = self.types[request.type_url] = _TypeState(request.type_url)
        if ts.nonce is not None:
            if request.response_nonce != ts.nonce:
                log.debug(
                    "node %s: stale %s request (nonce %r, latest %r) ignored",
                    self.node_id, rt.short_name(ts.type_url), request.response_nonce, ts.nonce,
                )
                return
            if ts.in_flight:
                self._answered(ts, ts.nonce, _error_detail(request))
        elif not ts.requested:
            ts.initial_version = request.version_info
        names = set(request.resource_names)
        if ts.type_url in rt.WILDCARD_TYPES:
            # Legacy wildcard: an empty list on the first request, kept while lists stay empty.
            ts.wildcard = "*" in names or (not names and (ts.wildcard or not ts.requested))
        names.discard("*")
        ts.names = names
        ts.requested = True
        if not ts.wildcard:
            self._forget(ts, [n for n in ts.client if n not in names])

    def _respond(self, ts: _TypeState, view: Mapping[str, Resource]) -> bytes | None:
        holding = {n: r.version for n, r in view.items()}
        version = self._version(ts, retained=True)
        if ts.sent_version is None:
            if ts.initial_version and ts.initial_version == version:
                # A reconnecting sidecar already holds exactly this: nothing to send.
                ts.sent_version, ts.client, ts.sent = version, holding, dict(view)
                self.status.already_has(self.node, ts.type_url, version)
                return None
            if not view and not ts.wildcard:
                return None  # asked for names that do not exist yet: answer when they do
        elif holding == ts.client:
            return None
        nonce = self._next_nonce()
        data = b"".join(
            [
                wire_field(_SOTW_VERSION, version.encode()),
                *(view[n].sotw_entry for n in sorted(view)),
                wire_field(_SOTW_TYPE_URL, ts.type_url.encode()),
                wire_field(_SOTW_NONCE, nonce.encode()),
            ]
        )
        ts.client, ts.sent = holding, dict(view)
        self._sent(ts, version, nonce, data)
        return data


class _DeltaStream(_Stream):
    kind = StreamKind.DELTA

    def handle(self, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        ts = self.types.get(request.type_url)
        if ts is None:
            ts = self.types[request.type_url] = _TypeState(request.type_url)
        if request.response_nonce:
            if request.response_nonce == ts.nonce and ts.in_flight:
                self._answered(ts, request.response_nonce, _error_detail(request))
            else:
                # Not an answer to our latest response. Subscription changes still apply:
                # in Delta they are increments, dropping them would lose them for good.
                log.debug(
                    "node %s: stale %s nonce %r (latest %r)",
                    self.node_id, rt.short_name(ts.type_url), request.response_nonce, ts.nonce,
                )
        subscribe = set(request.resource_names_subscribe)
        unsubscribe = set(request.resource_names_unsubscribe)
        if not ts.requested:
            ts.requested = True
            ts.wildcard = ts.type_url in rt.WILDCARD_TYPES and (not subscribe or "*" in subscribe)
            ts.client.update(request.initial_resource_versions)
        elif "*" in subscribe:
            ts.wildcard = True
        if "*" in unsubscribe:
            ts.wildcard = False
        subscribe.discard("*")
        unsubscribe.discard("*")
        ts.names |= subscribe
        ts.names -= unsubscribe
        ts.told_missing -= subscribe | unsubscribe
        if not ts.wildcard:
            # The sidecar drops what it unsubscribes; a later subscribe must send it again.
            self._forget(ts, unsubscribe)

    def _respond(self, ts: _TypeState, view: Mapping[str, Resource]) -> bytes | None:
        changed = [view[n] for n in sorted(view) if ts.client.get(n) != view[n].version]
        removed = sorted(n for n in ts.client if n not in view and (ts.wildcard or n in ts.names))
        missing = sorted(
            n for n in ts.names if n not in view and n not in ts.client and n not in ts.told_missing
        )
        first_wildcard = ts.wildcard and ts.nonce is None
        if not (changed or removed or missing or first_wildcard):
            return None
        version = self._version(ts, retained=True)
        nonce = self._next_nonce()
        data = b"".join(
            [
                wire_field(_DELTA_VERSION, version.encode()),
                *(r.delta_entry for r in changed),
                wire_field(_DELTA_TYPE_URL, ts.type_url.encode()),
                *(wire_field(_DELTA_REMOVED, n.encode()) for n in removed + missing),
                wire_field(_DELTA_NONCE, nonce.encode()),
            ]
        )
        for res in changed:
            ts.client[res.name] = res.version
            ts.sent[res.name] = res
            ts.told_missing.discard(res.name)
        self._forget(ts, removed)
        ts.told_missing.update(removed + missing)
        self._sent(ts, version, nonce, data)
        return data


def _identity(data: bytes) -> bytes:
    return data


class AdsServer:
    """Aggregated Discovery Service (SotW and Delta) serving snapshots from a SnapshotCache."""

    # Envoy sends its first request (with the node) at once; a stream that says nothing
    # would otherwise hold a task and a connection slot for ever.
    first_request_timeout = 10.0

    def __init__(
        self,
        cache: SnapshotCache,
        status: SyncStatus,
        on_connect: Callable[[core_pb2.Node], None] | None = None,
        on_disconnect: Callable[[str], None] | None = None,
        authenticate: Callable[[core_pb2.Node, Mapping[str, str]], None] | None = None,
    ) -> None:
        self.cache = cache
        self.status = status
        self._on_connect = on_connect
        # Sees the stream's gRPC metadata (a sidecar's token) before on_connect; may raise
        # RejectNode. Nothing is sent to a node it refuses.
        self._authenticate = authenticate
        self._on_disconnect = on_disconnect
        self._streams_per_node: dict[str, int] = {}
        # Each node's open streams' event queues: a newer stream closes the older ones.
        self._queues: dict[str, list[asyncio.Queue[object]]] = {}

    def add_to(self, server: grpc.aio.Server) -> None:
        """Register the AggregatedDiscoveryService. Responses are pre-encoded bytes, so the
        handlers are registered here with an identity serializer (not the generated helper)."""
        handlers = {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self.StreamAggregatedResources,
                request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                response_serializer=_identity,
            ),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self.DeltaAggregatedResources,
                request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                response_serializer=_identity,
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    async def StreamAggregatedResources(
        self,
        requests: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, bytes],
    ) -> None:
        await self._serve(_SotwStream, requests, context)

    async def DeltaAggregatedResources(
        self,
        requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, bytes],
    ) -> None:
        await self._serve(_DeltaStream, requests, context)

    async def _serve(
        self,
        stream_class: type[_Stream],
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext[Any, bytes],
    ) -> None:
        events: asyncio.Queue[object] = asyncio.Queue()
        reader = asyncio.create_task(self._read(requests, events))
        stream: _Stream | None = None
        unwatch: Callable[[], None] | None = None
        try:
            try:
                first = await asyncio.wait_for(events.get(), self.first_request_timeout)
            except TimeoutError:
                self.status.dropped("no_first_request")
                log.error("ADS stream from %s sent no request: closed", context.peer())
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no request received")
            if first is _END:
                return
            if first is _MALFORMED:
                await self._refuse_malformed(context)
            node_id = await self._admit(first, stream_class.kind, context)
            self._streams_per_node[node_id] = self._streams_per_node.get(node_id, 0) + 1
            # One stream per node id: a second one (it proved the same node id, so it holds
            # that sidecar's credential) replaces the first, as a restarted Envoy's does
            # before the old connection is known dead. Logged for audit; status shows both.
            older = self._queues.setdefault(node_id, [])
            previous = self.status.node(node_id)
            for queue in older:
                queue.put_nowait(_REPLACED)
            older.append(events)
            node = self.status.connect(node_id, stream_class.kind, context.peer())
            if previous is not None:
                log.warning(
                    "audit: node %s opened a second stream from %s; its stream from %s "
                    "(since %.0f) is closed", node_id, context.peer(), previous.peer,
                    previous.connected_at,
                )
                self.status.replaced(node, previous)
            stream = stream_class(node_id, self.status, node)
            log.info("node %s connected (%s, %s)", node_id, stream.kind, context.peer())
            unwatch = self.cache.watch(node_id, lambda _: events.put_nowait(_SNAPSHOT_CHANGED))
            stream.set_snapshot(self.cache.get(node_id))
            batch: list[object] = [first]
            while True:
                for event in batch:
                    if event is _END:
                        return
                    if event is _REPLACED:
                        self.status.dropped("replaced_by_newer_stream")
                        await context.abort(
                            grpc.StatusCode.ALREADY_EXISTS,
                            "a newer stream of this node id replaced this one",
                        )
                    if event is _MALFORMED:
                        await self._refuse_malformed(context, node_id)
                    if event is _SNAPSHOT_CHANGED:
                        stream.set_snapshot(self.cache.get(node_id))
                    else:
                        if not self._handle(stream, event):
                            # grpc keeps the abort's traceback (and this frame) a while:
                            # let go of the names now.
                            stream.types.clear()
                            self.status.dropped("too_many_names")
                            log.error(
                                "node %s subscribed to over %d names of one type: closed",
                                node_id, MAX_NAMES_PER_TYPE,
                            )
                            await context.abort(
                                grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"more than {MAX_NAMES_PER_TYPE} resource names of one type",
                            )
                for data in stream.plan():
                    await context.write(data)
                batch = [await events.get()]
                while not events.empty():  # coalesce whatever piled up while writing
                    batch.append(events.get_nowait())
        finally:
            reader.cancel()
            if unwatch is not None:
                unwatch()
            if stream is not None:
                queues = self._queues.get(stream.node_id, [])
                if events in queues:
                    queues.remove(events)
                if not queues:
                    self._queues.pop(stream.node_id, None)
            if stream is not None:
                self._disconnected(stream)

    async def _refuse_malformed(
        self, context: grpc.aio.ServicerContext[Any, bytes], node_id: str = ""
    ) -> None:
        self.status.dropped("malformed")
        log.error("ADS stream %s from %s sent a malformed request: closed", node_id, context.peer())
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed discovery request")

    async def _admit(
        self, first: object, kind: StreamKind, context: grpc.aio.ServicerContext[Any, bytes]
    ) -> str:
        node = getattr(first, "node", None)
        if node is None or not node.id:
            self.status.dropped("no_node")
            log.error("ADS %s stream from %s: first request has no node.id", kind, context.peer())
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "first request must carry node")
        if self._authenticate is not None:
            metadata = {k: str(v) for k, v in (context.invocation_metadata() or ())}
            try:
                deadline = time.monotonic() + AUTHENTICATION_WAIT
                while True:
                    try:
                        self._authenticate(node, metadata)
                        break
                    except RejectNode as err:
                        if not err.pending or time.monotonic() >= deadline:
                            raise
                        await asyncio.sleep(0.05)
            except RejectNode as err:
                self.status.dropped("unauthenticated")
                log.error("node %s from %s rejected: %s", node.id, context.peer(), err.message)
                await context.abort(err.code, err.message)
            except Exception:
                self.status.dropped("unauthenticated")
                log.exception("node %s: authentication failed", node.id)
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "cannot authenticate node")
        if self._on_connect is not None:
            try:
                self._on_connect(node)
            except RejectNode as err:
                self.status.dropped("rejected")
                log.error("node %s rejected: %s", node.id, err.message)
                await context.abort(err.code, err.message)
            except Exception:
                self.status.dropped("rejected")
                log.exception("node %s: on_connect failed", node.id)
                await context.abort(grpc.StatusCode.INTERNAL, "control plane failed to admit node")
        return str(node.id)

    def _handle(self, stream: _Stream, request: object) -> bool:
        """Apply one request; False when the stream subscribed to more than it may."""
        type_url = getattr(request, "type_url", "")
        if type_url not in KNOWN_TYPES:
            self.status.dropped("unknown_type")
            log.error(
                "node %s: request for unknown type %r ignored", stream.node_id, type_url[:200]
            )
            return True
        stream.dirty.add(type_url)
        try:
            stream.handle(request)
        except Exception:
            self.status.dropped("unhandled")
            log.exception("node %s: cannot handle %s request", stream.node_id, type_url)
        ts = stream.types.get(type_url)
        return ts is None or len(ts.names) <= MAX_NAMES_PER_TYPE

    def _disconnected(self, stream: _Stream) -> None:
        self.status.disconnect(stream.node)
        log.info("node %s disconnected (%s)", stream.node_id, stream.kind)
        left = self._streams_per_node.get(stream.node_id, 1) - 1
        if left > 0:
            self._streams_per_node[stream.node_id] = left
            return
        self._streams_per_node.pop(stream.node_id, None)
        if self._on_disconnect is not None:
            try:
                self._on_disconnect(stream.node_id)
            except Exception:
                log.exception("on_disconnect(%s) failed", stream.node_id)

    @staticmethod
    async def _read(requests: AsyncIterator[object], events: asyncio.Queue[object]) -> None:
        try:
            async for request in requests:
                events.put_nowait(request)
        except asyncio.CancelledError:
            raise
        except DecodeError:  # grpc hands the deserializer's error to the reader
            events.put_nowait(_MALFORMED)
        except Exception as err:  # the sidecar went away mid-stream
            log.debug("ADS stream read ended: %s", err)
        finally:
            events.put_nowait(_END)
