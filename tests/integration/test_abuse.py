"""Issue 18's attacks on the defense itself, replayed against real parts: run-time throttles
that cannot be undone, forged feed batches, borrowed tokens, duplicate node ids, raw keys in
outputs, oversized policy files — each must now fail, and be seen."""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.config.core.v3 import base_pb2 as core_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import json_format, struct_pb2, timestamp_pb2
from polling import eventually

from controlplane.app.server import ControlPlane, ControlPlaneConfig
from controlplane.app.usage_cli import fetch_usage, render
from controlplane.compile.inputs.inventory import Sidecar
from controlplane.extraction.verdicts import ClientRef, digest
from controlplane.gen.modelguard.admin.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    ratelimit_pb2,
    ratelimit_pb2_grpc,
)
from controlplane.gen.modelguard.feed.v1 import feed_pb2, feed_pb2_grpc
from controlplane.identity.service import IdentityConfig
from controlplane.netutil import free_port
from controlplane.ratelimit.admin import fingerprint
from controlplane.xds import resources as rt
from tests.conftest import Processes
from tests.integration.test_extraction_envoy import (  # noqa: F401  (the fixture)
    System,
    status_of,
    system,
    until,
)
from tests.integration.test_rate_envoy import policy, rate_system
from tests.resilience.conftest import PlaneThread, write_policies

pytestmark = pytest.mark.envoy


# --- run-time throttles: bounded, listed, removable (item 10) -------------------------------


def _throttle(address: str, client: str, seconds: float) -> None:
    until = timestamp_pb2.Timestamp()
    until.FromSeconds(int(time.time() + seconds))
    with grpc.insecure_channel(address) as channel:
        ratelimit_pb2_grpc.RateLimitsStub(channel).Throttle(
            ratelimit_pb2.ThrottleRequest(
                policy="demo/digits-model", client=client, requests=1, per_seconds=86400,
                until=until,
            ),
            timeout=5,
        )


def _unthrottle(address: str, client: str) -> ratelimit_pb2.UnthrottleResponse:
    with grpc.insecure_channel(address) as channel:
        response: ratelimit_pb2.UnthrottleResponse = ratelimit_pb2_grpc.RateLimitsStub(
            channel
        ).Unthrottle(ratelimit_pb2.UnthrottleRequest(client=client), timeout=5)
        return response


def _release(address: str, client: str) -> admin_pb2.ReleaseQuarantineResponse:
    with grpc.insecure_channel(address) as channel:
        response: admin_pb2.ReleaseQuarantineResponse = admin_pb2_grpc.QuarantinesStub(
            channel
        ).ReleaseQuarantine(admin_pb2.ReleaseQuarantineRequest(client_key=client), timeout=5)
        return response


async def test_a_runtime_throttle_is_bounded_listed_and_removed(
    tmp_path: Path, demo_model: tuple[str, int]
) -> None:
    text = policy(
        "{name: daily, clientKey: {header: x-api-key}, requests: 1000, per: day, scope: Global}"
    )
    async with rate_system(tmp_path, demo_model[1], text) as rates:
        address = f"127.0.0.1:{rates.admin_port}"
        assert (await rates.get("victim-paying-customer"))[0] == 200
        # The red team's throttle "until 9999" is refused, with the bound in the message.
        with pytest.raises(grpc.RpcError) as err:
            await asyncio.to_thread(_throttle, address, "victim-paying-customer", 400 * 86400)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "30 days" in (err.value.details() or "")
        await asyncio.to_thread(_throttle, address, "victim-paying-customer", 3600)

        async def throttled() -> bool:
            return (await rates.statuses("victim-paying-customer", 2))[-1] == 429

        await eventually(throttled, timeout=10)
        # Listed by fingerprint (usage and `quarantine list --all`), never by key.
        report = await asyncio.to_thread(fetch_usage, address)
        fp = fingerprint("victim-paying-customer")
        assert [(t.client, t.policy) for t in report.throttles] == [(fp, "demo/digits-model")]
        assert fp in render(report) and "victim-paying-customer" not in render(report)
        # Removed by its fingerprint (what the operator sees): 200 again.
        removed = await asyncio.to_thread(_unthrottle, address, fp[:19])
        assert [t.client for t in removed.removed] == [fp]

        async def served() -> bool:
            return (await rates.get("victim-paying-customer"))[0] == 200

        await eventually(served, timeout=10)
        assert not (await asyncio.to_thread(fetch_usage, address)).throttles
        # `quarantine release` lifts a run-time throttle too.
        await asyncio.to_thread(_throttle, address, "victim-paying-customer", 3600)
        await eventually(throttled, timeout=10)
        released = await asyncio.to_thread(_release, address, "victim-paying-customer")
        assert [(e.kind, e.client_key) for e in released.released] == [("runtime-throttle", fp)]
        await eventually(served, timeout=10)


# --- the feed is authorised; tokens bind the workload; one stream per node (items 4, 5) -----

EXTRACTION = """\
apiVersion: modelguard.io/v1alpha1
kind: ExtractionPolicy
metadata: {name: digits-model, namespace: demo}
spec:
  targetRef: {service: digits-model}
  clientKey: {header: x-api-key}
  request: {features: "$.instances[*]"}
  response: {scores: "$.predictions[*].probabilities"}
  detection: {detectors: [prada, nearDuplicate]}  # the reference detectors need reference data
  actions:
    onSuspicion: {throttle: {requests: 5, per: second}}
    onDetection: {quarantine: {duration: 1h}}
"""
DIGITS = "spiffe://cluster.local/ns/demo/sa/digits-model"
UNRELATED = "spiffe://cluster.local/ns/other-team/sa/unrelated-svc"


def _node(node_id: str, service: str, namespace: str, identity: str) -> core_pb2.Node:
    sidecar = Sidecar(
        node_id=node_id, service=service, namespace=namespace, identity=identity,
        app_port=8080, inbound_port=15006,
    )
    message = core_pb2.Node(id=node_id)
    message.metadata.CopyFrom(json_format.ParseDict(sidecar.to_metadata(), struct_pb2.Struct()))
    return message


class Stream:
    """One ADS stream held open in a thread, as a sidecar's is, until ``close``."""

    def __init__(self, plane: PlaneThread, node: core_pb2.Node, token: str, type_url: str):
        identity = plane.plane.identity
        assert identity is not None
        credentials = grpc.ssl_channel_credentials(root_certificates=identity.ca.root_pem.encode())
        self.channel = grpc.secure_channel(plane.xds, credentials)
        self.done = threading.Event()
        self.received: list[discovery_pb2.DiscoveryResponse] = []
        self.code: grpc.StatusCode | None = None

        def requests() -> Iterator[discovery_pb2.DiscoveryRequest]:
            yield discovery_pb2.DiscoveryRequest(node=node, type_url=type_url)
            self.done.wait(30)

        self.call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(
            self.channel
        ).StreamAggregatedResources(
            requests(), metadata=[("authorization", f"Bearer {token}")], timeout=30
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self.received.append(response)
        except grpc.RpcError as err:
            self.code = err.code()

    def close(self) -> None:
        self.done.set()
        self.call.cancel()
        self.thread.join(5)
        self.channel.close()


def _wait(check, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.05)


@pytest.fixture
def secure_plane(tmp_path: Path) -> Iterator[PlaneThread]:
    plane = PlaneThread(
        ControlPlaneConfig(
            policy_paths=(str(write_policies(tmp_path / "policies", EXTRACTION)),),
            xds_port=0,
            admin_port=0,
            watch=False,
            identity=IdentityConfig(
                directory=str(tmp_path / "identity"), trust_domain="cluster.local"
            ),
        )
    )
    try:
        yield plane
    finally:
        plane.stop()


def _forged_batch(node_id: str) -> feed_pb2.FeedBatch:
    batch = feed_pb2.FeedBatch(node_id=node_id, policy="demo/digits-model")
    batch.unobserved.add(client_key="victim-paying-customer", count=5000, reason="buffer_full")
    for i in range(96):
        batch.queries.add(
            client_key="victim-paying-customer", status=200,
            request_body=json.dumps({"instances": [[float((i * 7 + j) % 17) for j in range(64)]]})
            .encode(),
            response_body=b'{"predictions": [{"probabilities": [1.0]}]}',
        )
    return batch


def _report(plane: PlaneThread, batch: feed_pb2.FeedBatch, token: str) -> feed_pb2.FeedAck:
    identity = plane.plane.identity
    assert identity is not None
    credentials = grpc.ssl_channel_credentials(root_certificates=identity.ca.root_pem.encode())
    with grpc.secure_channel(plane.xds, credentials) as channel:
        ack: feed_pb2.FeedAck = feed_pb2_grpc.QueryFeedStub(channel).Report(
            batch, metadata=[("authorization", f"Bearer {token}")], timeout=10
        )
        return ack


def test_a_sidecar_not_targeted_by_a_policy_cannot_feed_it(secure_plane: PlaneThread) -> None:
    identity = secure_plane.plane.identity
    assert identity is not None
    tokens = identity.tokens
    unrelated = tokens.issue("unrelated-0", UNRELATED, "unrelated-svc", "other-team")
    digits = tokens.issue("digits-model-0", DIGITS, "digits-model", "demo")
    streams = [
        Stream(secure_plane, _node("unrelated-0", "unrelated-svc", "other-team", UNRELATED),
               unrelated, rt.CLUSTER),
        Stream(secure_plane, _node("digits-model-0", "digits-model", "demo", DIGITS),
               digits, rt.CLUSTER),
    ]
    try:
        inventory = secure_plane.plane.inventory
        _wait(lambda: inventory.get("unrelated-0") is not None
              and inventory.get("digits-model-0") is not None)
        monitor = secure_plane.plane.extraction.monitor
        before = secure_plane.call(lambda: monitor.counters()[0])
        # The red team's forgery: a real sidecar's valid token, a policy that does not
        # target it, a paying customer's key.
        with pytest.raises(grpc.RpcError) as err:
            _report(secure_plane, _forged_batch("unrelated-0"), unrelated)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "does not target" in (err.value.details() or "")
        after = secure_plane.call(lambda: monitor.counters()[0])
        # Counted, and nothing of it reached the monitor: no batch, no query, no verdict.
        assert after.refused_batches == before.refused_batches + 1
        assert (after.batches, after.queries, after.unobserved) == (
            before.batches, before.queries, before.unobserved
        )
        assert secure_plane.plane.extraction.verdicts.active() == ()
        assert secure_plane.plane.extraction.feed.refused_by_reason == {"not_targeted": 1}
        # The targeted sidecar still reports (the check is not a blanket refusal).
        ack = _report(secure_plane, feed_pb2.FeedBatch(
            node_id="digits-model-0", policy="demo/digits-model"), digits)
        assert ack.accepted == 0
        assert secure_plane.call(lambda: monitor.counters()[0]).batches == before.batches + 1
    finally:
        for stream in streams:
            stream.close()


def test_a_token_for_one_workload_gets_no_other_workloads_config_or_svid(
    secure_plane: PlaneThread,
) -> None:
    identity = secure_plane.plane.identity
    assert identity is not None
    unrelated = identity.tokens.issue("unrelated-0", UNRELATED, "unrelated-svc", "other-team")
    digits = identity.tokens.issue("digits-model-0", DIGITS, "digits-model", "demo")
    attempts = {
        # Another team's token claims the model's service (its listener, its policies).
        "other service": (_node("unrelated-0", "digits-model", "demo", UNRELATED), unrelated),
        # ... or the model's identity (its SVID).
        "other identity": (_node("unrelated-0", "digits-model", "demo", DIGITS), unrelated),
        # The model's token for another node id of the model.
        "other node": (_node("digits-model-1", "digits-model", "demo", DIGITS), digits),
    }
    for case, (node, token) in attempts.items():
        for type_url in (rt.SECRET, rt.CLUSTER, rt.LISTENER):
            stream = Stream(secure_plane, node, token, type_url)
            stream.thread.join(10)
            stream.close()
            assert stream.code == grpc.StatusCode.UNAUTHENTICATED, (case, type_url)
            assert stream.received == [], (case, type_url)
    assert secure_plane.plane.inventory.snapshot() == ()
    # Its own workload, with its own token: its configuration arrives, SVID included.
    own = Stream(
        secure_plane, _node("digits-model-0", "digits-model", "demo", DIGITS), digits, rt.CLUSTER
    )
    try:
        _wait(lambda: len(own.received) > 0)
        assert own.code is None
        snapshot = secure_plane.plane.cache.get("digits-model-0")
        assert snapshot is not None and snapshot.resources(rt.SECRET)
    finally:
        own.close()


def test_a_second_stream_of_a_node_id_replaces_the_first_and_status_shows_both(
    secure_plane: PlaneThread,
) -> None:
    identity = secure_plane.plane.identity
    assert identity is not None
    digits = identity.tokens.issue("digits-model-0", DIGITS, "digits-model", "demo")
    node = _node("digits-model-0", "digits-model", "demo", DIGITS)
    first = Stream(secure_plane, node, digits, rt.CLUSTER)
    second: Stream | None = None
    try:
        _wait(lambda: len(first.received) > 0)
        second = Stream(secure_plane, node, digits, rt.CLUSTER)
        _wait(lambda: second is not None and len(second.received) > 0)
        first.thread.join(10)
        # The first is closed, and says why; the second serves on.
        assert first.code == grpc.StatusCode.ALREADY_EXISTS
        assert second.code is None
        with grpc.insecure_channel(secure_plane.admin) as channel:
            report = admin_pb2_grpc.AdminStub(channel).GetStatus(
                admin_pb2.GetStatusRequest(), timeout=5
            )
        (sidecar,) = report.sidecars
        assert sidecar.node_id == "digits-model-0"
        assert len(sidecar.replaced_streams) == 1
        assert sidecar.replaced_streams[0].peer and sidecar.peer
        assert secure_plane.plane.inventory.get("digits-model-0") is not None
    finally:
        first.close()
        if second is not None:
            second.close()


# --- no raw key anywhere (item 6) --------------------------------------------------------------

RATE = """\
apiVersion: modelguard.io/v1alpha1
kind: RatePolicy
metadata: {name: digits-model, namespace: demo}
spec:
  targetRef: {service: digits-model}
  limits:
  - {name: daily, clientKey: {header: x-api-key}, requests: 100000, per: day, scope: Global}
"""


async def test_a_known_api_key_appears_nowhere(
    system: System,  # noqa: F811  (the fixture of test_extraction_envoy)
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The red team found plain keys in `quarantine list`, `usage` and about 20 times in
    config_dump. Quarantine one key through the real monitor, throttle it at run time, then
    read every output a person or a process can: none may hold the key."""
    import logging

    import numpy as np

    from controlplane.app.status_cli import render as render_status
    from controlplane.app.traces_cli import render as render_traces
    from controlplane.gen.modelguard.admin.v1 import telemetry_pb2, telemetry_pb2_grpc

    caplog.set_level(logging.DEBUG)
    secret = "sk-live-" + os.urandom(16).hex()
    (system.policies / "rate.yaml").write_text(RATE)
    address = f"127.0.0.1:{system.admin_port}"
    attack = np.random.default_rng(7).uniform(0, 16, size=(400, 64)).round(1)
    position = 0
    store = system.plane.extraction.verdicts
    while not any(e.kind == "quarantine" for e in store.active()):
        assert position < len(attack), "not quarantined"
        await system.query(secret, attack[position : position + 8])
        position += 8
    await until(lambda: _status_is(system, secret, attack[0], 403))
    # The digest and verdict headers cannot be forged: a caller sending the quarantined
    # key's digest (or a verdict header) under another key is judged by its own key.
    from controlplane.netutil import http_request
    from controlplane.policies.extraction.verdicts_translate import (
        DIGEST_PREFIX,
        QUARANTINED_HEADER,
    )

    forged, _, _ = await asyncio.to_thread(
        http_request, "POST", f"http://127.0.0.1:{system.listen_port}/v1/predict",
        json.dumps({"instances": [[0.0] * 64]}).encode(),
        {
            "content-type": "application/json", "x-api-key": "someone-else",
            DIGEST_PREFIX + "x-api-key": digest(secret)[:32],
            QUARANTINED_HEADER: "demo/digits-model",
        },
    )
    assert forged == 200
    await asyncio.to_thread(_throttle, address, secret, 600)
    await asyncio.sleep(1.5)  # access logs and spans reach the receiver

    def admin_outputs() -> dict[str, str]:
        with grpc.insecure_channel(address) as channel:
            status = admin_pb2_grpc.AdminStub(channel).GetStatus(
                admin_pb2.GetStatusRequest(), timeout=5
            )
            quarantines = admin_pb2_grpc.QuarantinesStub(channel)
            listed = quarantines.ListQuarantines(
                admin_pb2.ListQuarantinesRequest(include_throttles=True), timeout=5
            )
            stats = quarantines.GetMonitorStats(admin_pb2.MonitorStatsRequest(), timeout=5)
            traces = telemetry_pb2_grpc.TelemetryStub(channel).ListTelemetry(
                telemetry_pb2.TelemetryQuery(), timeout=5
            )
        usage = fetch_usage(address)
        from controlplane.app.quarantine_cli import render as render_quarantines

        return {
            "status": json_format.MessageToJson(status) + render_status(status),
            "quarantine list": json_format.MessageToJson(listed)
            + render_quarantines(list(listed.entries))
            + json_format.MessageToJson(stats),
            "usage": json_format.MessageToJson(usage) + render(usage),
            "traces": json_format.MessageToJson(traces) + render_traces(traces.records),
        }

    outputs = await asyncio.to_thread(admin_outputs)
    assert len(json.loads(json_format.MessageToJson(
        await asyncio.to_thread(fetch_usage, address)))["throttles"]) == 1
    outputs["config_dump"] = await asyncio.to_thread(
        system.envoy.admin_get, "/config_dump?include_eds"
    )
    outputs["control-plane logs"] = caplog.text
    outputs["verdict file"] = system.verdicts.read_text()
    fp = ClientRef.of("demo/digits-model", secret).fingerprint
    assert fp in outputs["quarantine list"] and fp in outputs["usage"]
    # The checks have teeth: the sidecar enforces the key (by digest), traces were taken.
    assert digest(secret)[:32] in outputs["config_dump"]
    assert "records" in outputs["traces"]
    leaks = [where for where, text in outputs.items() if secret in text]
    assert leaks == [], f"the key appears in {leaks}"
    # Nor any long piece of it (a prefix or suffix a log might truncate to).
    pieces = re.compile("|".join(re.escape(secret[i : i + 16]) for i in range(8, 24)))
    assert [w for w, text in outputs.items() if pieces.search(text)] == []


async def _status_is(
    system: System,  # noqa: F811
    key: str, row: object, code: int,
) -> bool:
    values = [float(v) for v in row]  # type: ignore[attr-defined]
    return await status_of(system, key, values) == code


# --- policy size limits (item 8) ------------------------------------------------------------


def _access_rules(count: int) -> str:
    rules = "".join(
        f"  - action: Allow\n    to: {{methods: [POST], paths: [/v1/predict/{i}]}}\n"
        for i in range(count)
    )
    return (
        "apiVersion: modelguard.io/v1alpha1\nkind: AccessPolicy\n"
        "metadata: {name: huge, namespace: demo}\n"
        "spec:\n  targetRef: {service: digits-model}\n  defaultAction: Deny\n  rules:\n" + rules
    )


async def test_a_50_mb_policy_file_is_refused_and_the_admin_api_keeps_answering(
    tmp_path: Path,
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "extraction.yaml").write_text(EXTRACTION)
    plane = ControlPlane(
        ControlPlaneConfig(
            policy_paths=(str(policies),), xds_port=free_port(), admin_port=free_port(),
            debounce_quiet=0.05, debounce_max=0.3,
        )
    )
    await plane.start()
    from bench.verdict_scale import rss

    rss_before = rss()
    try:
        address = f"127.0.0.1:{plane.admin_port}"
        latencies: list[float] = []
        stop = threading.Event()

        def probe() -> None:
            with grpc.insecure_channel(address) as channel:
                stub = admin_pb2_grpc.AdminStub(channel)
                while not stop.is_set():
                    started = time.perf_counter()
                    stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=10)
                    latencies.append(time.perf_counter() - started)
                    time.sleep(0.01)

        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        # The red team's file: 331k rules in 50 MB, written in place while we watch.
        unit = "  - action: Allow\n    to: {methods: [POST], paths: [/v1/predict]}\n"
        head = _access_rules(0)
        big = policies / "huge.yaml"
        with big.open("w") as out:
            out.write(head)
            out.write(unit * (50 * 1024 * 1024 // len(unit)))
        # A small file with too many rules is refused by its rule count, with the path.
        (policies / "many-rules.yaml").write_text(_access_rules(1_500))

        def errors() -> list[str]:
            with grpc.insecure_channel(address) as channel:
                report = admin_pb2_grpc.AdminStub(channel).GetStatus(
                    admin_pb2.GetStatusRequest(), timeout=10
                )
            return [*report.source_errors, *(e for p in report.policies for e in p.errors)]

        async def both_refused() -> list[str]:
            found = await asyncio.to_thread(errors)
            ok = any("huge.yaml" in e and "over the limit" in e for e in found) and any(
                "many-rules.yaml" in e and "spec.rules" in e for e in found
            )
            return found if ok else []

        found = await eventually(both_refused, timeout=30)
        await asyncio.sleep(1.0)  # keep probing a while after the refusal
        stop.set()
        prober.join(15)
        assert len(latencies) >= 20
        p99 = sorted(latencies)[int(len(latencies) * 0.99) - 1]
        assert p99 <= 0.100, f"admin p99 {p99 * 1000:.0f} ms while the file was read"
        # The last good policies keep serving; removing the files clears the errors.
        assert any(p.kind == "ExtractionPolicy" for p in plane.store.current().policies)
        assert "huge" not in {p.metadata.name for p in plane.store.current().policies}
        big.unlink()
        (policies / "many-rules.yaml").unlink()

        async def cleared() -> bool:
            return not await asyncio.to_thread(errors)

        await eventually(cleared, timeout=15)
        assert found
        # Nothing of the 50 MB file was kept (it was never read): memory stays where it was.
        assert rss() - rss_before < 64 * 1024 * 1024, (rss() - rss_before) / 2**20
    finally:
        await plane.stop(grace=0)


# --- bounded verdicts (item 7) ------------------------------------------------------------------


async def test_many_quarantined_keys_stay_cheap_in_the_sidecar_and_the_control_plane(
    tmp_path: Path,
) -> None:
    """2,000 distinct attacker keys (bench/verdict_scale.py runs the full 10,000: figures in
    BENCHMARKS.md). The per-key figure is the same at any count (a fixed-width digest entry),
    so the issue's 10,000-key bounds, checked here at a fifth of the count, hold with room:
    config_dump ≤ 64 bytes per key, Envoy ≤ 20 MB and the control plane ≤ 50 MB in all."""
    from bench.verdict_scale import measure

    figures = await measure(2_000, tmp_path)
    mb = 1024 * 1024
    assert figures.bytes_per_key <= 64, figures.summary()
    # Scaled to 10,000 keys (×5), with the noise of an RSS reading on top.
    assert figures.envoy_growth * 5 <= 20 * mb + 5 * 2 * mb, figures.summary()
    assert figures.plane_growth * 5 <= 50 * mb + 5 * 2 * mb, figures.summary()


# --- token files (item 5) ---------------------------------------------------------------------


def test_modelguard_run_keeps_every_token_and_key_file_private(
    tmp_path: Path, processes: Processes
) -> None:
    """The red team read the sidecar's token from a 0644 bootstrap and received its SVID.
    Now the bootstrap holds no token, and every file that holds a token or key is 0600."""
    import sys

    from controlplane.netutil import http_request, wait_for_port

    workdir = tmp_path / "run"
    listen, xds, admin = free_port(), free_port(), free_port()
    repo = Path(__file__).resolve().parents[2]
    processes.start(
        [
            str(Path(sys.executable).parent / "modelguard"), "run",
            "--policies", str(repo / "policies"), "--workdir", str(workdir),
            "--listen-port", str(listen), "--outbound-port", "0",
            "--xds-port", str(xds), "--admin-port", str(admin),
            # Every port free: the default metrics port (18002) may be a `make run`'s.
            "--metrics-port", str(free_port()),
        ],
        name="modelguard-run",
    )
    wait_for_port("127.0.0.1", listen, 90)
    # The demo's registered keys (written 0600 on the first start).
    key = (workdir / "demo-keys.txt").read_text().split()[1]
    deadline = time.monotonic() + 60
    while True:  # served through the sidecar: it got its token through file SDS
        code, _, _ = http_request(
            "POST", f"http://127.0.0.1:{listen}/v1/predict",
            json.dumps({"instances": [[0.0] * 64]}).encode(),
            {"content-type": "application/json", "x-api-key": key},
        )
        if code == 200:
            break
        assert time.monotonic() < deadline, f"the sidecar never served: {code}"
        time.sleep(0.5)
    bootstrap = workdir / "sidecar-bootstrap.yaml"
    token_file = workdir / "sidecar-bootstrap.token"
    token = token_file.read_text().strip()
    assert token and token not in bootstrap.read_text()
    secret_files = [
        bootstrap, token_file, workdir / "demo-keys.txt",
        *(p for p in (workdir / "identity").rglob("*") if p.is_file() and p.suffix == ".key"),
    ]
    assert len(secret_files) >= 3, secret_files
    modes = {str(p.relative_to(workdir)): stat.S_IMODE(p.stat().st_mode) for p in secret_files}
    assert set(modes.values()) == {0o600}, modes
    assert stat.S_IMODE((workdir / "identity").stat().st_mode) & 0o077 == 0
