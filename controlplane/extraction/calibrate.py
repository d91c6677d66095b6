"""Calibrate the detectors' thresholds on benign traffic only, reproducibly.

The procedure (``python -m controlplane.extraction.calibrate`` rewrites the checked-in
profile; same seed, same numbers):

1. Reference = the model's training split. Held-out benign queries = its test split.
2. Per-query cut-offs from held-out queries against the reference: the near-duplicate
   radius is the 1st percentile of natural nearest-neighbour distances; a query is
   "novel" above the 99th percentile of novelty, and the benign novelty rate is measured;
   the residual's benign mean and standard deviation.
3. Benign clients are simulated from the held-out split (never from any attack): i.i.d.
   users (20–400 queries), heavy users (1,000–3,000 queries drawn with replacement, so
   they repeat themselves) and what-if users (a few base records, 1–2 of their 2–4
   editable inputs changed per query, a third of the queries exact repeats). Each client's
   queries are fed through the detectors in batches, and the highest value every statistic
   reaches over the client's whole stream is kept.
4. A detector's threshold is set against those per-client maxima: ``high`` sensitivity is
   their 99th percentile (about 1% of benign clients would be flagged), ``medium`` 25%
   above their maximum (no simulated benign client is flagged), ``low`` 50% above it.

Nothing here looks at an attack: the extraction benchmark (``bench/extraction``) measures
what these thresholds catch.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from controlplane.extraction.detectors import (
    DETECTORS,
    ClientState,
    DetectorName,
    FloatArray,
    Reference,
    Thresholds,
    _sq_distances,
)

PROFILE_DIR = Path(__file__).parent / "profiles"
SENSITIVITIES = ("low", "medium", "high")
MARGIN = {"low": 1.5, "medium": 1.25}
BATCH = 8  # calibrate at a finer grain than sidecars batch: maxima are then conservative


@dataclass(frozen=True)
class Profile:
    """A model's reference distribution and its thresholds per sensitivity."""

    name: str
    reference: Reference
    thresholds: dict[str, Thresholds]
    calibration: dict[str, Any]  # how it was made: seed, client counts, benign maxima

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "name": self.name,
            "thresholds": {k: asdict(v) for k, v in self.thresholds.items()},
            "calibration": self.calibration,
        }
        path.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path, reference: Reference) -> Profile:
        payload = json.loads(path.read_text())
        return cls(
            name=payload["name"],
            reference=reference,
            thresholds={k: Thresholds(**v) for k, v in payload["thresholds"].items()},
            calibration=payload["calibration"],
        )


# --- benign client simulations ---------------------------------------------------------------


def iid_user(rng: np.random.Generator, pool: FloatArray, n: int) -> FloatArray:
    """Someone scoring their own, independent records."""
    idx = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
    return pool[idx]


def heavy_user(rng: np.random.Generator, pool: FloatArray, n: int) -> FloatArray:
    """A batch job scoring many records, some of them again."""
    return pool[rng.integers(0, len(pool), size=n)]


def whatif_user(rng: np.random.Generator, pool: FloatArray, n: int) -> FloatArray:
    """A what-if tool: a few base records, the same few inputs edited, often re-asked."""
    bases = pool[rng.choice(len(pool), size=int(rng.integers(1, 4)), replace=False)]
    editable = rng.choice(pool.shape[1], size=int(rng.integers(2, 5)), replace=False)
    out: list[FloatArray] = []
    for _ in range(n):
        if out and rng.random() < 1 / 3:
            out.append(out[int(rng.integers(0, len(out)))])
            continue
        x = bases[int(rng.integers(0, len(bases)))].copy()
        for feature in rng.choice(editable, size=int(rng.integers(1, 3)), replace=False):
            x[feature] = float(rng.integers(0, 17))
        out.append(x)
    return np.asarray(out, dtype=np.float32)


def benign_clients(
    rng: np.random.Generator, pool: FloatArray, per_kind: int
) -> Iterator[tuple[str, FloatArray]]:
    for _ in range(per_kind):
        yield "iid", iid_user(rng, pool, int(rng.integers(20, 401)))
        yield "heavy", heavy_user(rng, pool, int(rng.integers(1000, 3001)))
        yield "whatif", whatif_user(rng, pool, int(rng.integers(20, 401)))


# --- the procedure ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Cutoffs:
    duplicate_radius: float
    novelty_cut: float
    novelty_rate: float
    residual_mean: float
    residual_std: float

    def thresholds(
        self, prada: float, near_duplicate: float, out_of_distribution: float, coverage: float
    ) -> Thresholds:
        return Thresholds(
            prada=prada,
            near_duplicate=near_duplicate,
            out_of_distribution=out_of_distribution,
            coverage=coverage,
            **asdict(self),
        )


def per_query_cutoffs(reference: Reference, held_out: FloatArray) -> Cutoffs:
    d2 = _sq_distances(held_out, reference.points)
    nearest = np.sqrt(d2.min(axis=1))
    novelty = reference.novelty(held_out)
    cut = float(np.quantile(novelty, 0.99))
    residual = reference.residual(held_out)
    return Cutoffs(
        duplicate_radius=float(np.quantile(nearest[nearest > 0], 0.01)),
        novelty_cut=cut,
        # Never below 1%: a rate measured on a few hundred records is itself uncertain.
        novelty_rate=max(float((novelty > cut).mean()), 0.01),
        residual_mean=float(residual.mean()),
        residual_std=float(residual.std()),
    )


def stream_maxima(
    X: FloatArray,
    labels: npt.NDArray[np.int16],
    reference: Reference,
    thresholds: Thresholds,
) -> dict[DetectorName, float]:
    state = ClientState(dim=reference.dim)
    best: dict[DetectorName, float] = {d: 0.0 for d in DETECTORS}
    for start in range(0, len(X), BATCH):
        batch = slice(start, start + BATCH)
        state.observe(X[batch], labels[batch], reference, thresholds)
        for finding in state.findings(thresholds, DETECTORS):
            best[finding.detector] = max(best[finding.detector], finding.statistic)
    return best


def calibrate(
    name: str,
    train_X: npt.ArrayLike,
    held_out_X: npt.ArrayLike,
    predict: Any,
    *,
    seed: int = 0,
    per_kind: int = 100,
) -> Profile:
    """Thresholds for a model from benign data only; ``predict`` maps rows to labels."""
    reference = Reference.fit(train_X)
    held_out = np.asarray(held_out_X, dtype=np.float32)
    cutoffs = per_query_cutoffs(reference, held_out)
    # The statistics' own thresholds do not influence their values: placeholders.
    probe = cutoffs.thresholds(1.0, 1.0, 1.0, 1.0)
    rng = np.random.default_rng(seed)
    maxima: dict[str, list[float]] = {d: [] for d in DETECTORS}
    kinds: dict[str, int] = {}
    for kind, X in benign_clients(rng, held_out, per_kind):
        kinds[kind] = kinds.get(kind, 0) + 1
        labels = np.asarray(predict(X), dtype=np.int16)
        for detector, value in stream_maxima(X, labels, reference, probe).items():
            maxima[detector].append(value)
    thresholds: dict[str, Thresholds] = {}
    for sensitivity in SENSITIVITIES:
        values: dict[str, float] = {}
        for detector in DETECTORS:
            observed = np.asarray(maxima[detector])
            if sensitivity == "high":
                values[detector] = float(np.quantile(observed, 0.99))
            else:
                values[detector] = float(observed.max()) * MARGIN[sensitivity]
        thresholds[sensitivity] = cutoffs.thresholds(
            prada=min(values["prada"], 0.999),
            near_duplicate=values["nearDuplicate"],
            out_of_distribution=values["outOfDistribution"],
            coverage=values["coverage"],
        )
    calibration = {
        "seed": seed,
        "benign_clients": kinds,
        "batch": BATCH,
        "benign_maxima": {d: round(float(np.max(v)), 6) for d, v in maxima.items()},
        "benign_p99": {d: round(float(np.quantile(v, 0.99)), 6) for d, v in maxima.items()},
        "reference_points": len(reference.points),
        "held_out_points": len(held_out),
    }
    return Profile(name, reference, thresholds, calibration)


# --- the demo model's profile ----------------------------------------------------------------


def digits_reference(seed: int = 0) -> tuple[Reference, Any]:
    from controlplane.local.model import load_model

    model = load_model(seed)
    return Reference.fit(model.train_X), model


def digits_profile(seed: int = 0) -> Profile:
    """The checked-in profile of the demo digits model (thresholds from its JSON file)."""
    reference, model = digits_reference(seed)
    return Profile.load(PROFILE_DIR / f"{model.name}.json", reference)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-kind", type=int, default=100, help="simulated clients per kind")
    args = parser.parse_args(argv)
    from controlplane.local.model import load_model

    model = load_model(0)
    profile = calibrate(
        model.name,
        model.train_X,
        model.test_X,
        model.predict,
        seed=args.seed,
        per_kind=args.per_kind,
    )
    path = PROFILE_DIR / f"{model.name}.json"
    profile.save(path)
    print(json.dumps(profile.calibration, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
