"""A simulated sidecar: an ADS client that behaves like Envoy, for tests and benchmarks.

It is a fake, not a mock: a real grpc.aio stream that subscribes the way Envoy does (CDS and
LDS as wildcards, then the EDS and RDS names its clusters and listeners use), ACKs every
response — or NACKs when the ``reject`` hook says so — and, on restart, tells the server what
it still holds (SotW ``version_info``, Delta ``initial_resource_versions``). It keeps only
``Any`` payloads and parses just clusters and listeners, so a thousand of them stay light.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2 as core_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, json_format, struct_pb2
from google.rpc import status_pb2

from controlplane.xds import resources as rt
from controlplane.xds.wire import WIRE_32, WIRE_64, WIRE_LEN, WIRE_VARINT, read_varint

log = logging.getLogger(__name__)

# Given a type URL and the resources of a response, return an error message to NACK it.
RejectHook = Callable[[str, Sequence[any_pb2.Any]], str | None]


@dataclass(frozen=True)
class Received:
    """One response, as the sidecar saw it."""

    type_url: str
    version: str
    nonce: str
    names: tuple[str, ...]
    removed: tuple[str, ...]
    nbytes: int
    at: float  # time.monotonic()
    nacked: bool = False

    @property
    def short_name(self) -> str:
        return rt.short_name(self.type_url)


@dataclass
class _Holding:
    """What the sidecar holds of one type, and where its subscription stands."""

    resources: dict[str, tuple[str, any_pb2.Any]] = field(default_factory=dict)  # name -> (v, any)
    version: str = ""  # last accepted version_info / system_version_info
    nonce: str = ""  # of the latest response seen
    names: set[str] = field(default_factory=set)  # subscribed names (EDS, RDS)


class SimulatedSidecar:
    def __init__(
        self,
        target: str,
        node_id: str,
        *,
        delta: bool = False,
        metadata: Mapping[str, Any] | None = None,
        reject: RejectHook | None = None,
        record: bool = True,
        channel: grpc.aio.Channel | None = None,
        call_metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.target = target
        self.node_id = node_id
        self.delta = delta
        self.reject = reject
        self.record = record
        # Sent on the ADS stream, as Envoy sends its bootstrap token (initial_metadata).
        self.call_metadata = tuple(call_metadata)
        self.node = core_pb2.Node(id=node_id, cluster="modelguard-sim")
        if metadata:
            self.node.metadata.CopyFrom(json_format.ParseDict(dict(metadata), struct_pb2.Struct()))
        self.received: list[Received] = []
        self.responses = 0
        self.bytes_received = 0
        self.holding: dict[str, _Holding] = {}
        self.error: grpc.aio.AioRpcError | None = None  # how the stream ended, if it failed
        self._own_channel = channel is None
        self._channel = channel
        self._call: Any = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    # -- lifecycle --

    async def start(self) -> None:
        """Open the ADS stream and subscribe to clusters and listeners."""
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.target)
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self._channel)
        self.error = None
        if self.delta:
            self._call = stub.DeltaAggregatedResources(metadata=self.call_metadata or None)
        else:
            self._call = stub.StreamAggregatedResources(metadata=self.call_metadata or None)
        first = True
        for type_url in (rt.CLUSTER, rt.LISTENER):
            await self._subscribe_initial(type_url, with_node=first)
            first = False
        # A restarted sidecar still holding EDS/RDS asks for them again straight away.
        for type_url in (rt.ENDPOINT, rt.ROUTE):
            held = self.holding.get(type_url)
            if held is not None and held.names:
                await self._subscribe_initial(type_url, with_node=False)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Close the stream; what the sidecar holds stays (as Envoy keeps its config)."""
        if self._call is not None:
            self._call.cancel()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = self._call = None
        for held in self.holding.values():
            held.nonce = ""

    async def close(self) -> None:
        await self.stop()
        if self._own_channel and self._channel is not None:
            await self._channel.close(None)
            self._channel = None

    async def __aenter__(self) -> SimulatedSidecar:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- what tests read --

    def names(self, type_url: str) -> set[str]:
        held = self.holding.get(type_url)
        return set(held.resources) if held else set()

    def version(self, type_url: str) -> str:
        held = self.holding.get(type_url)
        return held.version if held else ""

    def resource(self, type_url: str, name: str) -> any_pb2.Any | None:
        held = self.holding.get(type_url)
        entry = held.resources.get(name) if held else None
        return entry[1] if entry else None

    def of_type(self, type_url: str) -> list[Received]:
        return [r for r in self.received if r.type_url == type_url]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Until ``predicate()`` holds after some response, or TimeoutError."""

        async def until() -> None:
            while not predicate():
                if self._task is not None and self._task.done():
                    raise ConnectionError(f"{self.node_id}: stream ended ({self.error})")
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(until(), timeout)

    async def ended(self, timeout: float = 5.0) -> grpc.aio.AioRpcError | None:
        """Wait for the stream to end; the error it ended with, if any."""
        if self._task is not None:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        return self.error

    # -- protocol --

    async def _subscribe_initial(self, type_url: str, *, with_node: bool) -> None:
        held = self.holding.setdefault(type_url, _Holding())
        node = self.node if with_node else None
        if self.delta:
            names = [] if type_url in rt.WILDCARD_TYPES else sorted(held.names)
            await self._call.write(
                discovery_pb2.DeltaDiscoveryRequest(
                    node=node,
                    type_url=type_url,
                    resource_names_subscribe=names,
                    initial_resource_versions={n: v for n, (v, _) in held.resources.items()},
                )
            )
        else:
            await self._call.write(
                discovery_pb2.DiscoveryRequest(
                    node=node,
                    type_url=type_url,
                    version_info=held.version,
                    resource_names=[] if type_url in rt.WILDCARD_TYPES else sorted(held.names),
                )
            )

    async def _run(self) -> None:
        try:
            async for response in self._call:
                self.responses += 1
                nbytes = response.ByteSize()
                self.bytes_received += nbytes
                if self.delta:
                    await self._on_delta(response, nbytes)
                else:
                    await self._on_sotw(response, nbytes)
                self._changed.set()
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                self.error = err
                log.debug("%s: stream ended: %s", self.node_id, err)
        except asyncio.InvalidStateError:
            pass  # stopped while answering a response: the call is already finished
        finally:
            self._changed.set()

    def _note(self, r: Received) -> None:
        if self.record:
            self.received.append(r)

    async def _on_sotw(self, response: discovery_pb2.DiscoveryResponse, nbytes: int) -> None:
        type_url = response.type_url
        held = self.holding.setdefault(type_url, _Holding())
        held.nonce = response.nonce
        resources = list(response.resources)
        error = self.reject(type_url, resources) if self.reject else None
        names = tuple(_name(type_url, a) for a in resources)
        self._note(
            Received(type_url, response.version_info, response.nonce, names, (), nbytes,
                     time.monotonic(), nacked=error is not None)
        )
        if error is None:
            held.version = response.version_info
            held.resources = {
                n: (response.version_info, a) for n, a in zip(names, resources, strict=True)
            }
        await self._call.write(
            discovery_pb2.DiscoveryRequest(
                type_url=type_url,
                version_info=held.version,
                response_nonce=response.nonce,
                resource_names=sorted(held.names),
                error_detail=status_pb2.Status(code=3, message=error) if error else None,
            )
        )
        if error is None:
            await self._follow(type_url)

    async def _on_delta(self, response: discovery_pb2.DeltaDiscoveryResponse, nbytes: int) -> None:
        type_url = response.type_url
        held = self.holding.setdefault(type_url, _Holding())
        held.nonce = response.nonce
        anys = [r.resource for r in response.resources]
        error = self.reject(type_url, anys) if self.reject else None
        self._note(
            Received(type_url, response.system_version_info, response.nonce,
                     tuple(r.name for r in response.resources), tuple(response.removed_resources),
                     nbytes, time.monotonic(), nacked=error is not None)
        )
        if error is None:
            held.version = response.system_version_info
            for r in response.resources:
                held.resources[r.name] = (r.version, r.resource)
            for name in response.removed_resources:
                held.resources.pop(name, None)
        await self._call.write(
            discovery_pb2.DeltaDiscoveryRequest(
                type_url=type_url,
                response_nonce=response.nonce,
                error_detail=status_pb2.Status(code=3, message=error) if error else None,
            )
        )
        if error is None:
            await self._follow(type_url)

    async def _follow(self, type_url: str) -> None:
        """After accepting clusters or listeners, subscribe to what they point at."""
        if type_url == rt.CLUSTER:
            wanted = _eds_names(self.holding[type_url])
            await self._resubscribe(rt.ENDPOINT, wanted)
        elif type_url == rt.LISTENER:
            wanted = _rds_names(self.holding[type_url])
            await self._resubscribe(rt.ROUTE, wanted)

    async def _resubscribe(self, type_url: str, wanted: set[str]) -> None:
        held = self.holding.setdefault(type_url, _Holding())
        if wanted == held.names:
            return
        added, dropped = wanted - held.names, held.names - wanted
        held.names = set(wanted)
        for name in dropped:
            held.resources.pop(name, None)
        if self.delta:
            await self._call.write(
                discovery_pb2.DeltaDiscoveryRequest(
                    type_url=type_url,
                    resource_names_subscribe=sorted(added),
                    resource_names_unsubscribe=sorted(dropped),
                )
            )
        else:
            await self._call.write(
                discovery_pb2.DiscoveryRequest(
                    type_url=type_url,
                    version_info=held.version,
                    response_nonce=held.nonce,
                    resource_names=sorted(wanted),
                )
            )


def _name(type_url: str, packed: any_pb2.Any) -> str:
    """A resource's name, read off the wire without parsing the message: every xDS resource
    type keeps its name (``cluster_name`` for endpoints) in field 1."""
    data, pos = packed.value, 0
    while pos < len(data):
        key, pos = read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == WIRE_VARINT:
            _, pos = read_varint(data, pos)
        elif wire == WIRE_64:
            pos += 8
        elif wire == WIRE_32:
            pos += 4
        elif wire == WIRE_LEN:
            size, pos = read_varint(data, pos)
            if number == 1:
                return data[pos : pos + size].decode()
            pos += size
        else:
            break
    raise ValueError(f"{rt.short_name(type_url)} resource without a name")


def _eds_names(held: _Holding) -> set[str]:
    names: set[str] = set()
    for _, packed in held.resources.values():
        cluster = cluster_pb2.Cluster()
        packed.Unpack(cluster)
        service = rt.eds_service_name(cluster)
        if service is not None:
            names.add(service)
    return names


def _rds_names(held: _Holding) -> set[str]:
    names: set[str] = set()
    for _, packed in held.resources.values():
        listener = listener_pb2.Listener()
        packed.Unpack(listener)
        names.update(rt.route_config_names(listener))
    return names
