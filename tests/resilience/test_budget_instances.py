"""Budgets that charge instances (``cost: instances``): a real ``modelguard serve``, a real
Envoy in front of the demo model, the budget in a real Redis.

A 256-instance request costs 256 of the daily budget; once what is left cannot pay for a
request, that request is refused (429) at once, with no overshoot beyond the README's
bound; and the attacker's ways around the count (a caller-sent instance header, an
escaped or duplicate ``instances`` key) are charged in full. Each test runs twice: on a
sidecar with only the budget (the Lua counter sets the class) and on one with an
ExtractionPolicy too (its Wasm filter, which checks every body anyway, sets the class).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from controlplane.netutil import http_request
from tests.conftest import Processes, Redis, demo_sidecar
from tests.resilience.conftest import write_policies
from tests.resilience.test_quota_service_gone import Plane, until

pytestmark = pytest.mark.envoy

BUDGET = 1000
LIMIT = "demo.digits-model.daily"

POLICY = f"""\
apiVersion: modelguard.io/v1alpha1
kind: RatePolicy
metadata: {{name: digits-model, namespace: demo}}
spec:
  targetRef: {{service: digits-model}}
  limits:
  - {{name: daily, clientKey: {{header: x-api-key}}, requests: {BUDGET}, per: day,
     scope: Global, cost: instances}}
"""
# Output hardening: the Wasm filter sets the class instead of the Lua counter. Its body
# limit is raised above the 256-row bodies (82 KB) sent here.
EXTRACTION = """\
---
apiVersion: modelguard.io/v1alpha1
kind: ExtractionPolicy
metadata: {name: digits-model, namespace: demo}
spec:
  targetRef: {service: digits-model}
  clientKey: {header: x-api-key}
  request: {features: "$.instances[*]", maxBytes: 1048576}
  response: {scores: "$.predictions[*].probabilities"}
  output: {roundDigits: 2}
"""
COUNTERS = pytest.mark.parametrize("counter", ["lua", "wasm"])


def policies(tmp: Path, counter: str) -> Path:
    return write_policies(tmp / "policies", POLICY + (EXTRACTION if counter == "wasm" else ""))


def body(n: int) -> bytes:
    return json.dumps({"instances": [[float(i % 16)] * 64 for i in range(n)]}).encode()


def _rounded(answer: bytes) -> bool:
    """Every score of the answer has at most 2 decimals (the Wasm filter's hardening)."""
    scores = [p for row in json.loads(answer)["predictions"] for p in row["probabilities"]]
    return all(abs(p * 100 - round(p * 100)) < 1e-6 for p in scores)


class Predict:
    """One sidecar in front of the demo model: POST /v1/predict as a client."""

    def __init__(self, processes: Processes, tmp: Path, app_port: int, xds: int, node: str):
        self.last = b""
        self.envoy, self.port = demo_sidecar(app_port, xds, tmp / f"{node}.log", node_id=node)
        processes.track(self.envoy)
        self.envoy.start()

    def expect_counter(self, counter: str) -> None:
        """The class comes from the filter the test is about, and only from it."""
        listeners = json.dumps(self.envoy.config_dump("dynamic_listeners"))
        assert ("modelguard.rate.instances" in listeners) == (counter == "lua"), counter
        assert ("modelguard.extraction.demo.digits-model" in listeners) == (counter == "wasm")
        if counter == "wasm":  # the Wasm filter answers: its hardening is on the answer
            until(lambda: self.post("warm-up", body(1)) == 200 and _rounded(self.last), 20, "Wasm")

    def post(self, key: str, payload: bytes, headers: dict[str, str] | None = None) -> int:
        status, _, answer = http_request(
            "POST",
            f"http://127.0.0.1:{self.port}/v1/predict",
            payload,
            {"x-api-key": key, "content-type": "application/json", **(headers or {})},
            timeout=10,
        )
        self.last = answer
        if status == 200:
            assert len(json.loads(answer)["predictions"]) >= 1
        return status


def configured(
    tmp_path: Path, processes: Processes, app_port: int, redis_server: Redis, counter: str
) -> tuple[Plane, Predict]:
    """A control plane with the budget counted by ``counter`` and one sidecar it has
    configured: its class comes from that counter (one warm-up request answered)."""
    plane = Plane(processes, policies(tmp_path, counter), redis_server)
    gate = Predict(processes, tmp_path, app_port, plane.xds, "digits-model-0")
    gate.envoy.wait_ready(30)
    until(lambda: gate.post("warm-up", body(1)) == 200, 20, "configured")
    gate.expect_counter(counter)
    return plane, gate


@COUNTERS
def test_a_256_instance_request_costs_256_of_a_daily_budget(
    tmp_path: Path,
    processes: Processes,
    demo_model: tuple[str, int],
    redis_server: Redis,
    counter: str,
) -> None:
    plane, gate = configured(tmp_path, processes, demo_model[1], redis_server, counter)
    until(plane.counted(LIMIT, "warm-up", 1), 10, "a 1-instance request counted as 1")

    # One 256-instance request: 256 of the budget, not 1.
    assert gate.post("spender", body(256)) == 200
    until(plane.counted(LIMIT, "spender", 256), 10, "a 256-instance request counted as 256")

    def spend(instances: int, most: int) -> int:
        """Requests of ``instances`` until one is refused; then the next is refused too."""
        statuses = []
        while len(statuses) < most and (not statuses or statuses[-1] == 200):
            statuses.append(gate.post("spender", body(instances)))
        assert statuses[-1] == 429 and gate.post("spender", body(instances)) == 429, statuses
        return len(statuses) - 1

    # 744 left: two more 256-instance requests, then they are refused. A third can pass
    # only if it went out while a report's answer was on its way (the README's bound).
    big = spend(256, 5)
    assert big in (2, 3), big
    # What is left still serves smaller requests: 100 instances are charged their class
    # (112, at most 25% above), single instances use up the rest.
    mid = spend(100, 5)
    small = spend(1, 300)
    # A share another bucket held may come back with the next reports: spend it too.
    time.sleep(6)
    small += spend(1, 300)
    answered = 256 * (1 + big) + 112 * mid + small
    # Exact (256 x 3 + 112 x 2 + 8 = 1000) but for what one request of each class may take
    # during a report's round trip.
    assert BUDGET <= answered <= BUDGET + 256 + 112 + 1, (big, mid, small)
    until(plane.counted(LIMIT, "spender", answered), 10, "everything answered counted")
    # Refused requests cost nothing: the count stays where the answers left it.
    assert gate.post("spender", body(1)) == 429
    time.sleep(6)
    assert plane.used(LIMIT, "spender") == answered


@COUNTERS
def test_attacks_on_the_instance_count_are_charged_in_full(
    tmp_path: Path,
    processes: Processes,
    demo_model: tuple[str, int],
    redis_server: Redis,
    counter: str,
) -> None:
    plane, gate = configured(tmp_path, processes, demo_model[1], redis_server, counter)

    rows = json.dumps([[1.0] * 64] * 256)
    # A caller's own instance header is replaced by the sidecar's count.
    assert gate.post("header", body(256), {"x-modelguard-instances": "1"}) == 200
    until(plane.counted(LIMIT, "header", 256), 10, "a forged instance header ignored")
    # A request of one row carries no class (it is charged 1): one the caller wrote is
    # dropped before the quota filter, so it neither costs more nor makes a new bucket.
    assert gate.post("claims", body(1), {"x-modelguard-instances": "64"}) == 200
    until(plane.counted(LIMIT, "claims", 1), 10, "a class written on a one-row request ignored")
    # The model reads "\u0069nstances" as "instances": so does the count (it reads no key).
    escaped = ('{"\\u0069nstances": ' + rows + "}").encode()
    assert gate.post("escaped", escaped) == 200
    until(plane.counted(LIMIT, "escaped", 256), 10, "an escaped key charged in full")
    # A duplicate key: the model keeps the last; the count takes the longest.
    duplicate = ('{"instances": [[0.0]], "instances": ' + rows + "}").encode()
    assert gate.post("duplicate", duplicate) == 200
    until(plane.counted(LIMIT, "duplicate", 256), 10, "a duplicate key charged in full")
    # UTF-16 and UTF-32 (the model's json.loads reads both): counted by code unit, so a
    # wide character whose bytes look like a quote and a bracket (U+5B22 is 22 5B in
    # UTF-16LE) cannot end a string early and hide what follows.
    wide = '{"note": "\u5b22\u5b22", "instances": ' + rows + "}"
    assert gate.post("utf16", wide.encode("utf-16-le")) == 200
    until(plane.counted(LIMIT, "utf16", 256), 10, "a UTF-16 body charged in full")
    assert gate.post("utf32", wide.encode("utf-32")) == 200
    until(plane.counted(LIMIT, "utf32", 256), 10, "a UTF-32 body charged in full")
    # Brackets inside strings are not instances; a body without instances costs 1.
    strings = b'{"note": "[[[,,,]]]\\"", "instances": [[' + b"1," * 63 + b"1]]}"
    assert gate.post("strings", strings) == 200
    until(plane.counted(LIMIT, "strings", 1), 10, "strings skipped")
    time.sleep(0.5)
    assert gate.envoy.server_state() == "LIVE"
