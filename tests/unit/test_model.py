"""The demo model API: a sound model behind a strict, well-behaved HTTP API."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from controlplane.local import model as model_mod
from controlplane.local.model import (
    MAX_INSTANCES,
    DigitsModel,
    ModelServer,
    load_digits_data,
    load_model,
    serve,
    split,
    train_model,
)
from controlplane.netutil import http_request

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model() -> DigitsModel:
    return train_model(seed=0)


@pytest.fixture(scope="module")
def server(model: DigitsModel) -> Iterator[ModelServer]:
    server = serve(0, model=model)
    try:
        yield server
    finally:
        server.stop()


def post(server: ModelServer, payload: Any, raw: bytes | None = None) -> tuple[int, Any]:
    body = raw if raw is not None else json.dumps(payload).encode()
    status, headers, data = http_request(
        "POST", f"{server.url}/v1/predict", body, {"content-type": "application/json"}
    )
    assert headers["content-type"] == "application/json"
    return status, json.loads(data)


# --- the model -------------------------------------------------------------------------------


def test_data_is_sklearns_digits() -> None:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    ours_X, ours_y = load_digits_data()
    assert np.array_equal(X, ours_X) and np.array_equal(y, ours_y)


def test_split_is_stratified_disjoint_and_reproducible() -> None:
    _, y = load_digits_data()
    train, test = split(y, seed=0)
    assert not set(train.tolist()) & set(test.tolist())
    assert len(train) + len(test) == len(y)
    assert 0.24 < len(test) / len(y) < 0.26
    assert set(np.unique(y[test]).tolist()) == set(range(10))
    again_train, again_test = split(y, seed=0)
    assert np.array_equal(train, again_train) and np.array_equal(test, again_test)


def test_model_is_accurate_on_held_out_digits(model: DigitsModel) -> None:
    assert model.test_X.shape[1] == 64 and len(model.test_X) == len(model.test_y)
    assert model.train_X.shape[1] == 64
    assert model.accuracy() > 0.9


def test_predictions_are_probability_vectors(model: DigitsModel) -> None:
    proba = model.predict_proba(model.test_X[:50])
    assert proba.shape == (50, 10)
    assert np.all(proba >= 0)
    assert np.allclose(proba.sum(axis=1), 1.0)


def test_inference_is_sklearns(model: DigitsModel) -> None:
    # Serving skips scikit-learn (start-up time); the numbers must stay sklearn's.
    from sklearn.linear_model import LogisticRegression

    estimator = LogisticRegression(max_iter=2000, random_state=0)
    estimator.fit(model.train_X / 16.0, model.train_y)
    assert np.allclose(
        estimator.predict_proba(model.test_X / 16.0),
        model.predict_proba(model.test_X),
        atol=1e-12,
    )


def test_training_is_deterministic(model: DigitsModel) -> None:
    assert np.array_equal(train_model(seed=0).coef, model.coef)


def test_weights_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: DigitsModel) -> None:
    monkeypatch.setenv(model_mod.CACHE_ENV, str(tmp_path))
    first = load_model(seed=0)
    [cached] = tmp_path.iterdir()
    assert cached.suffix == ".npz"
    monkeypatch.setattr(model_mod, "train_model", lambda seed=0: pytest.fail("retrained"))
    second = load_model(seed=0)
    assert np.array_equal(first.coef, second.coef)
    assert np.array_equal(second.coef, model.coef)
    assert np.array_equal(second.test_y, model.test_y)
    cached.write_bytes(b"garbage")  # a broken cache is retrained, not fatal
    monkeypatch.setattr(model_mod, "train_model", lambda seed=0: model)
    assert load_model(seed=0) is model


# --- the HTTP API ----------------------------------------------------------------------------


def test_predict(server: ModelServer, model: DigitsModel) -> None:
    instances = model.test_X[:3].tolist()
    status, answer = post(server, {"instances": instances})
    assert status == 200, answer
    assert answer["model"] == "digits-logreg"
    assert len(answer["predictions"]) == 3
    expected = model.predict_proba(instances)
    for prediction, row in zip(answer["predictions"], expected, strict=True):
        assert prediction["label"] == int(row.argmax())
        assert len(prediction["probabilities"]) == 10
        assert prediction["probabilities"] == pytest.approx(row.tolist())
        assert sum(prediction["probabilities"]) == pytest.approx(1.0)


def test_predict_accepts_integers_and_the_maximum_batch(server: ModelServer) -> None:
    status, answer = post(server, {"instances": [[0] * 64] * MAX_INSTANCES})
    assert status == 200, answer
    assert len(answer["predictions"]) == MAX_INSTANCES


@pytest.mark.parametrize(
    ("payload", "raw", "message"),
    [
        (None, b"{not json", "invalid JSON"),
        (None, b'{"instances": [[NaN]]}', "NaN"),
        (None, b"\xff\xfe", "invalid JSON"),
        ([[0] * 64], None, "JSON object"),
        ({}, None, "instances"),
        ({"instances": []}, None, "must not be empty"),
        ({"instances": [0] * 64}, None, "instances[0]"),
        ({"instances": [[0] * 63]}, None, "got 63 values"),
        ({"instances": [[0] * 64, [0] * 65]}, None, "instances[1]"),
        ({"instances": [[0] * 63 + ["7"]]}, None, "instances[0][63]: must be a number"),
        ({"instances": [[True] + [0] * 63]}, None, "instances[0][0]"),
        ({"instances": [[None] * 64]}, None, "must be a number"),
        (None, b'{"instances": [[1e400' + b", 0" * 63 + b"]]}", "finite"),
        ({"instances": [[0] * 64] * (MAX_INSTANCES + 1)}, None, f"at most {MAX_INSTANCES}"),
    ],
)
def test_bad_input_is_a_clear_400(
    server: ModelServer, payload: Any, raw: bytes | None, message: str
) -> None:
    status, answer = post(server, payload, raw)
    assert status == 400
    assert set(answer) == {"error"}
    assert message in answer["error"]


def test_health_and_metadata(server: ModelServer) -> None:
    status, _, body = http_request("GET", f"{server.url}/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    status, _, body = http_request("GET", f"{server.url}/v1/model")
    meta = json.loads(body)
    assert status == 200
    assert meta["model"] == "digits-logreg"
    assert (meta["features"], meta["classes"]) == (64, 10)
    assert meta["feature_range"] == [0, 16]


def test_unknown_paths_and_methods(server: ModelServer) -> None:
    status, _, body = http_request("GET", f"{server.url}/nope")
    assert status == 404 and "error" in json.loads(body)
    status, headers, _ = http_request("GET", f"{server.url}/v1/predict")
    assert status == 405 and headers["allow"] == "POST"
    status, headers, _ = http_request("POST", f"{server.url}/healthz", b"{}")
    assert status == 405 and headers["allow"] == "GET"


def test_connections_are_kept_alive(server: ModelServer, model: DigitsModel) -> None:
    # Envoy reuses upstream connections: several requests, errors included, on one socket.
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        for body in (b"{bad", json.dumps({"instances": model.test_X[:1].tolist()}).encode()) * 2:
            conn.request("POST", "/v1/predict", body, {"content-type": "application/json"})
            response = conn.getresponse()
            response.read()
            assert response.status in (200, 400)
            assert not response.will_close
    finally:
        conn.close()


def test_chunked_request_body(server: ModelServer) -> None:
    body = json.dumps({"instances": [[1] * 64]}).encode()
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        conn.request(
            "POST",
            "/v1/predict",
            iter([body[:10], body[10:]]),
            {"content-type": "application/json", "transfer-encoding": "chunked"},
            encode_chunked=True,
        )
        response = conn.getresponse()
        assert response.status == 200, response.read()
    finally:
        conn.close()


# --- the process -----------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_module_serves_until_signalled(sig: signal.Signals, free_port: Any) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "controlplane.local.model", "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        ready = process.stdout.readline().decode()
        assert f"ready on http://127.0.0.1:{port}" in ready, ready
        status, _, _ = http_request("GET", f"http://127.0.0.1:{port}/healthz")
        assert status == 200
        started = time.monotonic()
        process.send_signal(sig)
        assert process.wait(timeout=10) == 0
        assert time.monotonic() - started < 3
        assert b"Traceback" not in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
