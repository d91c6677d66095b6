"""The control plane process: wires the boxes of the data flow together and serves them.

policy sources → store → (debounced) pipeline: compile → translate → snapshot cache → ADS.
Sidecars join the inventory through their ADS node metadata. The admin service only reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format

from controlplane.app import page
from controlplane.app.admin import AdminService
from controlplane.app.adminauth import server_interceptors
from controlplane.app.observability import ObservabilityServer
from controlplane.compile.inputs.inventory import Inventory, InventoryError, Sidecar, targets
from controlplane.compile.inputs.store import PolicyStore
from controlplane.extraction.admin import QuarantineAdmin
from controlplane.extraction.feed import Extraction
from controlplane.extraction.routing import FeedRouter
from controlplane.extraction.shared import SharedVerdicts
from controlplane.identity.interceptor import SidecarAuthInterceptor
from controlplane.identity.kubernetes import AuthenticationPending
from controlplane.identity.plaintext import PlaintextWatch
from controlplane.identity.service import IdentityConfig, IdentityService
from controlplane.identity.tokens import AuthenticationError, Caller, SidecarAuthenticator
from controlplane.netutil import port_in_use_message
from controlplane.pipeline import Debouncer, Pipeline
from controlplane.ratelimit import RateLimitServices, backend_from_url
from controlplane.ratelimit.admin import RateLimitAdmin
from controlplane.sidecar.bootstrap import ENVOY_ADMIN_KEY
from controlplane.sources.files import FileSource
from controlplane.telemetry.instrument import Observed
from controlplane.telemetry.service import TelemetryService
from controlplane.telemetry.settings import TelemetrySettings
from controlplane.telemetry.verdict_log import VerdictLog
from controlplane.xds.cache import SnapshotCache
from controlplane.xds.server import SERVER_OPTIONS as ADS_SERVER_OPTIONS
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
    # Proxies in front of every sidecar whose X-Forwarded-For entries are believed (the
    # caller's address for anonymous clients and sourceIP keys); 0: only the TCP peer.
    xff_num_trusted_hops: int = 0
    # Where quarantines persist across restarts (None: in memory only).
    verdicts_path: str | None = None
    # Where calibrated detector profiles are cached by content hash, so a restart does not
    # recalibrate (None: next to verdicts_path; with neither, not cached).
    profiles_dir: str | None = None
    # Beyond loopback the admin API demands this bearer token (controlplane/app/adminauth.py).
    admin_token_file: str | None = None
    # Connections to sidecars are closed (GOAWAY) after this many seconds (±10 % jitter,
    # gRPC's) so that after a rollout or a scale-up sidecars spread over all replicas.
    xds_max_connection_age: float = 1800.0
    # On SIGTERM: in-flight calls get this long; then streams end and sidecars reconnect.
    shutdown_grace: float = 2.0
    # This replica's name among those sharing a Redis (feed routing); "" : host and pid.
    replica_id: str = ""
    # Count plaintext sidecars on the TLS xDS port and advise them, by owning fd 2
    # (identity/plaintext.py): for the CLI's processes only, never a library user's.
    watch_plaintext: bool = False
    # HTTP on admin_host: /metrics (Prometheus) and the live page /ui (telemetry/http.py).
    # None: not served; 0: any free port.
    metrics_port: int | None = None
    metrics_host: str | None = None  # None: admin_host; /ui stays loopback-only either way


# The collector's youngest generation runs every 700 net container allocations by default.
# A push to a thousand sidecars churns through short-lived objects (frames, protobuf
# wrappers, events) and triggered ~90 young collections per policy edit, ~12 % of the
# control plane's CPU (bench/convergence.py), while finding almost no garbage: nearly all of
# it is freed by reference counting. Collecting every 20,000 instead keeps cyclic garbage
# bounded (tens of thousands of objects at most) and takes the collector out of the push.
GC_YOUNG_THRESHOLD = 20_000


# gRPC binds its listening sockets with SO_REUSEPORT: a second control plane on the same
# ports would start and share them silently. Without it the second bind fails (PortInUse).
NO_REUSEPORT = [("grpc.so_reuseport", 0)]


class PortInUse(OSError):
    """A port the control plane must listen on is taken; names it and, if known, its holder."""


def _bind(add_port: Callable[[], int], what: str, host: str, port: int) -> int:
    try:
        bound = add_port()
    except RuntimeError as err:  # grpc: "Failed to bind to address ..."
        raise PortInUse(port_in_use_message(what, host, port)) from err
    if bound == 0:  # older grpc reports a failed bind as port 0
        raise PortInUse(port_in_use_message(what, host, port))
    return bound


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
        self.pipeline.xff_num_trusted_hops = config.xff_num_trusted_hops
        self.telemetry = TelemetryService(config.telemetry)
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
            profiles_dir=Path(config.profiles_dir) if config.profiles_dir else None,
        )
        self.pipeline.verdicts = self.extraction.verdicts.active
        # Replicas sharing a Redis (the budgets' backend) share their verdicts through it.
        self.shared_verdicts: SharedVerdicts | None = None
        if config.rate_limit_backend.startswith(("redis://", "rediss://", "unix://")):
            self.shared_verdicts = SharedVerdicts(
                self.extraction.verdicts,
                config.rate_limit_backend,
                release=self.extraction.monitor.release,
            )
            self.extraction.feed.router = FeedRouter(
                config.rate_limit_backend,
                config.replica_id or f"{socket.gethostname()}-{os.getpid()}",
                self.extraction.monitor.report,
            )
        self.pipeline.hardened = self.extraction.hardened.active
        self.extraction.feed.authorize = self._feed_authorized
        self.sidecar_services.append(self.extraction.feed)
        # The monitor's recent verdicts, for /metrics and the live page.
        self.verdict_log = VerdictLog.around(self.extraction.monitor)
        self.telemetry.instrument(self._observed())
        self.http: ObservabilityServer | None = None
        self.xds_port = 0
        self.admin_port = 0
        # Node id → its Envoy admin address, as its bootstrap announced it (proxy-config).
        self.envoy_admins: dict[str, str] = {}
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
            # Many keys of one tenant count against that tenant's share of the monitor.
            self.extraction.monitor.tenant_of = self.identity.tenant_of
        self.call_auth = (
            SidecarAuthInterceptor(self.identity, self.sync_status.dropped)
            if self.identity is not None
            else None
        )
        self._identity_task: asyncio.Task[None] | None = None
        self._plaintext: PlaintextWatch | None = None

    def grpc_servers(self) -> list[grpc.aio.Server]:
        """The xDS and admin servers started so far (none before ``start``)."""
        return [s for s in (self._xds_server, self._admin_server) if s is not None]

    def _observed(self) -> Observed:
        """What the control plane's own metrics and spans read, and nothing else."""
        store, cache = self.store, self.cache

        def snapshot_versions() -> dict[str, str]:
            return {
                node: snapshot.version
                for node in cache.node_ids()
                if (snapshot := cache.get(node)) is not None
            }

        return Observed(
            subscribe_policies=store.subscribe,
            policy_states=lambda: [(s.key[0], s.state) for s in store.statuses()],
            extraction_policies=lambda: [
                f"{p.metadata.namespace}/{p.metadata.name}"
                for p in store.current().policies
                if p.kind == "ExtractionPolicy"
            ],
            on_rebuild=self.pipeline.observers.append,
            sync_status=self.sync_status,
            snapshot_versions=snapshot_versions,
            grpc_servers=self.grpc_servers,
            enforcement_kinds=lambda: [e.kind for e in self.extraction.verdicts.active()],
            monitor=self.extraction.monitor,
            verdict_counts=self.verdict_log.counts,
        )

    def admin_service(self) -> AdminService:
        """The status report's service, handed the parts it reads."""
        return AdminService(
            store=self.store,
            inventory=self.inventory,
            cache=self.cache,
            sync_status=self.sync_status,
            telemetry_store=self.telemetry.store,
            envoy_admins=self.envoy_admins,
            calibrated=self.extraction.profiles.conditions,
            api_key_sets=self._api_key_sets if self.identity is not None else None,
        )

    def _api_key_sets(self) -> set[tuple[str, str]]:
        """The key Secrets compile sees now (non-empty ones: an empty set admits nobody)."""
        assert self.identity is not None
        return {ref for ref, keys in self.identity.mesh_inputs(()).api_keys.items() if keys}

    def secret_rate_client(self, policy: str, limit: str) -> bool:
        """Whether the clients of a global limit are raw header values (secrets, shown by
        fingerprint) rather than names the sidecar verified (shown as they are)."""
        for p in self.store.current().policies:
            if p.kind != "RatePolicy" or f"{p.metadata.namespace}/{p.metadata.name}" != policy:
                continue
            for rule in getattr(p.spec, "limits", ()):
                if f"{p.metadata.namespace}.{p.metadata.name}.{rule.name}" == limit:
                    return bool(rule.client_key.source == "header")
        return True

    def page_sources(self) -> page.Sources:
        """What the live page reads."""
        return page.Sources(
            admin=self.admin_service(),
            budgets=self.rate_limits.budgets,
            monitor=self.extraction.monitor,
            verdicts=self.extraction.verdicts,
            verdict_log=self.verdict_log,
            telemetry=self.telemetry,
            secret_rate_client=self.secret_rate_client,
        )

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

    def _feed_authorized(self, caller: Caller, node_id: str, policy: str) -> str | None:
        """A sidecar may report only for an ExtractionPolicy that targets it, as the
        inventory (its authenticated node metadata) describes it, and as its credential's
        identity. A batch for no known policy goes on: the monitor counts it as such."""
        namespace, _, name = policy.partition("/")
        found = [
            p for p in self.store.current().policies
            if p.kind == "ExtractionPolicy"
            and (p.metadata.namespace, p.metadata.name) == (namespace, name)
        ]
        if not found:
            return None
        sidecar = self.inventory.get(node_id)
        if sidecar is None:
            return f"node {node_id!r} is not connected: it reports for no policy"
        if sidecar.identity != caller.identity or caller.workload not in (
            None, (sidecar.service, sidecar.namespace)
        ):
            return f"node {node_id!r} is not {caller.identity}"
        if not targets(found[0], sidecar):
            return (
                f"policy {policy} does not target node {node_id!r} "
                f"({sidecar.service}.{sidecar.namespace})"
            )
        return None

    def _on_connect(self, node: base_pb2.Node) -> None:
        try:
            sidecar = sidecar_from_node(node)
        except InventoryError as err:
            log.warning("sidecar rejected: %s", err)
            raise RejectNode(str(err)) from err
        log.info("sidecar connected: %s (%s.%s)", node.id, sidecar.service, sidecar.namespace)
        admin = node.metadata.fields.get(ENVOY_ADMIN_KEY)
        if admin is not None and admin.string_value:
            self.envoy_admins[node.id] = admin.string_value
        if self.identity is not None:
            self.identity.ensure(sidecar)  # its first snapshot already carries its SVID
        self.inventory.observe(sidecar)

    def _on_disconnect(self, node_id: str) -> None:
        log.info("sidecar disconnected: %s", node_id)
        self.inventory.forget(node_id)
        self.envoy_admins.pop(node_id, None)
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
        if self.shared_verdicts is not None:  # and the verdicts every replica shares
            await asyncio.to_thread(self.shared_verdicts.start)
        if self.extraction.feed.router is not None:
            await asyncio.to_thread(self.extraction.feed.router.start)

        self._xds_server = grpc.aio.server(
            options=[
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                ("grpc.max_receive_message_length", 4 * 1024 * 1024),
                ("grpc.max_connection_age_ms", int(self.config.xds_max_connection_age * 1000)),
                # ADS streams never finish by themselves: end them soon after the GOAWAY.
                ("grpc.max_connection_age_grace_ms", 10_000),
                *ADS_SERVER_OPTIONS,  # a burst of connects must not lose streams
                *NO_REUSEPORT,
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
        xds_server = self._xds_server
        if self.identity is not None and self.identity.config.xds_tls:
            credentials = self.identity.server_credentials()
            self.xds_port = _bind(
                lambda: xds_server.add_secure_port(xds_address, credentials),
                "xDS",
                self.config.xds_host,
                self.config.xds_port,
            )
        else:
            self.xds_port = _bind(
                lambda: xds_server.add_insecure_port(xds_address),
                "xDS",
                self.config.xds_host,
                self.config.xds_port,
            )
        self._admin_server = grpc.aio.server(
            options=NO_REUSEPORT,
            interceptors=server_interceptors(self.config.admin_host, self.config.admin_token_file)
            or None,
        )
        self.admin_service().add_to(self._admin_server)
        RateLimitAdmin(self.rate_limits, self.secret_rate_client).add_to(self._admin_server)
        QuarantineAdmin(self.extraction.monitor, self.rate_limits).add_to(self._admin_server)
        self.telemetry.admin.add_to(self._admin_server)
        admin_server = self._admin_server
        self.admin_port = _bind(
            lambda: admin_server.add_insecure_port(
                f"{self.config.admin_host}:{self.config.admin_port}"
            ),
            "admin",
            self.config.admin_host,
            self.config.admin_port,
        )
        await self._xds_server.start()
        await self._admin_server.start()
        if self.config.metrics_port is not None:
            self.http = ObservabilityServer(
                self.page_sources(),
                self.config.metrics_host or self.config.admin_host,
                self.config.metrics_port,
                token_file=self.config.admin_token_file,
            )
            try:
                await self.http.start()
            except OSError as err:
                raise PortInUse(
                    port_in_use_message(
                        "metrics", self.http.host, self.config.metrics_port
                    )
                ) from err
        identity = self.identity
        if self.config.watch_plaintext and identity is not None and identity.config.xds_tls:
            self._plaintext = PlaintextWatch(
                f"{self.config.xds_host}:{self.xds_port}", self.sync_status.dropped
            )
            self._plaintext.start()
        if self.config.watch:
            self._watch_task = asyncio.create_task(self.files.watch(self._stop))
        if self.identity is not None:
            self._identity_task = asyncio.create_task(self.identity.run(debouncer.trigger))

    async def wait_closed(self) -> None:
        await self._stop.wait()

    def install_signal_handlers(self) -> None:
        """SIGTERM (Kubernetes stopping the pod) and SIGINT end ``wait_closed``; the caller
        then runs ``stop``: no new calls, GOAWAY, in-flight calls get ``shutdown_grace``,
        the remaining streams end and their sidecars reconnect to another replica."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)

    def _on_signal(self, signum: int) -> None:
        log.info("%s: shutting down gracefully", signal.Signals(signum).name)
        self._stop.set()

    async def stop(self, grace: float = 1.0) -> None:
        self._stop.set()
        self.pipeline.close()  # a rebuild in its worker stops at its next sidecar
        if self.extraction.feed.router is not None:
            # Leave the feed's membership first: the others take this replica's clients.
            await asyncio.to_thread(self.extraction.feed.router.stop)
        if self._plaintext is not None:
            self._plaintext.stop()
            self._plaintext = None
        if self._identity_task is not None:
            self._identity_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._identity_task
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch_task
        if self.http is not None:
            await self.http.stop()
        # Both at once: each stops taking calls, sends GOAWAY and gives calls ``grace``.
        await asyncio.gather(
            *(s.stop(grace) for s in (self._xds_server, self._admin_server) if s is not None)
        )
        for service in self.sidecar_services:
            await service.stop()
        if self.shared_verdicts is not None:
            await asyncio.to_thread(self.shared_verdicts.stop)
