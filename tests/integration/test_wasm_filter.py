"""The output-hardening Wasm filter and its query feed, through a real Envoy over ADS/ECDS.

policy file → control plane (ECDS) → Envoy (V8) → demo model, or a stub upstream that
answers malformed bodies; the query feed lands on a QueryFeed servicer of the test, served
on the control plane's xDS port like the real extraction monitor.
"""

from __future__ import annotations

import asyncio
import http.client
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from polling import eventually

from controlplane.gen.modelguard.feed.v1 import feed_pb2, feed_pb2_grpc
from controlplane.netutil import http_request
from tests.conftest import Upstream
from tests.integration.conftest import Deployment

pytestmark = pytest.mark.envoy

POLICY = """\
apiVersion: modelguard.io/v1alpha1
kind: ExtractionPolicy
metadata: {{name: digits-model, namespace: demo}}
spec:
  targetRef: {{service: digits-model}}
  clientKey: {{header: x-api-key}}
  request: {{features: "$.instances[*]"}}
  response: {{scores: "$.predictions[*].probabilities", label: "$.predictions[*].label"}}
  output:
    topK: {top_k}
    roundDigits: {digits}
    tierHeader: x-tier
    tiers:
      partner: {{topK: 3, roundDigits: 3}}
      trial: {{labelOnly: true}}
      noisy: {{noise: 0.2}}
  detection: {{detectors: [prada]}}
"""
STAT = "wasmcustom.modelguard.demo.digits-model."
INSTANCES = {"instances": [[0.0] * 20 + [8.0] * 24 + [0.0] * 20, [3.0] * 64, [16.0] * 64]}


class FeedRecorder(feed_pb2_grpc.QueryFeedServicer):
    """A QueryFeed servicer standing in for the extraction monitor; it can fail on demand."""

    def __init__(self) -> None:
        self.batches: list[feed_pb2.FeedBatch] = []
        self.fail = False

    def add_to(self, server: grpc.aio.Server) -> None:
        feed_pb2_grpc.add_QueryFeedServicer_to_server(self, server)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def Report(
        self, request: feed_pb2.FeedBatch, context: grpc.aio.ServicerContext
    ) -> feed_pb2.FeedAck:
        if self.fail:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "monitor down (test)")
        self.batches.append(request)
        return feed_pb2.FeedAck(accepted=len(request.queries))

    def queries(self) -> list[feed_pb2.Query]:
        return [q for b in self.batches for q in b.queries]

    def instances(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for batch in self.batches:
            for u in batch.unobserved:
                out[u.client_key, u.reason] = out.get((u.client_key, u.reason), 0) + u.instances
        return out

    def unobserved(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for batch in self.batches:
            for u in batch.unobserved:
                out[u.client_key, u.reason] = out.get((u.client_key, u.reason), 0) + u.count
        return out


class System(Deployment):
    @property
    def feed(self) -> FeedRecorder:
        feed = self.services[0]
        assert isinstance(feed, FeedRecorder)
        return feed

    async def post(
        self, headers: dict[str, str] | None = None, body: Any = INSTANCES, port: int | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        return await asyncio.to_thread(
            http_request,
            "POST",
            f"http://127.0.0.1:{port or self.listen_port}/v1/predict",
            json.dumps(body).encode(),
            {"content-type": "application/json", **(headers or {})},
        )

    def stats(self) -> dict[str, int]:
        return {k[len(STAT) :]: v for k, v in self.envoy.stats(STAT).items()}

    def write_policy(self, top_k: int = 1, digits: int = 2) -> None:
        (self.policies / "extraction.yaml").write_text(POLICY.format(top_k=top_k, digits=digits))


async def _start(tmp_path: Path, app_port: int) -> System:
    return await System.start(
        tmp_path,
        app_port,
        {"extraction.yaml": POLICY.format(top_k=1, digits=2)},
        services=(FeedRecorder(),),
    )


@pytest.fixture
async def system(tmp_path: Path, demo_model: tuple[str, int]) -> AsyncIterator[System]:
    async with await _start(tmp_path, demo_model[1]) as s:
        yield s


@pytest.fixture
def stub() -> Iterator[Upstream]:
    """An upstream that answers whatever the test sets: malformed and unexpected bodies."""
    s = Upstream()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
async def stub_system(tmp_path: Path, stub: Upstream) -> AsyncIterator[System]:
    async with await _start(tmp_path, stub.port) as s:
        yield s


def _scores(body: bytes) -> list[list[float]]:
    return [p["probabilities"] for p in json.loads(body)["predictions"]]


def _argmax(v: list[float]) -> int:
    return max(range(len(v)), key=lambda i: (v[i], -i))


def _decimals(x: float) -> int:
    text = repr(x)
    return len(text.split(".")[1]) if "." in text else 0


async def test_hardened_responses_have_the_configured_shape_per_tier(
    system: System, demo_model: tuple[str, int]
) -> None:
    _, _, raw_body = await system.post(port=demo_model[1])
    raw = _scores(raw_body)
    top = [_argmax(v) for v in raw]

    status, headers, body = await system.post({"x-api-key": "alice"})
    assert status == 200, body
    assert int(headers["content-length"]) == len(body)  # corrected after the rewrite
    answer = json.loads(body)
    assert [p["label"] for p in answer["predictions"]] == top  # other fields untouched
    assert answer["model"] == "digits-logreg"
    for vector, want, original in zip(_scores(body), top, raw, strict=True):
        assert len(vector) == 10
        assert [i for i, x in enumerate(vector) if x != 0] == [want]  # topK: 1
        assert vector[want] == round(original[want], 2)
        assert _decimals(vector[want]) <= 2

    _, _, body = await system.post({"x-api-key": "bob", "x-tier": "partner"})
    for vector, want in zip(_scores(body), top, strict=True):
        assert _argmax(vector) == want
        assert 1 <= sum(1 for x in vector if x != 0) <= 3
        assert all(_decimals(x) <= 3 for x in vector)

    _, _, body = await system.post({"x-api-key": "carol", "x-tier": "trial"})
    for vector, want in zip(_scores(body), top, strict=True):
        assert vector == [1.0 if i == want else 0.0 for i in range(10)]

    # Noise: bounded, never changes the top-1 class, and the same query gets the same noise
    # (no averaging it away by repeating the query).
    _, _, noisy = await system.post({"x-api-key": "dave", "x-tier": "noisy"})
    _, _, again = await system.post({"x-api-key": "dave", "x-tier": "noisy"})
    assert noisy == again
    moved = 0
    for vector, want, original in zip(_scores(noisy), top, raw, strict=True):
        assert _argmax(vector) == want
        assert all(abs(a - b) <= 0.2 + 1e-6 for a, b in zip(vector, original, strict=True))
        moved += sum(1 for a, b in zip(vector, original, strict=True) if abs(a - b) > 1e-3)
    assert moved > 5

    # An unknown tier gets the defaults.
    _, _, body = await system.post({"x-api-key": "eve", "x-tier": "platinum"})
    assert all(sum(1 for x in v if x != 0) == 1 for v in _scores(body))
    assert system.stats()["hardened"] == 6


async def test_policy_change_swaps_the_filter_config_live_on_an_open_connection(
    system: System,
) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", system.listen_port, timeout=5)

    def post_on_connection() -> list[list[float]]:
        conn.request(
            "POST",
            "/v1/predict",
            json.dumps(INSTANCES).encode(),
            {"content-type": "application/json"},
        )
        response = conn.getresponse()
        return _scores(response.read())

    try:
        before = await asyncio.to_thread(post_on_connection)
        assert all(sum(1 for x in v if x != 0) == 1 for v in before)
        listeners = system.envoy.stats("listener_manager.")
        system.write_policy(top_k=4, digits=4)

        async def four_kept() -> bool:
            vectors = await asyncio.to_thread(post_on_connection)
            return all(sum(1 for x in v if x != 0) == 4 for v in vectors)

        await eventually(four_kept, timeout=15)
        # Same TCP connection, same listener: the swap came through ECDS, not a new listener.
        after = system.envoy.stats("listener_manager.")
        for name in ("listener_manager.listener_modified", "listener_manager.listener_removed"):
            assert after.get(name, 0) == listeners.get(name, 0), name
        assert after.get("listener_manager.total_listeners_draining", 0) == 0
        reloads = system.envoy.stats("extension_config_discovery")
        assert any(k.endswith("config_reload") and v >= 2 for k, v in reloads.items()), reloads
    finally:
        conn.close()


async def test_hardening_without_the_feed_reads_the_tier_alone(system: System) -> None:
    # No detection: no feed, so the filter reads one request header (the tier, named here in
    # capitals; header names are case-insensitive) and feeds nothing.
    policy = POLICY.format(top_k=1, digits=2).replace("  detection: {detectors: [prada]}\n", "")
    policy = policy.replace("tierHeader: x-tier", "tierHeader: X-Tier")
    (system.policies / "extraction.yaml").write_text(policy)

    async def fed_nothing() -> bool:
        before = len(system.feed.queries())
        await system.post({"x-api-key": "alice"})
        await asyncio.sleep(0.4)  # past a flush (250 ms) if the feed were still on
        return len(system.feed.queries()) == before

    await eventually(fed_nothing, timeout=15)
    _, _, body = await system.post()
    default = _scores(body)
    assert all(sum(1 for x in v if x != 0) == 1 for v in default)  # topK 1, 2 digits
    assert any(max(v) < 1.0 for v in default)  # so label-only below is told apart
    _, headers, body = await system.post({"x-api-key": "carol", "x-tier": "trial"})
    assert int(headers["content-length"]) == len(body)
    labels = [[1.0 if i == _argmax(v) else 0.0 for i in range(len(v))] for v in default]
    assert _scores(body) == labels


@pytest.mark.parametrize(
    ("body", "content_type", "counter"),
    [
        (b'{"predictions": [{"probabilities": [0.1, 0.9', "application/json", "passed_malformed"),
        (b'{"predictions": [{"probabilities": "high"}]}', "application/json", "passed_unmatched"),
        (b'{"predictions": [{"probabilities": [0.1, 0.9]}]}', "text/plain", "passed_not_json"),
        (b"\xff\xfe not json at all", "application/json", "passed_malformed"),
    ],
    ids=["truncated", "unexpected-shape", "not-json-type", "binary"],
)
async def test_malformed_or_unexpected_bodies_pass_unchanged_and_are_counted(
    stub: Upstream, stub_system: System, body: bytes, content_type: str, counter: str
) -> None:
    stub.body, stub.content_type = body, content_type
    status, headers, got = await stub_system.post({"x-api-key": "alice"})
    assert status == 200
    assert got == body
    assert int(headers["content-length"]) == len(body)
    await eventually(lambda: stub_system.stats().get(counter) == 1)
    assert stub_system.stats()["hardened"] == 0
    # A well-formed answer through the same sidecar is still hardened.
    stub.body = b'{"predictions": [{"probabilities": [0.1, 0.9]}]}'
    stub.content_type = "application/json"
    _, _, got = await stub_system.post({"x-api-key": "alice"})
    assert json.loads(got) == {"predictions": [{"probabilities": [0.0, 0.9]}]}


async def test_feed_ships_queries_with_the_unhardened_answer_in_batches(system: System) -> None:
    _, _, hardened = await system.post({"x-api-key": "alice"})
    for _ in range(4):
        await system.post({"x-api-key": "bob"})
    await eventually(lambda: len(system.feed.queries()) == 5)
    queries = system.feed.queries()
    assert sorted(q.client_key for q in queries) == ["alice"] + ["bob"] * 4
    first = next(q for q in queries if q.client_key == "alice")
    assert json.loads(first.request_body) == INSTANCES
    assert first.path == "/v1/predict" and first.status == 200
    assert first.time_unix_ms > 1_600_000_000_000
    # The monitor sees the model's own answer, the client the hardened one.
    unhardened = _scores(first.response_body)
    assert any(0 < x < 1e-3 for v in unhardened for x in v)
    assert unhardened != _scores(hardened)
    batch = system.feed.batches[0]
    assert batch.node_id == "digits-model-0" and batch.policy == "demo/digits-model"
    assert batch.sequence >= 1
    assert len(system.feed.batches) < 5  # batched (one flush per tick), not one call per query
    # A GET carries no query: not fed.
    await asyncio.to_thread(http_request, "GET", f"http://127.0.0.1:{system.listen_port}/healthz")
    await asyncio.sleep(0.6)
    assert len(system.feed.queries()) == 5


async def test_feed_counts_what_it_cannot_ship_per_client(system: System) -> None:
    system.feed.fail = True
    for _ in range(3):
        await system.post({"x-api-key": "mallory"})
    await eventually(lambda: system.stats().get("feed_call_failures", 0) >= 1)
    system.feed.fail = False
    # A request over request.maxBytes (default: what the feed ships whole) never reaches
    # the model: refused with 413 and a JSON reason, so nothing answered goes unjudged.
    big = {"instances": [[16.0] * 64] * 300}
    status, _, body = await system.post({"x-api-key": "trudy"}, body=big)
    assert status == 413
    assert json.loads(body)["error"] == "request_too_large"
    await eventually(lambda: system.feed.unobserved().get(("mallory", "call_failed")) == 3)
    assert not [q for q in system.feed.queries() if q.client_key == "mallory"]
    # The lost batch is charged by the rows its requests carried (3 each), not by request.
    assert system.feed.instances().get(("mallory", "call_failed")) == 9
    assert system.stats()["feed_unobserved"] == 3
    assert system.stats()["refused_too_large"] == 1
    assert not [q for q in system.feed.queries() if q.client_key == "trudy"]


LABEL_ONLY_POLICY = """\
apiVersion: modelguard.io/v1alpha1
kind: ExtractionPolicy
metadata: {name: digits-model, namespace: demo}
spec:
  targetRef: {service: digits-model}
  clientKey: {header: x-api-key}
  request: {features: "$.instances[*]"}
  response: {label: "$.predictions[*].label"}
  detection: {detectors: [prada]}
"""


async def test_a_label_only_policy_feeds_the_models_labels(
    stub: Upstream, stub_system: System
) -> None:
    # A model whose answers carry labels: a label-only policy reads no scores, so nothing
    # is hardened (the old policy's topK would zero 0.1), and the feed still ships every
    # answer whole, so the monitor reads the labels (response.label).
    stub.body = (b'{"predictions": [{"label": 1, "probabilities": [0.1, 0.9]}, '
                 b'{"label": "seven", "probabilities": [0.1, 0.9]}]}')
    (stub_system.policies / "extraction.yaml").write_text(LABEL_ONLY_POLICY)

    async def unchanged_and_fed() -> bool:
        status, _, got = await stub_system.post({"x-api-key": "lena"})
        await asyncio.sleep(0.3)  # past a flush (250 ms)
        fed = [q for q in stub_system.feed.queries() if q.client_key == "lena"]
        return status == 200 and got == stub.body and bool(fed) and fed[-1].response_body == got

    await eventually(unchanged_and_fed, timeout=15)
    (query, *_) = [q for q in stub_system.feed.queries() if q.client_key == "lena"]
    assert json.loads(query.request_body) == INSTANCES
