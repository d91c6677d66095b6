"""The demo model API: the workload modelguard protects.

A scikit-learn ``LogisticRegression`` on the 8x8 digits that ship inside scikit-learn
(nothing is downloaded), served over plain HTTP/1.1 from the standard library:

- ``POST /v1/predict``  ``{"instances": [[64 numbers], ...]}`` →
  ``{"predictions": [{"label": 3, "probabilities": [10 floats]}], "model": "digits-logreg"}``
- ``GET /v1/model``     what the model takes and returns
- ``GET /healthz``      ``{"status": "ok"}``
- ``GET /v1/stats``     ``{"predict_requests": N}``: predict requests that reached the model
  (what shows that a refused caller never got here)

Importing scikit-learn alone takes 1.5 to 2 s on small machines, so the trained weights are
cached (keyed by scikit-learn version and seed) and a warm start needs numpy only. Inference
is the same arithmetic sklearn's multinomial ``predict_proba`` does.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import numpy.typing as npt

MODEL_NAME = "digits-logreg"
N_FEATURES = 64
N_CLASSES = 10
FEATURE_MIN = 0.0
FEATURE_MAX = 16.0
MAX_INSTANCES = 256
MAX_BODY_BYTES = 4 * 1024 * 1024
TEST_FRACTION = 0.25
CACHE_ENV = "MODELGUARD_CACHE_DIR"

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


# --- the model ------------------------------------------------------------------------------


def load_digits_data() -> tuple[FloatArray, IntArray]:
    """The digits data set (1797 x 64, pixel values 0..16) straight from scikit-learn's wheel.

    Same arrays as ``sklearn.datasets.load_digits(return_X_y=True)``, without importing
    scikit-learn.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-learn is not installed (it ships the digits data set)")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets/data/digits.csv.gz"
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].astype(np.float64), data[:, -1].astype(np.int64)


def split(
    y: IntArray, seed: int, test_fraction: float = TEST_FRACTION
) -> tuple[IntArray, IntArray]:
    """Stratified train/test indices, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    train: list[int] = []
    test: list[int] = []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        n_test = round(len(members) * test_fraction)
        test.extend(members[:n_test].tolist())
        train.extend(members[n_test:].tolist())
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(test, dtype=np.int64))


@dataclass(frozen=True)
class DigitsModel:
    """A trained multinomial logistic regression plus the data it was trained and tested on.

    ``coef`` / ``intercept`` act on features scaled to 0..1 (pixel / 16); callers always
    pass raw 0..16 pixels.
    """

    coef: FloatArray  # (10, 64)
    intercept: FloatArray  # (10,)
    train_X: FloatArray
    train_y: IntArray
    test_X: FloatArray
    test_y: IntArray
    seed: int = 0
    name: str = MODEL_NAME

    def decision_function(self, X: npt.ArrayLike) -> FloatArray:
        features = np.asarray(X, dtype=np.float64) / FEATURE_MAX
        logits: FloatArray = features @ self.coef.T + self.intercept
        return logits

    def predict_proba(self, X: npt.ArrayLike) -> FloatArray:
        logits = self.decision_function(X)
        logits = logits - logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        proba: FloatArray = exp / exp.sum(axis=1, keepdims=True)
        return proba

    def predict(self, X: npt.ArrayLike) -> IntArray:
        labels: IntArray = self.predict_proba(X).argmax(axis=1).astype(np.int64)
        return labels

    def accuracy(self, X: npt.ArrayLike | None = None, y: npt.ArrayLike | None = None) -> float:
        """Accuracy on (X, y); on the held-out test split by default."""
        X_ = self.test_X if X is None else np.asarray(X)
        y_ = self.test_y if y is None else np.asarray(y)
        return float((self.predict(X_) == y_).mean())

    def metadata(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "framework": "scikit-learn LogisticRegression (multinomial)",
            "features": N_FEATURES,
            "classes": N_CLASSES,
            "labels": list(range(N_CLASSES)),
            "feature_range": [FEATURE_MIN, FEATURE_MAX],
            "input_shape": [8, 8],
            "max_instances": MAX_INSTANCES,
        }


def _datasets(seed: int) -> tuple[FloatArray, IntArray, FloatArray, IntArray]:
    X, y = load_digits_data()
    train_idx, test_idx = split(y, seed)
    return X[train_idx], y[train_idx], X[test_idx], y[test_idx]


def train_model(seed: int = 0) -> DigitsModel:
    """Train the digits model with scikit-learn (deterministic for a seed)."""
    from sklearn.linear_model import LogisticRegression

    train_X, train_y, test_X, test_y = _datasets(seed)
    estimator = LogisticRegression(max_iter=2000, random_state=seed)
    estimator.fit(train_X / FEATURE_MAX, train_y)
    return DigitsModel(
        coef=np.asarray(estimator.coef_, dtype=np.float64),
        intercept=np.asarray(estimator.intercept_, dtype=np.float64),
        train_X=train_X,
        train_y=train_y,
        test_X=test_X,
        test_y=test_y,
        seed=seed,
    )


def cache_dir() -> Path:
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "modelguard"


def _cache_path(seed: int) -> Path:
    version = importlib.metadata.version("scikit-learn")
    return cache_dir() / f"{MODEL_NAME}-v1-sklearn{version}-seed{seed}.npz"


def load_model(seed: int = 0, *, use_cache: bool = True) -> DigitsModel:
    """The trained model, from the weight cache when possible (no scikit-learn import)."""
    path = _cache_path(seed)
    if use_cache:
        try:
            with np.load(path) as cached:
                coef, intercept = cached["coef"], cached["intercept"]
            if coef.shape == (N_CLASSES, N_FEATURES) and intercept.shape == (N_CLASSES,):
                train_X, train_y, test_X, test_y = _datasets(seed)
                return DigitsModel(coef, intercept, train_X, train_y, test_X, test_y, seed)
        except (OSError, KeyError, ValueError):
            pass  # missing or unreadable: train again
    model = train_model(seed)
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".weights-", suffix=".npz", dir=path.parent)
            with os.fdopen(fd, "wb") as out:
                np.savez(out, coef=model.coef, intercept=model.intercept)
            os.replace(tmp, path)  # concurrent starts never see half a file
        except OSError:
            pass  # a read-only home only costs the next start a retrain
    return model


# --- the HTTP API ---------------------------------------------------------------------------


class BadRequest(ValueError):
    """A request the API rejects, with the status to answer."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


def _reject_constant(name: str) -> float:
    raise BadRequest(f"invalid JSON: {name} is not a number")


def parse_instances(body: bytes) -> FloatArray:
    """Validate a predict request body → (n, 64) array; BadRequest says exactly what is wrong."""
    try:
        payload = json.loads(body, parse_constant=_reject_constant)
    except BadRequest:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadRequest(f"invalid JSON: {err}") from None
    if not isinstance(payload, dict):
        raise BadRequest('body must be a JSON object like {"instances": [[64 numbers], ...]}')
    instances = payload.get("instances")
    if not isinstance(instances, list):
        raise BadRequest("instances: must be a list of instances (lists of 64 numbers)")
    if not instances:
        raise BadRequest("instances: must not be empty")
    if len(instances) > MAX_INSTANCES:
        raise BadRequest(
            f"instances: {len(instances)} instances, at most {MAX_INSTANCES} per request"
        )
    for i, instance in enumerate(instances):
        if not isinstance(instance, list) or len(instance) != N_FEATURES:
            got = (
                f"{len(instance)} values" if isinstance(instance, list) else type(instance).__name__
            )
            raise BadRequest(f"instances[{i}]: must be a list of {N_FEATURES} numbers, got {got}")
        for j, value in enumerate(instance):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise BadRequest(f"instances[{i}][{j}]: must be a number, got {value!r}")
            if not math.isfinite(value):
                raise BadRequest(f"instances[{i}][{j}]: must be finite")
    return np.asarray(instances, dtype=np.float64)


class ModelHandler(BaseHTTPRequestHandler):
    # HTTP/1.1 keep-alive: Envoy pools upstream connections.
    protocol_version = "HTTP/1.1"
    server_version = "modelguard-demo-model"
    server: ModelServer

    def _send_json(
        self, status: HTTPStatus, payload: Any, headers: dict[str, str] | None = None
    ) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _error(
        self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None
    ) -> None:
        self._send_json(status, {"error": message}, headers)

    def _path(self) -> str:
        return self.path.split("?", 1)[0]

    def do_GET(self) -> None:
        path = self._path()
        if path == "/healthz":
            self._send_json(HTTPStatus.OK, {"status": "ok"})
        elif path == "/v1/model":
            self._send_json(HTTPStatus.OK, self.server.model.metadata())
        elif path == "/v1/stats":
            self._send_json(HTTPStatus.OK, {"predict_requests": self.server.predict_requests})
        elif path == "/v1/predict":
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, "use POST", {"Allow": "POST"})
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such path: {path}")

    def do_POST(self) -> None:
        path = self._path()
        if path != "/v1/predict":
            self._discard_body()
            if path in ("/healthz", "/v1/model"):
                self._error(HTTPStatus.METHOD_NOT_ALLOWED, "use GET", {"Allow": "GET"})
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no such path: {path}")
            return
        with self.server._count_lock:
            self.server.predict_requests += 1
        try:
            body = self._read_body()
            X = parse_instances(body)
        except BadRequest as err:
            self._error(err.status, str(err))
            return
        proba = self.server.model.predict_proba(X)
        predictions = [
            {"label": int(row.argmax()), "probabilities": [float(p) for p in row]} for row in proba
        ]
        self._send_json(
            HTTPStatus.OK, {"predictions": predictions, "model": self.server.model.name}
        )

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            raise BadRequest("Content-Length is required", HTTPStatus.LENGTH_REQUIRED)
        try:
            length = int(length_text)
        except ValueError:
            self.close_connection = True
            raise BadRequest("invalid Content-Length") from None
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise BadRequest(
                f"body larger than {MAX_BODY_BYTES} bytes", HTTPStatus.REQUEST_ENTITY_TOO_LARGE
            )
        return self.rfile.read(length)

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            size_line = self.rfile.readline(1024).split(b";", 1)[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                self.close_connection = True
                raise BadRequest("invalid chunked encoding") from None
            if size == 0:
                while self.rfile.readline(1024).strip():
                    pass  # trailers
                return b"".join(chunks)
            total += size
            if total > MAX_BODY_BYTES:
                self.close_connection = True
                raise BadRequest(
                    f"body larger than {MAX_BODY_BYTES} bytes",
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                )
            chunks.append(self.rfile.read(size))
            self.rfile.readline(1024)

    def _discard_body(self) -> None:
        try:
            self._read_body()
        except BadRequest:
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)


class ModelServer(ThreadingHTTPServer):
    """The demo model's HTTP server; ``serve()`` runs it on a background thread."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], model: DigitsModel, *, verbose: bool = False
    ) -> None:
        super().__init__(address, ModelHandler)
        self.model = model
        self.verbose = verbose
        self.predict_requests = 0
        self._count_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return str(self.server_address[0])

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ModelServer:
        self._thread = threading.Thread(
            target=self.serve_forever, name=f"demo-model:{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket; idempotent."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self.server_close()


def serve(
    port: int,
    host: str = "127.0.0.1",
    *,
    model: DigitsModel | None = None,
    verbose: bool = False,
) -> ModelServer:
    """Serve the model on host:port (0 picks a free port) from a background thread."""
    return ModelServer((host, port), model or load_model(), verbose=verbose).start()


def reference_csv(model: DigitsModel) -> str:
    """The demo ExtractionPolicy's reference data (policies/digits-reference.csv): the
    model's training split, pixel values as integers, and the model's own predicted class
    on each row as the ``label`` column (``labelColumn: label``)."""
    lines = [",".join([*(f"p{i}" for i in range(N_FEATURES)), "label"])]
    for row, label in zip(model.train_X, model.predict(model.train_X), strict=True):
        lines.append(",".join([*(str(int(v)) for v in row), str(int(label))]))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m controlplane.local.model", description="modelguard demo model API"
    )
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="always train at start-up")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    parser.add_argument("--write-reference", metavar="PATH", help="write the reference CSV, exit")
    args = parser.parse_args(argv)
    if args.write_reference:
        Path(args.write_reference).write_text(reference_csv(load_model(args.seed)))
        return 0

    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    model = load_model(args.seed, use_cache=not args.no_cache)
    server = serve(args.port, args.host, model=model, verbose=args.verbose)
    print(
        f"demo model {model.name} ready on {server.url} (test accuracy {model.accuracy():.3f})",
        flush=True,
    )
    try:
        while not stopping.wait(0.5):
            pass
    finally:
        server.stop()
    print("demo model stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
