"""Two ``modelguard serve --kubernetes`` replicas (real processes) against kmock, one real
Redis and one real Envoy sidecar each: one set of verdicts for both.

* a quarantine decided on replica A (by its own detectors, from traffic through A's sidecar)
  is enforced by B's sidecar within about a second;
* it survives a restart of B (Redis is the truth, not the replica's memory);
* a release on B takes effect through A's sidecar.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen
from typing import Any

import grpc
import kmock
import numpy as np
import pytest
import yaml
from kubernetes import client

from controlplane.compile.inputs.inventory import Sidecar
from controlplane.extraction.verdicts import ClientRef
from controlplane.gen.modelguard.admin.v1 import admin_pb2, admin_pb2_grpc
from controlplane.gen.modelguard.feed.v1 import feed_pb2, feed_pb2_grpc
from controlplane.local.envoy import EnvoyProcess
from controlplane.local.model import load_model
from controlplane.netutil import free_port, http_request
from controlplane.sidecar.bootstrap import build_bootstrap
from controlplane.sources.kubernetes import LEASE_NAME
from tests.conftest import DIGITS_REFERENCE, Processes, Redis, demo_sidecar, stop_process
from tests.integration.conftest import call, conditions, create_policy, read_policy

pytestmark = pytest.mark.envoy

ACCESS = {
    "targetRef": {"service": "digits-model"},
    "rules": [
        {
            "name": "predict",
            "action": "Allow",
            "to": {"methods": ["POST"], "paths": ["/v1/predict"]},
        }
    ],
}
EXTRACTION = {
    "targetRef": {"service": "digits-model"},
    "clientKey": {"header": "x-api-key"},
    "request": {"features": "$.instances[*]"},
    "response": {"scores": "$.predictions[*].probabilities"},
    "detection": {
        "detectors": ["prada", "nearDuplicate", "outOfDistribution", "coverage"],
        # The replicas' own files: both calibrate the same profile from it.
        "reference": {"file": str(DIGITS_REFERENCE), "labelColumn": "label"},
    },
    "actions": {"onDetection": {"quarantine": {"duration": "1h"}}},
}
# The replicas' binary: this venv's, or (MODELGUARD_TEST_BIN) another install's, e.g. the
# non-editable wheel install of test_wheel_install.install_wheel, as the image has it.
MODELGUARD = os.environ.get("MODELGUARD_TEST_BIN") or str(
    Path(sys.executable).parent / "modelguard"
)


def shown(key: str) -> str:
    """How admin answers name a client whose key is an x-api-key value: its fingerprint."""
    return ClientRef.of("demo/digits-model", key, "header", "x-api-key").shown


@dataclass
class Replica:
    name: str
    xds_port: int
    admin_port: int
    process: Popen[bytes] | None = None

    async def admin(self, method: str, request: Any) -> Any:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.admin_port}") as channel:
            stub = admin_pb2_grpc.QuarantinesStub(channel)
            return await getattr(stub, method)(request, timeout=5)

    async def quarantined(self) -> list[str]:
        listed = await self.admin(
            "ListQuarantines", admin_pb2.ListQuarantinesRequest(include_throttles=True)
        )
        return [e.client_key for e in listed.entries if e.kind == "quarantine"]


@dataclass
class Cluster:
    processes: Processes
    kubeconfig: Path
    redis: Redis
    replicas: dict[str, Replica]
    sidecar_ports: dict[str, int]  # replica → the listen port of a sidecar connected to it

    def start(self, replica: Replica) -> None:
        replica.process = self.processes.start(
            [MODELGUARD, "serve", "--kubernetes", "--kubeconfig", str(self.kubeconfig),
             "--replica-id", replica.name, "--webhook-port", "0", "--insecure",
             "--xds-port", str(replica.xds_port), "--admin-port", str(replica.admin_port),
             "--rate-limit-backend", self.redis.url, "--verdicts", ""],
            name=f"replica-{replica.name}",
            env={"PYTHONUNBUFFERED": "1"},
        )  # fmt: skip

    def log(self, replica: Replica) -> str:
        assert replica.process is not None
        return self.processes.log_of(replica.process)[-4000:]


async def until(check: Callable[[], Awaitable[Any]], timeout: float, every: float = 0.02) -> float:
    """Seconds until ``check()`` is true; fails after ``timeout``."""
    started = time.monotonic()
    last = None
    while time.monotonic() - started < timeout:
        last = await check()
        if last:
            return time.monotonic() - started
        await asyncio.sleep(every)
    raise AssertionError(f"not within {timeout}s (last: {last!r})")


async def predict(port: int, key: str, row: list[float]) -> tuple[int, bytes, bytes]:
    body = json.dumps({"instances": [row]}).encode()
    try:
        status, _, answer = await asyncio.to_thread(
            http_request,
            "POST",
            f"http://127.0.0.1:{port}/v1/predict",
            body,
            {"content-type": "application/json", "x-api-key": key},
        )
    except OSError:
        return 0, body, b""
    return int(status), body, answer


async def query(
    port: int, xds_port: int, key: str, rows: np.ndarray, report: bool = True
) -> list[int]:
    """Rows through one sidecar; the answered ones also reported to that sidecar's replica
    (as in test_extraction_envoy: the Wasm filter's own feed may lag; repeats count once)
    unless ``report`` is false: then only the sidecar's own feed reports them."""
    batch = feed_pb2.FeedBatch(node_id="feed", policy="demo/digits-model")
    statuses = []
    for row in rows:
        status, body, answer = await predict(port, key, [float(v) for v in row])
        statuses.append(status)
        if status == 200:
            batch.queries.add(
                client_key=key, status=status, request_body=body, response_body=answer,
                path="/v1/predict", time_unix_ms=int(time.time() * 1000),
            )  # fmt: skip
    if batch.queries and report:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{xds_port}") as channel:
            await feed_pb2_grpc.QueryFeedStub(channel).Report(batch, timeout=10)
    return statuses


def kubeconfig(path: Path, url: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "kmock", "cluster": {"server": url}}],
                "users": [{"name": "test", "user": {"token": "test"}}],
                "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test"}}],
                "current-context": "kmock",
            }
        )
    )
    return path


@pytest.fixture
async def two_replicas(
    cluster: kmock.KubernetesEmulator,
    api_client: client.ApiClient,
    processes: Processes,
    tmp_path: Path,
    demo_model: tuple[str, int],
) -> AsyncIterator[Cluster]:
    for kind, spec in (("AccessPolicy", ACCESS), ("ExtractionPolicy", EXTRACTION)):
        await create_policy(api_client, kind, "digits-model", spec)
    redis = Redis(processes)
    await asyncio.to_thread(redis.start)
    replicas = {name: Replica(name, free_port(), free_port()) for name in ("a", "b")}
    system = Cluster(
        processes,
        kubeconfig(tmp_path / "kubeconfig", str(cluster.url).rstrip("/")),
        redis,
        replicas,
        {},
    )
    for replica in replicas.values():
        system.start(replica)
    envoys = []
    for replica in replicas.values():
        envoy, listen = demo_sidecar(
            demo_model[1],
            replica.xds_port,
            tmp_path / f"envoy-{replica.name}.log",
            node_id=f"digits-model-{replica.name}.demo",
        )
        envoys.append(processes.track(envoy))
        envoy.start()
        system.sidecar_ports[replica.name] = listen
    try:
        benign = [float(v) for v in load_model(0).test_X[0]]
        for replica in replicas.values():
            port = system.sidecar_ports[replica.name]

            async def served(port: int = port) -> bool:
                return (await predict(port, "alice", benign))[0] == 200

            try:
                await until(served, timeout=60, every=0.2)
            except AssertionError as err:
                raise AssertionError(f"{err}\n{system.log(replica)}") from err
        # Each replica calibrates the policy's detectors from the reference first; queries
        # before that are not judged, which would skew the counts below.
        for replica in replicas.values():

            async def calibrated(replica: Replica = replica) -> bool:
                assert replica.process is not None
                log = system.processes.log_of(replica.process)
                return bool(re.search(r"policy .*digits-model.*: profile ", log))

            await until(calibrated, timeout=120, every=0.2)
        yield system
    finally:
        for envoy in envoys:
            await asyncio.to_thread(envoy.stop)
        for replica in replicas.values():
            if replica.process is not None:
                await asyncio.to_thread(stop_process, replica.process)


async def test_a_quarantine_on_one_replica_is_enforced_and_released_through_the_other(
    two_replicas: Cluster, api_client: client.ApiClient
) -> None:
    system = two_replicas
    a, b = system.replicas["a"], system.replicas["b"]
    port_a, port_b = system.sidecar_ports["a"], system.sidecar_ports["b"]
    model = load_model(0)
    benign = model.test_X
    attack = np.random.default_rng(0).uniform(0, 16, size=(600, 64)).round(1)
    probe = [float(v) for v in attack[0]]

    async def status(port: int, key: str, row: list[float]) -> int:
        return (await predict(port, key, row))[0]

    # Status across replicas: the Lease holder counts the sidecars of both.
    async def both_programmed() -> str:
        obj = await read_policy(api_client, "AccessPolicy", "digits-model")
        message = str(conditions(obj).get("Programmed", {}).get("message", ""))
        return message if message == "2 of 2 targeted sidecars ACKed" else ""

    try:
        await until(both_programmed, timeout=15, every=0.2)
    except AssertionError as err:
        obj = await read_policy(api_client, "AccessPolicy", "digits-model")
        raise AssertionError(f"{err}: {obj.get('status')}") from err

    # Meanwhile mallory asks B's sidecar one same question again and again (B's detectors
    # count a repeat once: B alone never judges mallory), until B's sidecar refuses it.
    repeat = [float(v) for v in benign[-1]]
    refused_on_b: list[float] = []

    async def watch_b() -> None:
        while await status(port_b, "mallory", repeat) != 403:
            await asyncio.sleep(0.02)
        refused_on_b.append(time.time())

    watcher = asyncio.create_task(watch_b())
    # Replica A's detectors judge mallory from traffic through A's sidecar; alice is benign.
    position = 0
    while not (entries := await a.quarantined()):
        assert position < 480, f"no quarantine after {position} queries\n{system.log(a)}"
        await query(port_a, a.xds_port, "alice", benign[position : position + 8])
        await query(port_a, a.xds_port, "mallory", attack[position : position + 8])
        position += 8
    assert entries == [shown("mallory")]
    listed = await a.admin("ListQuarantines", admin_pb2.ListQuarantinesRequest())
    decided_at = listed.entries[0].since.ToNanoseconds() / 1e9
    await asyncio.wait_for(watcher, timeout=10)
    seconds = refused_on_b[0] - decided_at
    print(f"quarantine decided on A after {position} queries, enforced by B's sidecar "
          f"{seconds:.2f} s later")  # fmt: skip
    # The goal is 1 s; twice that here, on a machine shared with other test runs.
    assert seconds < 2.0

    async def denied_on_a() -> bool:  # A's own sidecar: the same debounced push
        return await status(port_a, "mallory", probe) == 403

    await until(denied_on_a, timeout=3)
    assert await status(port_b, "alice", [float(v) for v in benign[1]]) == 200
    assert shown("mallory") in await b.quarantined()

    # B restarts: its verdicts come back from Redis, not from its own memory.
    assert b.process is not None
    await asyncio.to_thread(stop_process, b.process)
    system.start(b)

    async def b_knows() -> bool:
        try:
            return shown("mallory") in await b.quarantined()
        except grpc.aio.AioRpcError:
            return False

    await until(b_knows, timeout=30, every=0.2)

    # A release on B takes effect through A's sidecar.
    released = await b.admin(
        "ReleaseQuarantine", admin_pb2.ReleaseQuarantineRequest(client_key="mallory")
    )
    assert [e.client_key for e in released.released] == [shown("mallory")]

    async def served_on_a() -> bool:
        return await status(port_a, "mallory", probe) == 200

    seconds = await until(served_on_a, timeout=5)
    print(f"release on B served through A's sidecar after {seconds:.2f} s")
    assert seconds < 2.0
    assert await a.quarantined() == []

    async def served_on_b() -> bool:  # B's sidecar reconnects to the restarted B first
        return await status(port_b, "mallory", probe) == 200

    await until(served_on_b, timeout=15)


async def test_a_client_alternating_between_replicas_is_judged_as_one(
    two_replicas: Cluster,
) -> None:
    """Without one owner per client each replica would judge half of the stream (the issue
    measured 48 queries to a quarantine against 24 on one replica)."""
    system = two_replicas
    a, b = system.replicas["a"], system.replicas["b"]
    attack = np.random.default_rng(1).uniform(0, 16, size=(200, 64)).round(1)

    async def judged() -> tuple[int, int]:
        """Queries judged and quarantines decided, by both replicas. The monitor counts a
        quarantine when it decides it, before it counts the query that decided it."""
        request = admin_pb2.MonitorStatsRequest()
        stats = [await r.admin("GetMonitorStats", request) for r in (a, b)]
        return (
            sum(s.queries for s in stats),
            sum(s.verdicts["detection:quarantine"] for s in stats),
        )

    async def queries_to_quarantine(key: str, sides: list[Replica]) -> int:
        _, decided_before = await judged()
        for sent in range(1, len(attack) + 1):
            side = sides[sent % len(sides)]
            queries_before, _ = await judged()
            row = attack[sent - 1 :][:1]
            await query(system.sidecar_ports[side.name], side.xds_port, key, row, report=False)
            # Only the sidecar's feed reports it (a second copy from the test would count as a
            # repeat or not depending on which arrives first). Wait until the owner has judged
            # it (a forwarded batch takes a Redis hop and the owner's monitor), then ask
            # whether that decided a quarantine. The count is of
            # queries judged up to the decision, not of queries sent until the quarantine
            # shows in a listing, so a loaded machine cannot move it (sleeps and listings
            # did: 24 vs 21, 22 vs 19).
            deadline = asyncio.get_running_loop().time() + 15
            while (now := await judged())[0] <= queries_before:
                assert asyncio.get_running_loop().time() < deadline, f"query {sent} never judged"
                await asyncio.sleep(0.05)
            if now[1] > decided_before:
                async def listed() -> bool:
                    return shown(key) in await a.quarantined() + await b.quarantined()

                await until(listed, timeout=5)
                return sent
        raise AssertionError(f"{key} never quarantined\n{system.log(a)}\n{system.log(b)}")

    alone = await queries_to_quarantine("mallory-on-a", [a])
    alternating = await queries_to_quarantine("mallory-on-both", [a, b])
    print(f"quarantined after {alone} queries on one replica, {alternating} alternating")
    assert abs(alternating - alone) <= max(1, round(0.1 * alone)), (alone, alternating)


async def _connected(replica: Replica, node_id: str) -> bool:
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.admin_port}") as channel:
            report = await admin_pb2_grpc.AdminStub(channel).GetStatus(
                admin_pb2.GetStatusRequest(node_filter=node_id), timeout=5
            )
    except grpc.aio.AioRpcError:
        return False
    return any(s.node_id == node_id for s in report.sidecars)


async def test_a_replica_stopped_with_sigterm_hands_its_sidecars_over_without_a_failure(
    two_replicas: Cluster, api_client: client.ApiClient, tmp_path: Path,
    demo_model: tuple[str, int],
) -> None:  # fmt: skip
    system = two_replicas
    a, b = system.replicas["a"], system.replicas["b"]
    attack = np.random.default_rng(2).uniform(0, 16, size=(400, 64)).round(1)
    benign = [float(v) for v in load_model(0).test_X[0]]
    probe = [float(v) for v in attack[0]]
    position = 0
    while shown("mallory") not in await a.quarantined():
        assert position < 320, "no quarantine"
        await query(system.sidecar_ports["a"], a.xds_port, "mallory", attack[position:][:8])
        position += 8

    # A sidecar whose bootstrap lists both replicas (as a Service name resolving to both).
    listen, envoy_admin = free_port(), free_port()
    node_id = "digits-model-s.demo"
    sidecar = Sidecar(
        node_id, "digits-model", "demo", "spiffe://cluster.local/ns/demo/sa/digits-model",
        demo_model[1], listen, inbound_address="127.0.0.1",
    )  # fmt: skip
    bootstrap = build_bootstrap(sidecar, xds_host="127.0.0.1", xds_port=a.xds_port,
                                admin_port=envoy_admin)  # fmt: skip
    (xds,) = bootstrap["static_resources"]["clusters"]
    endpoints = xds["load_assignment"]["endpoints"][0]["lb_endpoints"]
    second = json.loads(json.dumps(endpoints[0]))
    second["endpoint"]["address"]["socket_address"]["port_value"] = b.xds_port
    endpoints.append(second)
    envoy = system.processes.track(
        EnvoyProcess(bootstrap, admin_port=envoy_admin, log_path=tmp_path / "envoy-s.log")
    )
    envoy.start()
    await asyncio.to_thread(envoy.wait_ready, 30)

    async def expected(key: str, row: list[float], code: int) -> bool:
        return (await predict(listen, key, row))[0] == code

    await until(lambda: expected("mallory", probe, 403), timeout=20)

    async def connected_somewhere() -> bool:
        return await _connected(a, node_id) or await _connected(b, node_id)

    await until(connected_somewhere, timeout=20)
    leaving, staying = (a, b) if await _connected(a, node_id) else (b, a)

    outcomes: list[tuple[str, int]] = []
    done = asyncio.Event()

    async def traffic() -> None:
        while not done.is_set():
            for key, row in (("alice", benign), ("mallory", probe)):
                outcomes.append((key, (await predict(listen, key, row))[0]))
            await asyncio.sleep(0.01)

    sender = asyncio.create_task(traffic())
    await asyncio.sleep(0.5)
    assert leaving.process is not None
    leaving.process.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(leaving.process.wait, 20)
    assert code == 0, system.log(leaving)
    log = system.log(leaving)
    assert "SIGTERM: shutting down gracefully" in log, log
    moved = await until(lambda: _connected(staying, node_id), timeout=20, every=0.1)
    print(f"sidecar reconnected to replica {staying.name} {moved:.2f} s after {leaving.name} "
          "exited")  # fmt: skip
    await asyncio.sleep(1.0)
    done.set()
    await sender
    failed = [
        (key, status) for key, status in outcomes if status != (200 if key == "alice" else 403)
    ]
    print(f"{len(outcomes)} requests during the hand-over, {len(failed)} failed")
    assert len(outcomes) > 40
    assert failed == []

    # The new connection carries new verdicts: a release on the survivor reaches the sidecar.
    await staying.admin(
        "ReleaseQuarantine", admin_pb2.ReleaseQuarantineRequest(client_key="mallory")
    )
    await until(lambda: expected("mallory", probe, 200), timeout=5)

    # The Lease is (or stays) with the survivor: released at once if the leaver held it
    # (an unreleased Lease would take its 15 s duration to expire).
    coordination = client.CoordinationV1Api(api_client)

    async def survivor_leads() -> bool:
        lease = await call(coordination.read_namespaced_lease, LEASE_NAME, "modelguard-system")
        return bool(lease.spec.holder_identity == staying.name)

    try:
        await until(survivor_leads, timeout=12, every=0.2)
    except AssertionError as err:
        raise AssertionError(f"{err}\n{log}\n{system.log(staying)}") from err
    print(f"leaver held the Lease: {'released lease' in log}")
