"""Evasions of the extraction monitor replayed through a real Envoy, the real demo model and
the real control plane (the sidecar's own feed, no reports by the test):

- issue 18.1, padding: requests padded past 64 KiB (1 and 256 instances) are refused at the
  policy's cap (request.maxBytes, by default what the feed ships whole); with a cap raised
  above 64 KiB they are fed whole and judged, and a uniform-noise attacker is quarantined by
  the same number of rows as with small bodies;
- issue 18.3, bytes: requests with keys that are not UTF-8, interleaved with an attack, are
  dropped and counted by the monitor one by one and do not delay the attack's quarantine.

Each attack goes in lockstep with the monitor (a request, then wait until the monitor has
taken its rows), so "rows until quarantine" is a count, not a race.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest
from polling import eventually

from controlplane.app.server import ControlPlane
from controlplane.local.model import load_model
from controlplane.netutil import http_request
from tests.conftest import DIGITS_REFERENCE
from tests.integration.conftest import Deployment

pytestmark = pytest.mark.envoy
log = logging.getLogger(__name__)

POLICY = """\
apiVersion: modelguard.io/v1alpha1
kind: ExtractionPolicy
metadata: {{name: digits-model, namespace: demo}}
spec:
  targetRef: {{service: digits-model}}
  clientKey: {{header: x-api-key}}
  request: {{features: "$.instances[*]"{limits}}}
  response: {{scores: "$.predictions[*].probabilities"}}
  output: {{topK: 1, roundDigits: 2}}
  detection:
    detectors: [prada, nearDuplicate, outOfDistribution, coverage]
    reference: {{file: REFERENCE, labelColumn: label}}
  actions:
    onSuspicion: {{throttle: {{requests: 1000, per: second}}}}
    onDetection: {{quarantine: {{duration: 1h}}}}
""".replace("REFERENCE", str(DIGITS_REFERENCE))
PADDED = 70_000  # bytes: past the feed's 64 KiB, as the red team sent them


class System(Deployment):
    def write_policy(self, limits: str = "") -> None:
        (self.policies / "extraction.yaml").write_text(POLICY.format(limits=limits))

    async def post(self, key: str | bytes, body: bytes) -> tuple[int, bytes]:
        # http.client sends a str header as latin-1: "\xff" goes out as the byte 0xff.
        header = key.decode("latin-1") if isinstance(key, bytes) else key
        status, _, answer = await asyncio.to_thread(
            http_request,
            "POST",
            f"http://127.0.0.1:{self.listen_port}/v1/predict",
            body,
            {"content-type": "application/json", "x-api-key": header},
            30,
        )
        return status, answer

    def quarantined(self, key: str) -> bool:
        return any(
            e.kind == "quarantine" and e.client.named_by(key)  # stored by digest
            for e in self.plane.extraction.verdicts.active()
        )


def body(rows: np.ndarray, pad_to: int = 0) -> bytes:
    data = json.dumps({"instances": rows.tolist()}).encode()
    return data[:-1] + b" " * max(0, pad_to - len(data)) + b"}"  # still valid JSON


async def _calibrated(plane: ControlPlane) -> bool:
    found = plane.extraction.profiles.conditions().get("demo/digits-model")
    return found is not None and found.status == "True"


@pytest.fixture
async def system(
    tmp_path: Path, demo_model: tuple[str, int], profile_cache: Callable[[Path], Path]
) -> AsyncIterator[System]:
    profile_cache(tmp_path)  # next to verdicts.json: the digits profile, calibrated once
    async with await System.start(
        tmp_path,
        demo_model[1],
        {"extraction.yaml": POLICY.format(limits="")},
        debounce_max=0.3,
        verdicts_path=str(tmp_path / "verdicts.json"),
    ) as s:
        await eventually(lambda: _served(s), timeout=30)
        await eventually(lambda: _calibrated(s.plane), timeout=60)
        yield s


async def _served(s: System) -> bool:
    return (await s.post("warmup", body(load_model(0).test_X[:1])))[0] == 200


ATTACK = np.random.default_rng(11).uniform(0, 16, size=(2000, 64)).round(1)


async def rows_until_quarantine(
    s: System, key: str, per_request: int, pad_to: int = 0, junk: int = 0
) -> int:
    """Sends ATTACK ``per_request`` rows at a time (each request followed by ``junk``
    requests under keys that are not UTF-8) until ``key`` is quarantined; the rows sent."""
    monitor = s.plane.extraction.monitor
    benign = load_model(0).test_X
    sent = 0
    while not s.quarantined(key):
        assert sent < 400, f"{key}: not quarantined after {sent} rows"
        taken = monitor.stats.queries
        junk_before = monitor.stats.unparsable["client_key"]
        status, _ = await s.post(key, body(ATTACK[sent : sent + per_request], pad_to))
        assert status == 200, status
        for j in range(junk):
            status, _ = await s.post(b"\xff\xfe" + bytes([0x80 + j % 64]), body(benign[j : j + 1]))
            assert status == 200
        sent += per_request
        # Lockstep: the monitor has taken this request's rows (and dropped the junk).
        await eventually(
            lambda taken=taken, junk_before=junk_before: (
                monitor.stats.queries >= taken + per_request
                and monitor.stats.unparsable["client_key"] >= junk_before + junk
            ),
            timeout=20,
            every=0.02,
        )
    return sent


async def test_padded_bodies_are_refused_at_the_cap_or_judged_whole(system: System) -> None:
    small = await rows_until_quarantine(system, "small", 1)
    # Default cap (64 KiB, what the feed ships whole): padded bodies never reach the model.
    rows = ATTACK[:256]
    for key, data in (("pad-1", body(rows[:1], PADDED)), ("pad-256", body(rows, PADDED))):
        status, answer = await system.post(key, data)
        assert status == 413, key
        assert json.loads(answer)["error"] == "request_too_large"
    # A cap raised past 64 KiB: the feed then ships those bodies whole, and they are judged.
    system.write_policy(", maxBytes: 262144")

    async def raised() -> bool:
        return (await system.post("probe", body(load_model(0).test_X[:1], PADDED)))[0] == 200

    await eventually(raised, timeout=30)
    padded = await rows_until_quarantine(system, "pad-1", 1, PADDED)
    assert abs(padded - small) <= 0.1 * small, (padded, small)
    # 256 rows a request: all of them are judged; quarantined within two requests.
    wide = await rows_until_quarantine(system, "pad-256", 256, 200_000)
    log.info("rows until quarantine: small %d, padded %d, 256 a request %d", small, padded, wide)
    assert wide <= 512
    assert system.plane.extraction.monitor.stats.unobserved_by_reason["body_too_large"] == 0
    # And quarantine is enforced at the sidecar.
    await eventually(lambda: _status_is(system, "pad-256", 403), timeout=20)


async def _status_is(s: System, key: str, code: int) -> bool:
    return (await s.post(key, body(load_model(0).test_X[:1])))[0] == code


async def test_keys_that_are_not_utf8_do_not_delay_a_quarantine(system: System) -> None:
    started = time.monotonic()
    alone = await rows_until_quarantine(system, "alone", 1)
    interleaved = await rows_until_quarantine(system, "interleaved", 1, junk=3)
    log.info("rows until quarantine: alone %d, with junk keys %d", alone, interleaved)
    assert interleaved <= 1.1 * alone, (interleaved, alone)
    stats = system.plane.extraction.monitor.stats
    assert stats.unparsable["client_key"] == 3 * interleaved  # each one dropped and counted
    assert stats.unknown_policy == 0
    # No batch failed on the way: every attack row the sidecar fed was taken.
    assert stats.queries >= alone + interleaved
    assert time.monotonic() - started < 300
