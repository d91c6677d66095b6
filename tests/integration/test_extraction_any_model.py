"""Bring your own model (issue 13): a 30-feature breast-cancer classifier, not the digits,
served by a tiny model server in this process, behind ``modelguard serve`` +
``modelguard bootstrap`` + a real Envoy. Its ExtractionPolicy names reference data
(``reference: {file: ...}``); the control plane calibrates the policy's profile by itself
(``modelguard status`` shows Calibrated), then: uniform noise and equation-solving clients
are quarantined at a median of at most 100 queries, and none of 20 benign clients (i.i.d.,
heavy, local exploration, single class) is.
"""

from __future__ import annotations

import http.client
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from bench.extraction.models import breast_cancer_model, reference_csv, serve, uniform_box
from controlplane.app.status_cli import fetch_status
from controlplane.extraction import calibrate as C
from controlplane.gen.modelguard.admin.v1 import admin_pb2, admin_pb2_grpc
from controlplane.gen.modelguard.feed.v1 import feed_pb2, feed_pb2_grpc
from controlplane.local.envoy import EnvoyProcess
from controlplane.netutil import free_port, http_request, wait_for_port
from tests.conftest import Processes

pytestmark = pytest.mark.envoy

MODELGUARD = str(Path(sys.executable).parent / "modelguard")
POLICY = """\
apiVersion: modelguard.io/v1alpha1
kind: ExtractionPolicy
metadata: {name: cancer-model, namespace: demo}
spec:
  targetRef: {service: cancer-model}
  clientKey: {header: x-api-key}
  request: {features: "$.instances[*]"}
  response: {scores: "$.predictions[*].probabilities"}
  detection:
    sensitivity: medium
    reference: {file: reference.csv, labelColumn: label}
  actions:
    onSuspicion: {throttle: {requests: 50, per: second}}
    onDetection: {quarantine: {duration: 1h}}
"""


def until(check: object, timeout: float = 30.0, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {check}")
        time.sleep(every)


@dataclass
class Sidecar:
    listen: int
    xds: int
    admin: int

    def send(self, key: str, rows: np.ndarray) -> int | None:
        """Rows one request each, as ``key``; reports the answered ones to the monitor
        (as the sidecar's own feed does; a query reported twice counts once). Returns how
        many were answered before the first 403 (None: never refused)."""
        batch = feed_pb2.FeedBatch(node_id="cancer-model.demo", policy="demo/cancer-model")
        answered = 0
        connection = http.client.HTTPConnection("127.0.0.1", self.listen, timeout=10)
        for row in rows:
            body = json.dumps({"instances": [[float(v) for v in row]]}).encode()
            connection.request("POST", "/v1/predict", body,
                               {"content-type": "application/json", "x-api-key": key})
            response = connection.getresponse()
            status, reply = response.status, response.read()
            if status == 403:
                connection.close()
                self.report(batch)
                return answered
            if status == 200:
                answered += 1
                batch.queries.add(client_key=key, status=200, request_body=body,
                                  response_body=reply)
            if len(batch.queries) >= 8:
                self.report(batch)
                batch = feed_pb2.FeedBatch(node_id="cancer-model.demo",
                                           policy="demo/cancer-model")
        connection.close()
        self.report(batch)
        return None

    def report(self, batch: feed_pb2.FeedBatch) -> None:
        if batch.queries:
            with grpc.insecure_channel(f"127.0.0.1:{self.xds}") as channel:
                feed_pb2_grpc.QueryFeedStub(channel).Report(batch, timeout=10)

    def quarantined(self) -> set[str]:
        with grpc.insecure_channel(f"127.0.0.1:{self.admin}") as channel:
            listed = admin_pb2_grpc.QuarantinesStub(channel).ListQuarantines(
                admin_pb2.ListQuarantinesRequest(), timeout=5
            )
        return {e.client_key for e in listed.entries if e.kind == "quarantine"}


def calibrated(admin: int) -> bool:
    report = fetch_status(f"127.0.0.1:{admin}")
    return any(c.type == "Calibrated" and c.status == "True"
               for p in report.policies for c in p.conditions)


@pytest.mark.timeout(600)  # calibration (tens of seconds on 2 busy cores), then ~4,000 queries
def test_another_model_is_calibrated_attacks_are_quarantined_benign_clients_are_not(
    tmp_path: Path, processes: Processes
) -> None:
    model = breast_cancer_model(0)
    server = serve(model.predict_proba)
    processes.track(server)
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "extraction.yaml").write_text(POLICY)
    (policies / "reference.csv").write_text(
        reference_csv(model.train_X, model.predict(model.train_X))
    )
    xds, admin, listen, envoy_admin = (free_port() for _ in range(4))
    processes.start(
        [MODELGUARD, "serve", "--insecure", "--policies", str(policies),
         "--xds-port", str(xds), "--admin-port", str(admin),
         "--verdicts", str(tmp_path / "state" / "verdicts.json")],
        name="modelguard-serve",
    )
    wait_for_port("127.0.0.1", admin, timeout=30)
    bootstrap = tmp_path / "bootstrap.yaml"
    subprocess.run(
        [MODELGUARD, "bootstrap", "--service", "cancer-model", "--namespace", "demo",
         "--app-port", str(server.port), "--inbound-port", str(listen),
         "--inbound-address", "127.0.0.1", "--admin-port", str(envoy_admin),
         "--xds", f"127.0.0.1:{xds}", "-o", str(bootstrap)],
        check=True, timeout=60,
    )
    envoy = processes.track(EnvoyProcess(bootstrap.read_text(), admin_port=envoy_admin,
                                         log_path=tmp_path / "envoy.log"))
    envoy.start()
    envoy.wait_ready(30)
    # The control plane calibrates the policy from its reference data by itself.
    until(lambda: calibrated(admin), timeout=180, every=1.0)
    status = subprocess.run([MODELGUARD, "status", "--admin", f"127.0.0.1:{admin}"],
                            capture_output=True, text=True, timeout=30)
    assert "Calibrated=True (Calibrated)" in status.stdout, status.stdout
    sidecar = Sidecar(listen, xds, admin)
    until(lambda: http_request("POST", f"http://127.0.0.1:{listen}/v1/predict",
                               json.dumps({"instances": [model.test_X[0].tolist()]}).encode(),
                               {"content-type": "application/json"})[0] == 200)

    rng = np.random.default_rng(42)
    pool = model.test_X.astype(np.float32)
    classes = model.predict(pool).astype(np.int16)
    benign: list[tuple[str, np.ndarray]] = []
    for i in range(5):
        benign.append((f"iid-{i}", C.iid_user(rng, pool, 80)))
        benign.append((f"heavy-{i}", C.heavy_user(rng, pool, 150)))
        benign.append((f"local-{i}", C.local_user(rng, pool, 150)))
        benign.append((f"class-{i}", C.segment_user(rng, pool, 80, classes)))
    refused = {name: sidecar.send(name, X) for name, X in benign}
    assert [n for n, r in refused.items() if r is not None] == []

    lo, hi = model.train_X.min(axis=0), model.train_X.max(axis=0)
    detected: dict[str, list[int | None]] = {"uniform": [], "equation": []}
    for i in range(3):
        for kind in detected:
            detected[kind].append(sidecar.send(f"{kind}-{i}", uniform_box(rng, lo, hi, 300)))
    for kind, found in detected.items():
        assert all(q is not None for q in found), (kind, found)
        assert statistics.median(q for q in found if q is not None) <= 100, (kind, found)
    # Listed by fingerprint (a header key is never stored): the six attackers, no one else.
    assert len(sidecar.quarantined()) == 6
