"""No false quarantines, attacks still caught: many clients driven straight into the monitor
with each model's own calibrated profile (digits; breast cancer, 30 features).

Benign clients include the calibration's generators with other seeds and the HELD-OUT
generators calibration never saw (feature sweeps, SHAP-style coalitions, cluster segments),
and real data: scikit-learn's own digit images of one class, one by one. Attacks are the
benchmark's off-distribution ones; their thresholds were never set on them.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.extraction.models import (
    Outcome,
    breast_cancer_model,
    calibrated_monitor,
    drive,
    reference_csv,
    uniform_box,
)
from controlplane.extraction import calibrate as C
from tests.conftest import DIGITS_REFERENCE

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "extraction"))

def benign(rng: np.random.Generator, pool: np.ndarray, classes: np.ndarray, n: int
           ) -> Iterator[tuple[str, np.ndarray]]:
    pool = pool.astype(np.float32)
    clusters = C.kmeans(pool, 8, 1)
    for i in range(n):
        yield f"iid-{i}", C.iid_user(rng, pool, 300)
        yield f"heavy-{i}", C.heavy_user(rng, pool, 1000)
        yield f"whatif-{i}", C.whatif_user(rng, pool, 300)
        yield f"local-{i}", C.local_user(rng, pool, 1000)
        yield f"class-{i}", C.segment_user(rng, pool, 300, classes.astype(np.int16))
        # Held out of calibration.
        yield f"held-sweep-{i}", C.sweep_user(rng, pool, 300)
        yield f"held-shap-{i}", C.shap_user(rng, pool, 1000)
        yield f"held-cluster-{i}", C.segment_user(rng, pool, 300, clusters)


def quarantined(outcomes: dict[str, Outcome], prefix: str = "") -> list[str]:
    return [n for n, o in outcomes.items() if o.quarantined_at is not None and n.startswith(prefix)]


def median_detection(outcomes: dict[str, Outcome], prefix: str) -> float:
    found = [o.quarantined_at for n, o in outcomes.items() if n.startswith(prefix)]
    assert found and all(q is not None for q in found), (prefix, found)
    return float(statistics.median(q for q in found if q is not None))


# --- digits --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(profile_cache: Callable[[Path], Path], tmp_path_factory: pytest.TempPathFactory
           ) -> Any:
    from controlplane.local.model import load_model

    state = tmp_path_factory.mktemp("digits-state")
    return load_model(0), calibrated_monitor(DIGITS_REFERENCE, profile_cache(state))


def test_digits_local_exploration_and_single_class_clients_are_never_quarantined(digits) -> None:  # type: ignore[no-untyped-def]
    from controlplane.local.model import load_digits_data

    model, monitor = digits
    rng = np.random.default_rng(2026)
    streams = list(benign(rng, model.test_X, model.predict(model.test_X), 2))
    # Real images, not simulations: scikit-learn's own digits of one class, one by one
    # (many of them the model's training images). Issue 13: class 1 was quarantined at 83.
    X, y = load_digits_data()
    streams += [(f"sklearn-class-{c}", X[y == c]) for c in range(10)]
    outcomes = drive(monitor, "demo/m", model.predict_proba, streams)
    assert quarantined(outcomes) == []
    assert outcomes["sklearn-class-1"].throttled_at is None
    # Local explorers are not even throttled: their only evidence alerts.
    assert [n for n, o in outcomes.items() if n.startswith("local") and o.throttled_at] == []


def answered(make: Callable[..., Any], rng: np.random.Generator, n: int,
             predict_proba: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """An adaptive attack's query stream, run against the model's own answers (the
    monitor's hardening keeps the top-1 class, all these attacks use)."""
    client = make(rng, n)
    out: list[np.ndarray] = []
    try:
        rows = next(client)
        while True:
            out.extend(rows)
            answer = [dict(enumerate(p.tolist())) for p in predict_proba(np.asarray(rows))]
            rows = client.send(answer)
    except StopIteration:
        pass
    return np.asarray(out[:n])


def jacobian_streams(pool: np.ndarray, predict_proba: Callable[[np.ndarray], np.ndarray]
                     ) -> list[tuple[str, np.ndarray]]:
    """Jacobian augmentation, plain and interleaved with natural digits, three of each
    (bench/extraction/false_quarantine_medians.py reports the same streams' medians)."""
    from attacks import interleaved, jacobian

    rng = np.random.default_rng(13)
    streams: list[tuple[str, np.ndarray]] = []
    for i in range(3):
        streams.append((f"jacobian-plain-{i}", answered(jacobian(pool), rng, 1000, predict_proba)))
        streams.append((f"jacobian-interleaved-{i}",
                        answered(interleaved(jacobian(pool), pool), rng, 1000, predict_proba)))
    return streams


def off_distribution_streams(pool: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Uniform noise, natural out-of-distribution patches, sign steps around a few digits,
    and noise interleaved with natural digits: three of each, on the digits model."""
    from attacks import natural_patches

    rng = np.random.default_rng(7)
    lo, hi = np.zeros(64), np.full(64, 16.0)
    streams: list[tuple[str, np.ndarray]] = []
    for i in range(3):
        streams.append((f"uniform-{i}", uniform_box(rng, lo, hi, 600).round(2)))
        streams.append((f"natural-ood-{i}", natural_patches(rng, 600)))
        seeds = pool[rng.choice(len(pool), 10, replace=False)]
        steps = np.clip(np.repeat(seeds, 60, axis=0) + 1.6 * rng.choice([-1, 1], (600, 64)), 0, 16)
        streams.append((f"sign-steps-{i}", steps[rng.permutation(600)]))
        mixed = np.empty((1000, 64))
        mixed[0::2] = uniform_box(rng, lo, hi, 500).round(2)
        mixed[1::2] = pool[rng.integers(0, len(pool), 500)]
        streams.append((f"interleaved-{i}", mixed))
    return streams


def test_digits_jacobian_augmentation_is_caught_and_explorers_are_not(digits) -> None:  # type: ignore[no-untyped-def]
    """Papernot et al.'s Jacobian-based augmentation: its points are near-duplicates of
    earlier synthetic points, as a local explorer's are of its instance; its steps move
    every pixel (``denseSteps``), an explorer's a few. Issue 13's rule had made it alert-only
    (quarantined at 669 queries; interleaved with natural digits, never within 1,000)."""
    model, monitor = digits
    pool = model.test_X
    streams = jacobian_streams(pool, model.predict_proba)
    # The benign explorers in the same run (held-out ones included): still never quarantined.
    # (Names of their own: the monitor is the module's, and remembers other tests' clients.)
    streams += [(f"j-{name}", X)
                for name, X in benign(np.random.default_rng(31), pool, model.predict(pool), 2)]
    outcomes = drive(monitor, "demo/m", model.predict_proba, streams)
    assert median_detection(outcomes, "jacobian-interleaved") <= 500
    assert median_detection(outcomes, "jacobian-plain") <= 100
    caught = {n for n in outcomes if n.startswith("jacobian")}
    assert set(quarantined(outcomes)) == caught
    assert all("denseSteps" in outcomes[n].detectors for n in caught)


def test_digits_off_distribution_attacks_are_still_caught_fast(digits) -> None:  # type: ignore[no-untyped-def]
    model, monitor = digits
    outcomes = drive(monitor, "demo/m", model.predict_proba, off_distribution_streams(model.test_X))
    for attack in ("uniform", "natural-ood", "sign-steps"):
        assert median_detection(outcomes, attack) <= 100, attack
    assert median_detection(outcomes, "interleaved") <= 500


# --- breast cancer: another model, 30 features ---------------------------------------------------


@pytest.fixture(scope="module")
def cancer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    model = breast_cancer_model(0)
    folder = tmp_path_factory.mktemp("cancer")
    reference = folder / "reference.csv"
    reference.write_text(reference_csv(model.train_X, model.predict(model.train_X)))
    return model, calibrated_monitor(reference, folder / "profiles")


def test_breast_cancer_benign_clients_are_not_quarantined_and_attacks_are(cancer) -> None:  # type: ignore[no-untyped-def]
    model, monitor = cancer
    rng = np.random.default_rng(11)
    streams = list(benign(rng, model.test_X, model.predict(model.test_X), 3))
    lo, hi = model.train_X.min(axis=0), model.train_X.max(axis=0)
    for i in range(5):
        streams.append((f"attack-uniform-{i}", uniform_box(rng, lo, hi, 600)))
        # Equation solving (Tramèr et al.): random points spread over the whole domain, then
        # a linear solve on the answers' log-odds.
        streams.append((f"attack-equation-{i}", uniform_box(rng, lo, hi, 600)))
    outcomes = drive(monitor, "demo/m", model.predict_proba, streams)
    assert quarantined(outcomes, "attack") == [n for n in outcomes if n.startswith("attack")]
    assert median_detection(outcomes, "attack-uniform") <= 100
    assert median_detection(outcomes, "attack-equation") <= 100
    benign_names = [n for n in outcomes if not n.startswith("attack")]
    assert len(benign_names) >= 20
    assert [n for n in benign_names if outcomes[n].quarantined_at is not None] == []
