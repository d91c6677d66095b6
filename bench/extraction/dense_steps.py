"""Per-stream maxima of ``denseSteps`` (issue 13 follow-up), monitor-free: each stream is
folded into a ``ClientState`` with its model's calibrated profile, 8 queries at a time (the
calibration's grain), and the statistic's maximum and first crossing of the medium
threshold are printed per generator. Benign: the calibration's generators (other seeds) and
the held-out ones; attacks: Jacobian augmentation, alone and interleaved, answered by the
model itself.

    .venv/bin/python bench/extraction/dense_steps.py      # ~1 min
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from attacks import interleaved, jacobian

from bench.extraction.models import breast_cancer_model, reference_csv
from controlplane.api.reference import load_file
from controlplane.extraction import calibrate as C
from controlplane.extraction.calibrate import BATCH, cached_profile
from controlplane.extraction.detectors import ClientState
from controlplane.local.model import load_digits_data, load_model


def answered(model: Any, make: Any, rng: np.random.Generator, n: int) -> np.ndarray:
    client = make(rng, n)
    out: list[np.ndarray] = []
    rows = next(client)
    while True:
        out.extend(rows)
        answer = [dict(enumerate(p.tolist())) for p in model.predict_proba(np.asarray(rows))]
        try:
            rows = client.send(answer)
        except StopIteration:
            return np.asarray(out)[:n]


def maximum(model: Any, profile: Any, X: np.ndarray) -> tuple[float, int | None]:
    thresholds = profile.thresholds["medium"]
    state = ClientState(dim=profile.reference.dim)
    best, first = 0.0, None
    labels = model.predict(X).astype(np.int16)
    for start in range(0, len(X), BATCH):
        rows = slice(start, start + BATCH)
        state.observe(X[rows].astype(np.float32), labels[rows], profile.reference, thresholds)
        value = state.statistic("denseSteps", thresholds)
        if value is not None:
            best = max(best, value)
            if first is None and value >= thresholds.dense_steps:
                first = state.queries
    return best, first


def report(name: str, model: Any, profile: Any, extra: list[tuple[str, np.ndarray]],
           attacks: list[tuple[str, Any]]) -> None:
    print(f"== {name}: denseSteps threshold (medium) "
          f"{profile.thresholds['medium'].dense_steps:.3f}, calibration benign maximum "
          f"{profile.calibration['benign_maxima']['denseSteps']}")
    pool = model.test_X.astype(np.float32)
    classes = model.predict(pool).astype(np.int16)
    clusters = C.kmeans(pool, 8, 1)
    rng = np.random.default_rng(5)
    kinds: dict[str, list[tuple[float, int | None]]] = {}
    for _ in range(10):
        for kind, X in [
            ("iid", C.iid_user(rng, pool, 400)),
            ("heavy", C.heavy_user(rng, pool, 1500)),
            ("whatif", C.whatif_user(rng, pool, 400)),
            ("local", C.local_user(rng, pool, 1500)),
            ("segment", C.segment_user(rng, pool, 400, classes)),
            ("held-out sweep", C.sweep_user(rng, pool, 300)),
            ("held-out shap", C.shap_user(rng, pool, 2000)),
            ("held-out cluster", C.segment_user(rng, pool, 400, clusters)),
        ]:
            kinds.setdefault(kind, []).append(maximum(model, profile, X))
    for kind, X in extra:
        kinds.setdefault(kind, []).append(maximum(model, profile, X))
    for kind, make in attacks:
        for i in range(5):
            X = answered(model, make, np.random.default_rng(300 + i), 1000)
            kinds.setdefault(kind, []).append(maximum(model, profile, X))
    for kind, values in kinds.items():
        firsts = sorted(f for _, f in values if f is not None)
        print(f"  {kind:28s} n={len(values):2d} max {max(b for b, _ in values):6.2f}  "
              f"over threshold {len(firsts)}/{len(values)}  first at {firsts}")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        digits = load_model(0)
        reference = Path(__file__).resolve().parents[2] / "policies" / "digits-reference.csv"
        profile = cached_profile("digits", load_file(reference, "label"), cache,
                                 label_column="label")[0]
        X, y = load_digits_data()
        pool = digits.test_X
        report("digits", digits, profile,
               [("held-out sklearn class", X[y == c]) for c in range(10)],
               [("jacobian", jacobian(pool)),
                ("jacobian interleaved", interleaved(jacobian(pool), pool))])
        cancer = breast_cancer_model(0)
        path = cache / "cancer.csv"
        path.write_text(reference_csv(cancer.train_X, cancer.predict(cancer.train_X)))
        profile = cached_profile("cancer", load_file(path, "label"), cache,
                                 label_column="label")[0]
        report("breast cancer", cancer, profile, [], [])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
