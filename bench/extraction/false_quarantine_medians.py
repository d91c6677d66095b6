"""The attack streams of ``tests/unit/test_false_quarantines.py`` (same seeds, same order),
driven into a monitor with each model's calibrated profile: the query at which each was
quarantined and the medians, which the test only bounds (≤ 100; interleaved ≤ 500).

    .venv/bin/python bench/extraction/false_quarantine_medians.py      # ~1 min
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench" / "extraction"))

from bench.extraction.models import (  # noqa: E402
    breast_cancer_model,
    calibrated_monitor,
    drive,
    reference_csv,
    uniform_box,
)
from controlplane.local.model import load_model  # noqa: E402
from tests.unit.test_false_quarantines import (  # noqa: E402
    benign,
    jacobian_streams,
    off_distribution_streams,
)


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="modelguard-medians-"))
    model = load_model(0)
    monitor = calibrated_monitor(ROOT / "policies" / "digits-reference.csv", tmp / "digits")
    pool = model.test_X
    streams = jacobian_streams(pool, model.predict_proba) + off_distribution_streams(pool)
    outcomes = drive(monitor, "demo/m", model.predict_proba, streams)
    cancer = breast_cancer_model(0)
    reference = tmp / "cancer.csv"
    reference.write_text(reference_csv(cancer.train_X, cancer.predict(cancer.train_X)))
    cancer_monitor = calibrated_monitor(reference, tmp / "cancer")
    rng = np.random.default_rng(11)
    list(benign(rng, cancer.test_X, cancer.predict(cancer.test_X), 3))  # the test's draws
    lo, hi = cancer.train_X.min(axis=0), cancer.train_X.max(axis=0)
    attacks: list[tuple[str, np.ndarray]] = []
    for i in range(5):
        attacks.append((f"cancer-uniform-{i}", uniform_box(rng, lo, hi, 600)))
        attacks.append((f"cancer-equation-{i}", uniform_box(rng, lo, hi, 600)))
    outcomes.update(drive(cancer_monitor, "demo/m", cancer.predict_proba, attacks))
    groups: dict[str, list[int | None]] = {}
    for name, outcome in outcomes.items():
        groups.setdefault(name.rsplit("-", 1)[0], []).append(outcome.quarantined_at)
    print("| attack | quarantined at | median |")
    print("| --- | --- | ---: |")
    for group, found in groups.items():
        caught = [q if q is not None else 10**6 for q in found]
        median = statistics.median(caught)
        shown = ", ".join("–" if q is None else str(q) for q in found)
        print(f"| {group} | {shown} | {median if median < 10**6 else 'not caught'} |")


if __name__ == "__main__":
    main()
