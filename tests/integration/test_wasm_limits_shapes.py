"""Request limits and body shapes in the Wasm filter, through a real Envoy over ADS/ECDS.

Limits (issue 18.1, 18.9): a request over ``request.maxBytes`` (with or without a
content-length), nested deeper than ``request.maxDepth``, or with more rows than
``request.maxInstances`` is refused by the sidecar before the model sees any of it; an
answer too large to harden is refused (502) under ``onUnhardenable: Deny``.

Shapes (issue 13): KServe v2 / Open Inference Protocol tensors (flat or nested data) and
single-score answers are hardened; the feed carries each request's row count.

The upstream is a stub that records what reached it and answers what the test sets.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import select
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from polling import eventually
from test_wasm_filter import STAT, System, _start

from controlplane.netutil import http_request
from tests.conftest import Upstream

pytestmark = pytest.mark.envoy

POLICY = """\
apiVersion: modelguard.io/v1alpha1
kind: ExtractionPolicy
metadata: {{name: digits-model, namespace: demo}}
spec:
  targetRef: {{service: digits-model}}
  clientKey: {{header: x-api-key}}
  request: {request}
  response: {response}
  output:
    topK: 1
    roundDigits: 2
    tierHeader: x-tier
    tiers:
      trial: {{labelOnly: true}}
      noisy: {{noise: 0.3}}
      round1: {{roundDigits: 1}}
{extra}  detection: {{detectors: [prada]}}
"""


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    r = Upstream(keep_alive=True)
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture
async def system(tmp_path: Path, upstream: Upstream) -> AsyncIterator[System]:
    async with await _start(tmp_path, upstream.port) as s:
        yield s


def apply(system: System, request: str, response: str, extra: str = "") -> None:
    """Writes the policy; callers wait for the sidecar to run it by its behaviour."""
    (system.policies / "extraction.yaml").write_text(
        POLICY.format(request=request, response=response, extra=extra)
    )


async def post(
    system: System, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(
        http_request,
        "POST",
        f"http://127.0.0.1:{system.listen_port}/v1/predict",
        body,
        {"content-type": "application/json", "x-api-key": "alice", **(headers or {})},
        30,
    )


def send_then_read(port: int, body: bytes) -> tuple[bytes, bytes]:
    """POSTs ``body`` over a raw socket, reading the answer as soon as one comes (an HTTP
    client that only reads after sending all would see the early 413 as a reset)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"x-api-key: alice\r\ncontent-length: %d\r\n\r\n" % len(body)
        )
        sock.setblocking(False)
        data, sent = b"", 0
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
            data.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0]
            if b"content-length: " in data
            else 1 << 30
        ):
            sending = [sock] if sent < len(body) else []
            readable, writable, _ = select.select([sock], sending, [], 30)
            if not readable and not writable:
                raise TimeoutError("no answer")
            if readable:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            elif writable:
                try:
                    sent += sock.send(body[sent : sent + 65536])
                except OSError:
                    sent = len(body)
        head, _, rest = data.partition(b"\r\n\r\n")
        return head.lower().replace(b"http/1.1", b"HTTP/1.1"), rest


async def _status(system: System, body: bytes, want: int) -> bool:
    return (await post(system, body))[0] == want


def stats(system: System) -> dict[str, int]:
    return {k[len(STAT) :]: v for k, v in system.envoy.stats(STAT).items()}


ROW = [0.5] * 64
SMALL = json.dumps({"instances": [ROW]}).encode()


async def test_oversized_and_deep_requests_never_reach_the_model(
    system: System, upstream: Upstream
) -> None:
    upstream.body = b'{"predictions": [{"probabilities": [0.1, 0.9]}]}'
    status, _, _ = await post(system, SMALL)
    assert status == 200 and upstream.seen == [SMALL]
    # 21.7 MB with a content-length: refused at the headers, with a JSON reason, while
    # the client is still sending (Envoy then closes the connection).
    huge = b'{"instances": [' + b"[" + b"1.0," * 5_425_000 + b"1.0]]}"
    assert len(huge) > 21_700_000
    head, body = await asyncio.to_thread(send_then_read, system.listen_port, huge)
    assert head.startswith(b"HTTP/1.1 413") and b"content-type: application/json" in head
    reason = json.loads(body)
    assert reason["error"] == "request_too_large" and "65536" in reason["reason"]
    # The same without a content-length (chunked): refused once the held body passes it.
    conn = http.client.HTTPConnection("127.0.0.1", system.listen_port, timeout=30)
    try:
        conn.request(
            "POST",
            "/v1/predict",
            body=iter([huge[i : i + 65536] for i in range(0, 4 * 65536, 65536)]),
            headers={"content-type": "application/json", "x-api-key": "alice"},
            encode_chunked=True,
        )
        response = conn.getresponse()
        assert response.status == 413
        assert json.loads(response.read())["error"] == "request_too_large"
    finally:
        conn.close()
    # Nesting depth 100k: 400 before the model (which would hit a RecursionError).
    deep = b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, _, body = await post(system, deep[:60_000] + b"]}")  # under maxBytes, deep
    assert status == 400 and json.loads(body)["error"] == "request_too_deep"
    status, _, _ = await post(system, deep)  # over maxBytes too: refused either way
    assert status in (400, 413)
    # The same in UTF-16 and UTF-32 (Python's json.loads reads them), with and without a
    # byte-order mark, and behind a wide character whose low byte is a quote: still 400.
    hidden = '{"x": "\u0122", "instances": ' + "[" * 200 + "]" * 200 + "}"
    for text in (deep[:3_000].decode() + "]}", hidden):
        for encoding in ("utf-16", "utf-16-be", "utf-32-le", "utf-8-sig"):
            status, _, body = await post(system, text.encode(encoding))
            assert status == 400, (encoding, text[:20])
    assert json.loads(hidden)  # well-formed: only its depth is refused
    assert upstream.seen == [SMALL]  # none of the refused bodies reached the model
    await eventually(lambda: stats(system).get("refused_too_large", 0) >= 2)
    assert stats(system)["refused_too_deep"] >= 1
    # The sidecar keeps serving.
    status, _, _ = await post(system, SMALL)
    assert status == 200


async def test_max_instances_counts_rows_in_every_shape(
    system: System, upstream: Upstream
) -> None:
    upstream.body = b'{"predictions": [{"probabilities": [0.1, 0.9]}]}'
    apply(
        system,
        '{features: "$.instances[*]", featureNames: [a, b], maxInstances: 4}',
        '{scores: "$.predictions[*].probabilities"}',
    )
    four = json.dumps({"instances": [{"a": 1, "b": 2}] * 4}).encode()
    five = json.dumps({"instances": [{"a": 1, "b": 2}] * 5}).encode()
    await eventually(lambda: _status(system, five, 413))
    upstream.seen.clear()
    assert (await post(system, four))[0] == 200
    status, _, body = await post(system, five)
    assert status == 413 and json.loads(body)["error"] == "too_many_instances"
    assert upstream.seen == [four]
    # Rows in a body the model reads as UTF-16 or with a UTF-8 byte-order mark count too.
    for encoding in ("utf-16", "utf-16-le", "utf-32", "utf-8-sig"):
        status, _, _ = await post(system, five.decode().encode(encoding))
        assert status == 413, encoding
    assert upstream.seen == [four]
    # KServe v2: rows are shape[0] of the input tensors.
    apply(
        system,
        '{format: kserveV2, features: "$.inputs[*]", maxInstances: 4}',
        '{format: kserveV2, scores: "$.outputs[0]"}',
    )

    def tensor(rows: int) -> bytes:
        # Two input tensors of the same rows: rows are shape[0], not the sum over inputs.
        return json.dumps(
            {"inputs": [{"name": "x", "shape": [rows, 2], "datatype": "FP32",
                         "data": [0.5] * (2 * rows)},
                        {"name": "y", "shape": [rows], "datatype": "FP32",
                         "data": [0.5] * rows}]}
        ).encode()

    await eventually(lambda: _status(system, tensor(5), 413))
    upstream.seen.clear()
    assert (await post(system, tensor(4)))[0] == 200
    assert (await post(system, tensor(5)))[0] == 413
    assert upstream.seen == [tensor(4)]
    # The feed carries each request's row count.
    await eventually(lambda: any(q.instances == 4 for q in system.feed.queries()))


async def test_kserve_v2_and_single_score_answers_are_hardened(
    system: System, upstream: Upstream
) -> None:
    apply(
        system,
        '{format: kserveV2, features: "$.inputs[*]"}',
        '{format: kserveV2, scores: "$.outputs[0]"}',
    )
    request = json.dumps(
        {"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    ).encode()
    flat = {"outputs": [{"name": "probabilities", "shape": [2, 3], "datatype": "FP32",
                         "data": [0.1234, 0.2345, 0.6421, 0.5111, 0.3222, 0.1667]}]}
    upstream.body = json.dumps(flat).encode()

    async def data(tier: str | None = None) -> Any:
        status, headers, body = await post(system, request, {"x-tier": tier} if tier else {})
        assert status == 200 and int(headers["content-length"]) == len(body)
        out = json.loads(body)["outputs"][0]
        assert out["name"] == "probabilities"
        return out["data"]

    async def hardened() -> bool:
        return await data() == [0.0, 0.0, 0.64, 0.51, 0.0, 0.0]  # rows of 3, top-1, 2 digits

    await eventually(hardened)  # rows of 3, top-1, 2 digits
    assert await data("trial") == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    # Nested data: each inner array is a row.
    nested = {"outputs": [{"name": "probabilities", "shape": [2, 3], "datatype": "FP32",
                           "data": [[0.1234, 0.2345, 0.6421], [0.5111, 0.3222, 0.1667]]}]}
    upstream.body = json.dumps(nested).encode()
    assert await data() == [[0.0, 0.0, 0.64], [0.51, 0.0, 0.0]]
    # A single-score output (shape [N]): each number is one row.
    single = {"outputs": [{"name": "probabilities", "shape": [3], "datatype": "FP32",
                           "data": [0.734, 0.2, 0.5]}]}
    upstream.body = json.dumps(single).encode()
    assert await data("round1") == [0.7, 0.2, 0.5]
    assert await data("trial") == [1.0, 0.0, 1.0]  # the class: its side of 0.5
    for _ in range(5):
        noisy = await data("noisy")
        assert all(abs(a - b) <= 0.3 + 1e-9 for a, b in zip(noisy, [0.734, 0.2, 0.5], strict=True))
        assert [x >= 0.5 for x in noisy] == [True, False, True]  # classes kept
    # Plain JSON single scores: `$.predictions[*]` selects one number per row.
    apply(system, '{features: "$.instances[*]"}', '{scores: "$.predictions[*]"}')
    upstream.body = b'{"predictions": [0.734, 0.2, 41.37]}'

    async def single_scores() -> bool:
        _, _, body = await post(system, SMALL)
        return bool(json.loads(body) == {"predictions": [0.73, 0.2, 41.37]})

    await eventually(single_scores)
    _, _, body = await post(system, SMALL, {"x-tier": "round1"})
    assert json.loads(body) == {"predictions": [0.7, 0.2, 41.4]}  # regression: rounded
    _, _, body = await post(system, SMALL, {"x-tier": "trial"})
    assert json.loads(body) == {"predictions": [1.0, 0.0, 41.0]}


async def test_answers_too_large_to_harden_are_denied_unless_the_policy_passes_them(
    system: System, upstream: Upstream
) -> None:
    big = {"predictions": [{"probabilities": [0.1, 0.9]}] * 20_000}
    upstream.body = json.dumps(big).encode()
    assert len(upstream.body) > 512 * 1024
    status, _, body = await post(system, SMALL)
    assert status == 502 and json.loads(body)["error"] == "answer_unhardenable"
    await eventually(lambda: stats(system).get("denied_unhardenable", 0) >= 1)
    # The model did answer it: the query still reaches the monitor (without the answer).
    await eventually(
        lambda: [q.request_body for q in system.feed.queries() if not q.response_body]
        == [SMALL]
    )
    # An answer over the feed's 64 KiB but hardenable: hardened for the client, and its
    # query fed without the answer, rather than counted as unobserved.
    mid = {"predictions": [{"probabilities": [0.1234, 0.8766]}] * 3000}
    upstream.body = json.dumps(mid).encode()
    assert 64 * 1024 < len(upstream.body) < 512 * 1024
    status, _, body = await post(system, SMALL, {"x-api-key": "bob"})
    assert status == 200
    assert json.loads(body)["predictions"][0] == {"probabilities": [0.0, 0.88]}
    await eventually(
        lambda: [q.response_body for q in system.feed.queries() if q.client_key == "bob"]
        == [b""]
    )
    assert not system.feed.unobserved()
    upstream.body = json.dumps(big).encode()
    apply(
        system,
        '{features: "$.instances[*]"}',
        '{scores: "$.predictions[*].probabilities"}',
        "  onUnhardenable: Pass\n",
    )
    await eventually(lambda: _status(system, SMALL, 200))
    status, _, body = await post(system, SMALL)
    assert status == 200 and body == upstream.body  # passed unchanged, as the policy says
