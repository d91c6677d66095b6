"""Uniform noise diluted with natural digits (one query in 2, 3, 4, 6 is noise; 1,200 queries,
two clients each), driven into a monitor with the digits' calibrated profile: when each is
throttled and quarantined. What the effect conditions of ``monitor._decisive`` cost.

    .venv/bin/python bench/extraction/diluted_noise.py      # ~1 min
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.extraction.models import calibrated_monitor, drive, uniform_box  # noqa: E402
from controlplane.local.model import load_model  # noqa: E402

model = load_model(0)
monitor = calibrated_monitor(ROOT / "policies" / "digits-reference.csv", Path(tempfile.mkdtemp()))
rng = np.random.default_rng(5)
pool = model.test_X
lo, hi = np.zeros(64), np.full(64, 16.0)
streams = []
for every in (2, 3, 4, 6):
    for i in range(2):
        X = pool[rng.integers(0, len(pool), 1200)].astype(float)
        X[::every] = uniform_box(rng, lo, hi, len(X[::every])).round(2)
        streams.append((f"noise-1-in-{every}-{i}", X))
outcomes = drive(monitor, "demo/m", model.predict_proba, streams)
for name, o in outcomes.items():
    print(name, "throttled at", o.throttled_at, "quarantined at", o.quarantined_at,
          sorted(o.detectors))
