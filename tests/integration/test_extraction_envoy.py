"""The extraction defense end to end: real Envoy, real demo model, real gRPC feed.

The sidecar's WASM filter ships every answered query to ``QueryFeed.Report`` itself. These
tests also report the requests and answers that went through the real sidecar through the
same gRPC service, so they hold whether or not that feed is running (a query reported twice
is an exact repeat: the monitor counts it once).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from controlplane.app.server import ControlPlane
from controlplane.extraction.verdicts import ClientRef, Enforcement, digest
from controlplane.gen.modelguard.admin.v1 import admin_pb2, admin_pb2_grpc
from controlplane.gen.modelguard.feed.v1 import feed_pb2, feed_pb2_grpc
from controlplane.local.model import load_model
from controlplane.netutil import http_request
from tests.conftest import DIGITS_REFERENCE
from tests.integration.conftest import Deployment

pytestmark = pytest.mark.envoy

POLICY = """\
apiVersion: modelguard.io/v1alpha1
kind: ExtractionPolicy
metadata: {name: digits-model, namespace: demo}
spec:
  targetRef: {service: digits-model}
  clientKey: {header: x-api-key}
  request: {features: "$.instances[*]"}
  response: {scores: "$.predictions[*].probabilities"}
  detection:
    detectors: [prada, nearDuplicate, outOfDistribution, coverage]
    reference: {file: REFERENCE, labelColumn: label}
  actions:
    onSuspicion: {throttle: {requests: 5, per: second}}
    onDetection: {quarantine: {duration: 1h}}
""".replace("REFERENCE", str(DIGITS_REFERENCE))


class System(Deployment):
    @property
    def verdicts(self) -> Path:
        return Path(str(self.config.verdicts_path))

    async def predict(self, key: str, row: list[float]) -> tuple[int, bytes, bytes]:
        body = json.dumps({"instances": [row]}).encode()
        status, _, answer = await asyncio.to_thread(
            http_request,
            "POST",
            f"http://127.0.0.1:{self.listen_port}/v1/predict",
            body,
            {"content-type": "application/json", "x-api-key": key},
        )
        return status, body, answer

    async def query(self, key: str, rows: np.ndarray) -> list[int]:
        """Send rows through the sidecar one request each; report the answered ones."""
        batch = feed_pb2.FeedBatch(node_id="digits-model-0", policy="demo/digits-model")
        statuses = []
        for row in rows:
            status, body, answer = await self.predict(key, [float(v) for v in row])
            statuses.append(status)
            if status == 200:
                batch.queries.add(
                    client_key=key,
                    status=status,
                    request_body=body,
                    response_body=answer,
                    path="/v1/predict",
                    time_unix_ms=int(time.time() * 1000),
                )
        if batch.queries:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{self.xds_port}") as channel:
                ack = await feed_pb2_grpc.QueryFeedStub(channel).Report(batch, timeout=10)
            assert ack.accepted == len(batch.queries)
        return statuses

    async def quarantines(self) -> list[admin_pb2.QuarantineEntry]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.admin_port}") as channel:
            listed = await admin_pb2_grpc.QuarantinesStub(channel).ListQuarantines(
                admin_pb2.ListQuarantinesRequest(include_throttles=True), timeout=5
            )
        return list(listed.entries)

    async def release(self, key: str) -> list[admin_pb2.QuarantineEntry]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.admin_port}") as channel:
            released = await admin_pb2_grpc.QuarantinesStub(channel).ReleaseQuarantine(
                admin_pb2.ReleaseQuarantineRequest(client_key=key), timeout=5
            )
        return list(released.released)


async def until(check, timeout: float = 15.0, every: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(every)
    raise AssertionError(f"not within {timeout}s (last: {last!r})")


async def calibrated(plane: ControlPlane, key: str = "demo/digits-model") -> None:
    """Until the policy's profile is ready (read from the seeded cache: within seconds)."""

    async def ready() -> bool:
        found = plane.extraction.profiles.conditions().get(key)
        return found is not None and found.status == "True"

    await until(ready, timeout=60)


async def start_system(tmp_path: Path, app_port: int, policy: str) -> System:
    return await System.start(
        tmp_path,
        app_port,
        {"extraction.yaml": policy},
        debounce_max=0.3,
        verdicts_path=str(tmp_path / "state" / "verdicts.json"),
    )


@pytest.fixture
async def system(
    tmp_path: Path, demo_model: tuple[str, int], profile_cache: Callable[[Path], Path]
) -> AsyncIterator[System]:
    profile_cache(tmp_path / "state")  # next to verdicts.json: calibrated once per session
    async with await start_system(tmp_path, demo_model[1], POLICY) as system:
        await calibrated(system.plane)
        yield system


async def status_of(system: System, key: str, row: list[float]) -> int:
    return (await system.predict(key, row))[0]


async def test_extraction_client_is_throttled_then_quarantined_benign_clients_are_not(
    system: System,
) -> None:
    model = load_model(0)
    rng = np.random.default_rng(0)
    benign = model.test_X
    attack = rng.uniform(0, 16, size=(400, 64)).round(1)
    probe = [float(v) for v in attack[0]]
    # Benign traffic and the attack interleaved, 8 queries at a time, until the monitor
    # suspects the attacker.
    position = 0
    while not system.plane.extraction.verdicts.active():
        assert position < 160, "no verdict after 160 attack queries"
        assert set(await system.query("alice", benign[position : position + 8])) == {200}
        await system.query("mallory", attack[position : position + 8])
        position += 8
    (throttle,) = system.plane.extraction.verdicts.active()
    assert (throttle.kind, throttle.client.key) == ("throttle", digest("mallory"))
    # Throttled within seconds of its verdict: 5 per second, then 429 — alice unaffected.
    # (The probe repeats one query: repeats never confirm a suspicion.)
    started = time.monotonic()
    await until(lambda: _is(system, "mallory", probe, 429), every=0.01)
    throttled_after = time.monotonic() - started
    assert throttled_after < 5
    assert await status_of(system, "alice", list(benign[0])) == 200
    # What the throttle still lets through confirms the suspicion: quarantine (403).
    deadline = time.monotonic() + 15
    while not any(e.kind == "quarantine" for e in system.plane.extraction.verdicts.active()):
        assert time.monotonic() < deadline, "suspicion not confirmed"
        await system.query("mallory", attack[position : position + 8])
        position += 8
        await asyncio.sleep(0.2)  # at the throttled pace
    await until(lambda: _is(system, "mallory", probe, 403))
    assert await status_of(system, "alice", list(benign[1])) == 200
    entries = await system.quarantines()
    mallory = ClientRef.of("demo/digits-model", "mallory").fingerprint
    assert [(e.kind, e.client_key, e.policy) for e in entries] == [
        ("quarantine", mallory, "demo/digits-model")
    ]
    assert system.verdicts.exists()  # persisted
    assert "mallory" not in system.verdicts.read_text()  # by digest only
    # A narrow user (issue 13): scikit-learn's own digit images of class 1, one by one
    # (class 1 was quarantined at query 83 before per-policy calibration): never refused.
    from controlplane.local.model import load_digits_data

    X, y = load_digits_data()
    for start in range(0, int((y == 1).sum()), 8):
        assert set(await system.query("ones", X[y == 1][start : start + 8])) == {200}
    assert [e.client_key for e in await system.quarantines() if e.client_key == "ones"] == []
    # Release: mallory is served again (and starts with a clean slate).
    assert [e.client_key for e in await system.release("mallory")] == [mallory]
    await until(lambda: _is(system, "mallory", probe, 200))
    assert await system.quarantines() == []


async def _is(system: System, key: str, row: list[float], code: int) -> bool:
    return await status_of(system, key, row) == code


async def test_quarantines_expire_by_themselves_and_survive_a_restart(system: System) -> None:
    row = [float(v) for v in load_model(0).test_X[0]]
    store = system.plane.extraction.verdicts
    now = time.time()
    client = ClientRef.of("demo/digits-model", "short", "header", "x-api-key")
    store.put(Enforcement("quarantine", client, now, now + 2.0, "test"))
    lasting = ClientRef.of("demo/digits-model", "lasting", "header", "x-api-key")
    store.put(Enforcement("quarantine", lasting, now, now + 3600, "test"))
    await until(lambda: _is(system, "short", row, 403))
    await until(lambda: _is(system, "short", row, 200), timeout=10)  # expired by itself
    # Admin answers name header keys by fingerprint only.
    assert [e.client_key for e in await system.quarantines()] == [lasting.fingerprint]
    # A restart of the control plane reads the quarantine back and pushes it again.
    await system.restart_plane()
    assert [e.client.key for e in system.plane.extraction.verdicts.active()] == [lasting.key]

    async def resynced() -> bool:
        return system.plane.pipeline.ir("digits-model-0") is not None

    await until(resynced, timeout=30)
    assert await status_of(system, "lasting", row) == 403
    assert await status_of(system, "anyone-else", row) == 200
    await system.release("lasting")
    await until(lambda: _is(system, "lasting", row, 200))
