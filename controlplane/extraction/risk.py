"""The extraction-risk estimate: how faithful a copy of the model each client could build
from what it has been told.

Detectors judge how a client's queries *look*; natural, in-distribution extraction looks
like any benign user and no detector sees it (on the digits model, 300 natural queries give
a 96%-faithful copy). This estimates what the client could have *learned* instead
(Kesarwani et al., ACSAC 2018: a per-user proxy model):

1. Each client's observed (query, unhardened answer) pairs — the monitor already has the
   query vectors and the argmax class of the model's scores, or the label it answered
   (``response.label``) — are what it could learn from.
   Exact repeats are no new knowledge and are skipped.
2. Two surrogates are fitted on them, and the better one counts (each is a lower bound on
   what the client could learn, so their maximum is a tighter one):
   - **1-nearest-neighbour**: no training, no hyper-parameter tuned to any attack, and it
     tracks what real substitutes achieve from natural queries: on digits, over 20 / 100 /
     300 / 1,000 natural pairs it agrees with the model on ~68% / 90% / 95% / 96% of
     held-out rows, as the logistic-regression copies of BENCHMARKS.md do (300 natural
     queries, 96%).
   - **nearest centroid** (the mean of each class's pairs): it generalises linearly from
     scattered queries, where 1-NN cannot (a uniform-noise stream's class means point along
     a linear model's weights): over 1,000 uniform queries 1-NN says 39%, nearest centroid
     90%, a logistic-regression copy reaches 88%. Kept only while classes x features stays
     under 8,192 sums.
   Both say *where* the client has looked: a client that explores locally (many
   perturbations of a few inputs) or asks about one class only can only answer with those
   few points' labels, so its estimate stays near the share of held-out rows that have
   those labels (digits: 10–28%). Their limit, said plainly: a learner built for the
   victim's exact family can beat both (equation solving recovers a logistic regression
   from ~100 noise queries: 100% faithful, estimated 81–86%); such streams are
   off-distribution and are the detectors' job.
   A client's surrogates are kept as what they need (``RiskSample``): per held-out row, the
   nearest pair so far and its answer; per class, the sum and count of its pairs. A new
   pair only has to be compared with the held-out rows, so the surrogates cover
   *everything* the client asked, exactly, in memory bounded by the held-out set and the
   classes: ~45 KB a client on digits (8 KB of surrogates, ``EVERY`` pending pairs and
   ``RECENT`` hashes of recent ones; the detectors keep ~100 KB), whatever its history.
3. Its agreement with the model's own answers on held-out reference rows is the client's
   **estimated extraction fidelity**, in [0, 1] (``fidelity`` computes the same from
   scratch). A client cannot unlearn, so the monitor acts on (and shows) the highest
   estimate a client has reached. For a model whose most common answer covers a share p
   of the reference rows, a constant copy already agrees on p of them: set onRisk steps
   above p.

Cadence and cost. A client's new pairs are folded in, and its estimate recomputed, at its
``FIRST`` = 16 distinct pairs, then every ``EVERY`` = 64 new ones: one (held-out × 64)
distance product, an argmin and a comparison, a (classes × 64) one-hot product into the
class sums, and the centroids' scores on the held-out rows. On this machine (one BLAS
thread, digits: 64 features, 450 held-out rows, 2 cores shared with other work) a fold takes
~0.2 ms and recording a pair ~1.5 µs: ~5 µs per distinct query, ~1 µs per repeat (a hash
lookup), whatever the client's history. The monitor's detectors take 60–70 µs per query;
with the estimate on, the monitor's CPU per query rose 11–16% on all-distinct traffic
(bench/extraction/risk_cost.py) and not measurably on bench/extraction/throughput.py's
(``--before``; BENCHMARKS.md). It lags a client's knowledge by at most 64 distinct queries.
The cost grows with held-out rows × features; rows beyond ``MAX_HELD_OUT`` are subsampled
(reproducibly), and 512 rows give the estimate a standard error under 2.2 points. It all
runs in the monitor, on the feed's worker thread: never on the request path. Client state
(and with it the estimate) is bounded and expires like the detectors' (``max_clients``,
``idle_ttl``): a client idle past it starts again from zero, so onRisk is a budget per
session of activity, not per lifetime.

The held-out rows and the model's answers on them come from the policy's profile
(``profile.held_out``, ``profile.held_out_answers``: the reference data's optional answer
column); ``held_out_of`` is the one place that reads them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from controlplane.api.common import WINDOW_SECONDS
from controlplane.policies.extraction.api import OnRisk, RiskStep

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

EVERY = 64  # new distinct pairs between two estimates ...
FIRST = 16  # ... and before the first: a client stopped early still gets one
RECENT = 256  # recent pairs remembered to skip exact repeats
MAX_HELD_OUT = 512  # held-out rows an estimate is scored on


@dataclass(frozen=True)
class HeldOut:
    """Reference rows kept out of everything else, and the model's own answers on them."""

    X: FloatArray  # (n, d)
    answers: IntArray  # (n,) the model's predicted class on each row
    sq: FloatArray  # squared norm of each row
    classes: IntArray  # the distinct answers, sorted: the nearest-centroid surrogate's classes

    @classmethod
    def of(cls, X: npt.ArrayLike, answers: npt.ArrayLike, seed: int = 0) -> HeldOut:
        rows = np.asarray(X, dtype=np.float32)
        labels = np.asarray(answers)
        if rows.ndim != 2 or labels.shape != (len(rows),):
            raise ValueError(f"held-out rows {rows.shape} and answers {labels.shape} disagree")
        if len(rows) > MAX_HELD_OUT:
            keep = np.sort(np.random.default_rng(seed).choice(len(rows), MAX_HELD_OUT, False))
            rows, labels = rows[keep], labels[keep]
        answers_ = labels.astype(np.int64)
        return cls(rows, answers_, np.einsum("ij,ij->i", rows, rows), np.unique(answers_))

    @property
    def centroids(self) -> bool:
        """Whether a nearest-centroid surrogate fits in a client's state (classes x features
        sums; 64 KiB at most)."""
        return len(self.classes) * self.dim <= 8192

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


def fidelity(held_out: HeldOut, X: npt.ArrayLike, y: npt.ArrayLike) -> float:
    """The estimate for pairs (X, y) in one go: what ``RiskSample`` reaches folding them in."""
    rows = np.asarray(X, dtype=np.float32)
    sample = RiskSample(rows.shape[1])
    sample.add(rows, np.asarray(y).astype(np.int16))
    return sample.update(held_out)


@dataclass
class RiskSample:
    """One client's 1-NN surrogate, kept as what it predicts on the held-out rows.

    For each held-out row: the (shifted) squared distance to the nearest pair the client
    has been answered, and that pair's answer. A new pair only has to be compared with the
    held-out rows, so the surrogate covers everything the client asked, exactly, in memory
    bounded by the held-out set (6 bytes a row) instead of by the client's history. New
    pairs wait in ``pending_X`` (``EVERY`` of them, or a batch's) and are folded in one
    product.
    """

    dim: int
    distinct: int = 0  # new pairs seen (a repeat older than ``RECENT`` pairs counts again)
    estimated_at: int = 0  # distinct pairs at the last estimate
    estimate: float | None = None  # the latest estimate
    peak: float = 0.0  # the highest estimate so far: what the client has shown it can learn
    nearest: FloatArray | None = None  # per held-out row: |x|² - 2 x·h of its nearest pair
    label: npt.NDArray[np.int16] | None = None  # per held-out row: that pair's answer
    sums: npt.NDArray[np.float64] | None = None  # per held-out class: sum of its pairs
    counts: npt.NDArray[np.int64] | None = None
    pending_X: FloatArray = field(init=False)  # new pairs not folded in yet: the first
    pending_y: npt.NDArray[np.int16] = field(init=False)  # n_pending rows
    n_pending: int = 0
    _recent: OrderedDict[int, None] = field(default_factory=OrderedDict)  # recent rows' hashes

    def __post_init__(self) -> None:
        self.pending_X = np.empty((EVERY, self.dim), dtype=np.float32)
        self.pending_y = np.empty(EVERY, dtype=np.int16)

    def add(self, X: FloatArray, y: npt.NDArray[np.int16]) -> None:
        """Fold a client's queries and the classes the model answered (-1: unknown)."""
        recent = self._recent
        if len(X) == 1:  # the common case (a batch mixes many clients): no lists, no copies
            label = int(y[0])
            key = hash(X[0].tobytes())  # a collision only skips a pair
            if label < 0 or key in recent:  # a repeat is no new knowledge
                return
            recent[key] = None
            if len(recent) > RECENT:
                recent.popitem(last=False)
            if self.n_pending == len(self.pending_X):
                self.pending_X = np.resize(self.pending_X, (self.n_pending + EVERY, self.dim))
                self.pending_y = np.resize(self.pending_y, self.n_pending + EVERY)
            self.pending_X[self.n_pending] = X[0]
            self.pending_y[self.n_pending] = label
            self.n_pending += 1
            self.distinct += 1
            return
        keys = [hash(row.tobytes()) for row in X]
        new = []
        for i, (key, label) in enumerate(zip(keys, y.tolist(), strict=True)):
            if label < 0 or key in recent:  # a repeat is no new knowledge
                continue
            recent[key] = None
            new.append(i)
        while len(recent) > RECENT:
            recent.popitem(last=False)
        if not new:
            return
        self.distinct += len(new)
        end = self.n_pending + len(new)
        if end > len(self.pending_X):  # more than EVERY between two folds
            self.pending_X = np.resize(self.pending_X, (end, self.dim))
            self.pending_y = np.resize(self.pending_y, end)
        self.pending_X[self.n_pending : end] = X[new]
        self.pending_y[self.n_pending : end] = y[new]
        self.n_pending = end

    def due(self) -> bool:
        return self.n_pending >= (EVERY if self.estimate is not None else FIRST)

    def update(self, held_out: HeldOut) -> float:
        if self.n_pending:
            X, y = self.pending_X[: self.n_pending], self.pending_y[: self.n_pending]
            self.n_pending = 0
            # Held-out rows × new pairs, so each row's nearest pair is a contiguous argmin;
            # |h|² is the same for every pair of a held-out row: left out.
            d = held_out.X @ X.T
            d *= -2.0
            d += np.einsum("ij,ij->i", X, X)[None, :]
            best = d.argmin(axis=1)
            d_best = d[np.arange(len(d)), best]
            if self.nearest is None or self.label is None:
                self.nearest, self.label = d_best, y[best]
            else:
                closer = d_best < self.nearest
                self.nearest = np.where(closer, d_best, self.nearest)
                self.label = np.where(closer, y[best], self.label)
            if held_out.centroids:
                self._fold_centroids(held_out, X, y)
            if len(self.pending_X) > EVERY:  # grown by a large batch: back to its size
                self.__post_init__()
        self.estimated_at = self.distinct
        agree = 0.0 if self.label is None else float((self.label == held_out.answers).mean())
        agree = max(agree, self._centroid_agreement(held_out))
        self.estimate = agree
        self.peak = max(self.peak, agree)
        return agree

    def _fold_centroids(self, held_out: HeldOut, X: FloatArray, y: npt.NDArray[np.int16]) -> None:
        # Answers the held-out rows never give cannot be agreed on: not folded in.
        k = np.minimum(np.searchsorted(held_out.classes, y), len(held_out.classes) - 1)
        known = held_out.classes[k] == y
        if self.sums is None or self.counts is None:
            self.sums = np.zeros((len(held_out.classes), self.dim))
            self.counts = np.zeros(len(held_out.classes), dtype=np.int64)
        # A one-hot product: np.add.at takes ten times as long for a few dozen rows.
        onehot = (k[known][None, :] == np.arange(len(held_out.classes))[:, None]).astype(np.float64)
        self.sums += onehot @ X[known]
        self.counts += onehot.sum(axis=1).astype(np.int64)

    def _centroid_agreement(self, held_out: HeldOut) -> float:
        """Nearest-centroid surrogate: each held-out row gets the class whose pairs' mean is
        closest. Unlike 1-NN it generalises linearly from scattered queries (a uniform-noise
        stream's class means point along a linear model's weights)."""
        if self.sums is None or self.counts is None or not self.counts.any():
            return 0.0
        present = np.flatnonzero(self.counts)
        C = (self.sums[present] / self.counts[present, None]).astype(np.float32)
        score = held_out.X @ C.T
        score -= 0.5 * np.einsum("ij,ij->i", C, C)[None, :]
        predicted = held_out.classes[present[score.argmax(axis=1)]]
        return float((predicted == held_out.answers).mean())

    def memory_bytes(self) -> int:
        rows = 0 if self.nearest is None else len(self.nearest)
        rows += 0 if self.sums is None else self.sums.nbytes // 6
        return 6 * rows + self.pending_X.nbytes + self.pending_y.nbytes + len(self._recent) * 100


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
