"""A second victim model (not digits) and a monitor-only harness, for the benchmark and tests.

``BreastCancerModel``: scikit-learn's bundled breast-cancer data (569 x 30, nothing
downloaded), a standardising logistic regression trained on a stratified 75% split;
``wine_model`` the same on the bundled wine data (178 x 13, 3 classes). It is
served by ``serve`` (a tiny standard-library HTTP server) with the demo's request and
response shapes: ``POST /v1/predict {"instances": [[30 numbers]]}`` →
``{"predictions": [{"label", "probabilities"}]}``.

``drive`` feeds client streams straight into an ``ExtractionMonitor`` (batches of 8
queries per client, as the benchmark's harness reports them, clients interleaved) and
returns when each client was throttled and quarantined: fast enough to run dozens of
clients in a unit test.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

Predictor = Callable[[np.ndarray], np.ndarray]


@dataclass
class BreastCancerModel:
    train_X: np.ndarray
    train_y: np.ndarray
    test_X: np.ndarray
    test_y: np.ndarray
    pipeline: Any
    name: str = "breast-cancer-logreg"

    def predict_proba(self, X: Any) -> np.ndarray:
        result: np.ndarray = self.pipeline.predict_proba(np.asarray(X, dtype=np.float64))
        return result

    def predict(self, X: Any) -> np.ndarray:
        return self.predict_proba(X).argmax(axis=1)


def breast_cancer_model(seed: int = 0) -> BreastCancerModel:
    from sklearn.datasets import load_breast_cancer

    return _logistic(load_breast_cancer, "breast-cancer-logreg", seed)


def wine_model(seed: int = 0) -> BreastCancerModel:
    """A third model: scikit-learn's bundled wine data (178 x 13, 3 classes), the same
    standardising logistic regression. Its inputs' scales differ by four orders of
    magnitude (proline ~750, hue ~1), and its reference is small (133 rows)."""
    from sklearn.datasets import load_wine

    return _logistic(load_wine, "wine-logreg", seed)


def _logistic(load: Callable[..., Any], name: str, seed: int) -> BreastCancerModel:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = load(return_X_y=True)
    train_X, test_X, train_y, test_y = train_test_split(
        X, y, test_size=0.25, stratify=y, random_state=seed
    )
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    pipeline.fit(train_X, train_y)
    return BreastCancerModel(train_X, train_y, test_X, test_y, pipeline, name)


def reference_csv(X: np.ndarray, labels: np.ndarray, names: Any = None) -> str:
    """Reference rows with the model's own class in a ``label`` column: its number, or
    its name (``names[class]``, e.g. scikit-learn's ``target_names``)."""
    lines = [",".join([*(f"f{i}" for i in range(X.shape[1])), "label"])]
    for row, label in zip(X, labels, strict=True):
        shown = str(int(label)) if names is None else str(names[int(label)])
        lines.append(",".join([*(repr(float(v)) for v in row), shown]))
    return "\n".join(lines) + "\n"


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        try:
            X = np.asarray(json.loads(body)["instances"], dtype=np.float64)
            P = self.server.predict_proba(X)
            out = {"predictions": [
                {"label": int(p.argmax()), "probabilities": p.tolist()} for p in P
            ]}
            status = 200
        except (ValueError, KeyError, TypeError) as err:
            out, status = {"error": str(err)}, 400
        data = json.dumps(out).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, predict_proba: Predictor) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.predict_proba = predict_proba
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def serve(predict_proba: Predictor) -> _Server:
    """A model API on a free loopback port, until ``stop()``."""
    return _Server(predict_proba)


# --- attacks on any tabular model ----------------------------------------------------------------


def uniform_box(rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, n: int) -> np.ndarray:
    """Uniform noise over the features' documented ranges (also the equation-solving
    queries of Tramèr et al.: random points, then a linear solve on the log-odds)."""
    return rng.uniform(lo, hi, size=(n, len(lo)))


# --- the monitor-only harness --------------------------------------------------------------------


@dataclass
class Outcome:
    name: str
    sent: int = 0
    throttled_at: int | None = None
    quarantined_at: int | None = None
    alerts: int = 0
    detectors: set[str] = field(default_factory=set)


def answer_with_scores(p: np.ndarray) -> dict[str, Any]:
    """One row's answer as the demo model gives it: its label and its probabilities."""
    return {"label": int(p.argmax()), "probabilities": p.tolist()}


def drive(
    monitor: Any,
    policy: str,
    predict_proba: Predictor,
    streams: Iterable[tuple[str, np.ndarray]],
    batch: int = 8,
    stop_at_quarantine: bool = True,
    answer: Callable[[np.ndarray], Any] = answer_with_scores,
) -> dict[str, Outcome]:
    """Feed each client's stream into the monitor, batches interleaved round-robin;
    ``answer`` makes a row's entry of ``predictions`` from the model's probabilities."""
    from controlplane.extraction.verdicts import digest
    from controlplane.gen.modelguard.feed.v1 import feed_pb2

    queue = [(name, np.asarray(X, dtype=np.float64)) for name, X in streams]
    outcomes = {name: Outcome(name) for name, _ in queue}
    # Verdicts name a header key by its digest (never the key): map them back.
    by_digest = {digest(name): outcomes[name] for name in outcomes}
    position = dict.fromkeys(outcomes, 0)
    seen_verdicts = 0
    while True:
        live = [(n, X) for n, X in queue if position[n] < len(X)
                and not (stop_at_quarantine and outcomes[n].quarantined_at is not None)]
        if not live:
            break
        for name, X in live:
            rows = X[position[name] : position[name] + batch]
            position[name] += len(rows)
            P = predict_proba(rows)
            feed = feed_pb2.FeedBatch(node_id="sim", policy=policy)
            for row, p in zip(rows, P, strict=True):
                feed.queries.add(
                    client_key=name, status=200,
                    request_body=json.dumps({"instances": [row.tolist()]}).encode(),
                    response_body=json.dumps({"predictions": [answer(p)]}).encode(),
                )
            monitor.report(feed)
            outcomes[name].sent = position[name]
            verdicts = monitor.sink.verdicts
            for v in verdicts[seen_verdicts:]:
                o = outcomes.get(v.client.key) or by_digest.get(v.client.key)
                if o is None:
                    continue
                o.detectors.update(e.detector for e in v.evidence)
                if v.action == "alert":
                    o.alerts += 1
                elif v.stage == "suspicion" and o.throttled_at is None:
                    o.throttled_at = o.sent
                elif v.stage == "detection" and o.quarantined_at is None:
                    o.quarantined_at = o.sent
            seen_verdicts = len(verdicts)
    return outcomes


def cancer_scenario(model: BreastCancerModel) -> list[Any]:
    """The breast-cancer model's clients: off-distribution attacks over the features'
    documented ranges, natural in-distribution extraction, and benign users from its test
    split (calibration's generators with other seeds, and the held-out ones)."""
    from attacks import Spec, fixed, interleaved, round2_specs

    from controlplane.extraction import calibrate as C

    pool = model.test_X.astype(np.float32)
    lo, hi = model.train_X.min(axis=0), model.train_X.max(axis=0)
    classes = model.predict(pool).astype(np.int16)
    clusters = C.kmeans(pool, 8, 1)

    def box(rng: np.random.Generator, n: int) -> Any:
        return fixed(uniform_box(rng, lo, hi, n))

    def pool_fixed(fn: Any) -> Any:
        return lambda rng, n: fixed(fn(rng, pool, n))

    return [
        Spec("equation-solving (uniform, Tramèr)", "attack", 1, box, 1000),
        Spec("uniform random", "attack", 1, box, 1000),
        Spec("in-distribution", "attack", 1,
             lambda rng, n: fixed(pool[rng.integers(0, len(pool), n)]), 1000),
        Spec("uniform split over 4 keys", "attack", 4, box, 1000),
        Spec("uniform interleaved with benign", "attack", 1, interleaved(box, pool), 1000),
        *[Spec(f"benign iid #{i}", "benign", 1, pool_fixed(C.iid_user), 143) for i in range(5)],
        *[Spec(f"benign heavy #{i}", "benign", 1, pool_fixed(C.heavy_user), 1000)
          for i in range(3)],
        *[Spec(f"benign what-if #{i}", "benign", 1, pool_fixed(C.whatif_user), 300)
          for i in range(4)],
        *[Spec(f"benign local (LIME-style) #{i}", "benign", 1, pool_fixed(C.local_user), 600)
          for i in range(4)],
        *[Spec(f"benign single class #{i}", "benign", 1,
               lambda rng, n: fixed(C.segment_user(rng, pool, n, classes)), 300)
          for i in range(4)],
        *[Spec(f"held-out sweep #{i}", "held-out", 1, pool_fixed(C.sweep_user), 300)
          for i in range(4)],
        *[Spec(f"held-out SHAP-style #{i}", "held-out", 1, pool_fixed(C.shap_user), 600)
          for i in range(4)],
        *[Spec(f"held-out cluster #{i}", "held-out", 1,
               lambda rng, n: fixed(C.segment_user(rng, pool, n, clusters)), 300)
          for i in range(4)],
        *round2_specs(pool, model.predict),
    ]


# --- a calibrated monitor, without a control plane -----------------------------------------------

MONITOR_POLICY = """\
apiVersion: modelguard.io/v1alpha1
kind: ExtractionPolicy
metadata: {{name: m, namespace: demo}}
spec:
  targetRef: {{service: m}}
  clientKey: {{header: x-api-key}}
  request: {{features: "$.instances[*]"}}
  response: {response}
  detection:
    detectors: [prada, nearDuplicate, outOfDistribution, coverage]
    reference: {{file: {reference}, labelColumn: label}}
  actions:
    onSuspicion: {{throttle: {{requests: 60, per: minute}}}}
    onDetection: {{quarantine: {{duration: 24h}}}}
"""
SCORES_RESPONSE = '{scores: "$.predictions[*].probabilities"}'


def calibrated_monitor(reference: Any, cache: Any, response: str = SCORES_RESPONSE) -> Any:
    """An ExtractionMonitor for one policy (``medium``, throttle then 24 h quarantine) whose
    profile the control plane's own ProfileBook calibrated from ``reference`` (a CSV with
    a ``label`` column), cached in ``cache``; verdicts kept in memory (``monitor.sink``).
    Its policy key is ``demo/m``; ``response`` its ``spec.response``."""
    from controlplane.api import parse_documents
    from controlplane.extraction.feed import ProfileBook
    from controlplane.extraction.monitor import ExtractionMonitor, WatchedPolicy
    from controlplane.extraction.verdicts import InMemoryVerdictSink, VerdictStore

    text = MONITOR_POLICY.format(reference=reference, response=response)
    loaded, found = parse_documents(text, "bench")
    if found:
        raise ValueError(found)
    policies = [lp.policy for lp in loaded]
    book = ProfileBook(cache)
    watched = WatchedPolicy.of(policies[0])  # type: ignore[arg-type]
    if watched is None:
        raise ValueError("not a watched policy")
    book(watched)  # starts the calibration (off this thread), or reads the cache
    if not book.wait(watched.key, 600):
        raise RuntimeError("calibration did not end within 600 s")
    condition = book.conditions()[watched.key]
    if condition.status != "True":
        raise RuntimeError(f"calibration failed: {condition}")
    return ExtractionMonitor(lambda: policies, VerdictStore(), InMemoryVerdictSink(), profile=book)
