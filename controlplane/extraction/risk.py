"""The extraction-risk estimate: how faithful a copy of the model each client could build
from what it has been told.

Detectors judge how a client's queries *look*; natural, in-distribution extraction looks
like any benign user and no detector sees it (on the digits model, 300 natural queries give
a 96%-faithful copy). This estimates what the client could have *learned* instead
(Kesarwani et al., ACSAC 2018: a per-user proxy model):

1. Each client's observed (query, unhardened answer) pairs — the monitor already has the
   query vectors and the argmax class of the model's scores — are kept as a bounded sample:
   a reservoir of at most ``CAPACITY`` distinct pairs (exact repeats are not new
   knowledge), uniformly over everything the client asked.
2. A surrogate is fitted on that sample: **1-nearest-neighbour**. It needs no training (the
   sample *is* the model), no hyper-parameter tuned to any attack, and it tracks what real
   substitutes achieve from natural queries: on digits, 1-NN over 30 / 100 / 300 / 1,000
   natural pairs agrees with the model on 74% / 90% / 96% / 95% of held-out rows, as the
   logistic-regression copies of BENCHMARKS.md do. It also says *where* the client has
   looked: a client that explores locally (many perturbations of a few inputs) or asks
   about one class only can only answer with those few points' labels, so its estimate
   stays near the share of held-out rows that have those labels (digits: 10–25%).
   Its limit, said plainly: a learner that generalises better than 1-NN from few,
   well-chosen points (equation solving on a linear model) can beat the estimate; those
   streams are off-distribution and are the detectors' job.
3. Its agreement with the model's own answers on held-out reference rows is the client's
   **estimated extraction fidelity**, in [0, 1]: ``fidelity(held_out, X, y)``. A client
   cannot unlearn, so the monitor acts on the highest estimate a client has reached.
   For a model whose most common answer covers a share p of the reference rows, a constant
   copy already agrees on p of them: set onRisk steps above p.

Cadence and cost (measured on this machine, one BLAS thread, digits: 64 features, 450
held-out rows): one estimate costs about 4.4 µs per pair in the sample (a (held-out ×
sample) distance product and an argmin), 4.5 ms at the full 1,024 pairs. A client is
re-estimated every ``max(EVERY, distinct / SPACING)`` new distinct pairs: every 32 pairs up
to 128, then every quarter of what it has sent — so the estimate lags by at most a quarter
of a client's knowledge, and the amortised cost is at most about 18 µs per distinct query
(≈ 4 × 4.4 µs), falling once the reservoir is full. Held-out rows beyond ``MAX_HELD_OUT``
are subsampled (reproducibly) to bound it for large reference sets; 512 rows give the
estimate a standard error under 2.2 points. Repeats cost a hash lookup. It all runs in the
monitor, on the feed's worker thread: never on the request path.

The held-out rows and the model's answers on them come from the policy's profile
(``profile.held_out``, ``profile.held_out_answers``: the reference data's optional answer
column); ``held_out_of`` is the one place that reads them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from controlplane.api.common import WINDOW_SECONDS
from controlplane.api.extraction import OnRisk, RiskStep

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

CAPACITY = 1024  # distinct (query, answer) pairs kept per client
EVERY = 32  # new distinct pairs between two estimates, at least ...
SPACING = 4  # ... or a 1/SPACING of the client's distinct pairs so far
MAX_HELD_OUT = 512  # held-out rows an estimate is scored on


@dataclass(frozen=True)
class HeldOut:
    """Reference rows kept out of everything else, and the model's own answers on them."""

    X: FloatArray  # (n, d)
    answers: IntArray  # (n,) the model's predicted class on each row
    sq: FloatArray  # squared norm of each row

    @classmethod
    def of(cls, X: npt.ArrayLike, answers: npt.ArrayLike, seed: int = 0) -> HeldOut:
        rows = np.asarray(X, dtype=np.float32)
        labels = np.asarray(answers)
        if rows.ndim != 2 or labels.shape != (len(rows),):
            raise ValueError(f"held-out rows {rows.shape} and answers {labels.shape} disagree")
        if len(rows) > MAX_HELD_OUT:
            keep = np.sort(np.random.default_rng(seed).choice(len(rows), MAX_HELD_OUT, False))
            rows, labels = rows[keep], labels[keep]
        return cls(rows, labels.astype(np.int64), np.einsum("ij,ij->i", rows, rows))

    @property
    def dim(self) -> int:
        return int(self.X.shape[1])


def held_out_of(profile: Any) -> HeldOut | None:
    """A profile's held-out rows and answers (CONTRACTS.md #2), or None when it has none or
    its answers are not classes (a single-score model's answers are scores: 1-NN agreement
    would need a tolerance there, and is not estimated)."""
    X = getattr(profile, "held_out", None)
    answers = getattr(profile, "held_out_answers", None)
    if X is None or answers is None:
        return None
    answers = np.asarray(answers)
    if answers.ndim != 1 or len(answers) == 0:
        return None
    if answers.dtype.kind == "f" and not np.all(answers == np.round(answers)):
        return None
    return HeldOut.of(X, answers)


def fidelity(held_out: HeldOut, X: FloatArray, y: npt.NDArray[Any]) -> float:
    """Agreement of the 1-NN surrogate on (X, y) with the model on the held-out rows."""
    if len(X) == 0:
        return 0.0
    # Nearest pair of each held-out row: |h|² is the same for every pair, so it is left out.
    d = X @ held_out.X.T
    d *= -2.0
    d += np.einsum("ij,ij->i", X, X)[:, None]
    nearest = d.argmin(axis=0)
    return float((y[nearest] == held_out.answers).mean())


@dataclass
class RiskSample:
    """One client's distinct (query, answer) pairs: a uniform reservoir, bounded."""

    dim: int
    capacity: int = CAPACITY
    X: FloatArray = field(init=False)
    y: npt.NDArray[np.int16] = field(init=False)
    size: int = 0
    distinct: int = 0  # distinct pairs seen (a repeat of an evicted pair counts again)
    estimated_at: int = 0  # distinct pairs at the last estimate
    estimate: float | None = None  # the latest estimate
    peak: float = 0.0  # the highest estimate so far: what the client has shown it can learn
    _slots: dict[bytes, int] = field(default_factory=dict)
    _rng: random.Random = field(default_factory=lambda: random.Random(0))

    def __post_init__(self) -> None:
        self.X = np.zeros((0, self.dim), dtype=np.float32)
        self.y = np.zeros(0, dtype=np.int16)

    def add(self, X: FloatArray, y: npt.NDArray[np.int16]) -> None:
        """Fold a client's queries and the classes the model answered (-1: unknown)."""
        for row, label in zip(X, y.tolist(), strict=True):
            if label < 0:
                continue
            raw = row.tobytes()
            if raw in self._slots:
                continue
            self.distinct += 1
            if self.size < self.capacity:
                slot = self.size
                self.size += 1
                if slot >= len(self.X):  # grown in steps: most clients stay small
                    grown = min(self.capacity, max(64, 2 * len(self.X)))
                    self.X = np.resize(self.X, (grown, self.dim))
                    self.y = np.resize(self.y, grown)
            else:
                slot = self._rng.randrange(self.distinct)
                if slot >= self.capacity:
                    continue
                del self._slots[self.X[slot].tobytes()]
            self.X[slot] = row
            self.y[slot] = label
            self._slots[raw] = slot

    def due(self) -> bool:
        return self.distinct - self.estimated_at >= max(EVERY, self.estimated_at // SPACING)

    def update(self, held_out: HeldOut) -> float:
        self.estimated_at = self.distinct
        self.estimate = fidelity(held_out, self.X[: self.size], self.y[: self.size])
        self.peak = max(self.peak, self.estimate)
        return self.estimate


# --- onRisk, as the monitor applies it ---------------------------------------------------------


@dataclass(frozen=True)
class RiskPlan:
    """A policy's ``actions.onRisk``, resolved for the monitor."""

    harden: tuple[tuple[str, tuple[tuple[float, str], ...]], ...]  # client tier → steps
    throttle: tuple[tuple[float, int, int], ...]  # (fidelity, requests, per seconds)
    seconds: int

    @classmethod
    def of(cls, on_risk: OnRisk) -> RiskPlan:
        def harden(steps: list[RiskStep]) -> tuple[tuple[float, str], ...]:
            return tuple((s.fidelity, s.harden) for s in steps if s.harden is not None)

        lists = [("", harden(on_risk.steps))]
        lists += [(tier, harden(steps)) for tier, steps in sorted(on_risk.tiers.items())]
        return cls(
            harden=tuple(lists),
            throttle=tuple(
                (s.fidelity, s.throttle.requests, WINDOW_SECONDS[s.throttle.per])
                for s in on_risk.steps
                if s.throttle is not None
            ),
            seconds=on_risk.seconds,
        )

    def tiers(self, reached: float) -> tuple[tuple[str, str], ...]:
        """Each client tier → the output tier a client at ``reached`` is answered with
        ("" = its own); empty when no harden step of any list is reached."""
        out = []
        for tier, steps in self.harden:
            names = [name for threshold, name in steps if reached >= threshold]
            out.append((tier, names[-1] if names else ""))
        return tuple(out) if any(name for _, name in out) else ()

    def throttle_step(self, reached: float) -> tuple[float, int, int] | None:
        steps = [s for s in self.throttle if reached >= s[0]]
        return steps[-1] if steps else None
