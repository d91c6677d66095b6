"""The Wasm filter in front of the quota filter (issue 18: it sets a budget's instance class
from the body it checks, instead of a second Lua pass over the body), through a real Envoy,
the real demo model and the real control plane (quota service, feed, monitor):

- what the budget refuses (429) the model never saw: the sidecar feeds only the answered
  queries, and counts nothing of the refused ones as unobserved;
- a request whose body ends with trailers (HTTP/2) is still held and checked: a body nested
  past request.maxDepth is refused, not passed on unchecked behind the trailers.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from polling import eventually

from controlplane.local.model import load_model
from controlplane.netutil import http_request
from tests.conftest import DIGITS_REFERENCE
from tests.integration.conftest import Deployment

pytestmark = pytest.mark.envoy

BUDGET = 6  # instances a day
POLICIES = f"""\
apiVersion: modelguard.io/v1alpha1
kind: RatePolicy
metadata: {{name: digits-model, namespace: demo}}
spec:
  targetRef: {{service: digits-model}}
  limits:
  - {{name: daily, clientKey: {{header: x-api-key}}, requests: {BUDGET}, per: day,
     scope: Global, cost: instances}}
---
apiVersion: modelguard.io/v1alpha1
kind: ExtractionPolicy
metadata: {{name: digits-model, namespace: demo}}
spec:
  targetRef: {{service: digits-model}}
  clientKey: {{header: x-api-key}}
  request: {{features: "$.instances[*]", maxDepth: 8}}
  response: {{scores: "$.predictions[*].probabilities"}}
  output: {{roundDigits: 2}}
  detection:
    detectors: [prada, nearDuplicate, outOfDistribution, coverage]
    reference: {{file: {DIGITS_REFERENCE}, labelColumn: label}}
  actions:
    onSuspicion: {{throttle: {{requests: 1000, per: second}}}}
    onDetection: {{quarantine: {{duration: 1h}}}}
"""
ROW = [float(v) for v in load_model(0).test_X[0]]


def body(rows: int) -> bytes:
    return json.dumps({"instances": [ROW] * rows}).encode()


class System(Deployment):
    async def post(self, key: str, data: bytes) -> int:
        status, _, _ = await asyncio.to_thread(
            http_request,
            "POST",
            f"http://127.0.0.1:{self.listen_port}/v1/predict",
            data,
            {"content-type": "application/json", "x-api-key": key},
            30,
        )
        return status


@pytest.fixture
async def system(
    tmp_path: Path, demo_model: tuple[str, int], profile_cache: Callable[[Path], Path]
) -> AsyncIterator[System]:
    profile_cache(tmp_path)
    async with await System.start(
        tmp_path,
        demo_model[1],
        {"policies.yaml": POLICIES},
        debounce_max=0.3,
        verdicts_path=str(tmp_path / "verdicts.json"),
    ) as s:

        async def served() -> bool:
            return await s.post("warmup", body(1)) == 200

        await eventually(served, timeout=30)
        # The Wasm filter sets the class, ahead of the quota filter; no Lua counter.
        listeners = json.dumps(s.envoy.config_dump("dynamic_listeners"))
        assert "modelguard.rate.instances" not in listeners
        assert listeners.index("modelguard.extraction.demo.digits-model") < listeners.index(
            "modelguard.rate.quota."
        )
        yield s


async def test_what_the_budget_refuses_is_not_fed(system: System) -> None:
    monitor = system.plane.extraction.monitor
    await eventually(lambda: monitor.stats.queries >= 1, timeout=20)  # the warm-up's
    taken, unobserved = monitor.stats.queries, monitor.stats.unobserved
    statuses = []
    # Until the budget refuses (a new bucket's first requests pass while its assignment is
    # on its way), then as many refused requests again.
    while statuses.count(429) < 8:
        assert len(statuses) < 60, statuses
        statuses.append(await system.post("spender", body(2)))
        if statuses[-1] == 200 and len(statuses) > 2 * BUDGET:
            await asyncio.sleep(0.5)  # let the assignment arrive
    assert set(statuses) == {200, 429}, statuses
    answered = 2 * statuses.count(200)  # the monitor counts rows
    await eventually(lambda: monitor.stats.queries >= taken + answered, timeout=20)
    # Another flush or two: nothing more arrives, neither as queries nor as unobserved.
    await asyncio.sleep(1.5)
    assert monitor.stats.queries == taken + answered, (statuses, monitor.stats.queries - taken)
    assert monitor.stats.unobserved == unobserved


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


def _literal(name: str, value: str) -> bytes:
    """HPACK: a literal header field without indexing, new name, no Huffman coding."""
    n, v = name.encode(), value.encode()
    assert len(n) < 127 and len(v) < 127
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


def h2_post_with_trailers(port: int, data: bytes, key: str) -> bytes:
    """POST over h2c (prior knowledge) whose body ends with trailers; returns the HPACK
    block of the response headers (its first byte 0x88 is ``:status: 200``)."""
    HEADERS, DATA, SETTINGS = 1, 0, 4
    END_STREAM, END_HEADERS, ACK = 1, 4, 1
    request = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/v1/predict"),
        (":authority", "digits-model"),
        ("content-type", "application/json"),
        ("x-api-key", key),
    ]
    out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(SETTINGS, 0, 0, b"")
    out += _frame(HEADERS, END_HEADERS, 1, b"".join(_literal(k, v) for k, v in request))
    for i in range(0, len(data), 16384):
        out += _frame(DATA, 0, 1, data[i : i + 16384])
    out += _frame(HEADERS, END_HEADERS | END_STREAM, 1, _literal("x-checksum", "none"))
    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        conn.sendall(out)
        buffered = b""
        while True:
            while len(buffered) < 9 or len(buffered) < 9 + int.from_bytes(buffered[:3], "big"):
                chunk = conn.recv(65536)
                assert chunk, "connection closed before the response headers"
                buffered += chunk
            size = int.from_bytes(buffered[:3], "big")
            kind, flags = buffered[3], buffered[4]
            stream = int.from_bytes(buffered[5:9], "big") & 0x7FFFFFFF
            payload, buffered = buffered[9 : 9 + size], buffered[9 + size :]
            if kind == SETTINGS and not flags & ACK:
                conn.sendall(_frame(SETTINGS, ACK, 0, b""))
            if kind == HEADERS and stream == 1:
                return payload


async def test_a_body_ended_by_trailers_is_still_checked(system: System) -> None:
    def refused() -> int:
        return system.envoy.stat("wasmcustom.modelguard.demo.digits-model.refused_too_deep")

    # A plain body with trailers is answered (the trailers end it; it was checked whole).
    answer = await asyncio.to_thread(h2_post_with_trailers, system.listen_port, body(1), "trailers")
    assert answer[:1] == b"\x88", answer
    # One nested past maxDepth (8) is refused, as it is without trailers.
    deep = b'{"instances": [' + b"[" * 20 + b"1" + b"]" * 20 + b"]}"
    before = refused()
    answer = await asyncio.to_thread(h2_post_with_trailers, system.listen_port, deep, "trailers")
    assert answer[:1] != b"\x88", answer
    await eventually(lambda: refused() == before + 1, timeout=10)
