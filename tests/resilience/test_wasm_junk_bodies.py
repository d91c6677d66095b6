"""Bodies that are not JSON (or JSON of any shape) through a real Envoy's output-hardening
filter and on into the extraction monitor: every answer reaches the client whole (unchanged,
or a well-formed rewrite), every one is counted by the filter, every query is counted by
the monitor, and the sidecar stays up."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.app.server import ControlPlaneConfig
from controlplane.local.envoy import EnvoyProcess
from controlplane.netutil import http_request
from tests.conftest import Upstream, demo_sidecar
from tests.resilience.conftest import ACCESS, EXTRACTION, PlaneThread, write_policies

pytestmark = pytest.mark.envoy

STAT = "wasmcustom.modelguard.demo.digits-model."
OUTCOMES = ("hardened", "passed_not_json", "passed_malformed", "passed_unmatched",
            "passed_too_large")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["predictions", "probabilities", "instances", "label", "x"]), inner,
        max_size=3,
    ),
    max_leaves=25,
)
BODIES = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda d: b'{"instances": ' + b"[" * d + b"]" * d + b"}", st.integers(60, 5000)),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.builds(lambda d: b'{"predictions": ' + b"[" * d + b"]" * d + b"}", st.integers(1, 5000)),
    st.builds(lambda n: b'{"predictions": [{"probabilities": [0.1, 0.' + b"9" * n + b"]}]}",
              st.integers(1, 3000)),
    st.just(b'{"predictions": [{"probabilities": [0.2, 0.8]}]}'),
    st.just(b'{"predictions": [{"probabilities": [0.2, 0.8]}]'),
)


MAX_DEPTH = 64  # the policy's request.maxDepth (the default)


def ascii_view(b: bytes) -> bytes:
    """The body as the filter scans it: UTF-16/32 (detected as json.loads does) by code
    unit, units over 127 as 'x'."""
    unit, big, skip = 0, False, 0
    if b[:4] == b"\xff\xfe\0\0":
        unit, skip = 4, 4
    elif b[:4] == b"\0\0\xfe\xff":
        unit, big, skip = 4, True, 4
    elif b[:2] == b"\xff\xfe":
        unit, skip = 2, 2
    elif b[:2] == b"\xfe\xff":
        unit, big, skip = 2, True, 2
    elif len(b) >= 4 and b[:2] == b"\0\0":
        unit, big = 4, True
    elif len(b) >= 4 and b[1:4] == b"\0\0\0":
        unit = 4
    elif len(b) >= 2 and b[0] == 0:
        unit, big = 2, True
    elif len(b) >= 2 and b[1] == 0:
        unit = 2
    if not unit:
        return b
    units = (b[skip + i : skip + i + unit] for i in range(0, (len(b) - skip) // unit * unit, unit))
    values = (int.from_bytes(u, "big" if big else "little") for u in units)
    return bytes(v if v < 128 else ord("x") for v in values)


def depth(body: bytes) -> int:
    """JSON nesting as the filter counts it: brackets outside strings."""
    body = ascii_view(body)
    deepest = level = 0
    in_string = escaped = False
    for c in body:
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:
                escaped = True
            elif c == 0x22:
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c in b"[{":
            level += 1
            deepest = max(deepest, level)
        elif c in b"]}" and level:
            level -= 1
    return deepest


@pytest.fixture
def sidecar_system(
    tmp_path: Path,
) -> Iterator[tuple[PlaneThread, EnvoyProcess, Upstream, int]]:
    upstream = Upstream()
    plane = PlaneThread(
        ControlPlaneConfig(
            policy_paths=(str(write_policies(tmp_path / "policies", ACCESS, EXTRACTION)),),
            xds_port=0, admin_port=0, watch=False, debounce_quiet=0.02, debounce_max=0.2,
        )
    )
    envoy, listen = demo_sidecar(upstream.port, plane.plane.xds_port, tmp_path / "envoy.log")
    try:
        envoy.start()
        envoy.wait_ready(30)
        yield plane, envoy, upstream, listen
    finally:
        envoy.stop()
        plane.stop()
        upstream.stop()


def test_junk_bodies_pass_whole_and_are_counted_by_filter_and_monitor(
    sidecar_system: tuple[PlaneThread, EnvoyProcess, Upstream, int],
) -> None:
    plane, envoy, upstream, port = sidecar_system
    monitor = plane.plane.extraction.monitor
    sent = 0
    empty_answers = empty_requests = 0  # nothing to harden or feed: not counted by design

    @settings(max_examples=40, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(BODIES, BODIES, st.sampled_from(["application/json", "text/plain", ""]))
    def fuzz(request: bytes, answer: bytes, content_type: str) -> None:
        nonlocal sent, empty_answers, empty_requests
        upstream.body, upstream.content_type = answer, content_type or "application/json"
        status, headers, got = http_request(
            "POST", f"http://127.0.0.1:{port}/v1/predict", request,
            {"content-type": "application/json", "x-api-key": "fuzzer"}, timeout=10,
        )
        if depth(request) > MAX_DEPTH:
            # Refused before the model sees it: neither answered nor fed.
            assert status == 400
            assert json.loads(got)["error"] == "request_too_deep"
            return
        sent += 1
        empty_answers += not answer
        empty_requests += not request
        assert status == 200
        assert int(headers["content-length"]) == len(got)
        if got != answer:  # rewritten: only ever a JSON answer into JSON
            json.loads(answer)
            json.loads(got)

    fuzz()
    assert envoy.server_state() == "LIVE"

    def outcomes() -> int:
        stats = {k[len(STAT):]: v for k, v in envoy.stats(STAT).items()}
        return sum(stats.get(name, 0) for name in OUTCOMES)

    def monitored() -> int:
        s = monitor.stats
        return s.queries + s.unobserved + sum(s.unparsable.values())

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (
        outcomes() < sent - empty_answers or monitored() < sent - empty_requests
    ):
        time.sleep(0.1)
    assert outcomes() == sent - empty_answers, (sent, empty_answers, envoy.stats(STAT))
    # Each query reached the monitor and was analysed or counted under a reason.
    assert monitored() >= sent - empty_requests, (sent, empty_requests, monitor.stats)
