"""The query feed receiver (a sidecar-facing gRPC service) and the extraction box's wiring.

``QueryFeed.Report`` is called by sidecars with batches of queries, off the request path.
The detectors run on a worker thread so the event loop (which also serves ADS) never waits
on numpy. The same service keeps enforcements expiring on time.

Every policy gets its own profile (``ProfileBook``): from its reference data, calibrated
on a background thread (never on the event loop, never on the feed's path) and cached on
disk by content hash, so a restart does not recalibrate. Until it is ready the policy runs
with the reference-free profile (prada and nearDuplicate, which need no reference data);
a policy without reference data keeps that one. Each policy's ``Calibrated`` condition
(True/False with a reason: NoReference, Pending, Calibrating, Calibrated, Failed) is what
``modelguard status`` and the CRD status show.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc

from controlplane.api import Policy
from controlplane.api.reference import ReferenceData, load_file, parse
from controlplane.extraction.calibrate import (
    DEFAULT_SETTINGS,
    Cancelled,
    Profile,
    Settings,
    cached_profile,
    reference_free,
)
from controlplane.extraction.hardened import HardenStore
from controlplane.extraction.monitor import ExtractionMonitor, WatchedPolicy
from controlplane.extraction.risk import HeldOut, held_out_of
from controlplane.extraction.routing import FeedRouter
from controlplane.extraction.verdicts import (
    OtelVerdictSink,
    Throttler,
    VerdictBackend,
    VerdictSink,
    VerdictStore,
)
from controlplane.gen.modelguard.feed.v1 import feed_pb2, feed_pb2_grpc
from controlplane.grpcutil import decode_checked
from controlplane.identity.interceptor import current_caller
from controlplane.identity.tokens import Caller

log = logging.getLogger(__name__)

EXPIRY_POLL = 1.0  # seconds: the latest an expired enforcement stays in force
WARM_EVERY = 0.5  # seconds between looks for new or changed policies' profiles


# Whether the authenticated ``caller`` (sidecar ``node_id``) may report for ``policy``
# (namespace/name): None if so, else why not (safe to return: names no secret).
FeedAuthorizer = Callable[[Caller, str, str], "str | None"]


class QueryFeedService(feed_pb2_grpc.QueryFeedServicer):  # type: ignore[misc]
    def __init__(
        self, monitor: ExtractionMonitor, authorize: FeedAuthorizer | None = None
    ) -> None:
        self.monitor = monitor
        # Authorisation, beyond authentication: a sidecar reports only for the policies
        # that target it (the server knows policies and inventory; this box does not).
        self.authorize = authorize
        self.refused_by_reason: dict[str, int] = {}
        self._expiry: asyncio.Task[None] | None = None
        # Replicas sharing Redis: hands each client's queries to its owner replica
        # (controlplane/extraction/routing.py), so a client is judged once.
        self.router: FeedRouter | None = None
        self._warm: asyncio.Task[None] | None = None
        self.profiles: ProfileBook | None = None  # closed with the service

    @property
    def refused_node(self) -> int:
        """Batches naming another node than the caller's credential."""
        return self.monitor.stats.refused_batches

    def add_to(self, server: grpc.aio.Server) -> None:
        feed_pb2_grpc.add_QueryFeedServicer_to_server(self, decode_checked(server))

    async def start(self) -> None:
        self.monitor.verdicts.expire()
        self.monitor.hardened.expire()
        self._expiry = asyncio.create_task(self._expire_loop())
        self._warm = asyncio.create_task(self._warm_loop())

    async def stop(self) -> None:
        for task in (self._expiry, self._warm):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.profiles is not None:
            self.profiles.close()

    async def _warm_loop(self) -> None:
        """Policies' profiles are asked for as policies change (calibration then runs on
        the profile book's own thread), not only when their first query arrives."""
        while True:
            try:
                self.monitor.warm_profiles()
            except Exception:
                log.exception("looking up extraction profiles failed")
            await asyncio.sleep(WARM_EVERY)

    async def _expire_loop(self) -> None:
        store = self.monitor.verdicts
        while True:
            due = min(
                (t for t in (store.next_expiry(), self.monitor.hardened.next_expiry()) if t),
                default=None,
            )
            wait = EXPIRY_POLL if due is None else min(EXPIRY_POLL, max(0.0, due - time.time()))
            await asyncio.sleep(wait)
            try:
                for gone in store.expire():  # a release is as much an event as a verdict
                    log.warning(
                        "%s of %s (%s) expired: released",
                        gone.kind,
                        gone.client.fingerprint,
                        gone.client.policy,
                    )
                self.monitor.hardened.expire()
            except Exception:
                log.exception("expiring verdicts failed")

    def _refuse(self, reason: str) -> None:
        self.monitor.stats.refused_batches += 1
        self.refused_by_reason[reason] = self.refused_by_reason.get(reason, 0) + 1

    async def Report(
        self,
        request: feed_pb2.FeedBatch,
        context: grpc.aio.ServicerContext[feed_pb2.FeedBatch, feed_pb2.FeedAck],
    ) -> feed_pb2.FeedAck:
        caller = current_caller()  # None with identity off: no one is authenticated
        if caller is not None and not caller.is_node(request.node_id):
            # A valid token for one sidecar must not report (or blame a key) as another.
            self._refuse("other_node")
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"batch names node {request.node_id!r}, but the caller is not that sidecar",
            )
        if caller is not None and self.authorize is not None:
            why = self.authorize(caller, request.node_id, request.policy)
            if why is not None:
                # Nothing of the batch reaches the monitor: a forged batch blames no one.
                self._refuse("not_targeted")
                log.warning("feed batch refused: %s", why)
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
        router = self.router
        if router is not None:
            mine = await asyncio.to_thread(router.route, request)
            forwarded = len(request.queries) - len(mine.queries)
            accepted = await asyncio.to_thread(self.monitor.report, mine) if mine.queries else 0
            return feed_pb2.FeedAck(accepted=accepted + forwarded)
        accepted = await asyncio.to_thread(self.monitor.report, request)
        return feed_pb2.FeedAck(accepted=accepted)


@dataclass(frozen=True)
class CalibratedCondition:
    """A policy's ``Calibrated`` condition."""

    status: str  # "True" | "False"
    reason: str  # NoReference | Pending | Calibrating | Calibrated | Failed
    message: str


# Reads a ConfigMap key (namespace, name, key) → bytes; cluster mode provides one.
ConfigMapReader = Callable[[str, str, str], bytes]


@dataclass
class _Entry:
    source: Any  # the policy's ReferenceSource (None without reference data)
    profile: Profile
    condition: CalibratedCondition


class ProfileBook:
    """Each policy's profile (the monitor's ``profile`` callable), calibrated off the event
    loop on one background thread and cached by content hash under ``cache_dir``."""

    def __init__(
        self,
        cache_dir: Path | None = None,
        settings: Settings = DEFAULT_SETTINGS,
        configmaps: ConfigMapReader | None = None,
    ) -> None:
        self.cache_dir = cache_dir
        self.settings = settings
        self.configmaps = configmaps
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="calibrate")
        self._done: dict[str, threading.Event] = {}
        self._closing = threading.Event()

    def __call__(self, policy: WatchedPolicy) -> Profile | None:
        entry = self._entries.get(policy.key)
        if entry is None or entry.source != policy.reference:
            entry = self._start(policy)
        return entry.profile

    def _start(self, policy: WatchedPolicy) -> _Entry:
        with self._lock:
            entry = self._entries.get(policy.key)
            if entry is not None and entry.source == policy.reference:
                return entry
            done = self._done[policy.key] = threading.Event()
            if policy.reference is None:
                entry = _Entry(
                    None,
                    reference_free(policy.key),
                    CalibratedCondition(
                        "False", "NoReference",
                        "no spec.detection.reference: prada and nearDuplicate run with "
                        "reference-free thresholds",
                    ),
                )
                done.set()
            else:
                entry = _Entry(
                    policy.reference,
                    reference_free(policy.key),
                    CalibratedCondition("False", "Pending", "waiting to calibrate"),
                )
            self._entries[policy.key] = entry
            if policy.reference is not None:
                self._executor.submit(self._calibrate, policy, entry, done)
            return entry

    def read(self, policy: WatchedPolicy) -> ReferenceData:
        """A policy's reference data, from its file or (cluster mode) its ConfigMap."""
        source = policy.reference
        if source.file is not None:
            return load_file(source.file, source.label_column)
        if self.configmaps is None:
            raise ValueError("configMap references need cluster mode (modelguard cluster)")
        ref = source.config_map
        data = self.configmaps(policy.namespace, ref.name, ref.key)
        return parse(data, ref.key, source.label_column, loc=("configMap",))

    def _calibrate(self, policy: WatchedPolicy, entry: _Entry, done: threading.Event) -> None:
        def current() -> bool:
            return self._entries.get(policy.key) is entry

        try:
            if not current():
                return
            entry.condition = CalibratedCondition("False", "Calibrating", "reading reference")
            data = self.read(policy)
            # The dimension (and class names) are known now: prada and nearDuplicate run
            # meanwhile, with labels numbered as the calibrated profile will number them.
            entry.profile = replace(reference_free(policy.key, data.dim), classes=data.classes)
            entry.condition = CalibratedCondition(
                "False", "Calibrating", f"calibrating on {len(data.X)} reference rows"
            )
            started = time.monotonic()
            profile, cached = cached_profile(
                policy.key, data, self.cache_dir, self.settings, policy.reference.label_column,
                self._closing,
            )
            took = time.monotonic() - started
            if current():
                entry.profile = profile
                how = "from cache" if cached else f"calibrated in {took:.1f}s"
                entry.condition = CalibratedCondition(
                    "True", "Calibrated",
                    f"{how}: {len(data.X)} rows of {data.dim} features, "
                    f"{sum(profile.calibration['benign_clients'].values())} simulated clients",
                )
                log.info("policy %s: profile %s", policy.key, how)
        except Cancelled:
            entry.condition = CalibratedCondition("False", "Pending", "control plane stopping")
        except Exception as err:  # a bad reference must not stop the monitor
            log.warning("policy %s: calibration failed: %s", policy.key, err)
            entry.condition = CalibratedCondition("False", "Failed", str(err))
        finally:
            done.set()

    def conditions(self) -> dict[str, CalibratedCondition]:
        """Each known policy's (namespace/name) Calibrated condition."""
        return {key: entry.condition for key, entry in list(self._entries.items())}

    def wait(self, key: str, timeout: float = 300.0) -> bool:
        """Until the policy's calibration ended (tests, the profile CLI)."""
        done = self._done.get(key)
        return done is not None and done.wait(timeout)

    def close(self) -> None:
        self._closing.set()
        self._executor.shutdown(wait=False, cancel_futures=True)


def one_blas_thread() -> None:
    """Keep the process's BLAS (OpenBLAS under numpy) on the calling thread.

    The monitor's products are small (a batch of at most a few hundred rows against the
    reference's points); OpenBLAS splits them over all cores anyway, and its threads' hand-offs
    and spinning cost more than they save: measured with bench/extraction/throughput.py, one
    thread roughly halves the monitor's CPU per query and quadruples its rate on 2 shared
    cores. The control plane's other work is not BLAS. Process-wide, like the library's own
    setting (OPENBLAS_NUM_THREADS).
    """
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

    threadpool_limits(limits=1, user_api="blas")


class Extraction:
    """The extraction box as the control plane wires it: store, monitor, feed service."""

    def __init__(
        self,
        policies: Callable[[], Iterable[Policy]],
        state_path: Path | None = None,
        *,
        sink: VerdictSink | None = None,
        throttler: Throttler | None = None,
        profile: Callable[[WatchedPolicy], Profile | None] | None = None,
        profiles_dir: Path | None = None,
        verdict_backend: VerdictBackend | None = None,
        held_out: Callable[[Profile], HeldOut | None] = held_out_of,
    ) -> None:
        one_blas_thread()
        # Profiles are cached next to the verdicts (the control plane's state directory).
        if profiles_dir is None and state_path is not None:
            profiles_dir = state_path.parent / "profiles"
        self.profiles = ProfileBook(profiles_dir)
        if profile is None:
            profile = self.profiles
        # ``verdict_backend``: where verdicts persist (default: the file at ``state_path``,
        # or memory); a shared one lets several replicas enforce one set of verdicts.
        self.verdicts = VerdictStore(state_path, backend=verdict_backend)
        self.hardened = HardenStore()
        self.monitor = ExtractionMonitor(
            policies,
            self.verdicts,
            sink or OtelVerdictSink(),
            profile=profile,
            throttler=throttler,
            hardened=self.hardened,
            held_out=held_out,
        )
        self.feed = QueryFeedService(self.monitor)
        self.feed.profiles = self.profiles
