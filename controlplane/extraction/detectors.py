"""Per-client extraction detectors over query vectors, with bounded memory per client.

Four detectors, each a statistic where larger means more suspicious, compared with a
threshold calibrated on benign traffic only (``calibrate.py``):

``prada``
    Juuti et al. 2019: the minimal L2 distance of each query to the client's earlier
    queries of the same predicted class; natural queries give a roughly normal
    distribution of those distances, synthetic ones (Jacobian steps, sweeps) do not.
    Statistic: ``1 - W`` of the Shapiro–Wilk test. Exact and near-exact repeats are
    dropped first: benign what-if users repeat themselves, and zero distances break the
    test.
``nearDuplicate``
    Probing around points: queries closer to an earlier query than natural neighbours
    ever are. A what-if user edits the same few inputs; a sweep or a gradient probe moves
    in many independent directions. Statistic: the effective rank (participation ratio)
    of the client's near-duplicate steps.
``denseSteps`` (part of ``nearDuplicate``: enabled with it, not a policy detector)
    The shape of the near-duplicate steps, not their directions: how many inputs each
    step moves (``step_width``, the participation ratio of its squared components: k
    for a step moving k inputs by one equal amount). What-if edits, LIME-style nudges,
    SHAP coalitions and sweeps move 1-4 inputs a step; a gradient probe (Jacobian-based
    augmentation, x + λ·sign(∇), Papernot et al. 2017) moves every input it can at once,
    round after round. Natural near-duplicates (two real images of one digit) are dense
    too, but rare. Statistic: inputs moved by near-duplicate steps per distinct query
    (decayed sums), so a few natural near-duplicates among many fresh queries stay low
    and a stream of dense steps, interleaved with natural queries or not, does not.
    Calibrated like the others (benign maxima times the margin), never below 4 inputs a
    query before the margin (``calibrate.DENSE_STEPS_FLOOR``); a reference-free profile
    has no benign data to calibrate it on and leaves it off (threshold infinite).
``outOfDistribution``
    Each query's novelty is its mean distance to the 5 nearest reference points (the
    model's own training data). Statistic: ``-log10`` of the binomial tail probability of
    the client's count of novel queries, with the benign novelty rate as the null.
``coverage``
    Space-covering streams fill directions the natural data never varies in. Each query's
    residual is its distance to the reference's principal subspace; statistic: the z
    score of the client's mean residual against the benign mean.

Counts decay with a half-life in queries, so a long benign history neither hides a later
attack nor accumulates forever.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import special, stats  # type: ignore[import-untyped]

FloatArray = npt.NDArray[np.float32]
DetectorName = Literal["prada", "nearDuplicate", "outOfDistribution", "coverage"]
DETECTORS: tuple[DetectorName, ...] = ("prada", "nearDuplicate", "outOfDistribution", "coverage")
# Statistics a detector adds besides its own: ``nearDuplicate`` also yields ``denseSteps``.
StatisticName = Literal["prada", "nearDuplicate", "outOfDistribution", "coverage", "denseSteps"]
STATISTICS: tuple[StatisticName, ...] = (*DETECTORS, "denseSteps")

# Shapiro-Wilk without scipy's axis/NaN-policy wrapper, which costs ~8x the test itself on
# 512 distances (it runs for every client every 8 queries). Same function, same W; a
# scipy without the wrapper's ``__wrapped__`` simply gets the wrapped one.
_shapiro = getattr(stats.shapiro, "__wrapped__", stats.shapiro)

# Queries closer than this fraction of the near-duplicate radius to an earlier one are
# repeats: they carry no new information and would put zeros into PRADA's distances.
REPEAT_FRACTION = 0.05

# Half the gap between 1 and the next float32: the rounding unit of the distances.
_UNIT = float(np.finfo(np.float32).eps) / 2


@dataclass(frozen=True)
class Reference:
    """The model's own input distribution: reference points and their principal subspace."""

    points: FloatArray  # (n, d)
    mean: FloatArray  # (d,)
    components: FloatArray  # (k, d), orthonormal rows
    spread: float = 0.0  # mean squared distance of the points to their mean (total variance)

    @classmethod
    def fit(cls, points: npt.ArrayLike, variance: float = 0.9) -> Reference:
        X = np.asarray(points, dtype=np.float32)
        mean = X.mean(axis=0)
        _, s, vt = np.linalg.svd(X - mean, full_matrices=False)
        explained = np.cumsum(s**2) / np.sum(s**2)
        k = int(np.searchsorted(explained, variance) + 1)
        spread = float(np.sum(s.astype(np.float64) ** 2) / max(len(X), 1))
        return cls(points=X, mean=mean, components=vt[:k].astype(np.float32), spread=spread)

    @property
    def dim(self) -> int:
        return int(self.points.shape[1])

    def novelty(self, X: FloatArray, k: int = 5) -> FloatArray:
        """Mean distance of each row to its k nearest reference points."""
        d2 = sq_distances(X, self.points)
        k = min(k, d2.shape[1])
        nearest = np.partition(d2, k - 1, axis=1)[:, :k]
        result: FloatArray = np.sqrt(np.maximum(nearest, 0)).mean(axis=1).astype(np.float32)
        return result

    def residual(self, X: FloatArray) -> FloatArray:
        """Distance of each row to the reference's principal subspace."""
        centred = X - self.mean
        projected = centred @ self.components.T @ self.components
        result: FloatArray = np.linalg.norm(centred - projected, axis=1).astype(np.float32)
        return result


@dataclass(frozen=True)
class Thresholds:
    """Where each statistic starts to mean "not a benign client"; from ``calibrate``."""

    prada: float  # 1 - Shapiro-Wilk W
    near_duplicate: float  # effective rank of near-duplicate steps
    out_of_distribution: float  # -log10 binomial tail
    coverage: float  # z score of the mean residual
    # Per-query quantities the statistics are built on (also calibrated on benign data).
    duplicate_radius: float  # closer than any natural neighbour: a near-duplicate
    novelty_cut: float  # per-query novelty above which a query counts as novel
    novelty_rate: float  # how often benign queries are novel (the binomial null)
    residual_mean: float
    residual_std: float
    # Minimum evidence before a statistic counts at all.
    # Shapiro-Wilk's W is noisy on few distances; PRADA too waits for enough of them.
    prada_min: int = 50
    near_duplicate_min: int = 8
    ood_min: int = 10
    coverage_min: int = 10
    # Without reference data (no natural neighbour distances to calibrate on): the radius
    # also grows with each query's own norm, ``duplicate_radius + relative_radius * |x|``.
    relative_radius: float = 0.0
    # Inputs moved by near-duplicate steps per distinct query (``denseSteps``). Infinite
    # (off) in profiles calibrated before it existed and in reference-free ones.
    dense_steps: float = math.inf
    # The 99th percentile of natural queries' residuals (held-out rows). ``coverage`` is a
    # z score: any population a little further from the subspace than the data's average
    # (a partial-dependence plot, imputed inputs, SHAP coalitions) reaches any threshold
    # once it has sent enough queries. For a quarantine the monitor also wants the effect:
    # the client's mean residual beyond this, its typical query further from the subspace
    # than 99% of the model's own records (``monitor.DECISIVE``). 0 (no such condition) in
    # profiles calibrated before it existed, and when the reference's held-out rows are too
    # few to estimate a 99th percentile (``calibrate.MIN_TAIL_ROWS``).
    residual_cut: float = 0.0
    # The same for ``outOfDistribution``: the client's mean novelty must be beyond this
    # (the novelty cut, when estimated on enough rows; else 0: no such condition).
    novelty_gate: float = 0.0

    def of(self, detector: StatisticName) -> float:
        return {
            "prada": self.prada,
            "nearDuplicate": self.near_duplicate,
            "outOfDistribution": self.out_of_distribution,
            "coverage": self.coverage,
            "denseSteps": self.dense_steps,
        }[detector]


@dataclass(frozen=True)
class Finding:
    """One detector's view of one client after its latest queries: the evidence."""

    detector: StatisticName
    statistic: float
    threshold: float
    queries: int  # queries of this client the statistic is built on

    @property
    def fired(self) -> bool:
        return self.statistic >= self.threshold


def sq_distances(A: FloatArray, B: FloatArray) -> FloatArray:
    d2: FloatArray = (
        np.einsum("ij,ij->i", A, A)[:, None]
        - 2.0 * (A @ B.T)
        + np.einsum("ij,ij->i", B, B)[None, :]
    )
    return np.maximum(d2, 0.0, out=d2)


def binomial_surprise(novel: float, total: float, rate: float) -> float:
    """-log10 P(X >= novel) for X ~ Binomial(total, rate); 0 when there is no excess."""
    n = max(round(total), 0)
    k = round(novel)
    if n == 0 or k <= rate * n:
        return 0.0
    # bdtrc is the binomial survival function as a plain ufunc: the same value as
    # ``stats.binom.sf`` (whose logsf is log(sf)) without the distribution machinery.
    sf = float(special.bdtrc(k - 1, n, rate))
    # Beyond double precision the tail is 0; any finite cap far above thresholds will do.
    if sf <= 0.0:
        return 300.0
    return min(-math.log10(sf), 300.0)


def effective_rank(steps: FloatArray) -> float:
    """Participation ratio of the steps' directions: ~1 along one axis, up to d when spread."""
    if len(steps) == 0:
        return 0.0
    norms = np.linalg.norm(steps, axis=1, keepdims=True)
    units = steps / np.maximum(norms, 1e-12)
    eig = np.linalg.eigvalsh(units.T @ units)
    eig = np.maximum(eig, 0)
    total = float(eig.sum())
    return total * total / float((eig**2).sum()) if total > 0 else 0.0


def step_width(step: FloatArray) -> float:
    """How many inputs a step moves: the participation ratio of its squared components,
    k for k inputs moved by one equal amount, ~1 when one input dominates."""
    sq = np.square(step, dtype=np.float64)
    fourth = float(np.dot(sq, sq))
    return float(sq.sum()) ** 2 / fourth if fourth > 0 else 0.0


@dataclass
class ClientState:
    """What the monitor remembers of one client: bounded, whatever the client sends."""

    dim: int
    history_size: int = 256  # distinct recent queries kept for distances
    distances_size: int = 512  # recent PRADA minimal distances
    steps_size: int = 128  # recent near-duplicate steps
    half_life: float = 1000.0  # in queries, for the decayed counters
    history: FloatArray = field(init=False)
    history_sq: FloatArray = field(init=False)  # squared norm of each history row
    history_key: npt.NDArray[np.int64] = field(init=False)  # hash of each row's bytes
    labels: npt.NDArray[np.int16] = field(init=False)
    stored: int = 0  # distinct queries ever stored (history is a ring)
    distances: list[float] = field(default_factory=list)
    steps: FloatArray = field(init=False)
    n_steps: int = 0
    queries: int = 0  # everything observed, repeats included
    repeats: int = 0
    unobserved: int = 0  # requests the sidecar saw but could not ship
    # Decayed counters: weight of queries, of novel queries, sum of residuals.
    weight: float = 0.0  # fresh queries, decayed
    novel: float = 0.0
    # Decayed sums of the fresh queries' novelty and of the squares of it and of the
    # residuals: how far beyond the natural tail a client typically is (``lower_mean``).
    novelty_sum: float = 0.0
    novelty_sq_sum: float = 0.0
    residual_sum: float = 0.0
    residual_sq_sum: float = 0.0
    # Decayed sums of the fresh rows and of their squared norms: the client's dispersion.
    row_sum: FloatArray | None = None
    row_sq_sum: float = 0.0
    # Decayed: distinct queries (fresh and near-duplicates), and the inputs moved by the
    # near-duplicate steps among them (``denseSteps``).
    distinct: float = 0.0
    moved: float = 0.0
    last_seen: float = 0.0

    def __post_init__(self) -> None:
        self.history = np.zeros((self.history_size, self.dim), dtype=np.float32)
        self.history_sq = np.zeros(self.history_size, dtype=np.float32)
        self.history_key = np.zeros(self.history_size, dtype=np.int64)
        self.labels = np.full(self.history_size, -1, dtype=np.int16)
        self.steps = np.zeros((self.steps_size, self.dim), dtype=np.float32)

    def memory_bytes(self) -> int:
        arrays = (self.history, self.history_sq, self.history_key, self.labels, self.steps)
        return sum(int(a.nbytes) for a in arrays) + 8 * self.distances_size

    def _recent(self) -> tuple[FloatArray, npt.NDArray[np.int16]]:
        n = min(self.stored, self.history_size)
        return self.history[:n], self.labels[:n]

    def observe(
        self,
        X: FloatArray,
        labels: npt.NDArray[np.int16],
        reference: Reference,
        thresholds: Thresholds,
    ) -> None:
        """Fold a client's new queries (rows of X, in order) into its state."""
        fresh = self.match(X, labels, thresholds)
        if len(fresh):
            self.fold(reference.novelty(fresh), reference.residual(fresh), thresholds, fresh)

    def match(
        self, X: FloatArray, labels: npt.NDArray[np.int16], thresholds: Thresholds
    ) -> FloatArray:
        """The first half of ``observe``: each query against the client's earlier ones
        (repeats, near-duplicate steps, PRADA distances, history). Returns the fresh rows,
        whose reference values (novelty, residual) ``fold`` then takes: the monitor
        computes those for the fresh rows of all clients of a batch at once."""
        X = np.asarray(X, dtype=np.float32)
        if len(X) == 0:
            fresh = X
        elif self._held(X, thresholds):
            # Repeats all, as the general path would find: no distance to compute.
            self.queries += len(X)
            self.repeats += len(X)
            fresh = X[:0]
        elif len(X) == 1:
            # The common case: a batch mixes many clients, most with one query in it.
            fresh = X if self._match_one(X[0], int(labels[0]), thresholds) else X[:0]
        else:
            fresh = self._match_rows(X, labels, thresholds)
        if len(self.distances) > self.distances_size:
            del self.distances[: len(self.distances) - self.distances_size]
        return fresh

    def fold(
        self,
        novelty: FloatArray,
        residual: FloatArray,
        thresholds: Thresholds,
        rows: FloatArray | None = None,
    ) -> None:
        """The second half of ``observe``: the fresh rows' novelty and residual (and the
        rows themselves, for the client's dispersion), into the decayed counters."""
        n_fresh = len(novelty)
        if n_fresh == 0:
            return
        decay = 0.5 ** (n_fresh / self.half_life)
        if rows is not None:
            total = rows.astype(np.float64).sum(axis=0)
            self.row_sum = total if self.row_sum is None else self.row_sum * decay + total
            self.row_sq_sum = self.row_sq_sum * decay + float(
                np.einsum("ij,ij->", rows, rows, dtype=np.float64)
            )
        self.weight = self.weight * decay + n_fresh
        self.novel = self.novel * decay + float((novelty > thresholds.novelty_cut).sum())
        self.novelty_sum = self.novelty_sum * decay + float(novelty.sum(dtype=np.float64))
        self.novelty_sq_sum = self.novelty_sq_sum * decay + float(
            np.dot(novelty.astype(np.float64), novelty)
        )
        self.residual_sum = self.residual_sum * decay + float(residual.sum())
        self.residual_sq_sum = self.residual_sq_sum * decay + float(
            np.dot(residual.astype(np.float64), residual)
        )

    def _held(self, X: FloatArray, thresholds: Thresholds) -> bool:
        """Whether every row of X is, bit for bit, a row the history holds, with a norm
        small enough that the general path cannot miss it for a repeat.

        Most traffic of a benign client is repeats (a what-if user, a batch job scoring
        records again, retries), and a repeat changes nothing but two counters. The general
        path finds it at a computed distance that is 0 up to float32 rounding: for a row of
        squared norm s in d dimensions the rounding of ``|h|² - 2h·x + |x|²`` is at most
        (4d + 1)·u·s (u the unit roundoff; each of the three sums errs by at most d·u·s
        whatever its order of summation), so while that stays under the repeat radius
        squared the general path calls it a repeat too, and the shortcut decides exactly as
        it would. Larger rows take the general path.
        """
        n = min(self.stored, self.history_size)
        if n == 0:
            return False
        rounding = (4 * self.dim + 1) * _UNIT
        held = self.history_key[:n]
        for x in X:
            raw = x.tobytes()
            key = hash(raw)
            # The first row with this hash: another row with the same 64-bit hash before
            # it would only send this one the general way.
            j = int((held == key).argmax())
            if held[j] != key or self.history[j].tobytes() != raw:
                return False
        x_sq = np.einsum("ij,ij->i", X, X)
        radius = REPEAT_FRACTION * (
            thresholds.duplicate_radius + thresholds.relative_radius * np.sqrt(x_sq)
        )
        return bool(np.all(x_sq * rounding <= 0.98 * radius * radius))

    def _match_one(self, x: FloatArray, label: int, thresholds: Thresholds) -> bool:
        """``_match_rows`` for a single row, in a third of its numpy calls (each costs
        microseconds whatever its size, and there are a few dozen for one row)."""
        self.queries += 1
        past, past_labels = self._recent()
        x_sq = np.einsum("i,i->", x, x)
        nearest_any = nearest_same = math.inf
        j = -1
        if len(past):
            d2 = self.history_sq[: len(past)] - 2.0 * (past @ x) + x_sq
            j = int(d2.argmin())
            nearest_any = math.sqrt(max(float(d2[j]), 0.0))
            same = np.min(d2, where=past_labels == label, initial=np.inf)
            nearest_same = math.sqrt(max(float(same), 0.0))
        radius = thresholds.duplicate_radius + thresholds.relative_radius * math.sqrt(x_sq)
        if nearest_any <= REPEAT_FRACTION * radius:
            self.repeats += 1
            return False
        fresh = nearest_any >= radius
        self._count_distinct()
        if not fresh:
            step = x - past[j]
            self.steps[self.n_steps % self.steps_size] = step
            self.n_steps += 1
            self.moved += step_width(step)
        elif math.isfinite(nearest_same):
            self.distances.append(nearest_same)
        slot = self.stored % self.history_size
        self.history[slot] = x
        self.history_sq[slot] = x_sq
        self.history_key[slot] = hash(x.tobytes())
        self.labels[slot] = label
        self.stored += 1
        return fresh

    def _match_rows(
        self, X: FloatArray, labels: npt.NDArray[np.int16], thresholds: Thresholds
    ) -> FloatArray:
        self.queries += len(X)
        # Distances are computed against the history as it was before this batch plus the
        # batch itself, in order: query i may only look at earlier queries.
        past, past_labels = self._recent()
        m, p = len(X), len(past)
        # The history's squared norms are kept with it: per batch only the
        # products with the new rows are computed, and the history is never copied.
        x_sq = np.einsum("ij,ij->i", X, X)
        radius = thresholds.duplicate_radius
        if thresholds.relative_radius:
            radius = radius + thresholds.relative_radius * np.sqrt(x_sq)
        repeat_radius = REPEAT_FRACTION * radius
        d2 = np.empty((m, p + m), dtype=np.float32)
        d2[:, :p] = x_sq[:, None] - 2.0 * (X @ past.T) + self.history_sq[None, :p]
        d2[:, p:] = x_sq[:, None] - 2.0 * (X @ X.T) + x_sq[None, :]
        np.maximum(d2, 0.0, out=d2)
        d2[:, p:][np.arange(m)[:, None] <= np.arange(m)[None, :]] = np.inf
        nearest_idx = d2.argmin(axis=1)
        nearest_any = np.sqrt(d2[np.arange(m), nearest_idx])
        all_labels = np.concatenate([past_labels, labels])
        d2_same = np.where(all_labels[None, :] == labels[:, None], d2, np.inf)
        nearest_same = np.sqrt(d2_same.min(axis=1))
        kept = nearest_any > repeat_radius
        near = kept & (nearest_any < radius)
        # Near-duplicates are the near-duplicate detector's evidence. The other detectors
        # look only at fresh queries: a what-if user's hundred edits of one record are one
        # point of evidence about where their queries come from, not a hundred.
        fresh = nearest_any >= radius
        self.repeats += int((~kept).sum())
        for i in np.flatnonzero(kept):
            self._count_distinct()
            if not near[i]:
                continue
            j = int(nearest_idx[i])
            step = X[i] - (past[j] if j < p else X[j - p])
            self.steps[self.n_steps % self.steps_size] = step
            self.n_steps += 1
            self.moved += step_width(step)
        self.distances.extend(float(d) for d in nearest_same[fresh] if math.isfinite(d))
        for i in np.flatnonzero(kept):
            slot = self.stored % self.history_size
            self.history[slot] = X[i]
            self.history_sq[slot] = x_sq[i]
            self.history_key[slot] = hash(X[i].tobytes())
            self.labels[slot] = labels[i]
            self.stored += 1
        rows: FloatArray = X[fresh]
        return rows

    def _count_distinct(self) -> None:
        decay = 0.5 ** (1.0 / self.half_life)
        self.distinct = self.distinct * decay + 1.0
        self.moved *= decay

    def lower_mean(self, of: Literal["residual", "novelty"], z: float = 2.0) -> float | None:
        """A lower confidence bound (the mean less ``z`` standard errors, one-sided ~97.7%)
        of the decayed mean residual or novelty of the client's fresh queries: how far from
        the data its typical query is, surely (a mean of 24 queries can be high by chance;
        the monitor compares this with the natural 99th percentile)."""
        if self.weight <= 0:
            return None
        total, squares = (
            (self.residual_sum, self.residual_sq_sum)
            if of == "residual"
            else (self.novelty_sum, self.novelty_sq_sum)
        )
        mean = total / self.weight
        variance = max(squares / self.weight - mean * mean, 0.0)
        return mean - z * math.sqrt(variance / self.weight)

    def dispersion(self) -> float | None:
        """Mean squared distance of the client's fresh queries to their mean (decayed):
        compared with the reference's ``spread``, how much of the space they cover."""
        if self.row_sum is None or self.weight <= 0:
            return None
        mean = self.row_sum / self.weight
        return max(self.row_sq_sum / self.weight - float(mean @ mean), 0.0)

    def findings(
        self, thresholds: Thresholds, detectors: tuple[DetectorName, ...]
    ) -> list[Finding]:
        """The current statistic of every enabled detector that has enough evidence."""
        out: list[Finding] = []
        for detector in detectors:
            value = self.statistic(detector, thresholds)
            if value is not None:
                out.append(Finding(detector, value, thresholds.of(detector), self.queries))
            if detector == "nearDuplicate":
                dense = self.statistic("denseSteps", thresholds)
                if dense is not None:
                    out.append(
                        Finding("denseSteps", dense, thresholds.dense_steps, self.queries)
                    )
        return out

    def statistic(self, detector: StatisticName, t: Thresholds) -> float | None:
        if detector == "prada":
            if len(self.distances) < t.prada_min:
                return None
            d = np.asarray(self.distances)
            if float(d.std()) == 0.0:
                return 1.0
            return 1.0 - float(_shapiro(d).statistic)
        if detector == "nearDuplicate":
            n = min(self.n_steps, self.steps_size)
            if n < t.near_duplicate_min:
                return None
            return effective_rank(self.steps[:n])
        if detector == "denseSteps":
            if min(self.n_steps, self.steps_size) < t.near_duplicate_min or self.distinct <= 0:
                return None
            return self.moved / self.distinct
        if detector == "outOfDistribution":
            if self.weight < t.ood_min:
                return None
            return binomial_surprise(self.novel, self.weight, t.novelty_rate)
        if self.weight < t.coverage_min:
            return None
        mean = self.residual_sum / self.weight
        return (mean - t.residual_mean) / (t.residual_std / math.sqrt(self.weight))
