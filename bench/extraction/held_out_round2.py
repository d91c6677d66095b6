"""Held-out benign generators, round 2 (``controlplane/extraction/held_out.py``), through the
monitor (monitor-only, as ``tests/unit/test_false_quarantines.py`` drives it) on three
models, each with the profile the control plane calibrates from its reference data:
digits (64 features), breast cancer (30), wine (13, 3 classes). Default ``medium``
sensitivity, throttle 60/minute, quarantine 24 h. Per client: when it was throttled and
quarantined (queries), and by which detectors. Uniform-noise attackers run on every model
beside them (the wine model has no other attack test).

    .venv/bin/python bench/extraction/held_out_round2.py            # ~1 min on 2 busy cores
    .venv/bin/python bench/extraction/held_out_round2.py --models wine --per-kind 4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.extraction.models import (  # noqa: E402
    breast_cancer_model,
    calibrated_monitor,
    drive,
    reference_csv,
    uniform_box,
    wine_model,
)
from controlplane.extraction.held_out import round2_clients  # noqa: E402

MODELS = ("digits", "cancer", "wine")


def model_and_reference(name: str, folder: Path) -> tuple[Any, Path, tuple[int, int] | None]:
    if name == "digits":
        from controlplane.local.model import load_model

        return load_model(0), ROOT / "policies" / "digits-reference.csv", (8, 8)
    model = breast_cancer_model(0) if name == "cancer" else wine_model(0)
    reference = folder / f"{name}-reference.csv"
    reference.write_text(reference_csv(model.train_X, model.predict(model.train_X)))
    return model, reference, None


def run(name: str, per_kind: int, seed: int, attacks: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model, reference, image = model_and_reference(name, folder)
        started = time.monotonic()
        monitor = calibrated_monitor(reference, folder / "profiles")
        print(f"{name}: calibrated in {time.monotonic() - started:.1f} s", file=sys.stderr)
        rng = np.random.default_rng(seed)
        pool = np.asarray(model.test_X, dtype=np.float32)

        def labels(X: np.ndarray) -> np.ndarray:
            return np.asarray(model.predict(X))

        streams = list(round2_clients(rng, pool, per_kind, labels, image))
        lo, hi = model.train_X.min(axis=0), model.train_X.max(axis=0)
        streams += [(f"attack-uniform-{i}", uniform_box(rng, lo, hi, 600)) for i in range(attacks)]
        outcomes = drive(monitor, "demo/m", model.predict_proba, streams)
    return [
        {"model": name, "client": o.name, "kind": o.name.rsplit("-", 1)[0], "sent": o.sent,
         "throttled_at": o.throttled_at, "quarantined_at": o.quarantined_at,
         "detectors": sorted(o.detectors)}
        for o in outcomes.values()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--per-kind", type=int, default=3)
    parser.add_argument("--seed", type=int, default=2027)
    parser.add_argument("--attacks", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        rows += run(name, args.per_kind, args.seed, args.attacks)
    by_kind: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_kind[(row["model"], row["kind"])].append(row)
    print("| model | kind | clients | throttled (at) | quarantined (at) | detectors |")
    print("| --- | --- | ---: | --- | --- | --- |")
    for (model, kind), group in by_kind.items():
        def at(key: str, group: list[dict[str, Any]] = group) -> str:
            hits = [str(r[key]) for r in group if r[key] is not None]
            return f"{len(hits)}" + (f" ({', '.join(hits)})" if hits else "")

        found = sorted({d for r in group for d in r["detectors"]})
        print(f"| {model} | {kind} | {len(group)} | {at('throttled_at')} | "
              f"{at('quarantined_at')} | {', '.join(found) or '-'} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
