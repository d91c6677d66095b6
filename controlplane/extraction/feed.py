"""The query feed receiver (a sidecar-facing gRPC service) and the extraction box's wiring.

``QueryFeed.Report`` is called by sidecars with batches of queries, off the request path.
The detectors run on a worker thread so the event loop (which also serves ADS) never waits
on numpy. The same service keeps enforcements expiring on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc

from controlplane.api import Policy
from controlplane.extraction.calibrate import Profile, digits_profile
from controlplane.extraction.hardened import HardenStore
from controlplane.extraction.monitor import ExtractionMonitor, WatchedPolicy
from controlplane.extraction.risk import HeldOut, held_out_of
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

    async def stop(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry

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
        accepted = await asyncio.to_thread(self.monitor.report, request)
        return feed_pb2.FeedAck(accepted=accepted)


@functools.cache
def _digits_profile() -> Profile:
    return digits_profile()


def default_profile(policy: WatchedPolicy) -> Profile | None:
    """The demo digits model's calibrated profile for every policy.

    Other models need their own reference data and calibration (``calibrate.calibrate``);
    queries whose dimension does not match the profile are counted and not analysed.
    """
    return _digits_profile()


def interim_held_out(profile: Profile) -> HeldOut | None:
    """The held-out rows the risk estimate scores on (``risk.held_out_of``), and until
    per-policy reference data lands (CONTRACTS.md #2: ``profile.held_out`` and
    ``held_out_answers``), the digits profile's from the demo model's test split and its
    predictions: the rows its calibration kept out of the reference. The one adapter to drop
    when profiles carry their own."""
    held = held_out_of(profile)
    if held is None and profile.name == "digits-logreg":
        held = _digits_held_out()
    return held


@functools.cache
def _digits_held_out() -> HeldOut:
    from controlplane.local.model import load_model

    model = load_model(0)
    return HeldOut.of(model.test_X, model.predict(model.test_X))


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
        profile: Callable[[WatchedPolicy], Profile | None] = default_profile,
        verdict_backend: VerdictBackend | None = None,
        held_out: Callable[[Profile], HeldOut | None] = interim_held_out,
    ) -> None:
        one_blas_thread()
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
