"""The control plane SIGKILLed during traffic: the sidecar keeps enforcing its last
configuration and no request fails because of it; a restarted control plane resyncs the
sidecar, and the quarantine it had decided (persisted to its verdicts file) and the budget
counted in Redis are still there.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from controlplane.app.status_cli import fetch_status
from controlplane.extraction.verdicts import ClientRef
from controlplane.gen.modelguard.admin.v1 import admin_pb2, admin_pb2_grpc
from controlplane.gen.modelguard.feed.v1 import feed_pb2, feed_pb2_grpc
from controlplane.netutil import free_port, http_request, wait_for_port
from tests.conftest import Processes, Redis, demo_sidecar
from tests.resilience.conftest import ACCESS, EXTRACTION, write_policies

pytestmark = pytest.mark.envoy

BUDGET = 40
RATE = f"""\
apiVersion: modelguard.io/v1alpha1
kind: RatePolicy
metadata: {{name: digits-model, namespace: demo}}
spec:
  targetRef: {{service: digits-model}}
  failureMode: FailOpen
  limits:
  - name: minute
    clientKey: {{header: x-api-key}}
    requests: {BUDGET}
    per: minute
    scope: Global
"""
ROW = [0.0] * 20 + [8.0] * 24 + [0.0] * 20
STEADY_KEYS = 100  # steady traffic spreads over keys, each far below its budget


class Plane:
    """``modelguard serve`` as a subprocess, so it can be SIGKILLed."""

    def __init__(self, processes: Processes, policies: Path, state: Path, redis: Redis) -> None:
        self.processes, self.policies, self.state, self.redis = processes, policies, state, redis
        self.xds, self.admin = free_port(), free_port()
        self.process = self.start()

    def start(self) -> object:
        process = self.processes.start(
            [
                str(Path(sys.executable).parent / "modelguard"), "serve", "--insecure",
                "--policies", str(self.policies),
                "--xds-port", str(self.xds), "--admin-port", str(self.admin),
                "--rate-limit-backend", self.redis.url,
                "--verdicts", str(self.state / "verdicts.json"),
            ],
            name="modelguard-serve",
        )
        wait_for_port("127.0.0.1", self.admin, timeout=30)
        return process

    def kill(self) -> None:
        process = self.process
        assert hasattr(process, "kill")
        process.kill()  # type: ignore[attr-defined]
        process.wait(10)  # type: ignore[attr-defined]


def post(port: int, key: str, row: list[float] = ROW) -> tuple[int, dict[str, str]]:
    status, headers, _ = http_request(
        "POST",
        f"http://127.0.0.1:{port}/v1/predict",
        json.dumps({"instances": [row]}).encode(),
        {"content-type": "application/json", "x-api-key": key},
    )
    return status, headers


def synced(admin: int) -> bool:
    try:
        report = fetch_status(f"127.0.0.1:{admin}")
    except grpc.RpcError:
        return False
    return any(s.node_id == "digits-model-0" and s.state == "SYNCED" for s in report.sidecars)


def calibrated(admin: int) -> bool:
    """Whether the ExtractionPolicy's profile is ready (``modelguard status``)."""
    report = fetch_status(f"127.0.0.1:{admin}")
    return any(
        c.type == "Calibrated" and c.status == "True" for p in report.policies for c in p.conditions
    )


def until(check: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {check}")
        time.sleep(0.1)


def quarantine_by_the_monitor(xds: int) -> None:
    """Feed the monitor an off-distribution query stream, as the sidecar's feed would."""
    rng = np.random.default_rng(7)
    with grpc.insecure_channel(f"127.0.0.1:{xds}") as channel:
        stub = feed_pb2_grpc.QueryFeedStub(channel)
        for _ in range(3):
            batch = feed_pb2.FeedBatch(node_id="digits-model-0", policy="demo/digits-model")
            for _ in range(16):
                row = rng.uniform(0, 16, 64).round(0).tolist()
                batch.queries.add(
                    client_key="thief",
                    status=200,
                    request_body=json.dumps({"instances": [row]}).encode(),
                    response_body=json.dumps(
                        {"predictions": [{"probabilities": [0.1] * 10}]}
                    ).encode(),
                )
            stub.Report(batch, timeout=10)


THIEF = ClientRef.of("demo/digits-model", "thief").fingerprint


def quarantined(admin: int) -> list[str]:
    with grpc.insecure_channel(f"127.0.0.1:{admin}") as channel:
        listed = admin_pb2_grpc.QuarantinesStub(channel).ListQuarantines(
            admin_pb2.ListQuarantinesRequest(), timeout=5
        )
    return [e.client_key for e in listed.entries if e.kind == "quarantine"]


class SteadyTraffic:
    """Requests through the sidecar, back to back, from a thread; every status kept."""

    def __init__(self, port: int) -> None:
        self.port, self.statuses, self.errors = port, Counter[int](), Counter[str]()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            try:
                self.statuses[post(self.port, f"steady-{i % STEADY_KEYS}")[0]] += 1
            except OSError as err:
                self.errors[type(err).__name__] += 1
            i += 1

    def __enter__(self) -> SteadyTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def test_sidecar_keeps_enforcing_through_a_sigkill_and_resyncs_with_state_intact(
    tmp_path: Path,
    processes: Processes,
    demo_model: tuple[str, int],
    redis_server: Redis,
    profile_cache: Callable[[Path], Path],
) -> None:
    policies = write_policies(tmp_path / "policies", ACCESS, EXTRACTION, RATE)
    profile_cache(tmp_path / "state")  # the extraction profile: calibrated once per session
    plane = Plane(processes, policies, tmp_path / "state", redis_server)
    envoy, listen = demo_sidecar(demo_model[1], plane.xds, tmp_path / "envoy.log")
    processes.track(envoy)
    envoy.start()
    envoy.wait_ready(30)
    until(lambda: synced(plane.admin))
    until(lambda: calibrated(plane.admin))
    assert post(listen, "someone")[0] == 200

    # The monitor quarantines a client; the sidecar refuses it.
    quarantine_by_the_monitor(plane.xds)
    until(lambda: post(listen, "thief")[0] == 403)
    assert quarantined(plane.admin) == [THIEF]  # by fingerprint: a key is a secret

    # The budget and its check after the restart must fall in one window of the minute.
    left = 60 - time.time() % 60
    if left < 35:
        time.sleep(left + 0.2)
    used = BUDGET - 10
    for n in range(used):
        status, headers = post(listen, "tenant")
        assert status == 200 and headers["ratelimit-remaining"] == str(BUDGET - n - 1)

    with SteadyTraffic(listen) as traffic:
        time.sleep(0.5)
        plane.kill()
        # No control plane at all: the last configuration keeps being enforced.
        time.sleep(1.0)
        assert post(listen, "thief")[0] == 403
        status, _, _ = http_request("GET", f"http://127.0.0.1:{listen}/v1/model")
        assert status == 403  # default deny
        served_while_down = sum(traffic.statuses.values())
        plane.process = plane.start()
        until(lambda: synced(plane.admin), timeout=30)
        time.sleep(0.5)
    assert sum(traffic.statuses.values()) > served_while_down > 0
    assert traffic.statuses == Counter({200: traffic.statuses[200]}), traffic.statuses
    assert not traffic.errors, traffic.errors

    # What the control plane decided and counted before it died is still there.
    assert quarantined(plane.admin) == [THIEF]  # by fingerprint: a key is a secret
    assert post(listen, "thief")[0] == 403
    codes = [post(listen, "tenant") for _ in range(BUDGET - used + 2)]
    assert [c for c, _ in codes] == [200] * (BUDGET - used) + [429, 429], codes
    assert codes[0][1]["ratelimit-remaining"] == str(BUDGET - used - 1)
    assert envoy.server_state() == "LIVE"
