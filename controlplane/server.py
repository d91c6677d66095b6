"""The control plane process: wires the boxes of the data flow together and serves them.

policy sources → store → (debounced) pipeline: compile → translate → snapshot cache → ADS.
Sidecars join the inventory through their ADS node metadata. The admin service only reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format

from controlplane.admin import AdminService
from controlplane.extraction.admin import QuarantineAdmin
from controlplane.extraction.feed import Extraction
from controlplane.identity.interceptor import SidecarAuthInterceptor
from controlplane.identity.kubernetes import AuthenticationPending
from controlplane.identity.service import IdentityConfig, IdentityService
from controlplane.identity.tokens import AuthenticationError, SidecarAuthenticator
from controlplane.inventory import Inventory, InventoryError, Sidecar
from controlplane.pipeline import Debouncer, Pipeline
from controlplane.ratelimit import RateLimitServices, backend_from_url
from controlplane.ratelimit.admin import RateLimitAdmin
from controlplane.sources.files import FileSource
from controlplane.store import PolicyStore
from controlplane.telemetry.service import TelemetryService
from controlplane.telemetry.settings import TelemetrySettings
from controlplane.xds.cache import SnapshotCache
from controlplane.xds.server import AdsServer, RejectNode
from controlplane.xds.status import SyncStatus

log = logging.getLogger(__name__)


class SidecarService(Protocol):
    """A gRPC service sidecars call (rate limits, telemetry, the query feed). It is served
    on the xDS port, so sidecars reach it through the bootstrap's control-plane cluster."""

    def add_to(self, server: grpc.aio.Server) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class ControlPlaneConfig:
    policy_paths: Sequence[str] = ("policies/",)
    xds_host: str = "127.0.0.1"
    xds_port: int = 18000  # 0: any free port
    admin_host: str = "127.0.0.1"
    admin_port: int = 18001
    debounce_quiet: float = 0.1
    debounce_max: float = 1.0
    watch: bool = True
    # Workload identity (CA, SVIDs over SDS, mTLS, xDS over TLS, sidecar tokens). None: no
    # CA, sidecars get plaintext config as before (what most feature tests use).
    identity: IdentityConfig | None = None
    telemetry: TelemetrySettings = TelemetrySettings()  # noqa: RUF009 (frozen)
    rate_limit_backend: str = "memory"  # or redis://host:port/db, shared by replicas
    # Seconds a sidecar keeps a budget's assignment without a fresh one (quota service or
    # its backend gone) before the policy's failureMode applies. Over the 5 s reports.
    quota_assignment_ttl: int = 15
    # Where quarantines persist across restarts (None: in memory only).
    verdicts_path: str | None = None


# The collector's youngest generation runs every 700 net container allocations by default.
# A push to a thousand sidecars churns through short-lived objects (frames, protobuf
# wrappers, events) and triggered ~90 young collections per policy edit, ~12 % of the
# control plane's CPU (bench/convergence.py), while finding almost no garbage: nearly all of
# it is freed by reference counting. Collecting every 20,000 instead keeps cyclic garbage
# bounded (tens of thousands of objects at most) and takes the collector out of the push.
GC_YOUNG_THRESHOLD = 20_000


def tune_gc() -> None:
    """Process-wide: the control plane owns its process (``modelguard serve``/``run``)."""
    young, middle, old = gc.get_threshold()
    if young < GC_YOUNG_THRESHOLD:
        gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def sidecar_from_node(node: base_pb2.Node) -> Sidecar:
    metadata = json_format.MessageToDict(node.metadata)
    return Sidecar.from_metadata(node.id, metadata)


class ControlPlane:
    def __init__(
        self, config: ControlPlaneConfig, *, authenticator: SidecarAuthenticator | None = None
    ) -> None:
        # ``authenticator``: how sidecars prove who they are (default: bootstrap tokens;
        # cluster mode: Kubernetes service-account tokens).
        self.config = config
        self.store = PolicyStore()
        self.inventory = Inventory()
        self.cache = SnapshotCache()
        self.sync_status = SyncStatus()
        self.pipeline = Pipeline(self.store, self.inventory, self.cache)
        self.files = FileSource(config.policy_paths, self.store)
        # One line per sidecar-facing service.
        self.sidecar_services: list[SidecarService] = []
        # Sidecars' traces and access logs; the control plane's own spans and metrics.
        self.pipeline.telemetry = config.telemetry
        self.telemetry = TelemetryService(config.telemetry, self)
        self.sidecar_services.append(self.telemetry)
        # Rate limit (per request) and quota (RLQS) services over one budget backend.
        self.rate_limits = RateLimitServices(
            backend_from_url(config.rate_limit_backend),
            assignment_ttl=config.quota_assignment_ttl,
        )
        self.sidecar_services.append(self.rate_limits)
        # Extraction monitor: the sidecars' query feed in, verdicts out into compile.
        self.extraction = Extraction(
            lambda: self.store.current().policies,
            Path(config.verdicts_path) if config.verdicts_path else None,
        )
        self.pipeline.verdicts = self.extraction.verdicts.active
        self.pipeline.hardened = self.extraction.hardened.active
        self.sidecar_services.append(self.extraction.feed)
        self.xds_port = 0
        self.admin_port = 0
        self._xds_server: grpc.aio.Server | None = None
        self._admin_server: grpc.aio.Server | None = None
        self._stop = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None
        # Admits sidecars and issues and rotates their SVIDs; feeds compile.
        self.identity = (
            IdentityService(config.identity, authenticator=authenticator, xds_host=config.xds_host)
            if config.identity is not None
            else None
        )
        if self.identity is not None:
            self.pipeline.mesh_inputs = self.identity.mesh_inputs
        self.call_auth = (
            SidecarAuthInterceptor(self.identity, self.sync_status.dropped)
            if self.identity is not None
            else None
        )
        self._identity_task: asyncio.Task[None] | None = None

    def _authenticate(self, node: base_pb2.Node, metadata: Mapping[str, str]) -> None:
        assert self.identity is not None
        try:
            self.identity.authenticate(sidecar_from_node(node), metadata)
        except InventoryError as err:
            raise RejectNode(str(err)) from err
        except AuthenticationPending as err:
            raise RejectNode(str(err), grpc.StatusCode.UNAUTHENTICATED, pending=True) from err
        except AuthenticationError as err:
            raise RejectNode(str(err), grpc.StatusCode.UNAUTHENTICATED) from err

    def _on_connect(self, node: base_pb2.Node) -> None:
        try:
            sidecar = sidecar_from_node(node)
        except InventoryError as err:
            log.warning("sidecar rejected: %s", err)
            raise RejectNode(str(err)) from err
        log.info("sidecar connected: %s (%s.%s)", node.id, sidecar.service, sidecar.namespace)
        if self.identity is not None:
            self.identity.ensure(sidecar)  # its first snapshot already carries its SVID
        self.inventory.observe(sidecar)

    def _on_disconnect(self, node_id: str) -> None:
        log.info("sidecar disconnected: %s", node_id)
        self.inventory.forget(node_id)
        if self.identity is not None:
            self.identity.forget(node_id)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        tune_gc()
        debouncer = Debouncer(
            self.pipeline.rebuild_async, loop, self.config.debounce_quiet, self.config.debounce_max
        )
        self.store.subscribe(lambda _policies: debouncer.trigger())
        self.inventory.subscribe(debouncer.trigger)
        self.extraction.verdicts.subscribe(debouncer.trigger)
        self.extraction.hardened.subscribe(debouncer.trigger)
        self.files.sync()  # the first policy set is in place before any sidecar is served

        self._xds_server = grpc.aio.server(
            options=[
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            ],
            # Every sidecar service on this port checks the sidecar's credential, as ADS does.
            interceptors=[self.call_auth] if self.call_auth is not None else None,
        )
        AdsServer(
            self.cache,
            self.sync_status,
            on_connect=self._on_connect,
            on_disconnect=self._on_disconnect,
            authenticate=self._authenticate if self.identity is not None else None,
        ).add_to(self._xds_server)
        for service in self.sidecar_services:
            service.add_to(self._xds_server)
            await service.start()
        xds_address = f"{self.config.xds_host}:{self.config.xds_port}"
        if self.identity is not None and self.identity.config.xds_tls:
            self.xds_port = self._xds_server.add_secure_port(
                xds_address, self.identity.server_credentials()
            )
        else:
            self.xds_port = self._xds_server.add_insecure_port(xds_address)
        self._admin_server = grpc.aio.server()
        AdminService(self).add_to(self._admin_server)
        RateLimitAdmin(self.rate_limits).add_to(self._admin_server)
        QuarantineAdmin(self.extraction.monitor).add_to(self._admin_server)
        self.telemetry.admin.add_to(self._admin_server)
        self.admin_port = self._admin_server.add_insecure_port(
            f"{self.config.admin_host}:{self.config.admin_port}"
        )
        await self._xds_server.start()
        await self._admin_server.start()
        if self.config.watch:
            self._watch_task = asyncio.create_task(self.files.watch(self._stop))
        if self.identity is not None:
            self._identity_task = asyncio.create_task(self.identity.run(debouncer.trigger))

    async def wait_closed(self) -> None:
        await self._stop.wait()

    async def stop(self, grace: float = 1.0) -> None:
        self._stop.set()
        if self._identity_task is not None:
            self._identity_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._identity_task
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch_task
        for server in (self._xds_server, self._admin_server):
            if server is not None:
                await server.stop(grace)
        for service in self.sidecar_services:
            await service.stop()
