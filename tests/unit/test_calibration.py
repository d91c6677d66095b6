"""Per-policy calibration: the benign generators, the content-hash cache, the profile book
(Calibrated condition, restarts, failures), reference-free defaults, several policies of
different dimensions in one monitor."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from controlplane.api import parse_documents
from controlplane.api.reference import ReferenceData, load_file, parse
from controlplane.extraction import calibrate as C
from controlplane.extraction.detectors import Reference
from controlplane.extraction.feed import ProfileBook
from controlplane.extraction.monitor import ExtractionMonitor, WatchedPolicy
from controlplane.extraction.verdicts import InMemoryVerdictSink, VerdictStore

ROOT = Path(__file__).resolve().parents[2]
FAST = C.Settings(per_kind=2)

POLICY = """\
apiVersion: modelguard.io/v1alpha1
kind: ExtractionPolicy
metadata: {{name: {name}, namespace: demo}}
spec:
  targetRef: {{service: {name}}}
  clientKey: {{header: x-api-key}}
  request: {{features: "$.instances[*]"}}
  response: {{scores: "$.predictions[*].probabilities"}}
  detection: {detection}
"""


def csv_bytes(n: int = 300, d: int = 6, seed: int = 0) -> bytes:
    X = np.random.default_rng(seed).normal(size=(n, d)).round(4)
    labels = (X[:, 0] > 0).astype(int)
    return ("\n".join(",".join([*map(str, r), str(y)]) for r, y in zip(X, labels, strict=True))
            + "\n").encode()


def watched(tmp_path: Path, name: str, detection: str) -> WatchedPolicy:
    path = tmp_path / f"{name}.yaml"
    path.write_text(POLICY.format(name=name, detection=detection))
    loaded, found = parse_documents(path.read_text(), str(path))
    assert not found, found
    w = WatchedPolicy.of(loaded[0].policy)  # type: ignore[arg-type]
    assert w is not None
    return w


# --- generators ---------------------------------------------------------------------------------


def test_generators_stay_near_their_inputs_and_in_their_segment() -> None:
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(200, 10)).astype(np.float32)
    local = C.local_user(rng, pool, 500)
    assert local.shape == (500, 10)
    # One or two bases; every query differs from its nearest base in 1 to 4 inputs.
    base_rows = [b for b in pool if np.sum(np.any(np.isclose(local, b), axis=0)) > 5]
    assert 1 <= len(base_rows) <= 2
    changed = np.min([np.sum(~np.isclose(local, b, atol=1e-7), axis=1) for b in base_rows], axis=0)
    assert changed.min() >= 1 and changed.max() <= 4
    segments = (pool[:, 0] > 0).astype(np.int16)
    one = C.segment_user(rng, pool, 50, segments)
    rows = [int(np.argmin(np.abs(pool - r).sum(1))) for r in one]
    assert len({int(s) for s in segments[rows]}) == 1
    shap = C.shap_user(rng, pool, 300)
    # The instance: each input's most frequent value (each query changes at most 4 of 10).
    x0 = np.array([max(set(col.tolist()), key=col.tolist().count) for col in shap.T])
    assert np.sum(~np.isclose(shap, x0), axis=1).max() <= 4
    sweep = C.sweep_user(rng, pool, 60)
    assert sweep.shape == (60, 10)
    kinds = [kind for kind, _ in C.benign_clients(rng, pool, 1, (pool, segments))]
    assert kinds == list(C.CALIBRATION_KINDS)
    held = [kind for kind, _ in C.held_out_clients(rng, pool, 1, segments)]
    assert held == list(C.HELD_OUT_KINDS) and not set(held) & set(kinds)


# --- cache and profile book ----------------------------------------------------------------------


def test_profiles_are_cached_by_content_hash_and_not_recalibrated(tmp_path: Path) -> None:
    data = parse(csv_bytes(), "ref.csv", -1)
    started = time.monotonic()
    first, cached = C.cached_profile("a", data, tmp_path, FAST, -1)
    assert not cached
    took = time.monotonic() - started
    (path,) = tmp_path.glob("*.json")
    second, cached = C.cached_profile("b", data, tmp_path, FAST, -1)
    assert cached and second.name == "b"
    for s in C.SENSITIVITIES:
        assert second.thresholds[s] == pytest.approx(first.thresholds[s])
    assert second.held_out is not None and first.held_out is not None
    assert len(second.held_out) == len(first.held_out)
    assert took > 0
    # Anything that changes the profile changes the key: bytes, settings, label column,
    # the calibration code's version.
    keys = {
        C.cache_key(data, FAST, -1),
        C.cache_key(parse(csv_bytes(seed=1), "ref.csv", -1), FAST, -1),
        C.cache_key(data, C.Settings(per_kind=3), -1),
        C.cache_key(data, FAST, None),
    }
    assert len(keys) == 4 and path.stem == C.cache_key(data, FAST, -1)
    payload = json.loads(path.read_text())
    assert payload["calibration"]["version"] == C.VERSION
    assert payload["calibration"]["reference_sha256"] == data.digest


def test_the_book_reports_calibrated_and_a_restart_reads_the_cache(tmp_path: Path) -> None:
    (tmp_path / "ref.csv").write_bytes(csv_bytes())
    policy = watched(tmp_path, "m", "{reference: {file: ref.csv, labelColumn: -1}}")
    book = ProfileBook(tmp_path / "profiles", FAST)
    interim = book(policy)
    assert interim is not None and interim.reference is None  # prada/nearDuplicate meanwhile
    assert book.conditions()["demo/m"].reason in ("Pending", "Calibrating", "Calibrated")
    assert book.wait("demo/m", 120)
    condition = book.conditions()["demo/m"]
    assert (condition.status, condition.reason) == ("True", "Calibrated"), condition
    assert "calibrated in" in condition.message
    profile = book(policy)
    assert profile is not None and profile.reference is not None and profile.dim == 6
    book.close()
    again = ProfileBook(tmp_path / "profiles", FAST)  # a restart
    again(policy)
    assert again.wait("demo/m", 60)
    assert again.conditions()["demo/m"].message.startswith("from cache")
    again.close()


def test_failures_and_policies_without_reference(tmp_path: Path) -> None:
    book = ProfileBook(None, FAST)
    plain = watched(tmp_path, "plain", "{sensitivity: medium}")
    profile = book(plain)
    assert profile is not None and profile.reference is None
    assert (book.conditions()["demo/plain"].status,
            book.conditions()["demo/plain"].reason) == ("False", "NoReference")
    cm = watched(tmp_path, "cm", "{reference: {configMap: {name: ref, key: ref.csv}}}")
    book(cm)
    assert book.wait("demo/cm", 30)
    failed = book.conditions()["demo/cm"]
    assert (failed.status, failed.reason) == ("False", "Failed")
    assert "cluster mode" in failed.message
    # In cluster mode the ConfigMap's bytes are read like a file's.
    book.configmaps = lambda ns, name, key: csv_bytes() if (ns, name) == ("demo", "ref") else b""
    cm2 = watched(tmp_path, "cm2", "{reference: {configMap: {name: ref, key: ref.csv}}}")
    book(cm2)
    assert book.wait("demo/cm2", 120)
    assert book.conditions()["demo/cm2"].status == "True"
    book.close()


# --- reference-free and several dimensions -------------------------------------------------------


def test_reference_free_defaults_hold_over_the_calibration_generators() -> None:
    """The documented defaults stay above what benign generators reach on both bundled data
    sets (REFERENCE_FREE is 1.25 x those maxima)."""
    from bench.extraction.models import breast_cancer_model, reference_csv

    model = breast_cancer_model(0)
    datasets = [
        load_file(ROOT / "policies" / "digits-reference.csv", "label"),
        parse(reference_csv(model.train_X, model.predict(model.train_X)).encode(), "b.csv",
              "label"),
    ]
    probe = C.reference_free("x").thresholds["medium"]
    for data in datasets:
        parts = C.split(data, 0)
        ref = Reference.fit(parts.reference)
        rng = np.random.default_rng(3)
        for _, X in C.benign_clients(rng, parts.held_out, 3, parts.segments):
            best = C.stream_maxima(X, parts.labeller(X), ref, probe)
            assert best["prada"] < C.REFERENCE_FREE["prada"]
            assert best["nearDuplicate"] < C.REFERENCE_FREE["nearDuplicate"]


def test_policies_of_different_dimensions_get_their_own_profiles(tmp_path: Path) -> None:
    from controlplane.gen.modelguard.feed.v1 import feed_pb2

    (tmp_path / "six.csv").write_bytes(csv_bytes(d=6))
    (tmp_path / "three.csv").write_bytes(csv_bytes(d=3, seed=2))
    texts = [
        POLICY.format(name="six", detection="{reference: {file: six.csv, labelColumn: -1}}"),
        POLICY.format(name="three", detection="{reference: {file: three.csv, labelColumn: -1}}"),
        POLICY.format(name="free", detection="{sensitivity: medium}"),
    ]
    (tmp_path / "p.yaml").write_text("---\n".join(texts))
    loaded, found = parse_documents((tmp_path / "p.yaml").read_text(), str(tmp_path / "p.yaml"))
    assert not found
    policies = [lp.policy for lp in loaded]
    book = ProfileBook(None, FAST)
    monitor = ExtractionMonitor(lambda: policies, VerdictStore(), InMemoryVerdictSink(),
                                profile=book)
    monitor.warm_profiles()
    assert book.wait("demo/six", 120) and book.wait("demo/three", 120)
    rng = np.random.default_rng(0)
    for name, d in (("six", 6), ("three", 3), ("free", 5)):
        batch = feed_pb2.FeedBatch(node_id="n", policy=f"demo/{name}")
        for row in rng.normal(size=(8, d)):
            batch.queries.add(client_key="c", status=200,
                              request_body=json.dumps({"instances": [row.tolist()]}).encode())
        assert monitor.report(batch) == 8, name
    assert monitor.stats.unparsable.get("dimension", 0) == 0
    dims = {key[0]: tracked.state.dim for key, tracked in monitor._clients.items()}
    assert dims == {"demo/six": 6, "demo/three": 3, "demo/free": 5}
    assert book(WatchedPolicy.of(policies[0])).dim == 6  # type: ignore[arg-type, union-attr]
    book.close()


def test_nothing_under_extraction_imports_the_demo_model() -> None:
    for path in (ROOT / "controlplane" / "extraction").glob("*.py"):
        assert not re.search(r"controlplane\.local\b", path.read_text()), path.name


def test_the_demo_reference_is_the_models_training_split() -> None:
    from controlplane.local.model import load_model, reference_csv

    data = load_file(ROOT / "policies" / "digits-reference.csv", "label")
    model = load_model(0)
    np.testing.assert_allclose(data.X, model.train_X, rtol=0, atol=0)  # integer pixels
    assert data.answers is not None
    agree = (data.answers == model.predict(model.train_X)).mean()
    assert agree > 0.999  # the model's own classes (a tie could round either way)
    assert reference_csv(model).splitlines()[0] == (ROOT / "policies" / "digits-reference.csv"
                                                    ).read_text().splitlines()[0]


def test_reference_data_keeps_answers_with_their_rows() -> None:
    data = ReferenceData(np.zeros((4, 2), dtype=np.float32), np.arange(4.0))
    assert data.dim == 2
