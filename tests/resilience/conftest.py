"""Fixtures of the resilience tests: a control plane on its own event-loop thread (so
synchronous clients and hypothesis can hammer it), Redis, and leak probes."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import pytest

from controlplane.app.server import ControlPlane, ControlPlaneConfig
from tests.conftest import DIGITS_REFERENCE

T = TypeVar("T")

ACCESS = """\
apiVersion: modelguard.io/v1alpha1
kind: AccessPolicy
metadata: {name: digits-model, namespace: demo}
spec:
  targetRef: {service: digits-model}
  mtls: {mode: Permissive}
  defaultAction: Deny
  rules:
  - action: Allow
    to: {methods: [POST], paths: [/v1/predict]}
  - action: Allow
    to: {methods: [GET], paths: [/healthz]}
"""

EXTRACTION = """\
apiVersion: modelguard.io/v1alpha1
kind: ExtractionPolicy
metadata: {name: digits-model, namespace: demo}
spec:
  targetRef: {service: digits-model}
  clientKey: {header: x-api-key}
  request: {features: "$.instances[*]"}
  response: {scores: "$.predictions[*].probabilities"}
  output: {topK: 1, roundDigits: 2}
  detection:
    detectors: [prada, nearDuplicate, outOfDistribution, coverage]
    reference: {file: REFERENCE, labelColumn: label}
  actions:
    onSuspicion: {throttle: {requests: 50, per: second}}
    onDetection: {quarantine: {duration: 1h}}
""".replace("REFERENCE", str(DIGITS_REFERENCE))


class PlaneThread:
    """A ControlPlane running on an event loop in a thread of this process.

    Tests talk to it over real gRPC from the main thread (synchronous stubs, hypothesis),
    and read its in-process counters with ``call``.
    """

    def __init__(self, config: ControlPlaneConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.plane: ControlPlane = self.run(self._start(config))

    async def _start(self, config: ControlPlaneConfig) -> ControlPlane:
        plane = ControlPlane(config)
        await plane.start()
        return plane

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the plane's loop thread (its state is written only there)."""

        async def wrapped() -> T:
            return fn()

        return self.run(wrapped())

    def tasks(self) -> int:
        return self.call(lambda: len(asyncio.all_tasks(self.loop)))

    @property
    def xds(self) -> str:
        return f"127.0.0.1:{self.plane.xds_port}"

    @property
    def admin(self) -> str:
        return f"127.0.0.1:{self.plane.admin_port}"

    def stop(self) -> None:
        try:
            self.run(self.plane.stop(grace=0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


def write_policies(folder: Path, *texts: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (folder / f"policy-{i}.yaml").write_text(text)
    return folder


@pytest.fixture(scope="module")
def plane_thread(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PlaneThread]:
    """One control plane (no CA) with an access and an extraction policy, shared by a module."""
    root = tmp_path_factory.mktemp("plane")
    policies = write_policies(root / "policies", ACCESS, EXTRACTION)
    plane = PlaneThread(
        ControlPlaneConfig(
            policy_paths=(str(policies),),
            xds_port=0,
            admin_port=0,
            debounce_quiet=0.02,
            debounce_max=0.2,
            watch=False,
            verdicts_path=str(root / "verdicts.json"),
        )
    )
    try:
        yield plane
    finally:
        plane.stop()


def settle(probe: Callable[[], int], baseline: int, slack: int = 0, timeout: float = 10.0) -> int:
    """Poll ``probe`` until it is back to at most ``baseline + slack``; returns the last value
    (callers assert on it, so a leak fails with the number it leaked)."""
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        value = probe()
        if value <= baseline + slack or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def rss_bytes() -> int:
    """Resident memory of this process (the in-thread control plane lives here)."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")
