"""Calibrate the detectors' thresholds on benign traffic only, per policy, reproducibly.

A policy's profile is built from its own reference data (``spec.detection.reference``,
read by ``reference.py``); same data, same settings, same numbers:

1. The reference rows are shuffled (seeded) and split: a quarter (at most 2,000 rows) is
   held out, the rest is the calibration reference (the points novelty and residual are
   measured against). The held-out rows are the benign users' records; the risk estimate
   (issue 13) reads them too (``Profile.held_out``, ``held_out_answers``).
2. Per-query cut-offs from held-out queries against the reference: the near-duplicate
   radius is the 1st percentile of natural nearest-neighbour distances; a query is
   "novel" above the 99th percentile of novelty, and the benign novelty rate is measured;
   the residual's benign mean and standard deviation.
3. Benign clients are simulated from the held-out rows (never from any attack), by the
   CALIBRATION generators below: i.i.d. users, heavy users (draws with replacement, so
   they repeat themselves), what-if users (a few base records, 1-2 of their 2-4 editable
   inputs set to values those inputs take in the data), local explorers (LIME/SHAP-style:
   one instance, 1-4 of its inputs nudged by a fraction of their natural spread, hundreds
   to thousands of times) and single-segment users (all queries from one of the model's
   classes, when the reference carries the model's answers, else from one cluster of the
   reference). The model's class of a simulated query is the answer of its nearest
   reference row (or its cluster without answers): a stand-in for the model, which the
   control plane does not call. Each client's queries are fed through the detectors in
   batches, and the highest value every statistic reaches over its stream is kept.
   The HELD-OUT generators (``HELD_OUT_KINDS``: feature sweeps, SHAP-style coalitions,
   cluster segments) never take part: tests and the benchmark report them apart; nor does
   the second held-out set (``held_out.py``: KernelSHAP, augmentation, drift, retries,
   imputation, partial dependence...).
4. A detector's threshold is set against those per-client maxima: ``high`` sensitivity is
   their 99th percentile (about 1% of benign clients would be flagged), ``medium`` 25%
   above their maximum (no simulated benign client is flagged), ``low`` 50% above it;
   ``outOfDistribution`` never below a fixed tail probability (``OOD_FLOOR``), and the
   novelty rate its null assumes is the measured rate's upper confidence bound.

Without reference data only ``prada`` and ``nearDuplicate`` run (``reference_free``): a
near-duplicate is then a query within ``RELATIVE_RADIUS`` of its own norm of an earlier
query (a scale-free radius: no data says what "near" means for this model), and their
thresholds are the documented defaults ``REFERENCE_FREE``.

Nothing here looks at an attack: the extraction benchmark (``bench/extraction``) measures
what these thresholds catch. ``modelguard profile build`` (``controlplane.app.profile_cli``)
calibrates offline.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from controlplane.api.reference import ReferenceData
from controlplane.extraction.detectors import (
    DETECTORS,
    STATISTICS,
    ClientState,
    FloatArray,
    Reference,
    StatisticName,
    Thresholds,
    sq_distances,
)

SENSITIVITIES = ("low", "medium", "high")
MARGIN = {"low": 1.5, "medium": 1.25}
BATCH = 8  # calibrate at a finer grain than sidecars batch: maxima are then conservative
# outOfDistribution is a binomial tail (-log10 p): never below these. The simulated users
# draw from the held-out rows the novelty rate was measured on, so their maxima understate
# what another population of natural queries (the model's real users) reaches; measured on
# the digits' test split, 1.5 within the first 40 queries of a heavy user. A floor is a
# tail probability every client may reach once in a thousand (100 at high).
OOD_FLOOR = {"low": 4.0, "medium": 3.0, "high": 2.0}
# denseSteps (inputs moved by near-duplicate steps per distinct query) is never below this
# before the margin: what-if tools and explainers edit 1-4 inputs a step (issue 13's
# explorers; the generators' range), so a client all of whose queries edit 4 inputs stays
# under it even on a reference where the simulated explorers' steps rarely fall within the
# near-duplicate radius (breast cancer: benign maximum 1.29) or never do (a maximum of 0).
DENSE_STEPS_FLOOR = 4.0
# Part of every cache key: bump whenever the procedure (generators, split, statistics)
# changes, so a cached profile is never one the current code would not produce.
VERSION = "13.6"  # 13.5: denseSteps; 13.6: residual_cut, novelty_gate
HELD_OUT_FRACTION = 0.25
MAX_HELD_OUT = 2000
MAX_REFERENCE = 20_000  # reference points kept for novelty (a distance matrix per batch)
# Rows needed to estimate a 99th percentile as more than the sample's largest value.
MIN_TAIL_ROWS = 100
N_SEGMENTS = 8  # clusters standing in for classes when the reference has no answers
RELATIVE_RADIUS = 0.02  # reference-free near-duplicate radius, as a fraction of |x|

IntArray = npt.NDArray[np.int16]


class Cancelled(Exception):
    """The control plane is stopping: a calibration in progress gives up."""


Labeller = Callable[[FloatArray], IntArray]


@dataclass(frozen=True)
class Settings:
    """What, besides the reference bytes, decides a profile (part of its cache key)."""

    seed: int = 0
    per_kind: int = 40  # simulated clients per calibration generator

    def key(self) -> dict[str, Any]:
        return {**asdict(self), "version": VERSION}


DEFAULT_SETTINGS = Settings()


@dataclass(frozen=True)
class Profile:
    """A model's reference distribution and its thresholds per sensitivity.

    ``reference`` is None for a reference-free profile (prada and nearDuplicate only).
    """

    name: str
    reference: Reference | None
    thresholds: dict[str, Thresholds]
    calibration: dict[str, Any]  # how it was made: seed, client counts, benign maxima
    held_out: FloatArray | None = None  # rows kept out of the calibration reference
    held_out_answers: npt.NDArray[np.float64] | None = None
    dimension: int | None = None  # of a reference-free profile (None: any)
    # The reference's class names (a label column of names, ``ReferenceData.classes``): a
    # name's class is its index, as in ``held_out_answers``. Read from the data, not cached.
    classes: tuple[str, ...] = ()

    @property
    def dim(self) -> int | None:
        return self.reference.dim if self.reference is not None else self.dimension

    def payload(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "thresholds": {k: asdict(v) for k, v in self.thresholds.items()},
            "calibration": self.calibration,
        }

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.payload(), indent=1, sort_keys=True) + "\n")
        tmp.replace(path)  # a crash mid-write never leaves half a profile in the cache

    @classmethod
    def load(
        cls,
        path: Path,
        reference: Reference | None,
        held_out: FloatArray | None = None,
        held_out_answers: npt.NDArray[np.float64] | None = None,
    ) -> Profile:
        payload = json.loads(path.read_text())
        return cls(
            name=payload["name"],
            reference=reference,
            thresholds={k: Thresholds(**v) for k, v in payload["thresholds"].items()},
            calibration=payload["calibration"],
            held_out=held_out,
            held_out_answers=held_out_answers,
        )


# Reference-free defaults (no data to calibrate on): 1.25 times the highest value the
# calibration generators reach with the relative radius on either bundled data set
# (digits, 64 features: prada 0.49 for what-if users, nearDuplicate 42 for local
# explorers; breast cancer, 30 features: prada 0.73 for single-class users, whose natural
# distances are far from normal). PRADA is therefore weak without reference data: it only
# fires on streams whose distances are wildly non-normal. tests/unit/test_calibration.py
# checks the defaults still hold over the generators.
REFERENCE_FREE = {"prada": 0.92, "nearDuplicate": 53.0}


def reference_free(name: str, dim: int | None = None) -> Profile:
    """prada and nearDuplicate on any dimension, without reference data."""
    base = Thresholds(
        prada=REFERENCE_FREE["prada"],
        near_duplicate=REFERENCE_FREE["nearDuplicate"],
        out_of_distribution=float("inf"),
        coverage=float("inf"),
        duplicate_radius=0.0,
        novelty_cut=float("inf"),
        novelty_rate=0.01,
        residual_mean=0.0,
        residual_std=1.0,
        relative_radius=RELATIVE_RADIUS,
    )
    scale = {"low": 1.5, "medium": 1.0, "high": 0.8}
    thresholds = {
        s: replace(
            base,
            prada=min(base.prada * scale[s], 0.999),
            near_duplicate=base.near_duplicate * scale[s],
        )
        for s in SENSITIVITIES
    }
    return Profile(name, None, thresholds, {"reference_free": True}, dimension=dim)


# --- benign client simulations ---------------------------------------------------------------
# Calibration generators take (rng, pool, n) or (rng, pool, n, segments); pool rows are
# natural records (the held-out split).


def iid_user(rng: np.random.Generator, pool: FloatArray, n: int) -> FloatArray:
    """Someone scoring their own, independent records."""
    idx = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
    return pool[idx]


def heavy_user(rng: np.random.Generator, pool: FloatArray, n: int) -> FloatArray:
    """A batch job scoring many records, some of them again."""
    return pool[rng.integers(0, len(pool), size=n)]


def whatif_user(rng: np.random.Generator, pool: FloatArray, n: int) -> FloatArray:
    """A what-if tool: a few base records, the same few inputs edited (to values those
    inputs take in the data), often re-asked."""
    bases = pool[rng.choice(len(pool), size=int(rng.integers(1, 4)), replace=False)]
    editable = rng.choice(pool.shape[1], size=int(min(rng.integers(2, 5), pool.shape[1])),
                          replace=False)
    out: list[FloatArray] = []
    for _ in range(n):
        if out and rng.random() < 1 / 3:
            out.append(out[int(rng.integers(0, len(out)))])
            continue
        x = bases[int(rng.integers(0, len(bases)))].copy()
        for feature in rng.choice(editable, size=int(rng.integers(1, min(3, len(editable) + 1))),
                                  replace=False):
            x[feature] = pool[int(rng.integers(0, len(pool))), feature]
        out.append(x)
    return np.asarray(out, dtype=np.float32)


def local_user(rng: np.random.Generator, pool: FloatArray, n: int) -> FloatArray:
    """LIME/SHAP-style local exploration: one (sometimes two) instance(s), each query nudges
    1-4 of its inputs by a fraction of their natural spread; explanation tools send
    hundreds to thousands of such perturbations of one instance."""
    spread = pool.std(axis=0) + 1e-6
    bases = pool[rng.choice(len(pool), size=int(rng.integers(1, 3)), replace=False)]
    lo, hi = pool.min(axis=0), pool.max(axis=0)
    scale = float(rng.uniform(0.05, 0.3))
    out = np.empty((n, pool.shape[1]), dtype=np.float32)
    for i in range(n):
        x = bases[int(rng.integers(0, len(bases)))].copy()
        k = int(rng.integers(1, min(4, pool.shape[1]) + 1))
        features = rng.choice(pool.shape[1], size=k, replace=False)
        x[features] += rng.normal(0, scale, size=k) * spread[features]
        out[i] = np.clip(x, lo, hi)
    return out


def segment_user(
    rng: np.random.Generator, pool: FloatArray, n: int, segments: IntArray
) -> FloatArray:
    """A narrow user: every query from one class (or segment) of the data, in order, each
    record once (a user who only ever sees one kind of case)."""
    values, counts = np.unique(segments, return_counts=True)
    values = values[counts >= 20] if (counts >= 20).any() else values
    members = np.flatnonzero(segments == values[int(rng.integers(0, len(values)))])
    idx = rng.permutation(members)[:n]
    rows: FloatArray = pool[idx]
    return rows


# Held-out generators: never used by calibration; tests and the benchmark report them apart.


def sweep_user(rng: np.random.Generator, pool: FloatArray, n: int) -> FloatArray:
    """An ICE / partial-dependence sweep: a few instances, one input at a time stepped
    through the values it takes in the data."""
    bases = pool[rng.choice(len(pool), size=int(rng.integers(1, 4)), replace=False)]
    out = np.empty((n, pool.shape[1]), dtype=np.float32)
    grid = np.quantile(pool, np.linspace(0.05, 0.95, 10), axis=0)  # (10, d)
    features = rng.choice(pool.shape[1], size=int(min(3, pool.shape[1])), replace=False)
    for i in range(n):
        x = bases[(i // 10) % len(bases)].copy()
        f = features[(i // (10 * len(bases))) % len(features)]
        x[f] = grid[i % 10, f]
        out[i] = x
    return out


def shap_user(rng: np.random.Generator, pool: FloatArray, n: int) -> FloatArray:
    """KernelSHAP-style coalitions around one instance: small coalitions of 1-4 inputs
    take a background record's values (the instance keeps the rest)."""
    x0 = pool[int(rng.integers(0, len(pool)))]
    background = pool[rng.choice(len(pool), size=min(10, len(pool)), replace=False)]
    out = np.empty((n, pool.shape[1]), dtype=np.float32)
    for i in range(n):
        x = x0.copy()
        k = int(rng.integers(1, min(4, pool.shape[1]) + 1))
        features = rng.choice(pool.shape[1], size=k, replace=False)
        x[features] = background[int(rng.integers(0, len(background))), features]
        out[i] = x
    return out


CALIBRATION_KINDS = ("iid", "heavy", "whatif", "local", "segment")
HELD_OUT_KINDS = ("sweep", "shap", "cluster")


def benign_clients(
    rng: np.random.Generator,
    pool: FloatArray,
    per_kind: int,
    segments: tuple[FloatArray, IntArray] | None = None,
) -> Iterator[tuple[str, FloatArray]]:
    """The calibration generators' clients, in a fixed order. Single-segment users draw
    from ``segments`` (rows, their class or cluster), all other users from ``pool``."""
    if segments is None:
        segments = (pool, np.zeros(len(pool), dtype=np.int16))
    for _ in range(per_kind):
        yield "iid", iid_user(rng, pool, int(rng.integers(20, 401)))
        yield "heavy", heavy_user(rng, pool, int(rng.integers(1000, 2001)))
        yield "whatif", whatif_user(rng, pool, int(rng.integers(20, 401)))
        yield "local", local_user(rng, pool, int(rng.integers(100, 1501)))
        yield "segment", segment_user(rng, segments[0], int(rng.integers(50, 401)), segments[1])


def held_out_clients(
    rng: np.random.Generator, pool: FloatArray, per_kind: int, clusters: IntArray
) -> Iterator[tuple[str, FloatArray]]:
    """Benign clients calibration never saw: for tests and the benchmark only."""
    for _ in range(per_kind):
        yield "sweep", sweep_user(rng, pool, int(rng.integers(30, 301)))
        yield "shap", shap_user(rng, pool, int(rng.integers(200, 2001)))
        yield "cluster", segment_user(rng, pool, int(rng.integers(50, 401)), clusters)


def kmeans(X: FloatArray, k: int, seed: int = 0, rounds: int = 20) -> IntArray:
    """Cluster ids (k-means, seeded k-means++ start): segments of a reference."""
    rng = np.random.default_rng(seed)
    k = min(k, len(X))
    centres = [X[int(rng.integers(0, len(X)))]]
    for _ in range(1, k):
        d2 = sq_distances(X, np.asarray(centres)).min(axis=1).astype(np.float64)
        total = d2.sum()
        p = d2 / total if total > 0 else None
        centres.append(X[int(rng.choice(len(X), p=p))])
    C = np.asarray(centres, dtype=np.float32)
    labels = np.zeros(len(X), dtype=np.int16)
    for _ in range(rounds):
        labels = sq_distances(X, C).argmin(axis=1).astype(np.int16)
        for j in range(k):
            members = X[labels == j]
            if len(members):
                C[j] = members.mean(axis=0)
    return labels


def class_answers(answers: npt.NDArray[np.float64] | None) -> IntArray | None:
    """The answers as classes when they are classes (few distinct integers), else None:
    scores of a single-score model give PRADA one class, as the monitor does."""
    if answers is None:
        return None
    values = np.unique(answers)
    if len(values) > 100 or not np.all(values == np.round(values)):
        return None
    return answers.astype(np.int16)


def nearest_labeller(points: FloatArray, labels: IntArray) -> Labeller:
    """The label of each query's nearest point: the model's class, approximately."""

    def label(X: FloatArray) -> IntArray:
        nearest = sq_distances(np.asarray(X, dtype=np.float32), points).argmin(axis=1)
        out: IntArray = labels[nearest]
        return out

    return label


# --- the procedure ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Cutoffs:
    duplicate_radius: float
    novelty_cut: float
    novelty_rate: float
    residual_mean: float
    residual_std: float
    residual_cut: float = 0.0
    novelty_gate: float = 0.0

    def thresholds(
        self,
        prada: float,
        near_duplicate: float,
        out_of_distribution: float,
        coverage: float,
        dense_steps: float = float("inf"),
    ) -> Thresholds:
        return Thresholds(
            prada=prada,
            near_duplicate=near_duplicate,
            out_of_distribution=out_of_distribution,
            coverage=coverage,
            dense_steps=dense_steps,
            **asdict(self),
        )


def rate_upper_bound(k: int, n: int, confidence: float = 0.975) -> float:
    """One-sided upper confidence bound of a rate seen k times in n (Clopper-Pearson)."""
    from scipy import special  # type: ignore[import-untyped]

    if k >= n:
        return 1.0
    return float(special.betaincinv(k + 1, n - k, confidence))


def per_query_cutoffs(reference: Reference, held_out: FloatArray) -> Cutoffs:
    d2 = sq_distances(held_out, reference.points)
    nearest = np.sqrt(d2.min(axis=1))
    novelty = reference.novelty(held_out)
    cut = float(np.quantile(novelty, 0.99))
    residual = reference.residual(held_out)
    tail = len(held_out) >= MIN_TAIL_ROWS
    return Cutoffs(
        duplicate_radius=float(np.quantile(nearest[nearest > 0], 0.01)),
        novelty_cut=cut,
        # A rate measured on a few hundred records is itself uncertain, and another
        # population of natural queries (a model's real users) is novel a little more or
        # less often: the null is the rate's one-sided 97.5% upper confidence bound
        # (Clopper-Pearson), never below 1%.
        novelty_rate=max(rate_upper_bound(int((novelty > cut).sum()), len(novelty)), 0.01),
        residual_mean=float(residual.mean()),
        residual_std=float(residual.std()),
        # What a quarantine on coverage or outOfDistribution also needs (the effect, not
        # only its significance: ``monitor._decisive``): the client's mean beyond what 1%
        # of natural queries exceed. Only from enough rows to tell a 99th percentile from
        # the sample's maximum; else no such condition (the tests' null still holds).
        residual_cut=float(np.quantile(residual, 0.99)) if tail else 0.0,
        novelty_gate=cut if tail else 0.0,
    )


def stream_maxima(
    X: FloatArray,
    labels: npt.NDArray[np.int16],
    reference: Reference,
    thresholds: Thresholds,
) -> dict[StatisticName, float]:
    state = ClientState(dim=reference.dim)
    best: dict[StatisticName, float] = {d: 0.0 for d in STATISTICS}
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
    predict: Labeller,
    *,
    seed: int = 0,
    per_kind: int = 24,
    segments: tuple[FloatArray, IntArray] | None = None,
    cancel: threading.Event | None = None,
) -> Profile:
    """Thresholds from benign data only; ``predict`` maps rows to the model's classes.

    ``segments``: rows and their class (or cluster) for the single-segment users, who need
    long streams of one class: by default the held-out rows and their predicted class."""
    reference = Reference.fit(train_X)
    held_out = np.asarray(held_out_X, dtype=np.float32)
    cutoffs = per_query_cutoffs(reference, held_out)
    # The statistics' own thresholds do not influence their values: placeholders.
    probe = cutoffs.thresholds(1.0, 1.0, 1.0, 1.0, 1.0)
    if segments is None:
        segments = (held_out, np.asarray(predict(held_out), dtype=np.int16))
    rng = np.random.default_rng(seed)
    maxima: dict[str, list[float]] = {d: [] for d in STATISTICS}
    kinds: dict[str, int] = {}
    for kind, X in benign_clients(rng, held_out, per_kind, segments):
        if cancel is not None and cancel.is_set():
            raise Cancelled("calibration cancelled")
        kinds[kind] = kinds.get(kind, 0) + 1
        labels = np.asarray(predict(X), dtype=np.int16)
        for detector, value in stream_maxima(X, labels, reference, probe).items():
            maxima[detector].append(value)
    thresholds: dict[str, Thresholds] = {}
    for sensitivity in SENSITIVITIES:
        values: dict[str, float] = {}
        for detector in STATISTICS:
            observed = np.asarray(maxima[detector])
            if detector == "denseSteps":
                observed = np.maximum(observed, DENSE_STEPS_FLOOR)
            if sensitivity == "high":
                values[detector] = float(np.quantile(observed, 0.99))
            else:
                values[detector] = float(observed.max()) * MARGIN[sensitivity]
        thresholds[sensitivity] = cutoffs.thresholds(
            prada=min(values["prada"], 0.999),
            near_duplicate=values["nearDuplicate"],
            out_of_distribution=max(values["outOfDistribution"], OOD_FLOOR[sensitivity]),
            coverage=values["coverage"],
            dense_steps=values["denseSteps"],
        )
    calibration = {
        "seed": seed,
        "version": VERSION,
        "benign_clients": kinds,
        "batch": BATCH,
        "benign_maxima": {d: round(float(np.max(v)), 6) for d, v in maxima.items()},
        "benign_p99": {d: round(float(np.quantile(v, 0.99)), 6) for d, v in maxima.items()},
        "reference_points": len(reference.points),
        "held_out_points": len(held_out),
    }
    return Profile(name, reference, thresholds, calibration)


@dataclass(frozen=True)
class Split:
    """A reference's calibration part and held-out part, and how to label queries."""

    reference: FloatArray
    held_out: FloatArray
    held_out_answers: npt.NDArray[np.float64] | None
    labeller: Labeller
    segments: tuple[FloatArray, IntArray]  # all rows, and their class (or cluster)
    clusters: IntArray  # of the held-out rows: always clusters (held-out segment users)
    has_classes: bool = field(default=False)


def split(data: ReferenceData, seed: int = 0) -> Split:
    """Shuffle (seeded) and split a reference: held out a quarter, at most MAX_HELD_OUT."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data.X))
    n_held = min(max(int(len(order) * HELD_OUT_FRACTION), 1), MAX_HELD_OUT)
    held, ref = order[:n_held], order[n_held:][:MAX_REFERENCE]
    X_ref, X_held = data.X[ref], data.X[held]
    classes = class_answers(data.answers)
    ref_clusters = kmeans(X_ref, N_SEGMENTS, seed)
    ref_labels = classes[ref] if classes is not None else ref_clusters
    labeller = nearest_labeller(X_ref, ref_labels)
    clusters = nearest_labeller(X_ref, ref_clusters)(X_held)
    everything = np.concatenate([X_ref, X_held])
    if classes is not None:
        segments = (everything, np.concatenate([classes[ref], classes[held]]))
    else:
        segments = (everything, np.concatenate([ref_clusters, clusters]))
    answers = data.answers[held] if data.answers is not None else None
    return Split(X_ref, X_held, answers, labeller, segments, clusters, classes is not None)


def calibrate_reference(
    name: str,
    data: ReferenceData,
    settings: Settings = DEFAULT_SETTINGS,
    cancel: threading.Event | None = None,
) -> Profile:
    """A policy's profile from its reference data (what the control plane runs)."""
    parts = split(data, settings.seed)
    profile = calibrate(
        name,
        parts.reference,
        parts.held_out,
        parts.labeller,
        seed=settings.seed,
        per_kind=settings.per_kind,
        segments=parts.segments,
        cancel=cancel,
    )
    calibration = {
        **profile.calibration,
        "reference_sha256": data.digest,
        "segments": "model answers" if parts.has_classes else f"{N_SEGMENTS} clusters",
    }
    return replace(
        profile,
        calibration=calibration,
        held_out=parts.held_out,
        held_out_answers=parts.held_out_answers,
        classes=data.classes,
    )


def cache_key(data: ReferenceData, settings: Settings, label_column: object = None) -> str:
    """Content hash: the reference bytes, the calibration code's version, the settings."""
    blob = json.dumps(
        {"reference": data.digest, "labelColumn": label_column, **settings.key()},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def cached_profile(
    name: str,
    data: ReferenceData,
    cache_dir: Path | None,
    settings: Settings = DEFAULT_SETTINGS,
    label_column: object = None,
    cancel: threading.Event | None = None,
) -> tuple[Profile, bool]:
    """The profile of ``data``, from ``cache_dir`` when calibrated before (a restart does
    not recalibrate), else calibrated now and cached. Returns (profile, from_cache)."""
    path = cache_dir / f"{cache_key(data, settings, label_column)}.json" if cache_dir else None
    if path is not None and path.is_file():
        try:
            parts = split(data, settings.seed)
            profile = Profile.load(path, Reference.fit(parts.reference), parts.held_out,
                                   parts.held_out_answers)
            return replace(profile, name=name, classes=data.classes), True
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable: calibrate again and overwrite it
    profile = calibrate_reference(name, data, settings, cancel)
    if path is not None:
        profile.save(path)
    return profile, False
