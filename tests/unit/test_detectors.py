"""Detectors on synthetic query streams whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from controlplane.extraction.calibrate import calibrate, per_query_cutoffs
from controlplane.extraction.detectors import (
    DETECTORS,
    ClientState,
    Reference,
    Thresholds,
    binomial_surprise,
    effective_rank,
    step_width,
)

DIM = 16


def natural(rng: np.random.Generator, n: int) -> np.ndarray:
    """The synthetic model's own distribution: 4 informative directions, little elsewhere."""
    X = np.zeros((n, DIM), dtype=np.float32)
    X[:, :4] = rng.normal(0, 3, size=(n, 4))
    X[:, 4:] = rng.normal(0, 0.3, size=(n, DIM - 4))
    return X


def labels_of(X: np.ndarray) -> np.ndarray:
    return (X[:, 0] > 0).astype(np.int16)


@pytest.fixture(scope="module")
def world() -> tuple[Reference, Thresholds]:
    rng = np.random.default_rng(7)
    profile = calibrate("synthetic", natural(rng, 1500), natural(rng, 500), labels_of, per_kind=3)
    return profile.reference, profile.thresholds["medium"]


def run(X: np.ndarray, reference: Reference, thresholds: Thresholds, batch: int = 8):
    state = ClientState(dim=DIM)
    first: dict[str, int] = {}
    for start in range(0, len(X), batch):
        rows = X[start : start + batch]
        state.observe(rows, labels_of(rows), reference, thresholds)
        for finding in state.findings(thresholds, DETECTORS):
            if finding.fired:
                first.setdefault(finding.detector, state.queries)
    return state, first


def test_binomial_surprise_known_values() -> None:
    assert binomial_surprise(1, 100, 0.01) == 0.0  # at the expected count: no surprise
    assert binomial_surprise(10, 10, 0.5) == pytest.approx(10 * math.log10(2))
    assert binomial_surprise(0, 0, 0.01) == 0.0
    assert binomial_surprise(5000, 5000, 1e-9) == 300.0  # capped, never inf


def test_effective_rank_counts_independent_directions() -> None:
    assert effective_rank(np.eye(DIM, dtype=np.float32)[[0, 0, 0]] * 3) == pytest.approx(1.0)
    four = np.vstack([np.eye(DIM, dtype=np.float32)[:4]] * 5)
    assert effective_rank(four) == pytest.approx(4.0)
    assert effective_rank(np.zeros((0, DIM), dtype=np.float32)) == 0.0


def test_calibration_is_reproducible_and_uses_held_out_cutoffs() -> None:
    rng = np.random.default_rng(1)
    train, held = natural(rng, 600), natural(rng, 200)
    a = calibrate("s", train, held, labels_of, per_kind=2, seed=3)
    b = calibrate("s", train, held, labels_of, per_kind=2, seed=3)
    assert a.thresholds == b.thresholds
    cut = per_query_cutoffs(a.reference, held)
    # 1% of held-out queries are novel by construction of the cut.
    novelty = a.reference.novelty(held)
    assert float((novelty > cut.novelty_cut).mean()) == pytest.approx(0.01, abs=0.006)
    # Sensitivities are ordered: high flags soonest, low latest.
    for name in ("prada", "near_duplicate", "out_of_distribution", "coverage"):
        assert getattr(a.thresholds["high"], name) <= getattr(a.thresholds["medium"], name)
        assert getattr(a.thresholds["medium"], name) <= getattr(a.thresholds["low"], name)


def test_benign_streams_fire_nothing(world) -> None:
    reference, thresholds = world
    rng = np.random.default_rng(99)  # not the calibration's seed
    for n in (50, 400, 2000):
        _, first = run(natural(rng, n), reference, thresholds)
        assert first == {}, n


def test_uniform_noise_is_out_of_distribution_and_covering(world) -> None:
    reference, thresholds = world
    rng = np.random.default_rng(5)
    X = rng.uniform(-8, 8, size=(200, DIM)).astype(np.float32)
    _, first = run(X, reference, thresholds)
    assert first["outOfDistribution"] <= 100
    assert first["coverage"] <= 100
    assert "nearDuplicate" not in first


def test_feature_sweep_spreads_its_steps_and_what_if_edits_do_not(world) -> None:
    """A sweep along every axis probes in many directions, a what-if user in two. Since
    issue 13 local explorers (LIME-style, also many directions) are in the calibration, so
    the sweep's effective rank is compared with the what-if user's, not with the threshold:
    nearDuplicate evidence alone is never more than an alert (test_calibration.py)."""
    reference, thresholds = world
    rng = np.random.default_rng(11)
    base = natural(rng, 1)[0]
    step = thresholds.duplicate_radius / 3
    # A sweep: small moves along every axis in turn, around a few natural points.
    sweep = []
    for b in natural(rng, 4):
        for axis in range(DIM):
            x = b.copy()
            x[axis] += step
            sweep += [b, x]
    swept, _ = run(np.asarray(sweep), reference, thresholds)
    sweep_rank = swept.statistic("nearDuplicate", thresholds)
    assert sweep_rank is not None and sweep_rank > DIM / 2
    # A what-if user: the same two inputs edited again and again, often re-asked.
    whatif = []
    for i in range(300):
        x = base.copy()
        x[i % 2] += step * rng.uniform(-1, 1)
        whatif.append(x if i % 3 else base)
    state, first = run(np.asarray(whatif), reference, thresholds)
    assert first == {}
    whatif_rank = state.statistic("nearDuplicate", thresholds)
    assert whatif_rank is not None and whatif_rank < 3 < sweep_rank
    assert state.repeats > 50  # the re-asked base is recognised as a repeat


def test_prada_separates_synthetic_steps_from_natural_distances(world) -> None:
    reference, thresholds = world
    rng = np.random.default_rng(3)
    state, _ = run(natural(rng, 300), reference, thresholds)
    natural_stat = state.statistic("prada", thresholds)
    # Jacobian-style: each query is an earlier one plus λ·sign(random direction), fresh
    # (larger than the near-duplicate radius) but always at the same distance.
    lam = thresholds.duplicate_radius * 1.2 / math.sqrt(DIM)
    X = list(natural(rng, 10))
    while len(X) < 300:
        parent = X[int(rng.integers(0, len(X)))]
        X.append(parent + lam * np.sign(rng.normal(size=DIM)).astype(np.float32))
    state, first = run(np.asarray(X, dtype=np.float32), reference, thresholds)
    assert natural_stat is not None and natural_stat < thresholds.prada
    assert first.get("prada") is not None and first["prada"] <= 300


def test_exact_repeats_never_reach_prada_distances(world) -> None:
    reference, thresholds = world
    rng = np.random.default_rng(4)
    X = natural(rng, 40)
    state, _ = run(np.concatenate([X, X, X]), reference, thresholds)
    assert state.repeats == 80
    assert min(state.distances) > 0


def test_state_is_bounded_whatever_the_client_sends(world) -> None:
    reference, thresholds = world
    rng = np.random.default_rng(8)
    state = ClientState(dim=DIM)
    size = state.memory_bytes()
    for _ in range(40):
        rows = rng.uniform(-8, 8, size=(256, DIM)).astype(np.float32)
        state.observe(rows, labels_of(rows), reference, thresholds)
    assert state.queries == 40 * 256
    assert state.memory_bytes() == size
    assert len(state.distances) <= state.distances_size
    assert state.weight < 2 * state.half_life  # decayed counters stay bounded


def test_shapiro_without_scipys_wrapper_is_scipys_shapiro() -> None:
    from scipy import stats

    from controlplane.extraction.detectors import _shapiro

    assert _shapiro is not stats.shapiro  # else the fast path silently went away
    rng = np.random.default_rng(3)
    for sample in (rng.normal(size=512), rng.exponential(size=60), np.arange(50.0) ** 2):
        assert float(_shapiro(sample).statistic) == float(stats.shapiro(sample).statistic)


@pytest.mark.parametrize(
    ("novel", "total", "rate"),
    [(3, 10, 0.1), (30, 200, 0.1), (150, 200, 0.01), (12, 40, 0.05), (400, 1000, 0.3)],
)
def test_binomial_surprise_is_scipys_binomial_tail(novel: int, total: int, rate: float) -> None:
    from scipy import stats

    want = -float(stats.binom.logsf(novel - 1, total, rate)) / math.log(10)
    assert binomial_surprise(novel, total, rate) == pytest.approx(min(want, 300.0), rel=1e-9)


def test_batch_wide_reference_values_change_nothing(world) -> None:
    """The monitor matches every client's rows first, then computes the reference values
    of all clients' fresh rows at once and folds each client's share: the state must be
    the one observe() reaches on its own."""
    reference, thresholds = world
    rng = np.random.default_rng(11)
    X = np.concatenate([natural(rng, 200), rng.uniform(-9, 9, size=(100, DIM))]).astype(
        np.float32
    )
    X[50:60] = X[40:50] + 0.01  # near-duplicates and repeats too
    X[60:70] = X[40:50]
    other = natural(rng, 8)  # another client's fresh rows in the same batches
    mine, theirs = ClientState(dim=DIM), ClientState(dim=DIM)
    for start in range(0, len(X), 8):
        rows = X[start : start + 8]
        mine.observe(rows, labels_of(rows), reference, thresholds)
        fresh = theirs.match(rows, labels_of(rows), thresholds)
        batch = np.concatenate([other, fresh])
        novelty, residual = reference.novelty(batch), reference.residual(batch)
        theirs.fold(novelty[len(other) :], residual[len(other) :], thresholds)
    assert mine.repeats == theirs.repeats > 0
    assert mine.stored == theirs.stored
    assert mine.novel == pytest.approx(theirs.novel)
    assert mine.residual_sum == pytest.approx(theirs.residual_sum)
    assert mine.distances == pytest.approx(theirs.distances)
    for detector in DETECTORS:
        assert mine.statistic(detector, thresholds) == pytest.approx(
            theirs.statistic(detector, thresholds)
        )


def test_history_norms_follow_the_ring(world) -> None:
    reference, thresholds = world
    state = ClientState(dim=DIM, history_size=16)
    X = natural(np.random.default_rng(5), 100)
    for start in range(0, len(X), 7):
        rows = X[start : start + 7]
        state.observe(rows, labels_of(rows), reference, thresholds)
    assert state.stored > 16  # the ring wrapped
    assert state.history_sq == pytest.approx((state.history**2).sum(axis=1), rel=1e-5)


def test_one_row_at_a_time_is_the_general_path(world) -> None:
    """observe() takes a shortcut for a single row (the monitor's common case); it must
    reach the state the general path reaches on the same rows."""
    reference, thresholds = world
    rng = np.random.default_rng(13)
    X = np.concatenate([natural(rng, 300), rng.uniform(-9, 9, size=(40, DIM))]).astype(
        np.float32
    )
    X[100:140] = X[60:100] + 0.02  # near-duplicates
    X[140:160] = X[60:80]  # exact repeats
    short, general = ClientState(dim=DIM), ClientState(dim=DIM)
    for i in range(len(X)):
        row = X[i : i + 1]
        short.observe(row, labels_of(row), reference, thresholds)
        fresh = general._match_rows(row, labels_of(row), thresholds)
        general.fold(reference.novelty(fresh), reference.residual(fresh), thresholds)
    assert short.repeats == general.repeats > 0
    assert short.n_steps == general.n_steps > 0
    assert (short.stored, short.queries) == (general.stored, general.queries)
    np.testing.assert_allclose(short.history, general.history)
    np.testing.assert_allclose(short.steps, general.steps, atol=1e-6)
    assert short.distances == pytest.approx(general.distances, rel=1e-5)
    assert (short.weight, short.novel) == pytest.approx((general.weight, general.novel))
    assert short.residual_sum == pytest.approx(general.residual_sum, rel=1e-6)


def test_step_width_counts_the_inputs_a_step_moves() -> None:
    sign_step = np.full(DIM, 1.6, dtype=np.float32) * np.where(np.arange(DIM) % 2, 1, -1)
    assert step_width(sign_step) == pytest.approx(DIM)
    edit = np.zeros(DIM, dtype=np.float32)
    edit[[2, 5, 9]] = [0.5, -0.5, 0.5]
    assert step_width(edit) == pytest.approx(3.0)
    edit[9] = 0.05  # one input dominating the others counts less than its share
    assert step_width(edit) < 2.1
    assert step_width(np.zeros(DIM, dtype=np.float32)) == 0.0


def test_dense_steps_tell_a_gradient_probe_from_a_local_explorer(world) -> None:  # type: ignore[no-untyped-def]
    """Both clients send near-duplicates of their own earlier queries, round after round:
    an explorer edits 1-3 inputs of its instance a step, a Jacobian-style probe steps every
    input of every earlier point by one amount. Only the probe's steps are dense; the
    explorer is not even suspected of it, however many queries it sends."""
    reference, thresholds = world
    assert math.isfinite(thresholds.dense_steps) and thresholds.dense_steps >= 4.0
    rng = np.random.default_rng(3)
    base = natural(rng, 1)[0]
    radius = thresholds.duplicate_radius
    explorer = np.repeat(base[None, :], 600, axis=0)
    for row in explorer:
        features = rng.choice(DIM, size=int(rng.integers(1, 4)), replace=False)
        row[features] += rng.normal(0, radius / 4, size=len(features))
    state, first = run(explorer, reference, thresholds)
    assert state.n_steps > 100  # it is all near-duplicates...
    assert "denseSteps" not in first  # ...of a narrow shape
    points = natural(rng, 4)
    probe = [points]
    step = radius / 2 / math.sqrt(DIM)
    while sum(len(p) for p in probe) < 300:
        seen = np.vstack(probe)
        probe.append(seen + step * rng.choice([-1.0, 1.0], size=seen.shape).astype(np.float32))
    state, first = run(np.vstack(probe)[:300], reference, thresholds)
    assert first.get("denseSteps", 10**6) <= 40


def test_effect_cuts_tell_a_slightly_shifted_population_from_noise(world) -> None:  # type: ignore[no-untyped-def]
    """coverage's z score grows with the square root of the queries: a natural population
    a little off the subspace (every record's small inputs shifted by half their spread)
    crosses its threshold given enough queries, but its mean residual (lower confidence
    bound) stays under the natural 99th percentile; noise is far beyond it."""
    reference, thresholds = world
    assert thresholds.residual_cut > thresholds.residual_mean
    assert thresholds.novelty_gate == pytest.approx(thresholds.novelty_cut, rel=1e-6)
    rng = np.random.default_rng(9)
    shifted = natural(rng, 2000)
    shifted[:, 4:] += 0.15
    state, first = run(shifted, reference, thresholds)
    assert "coverage" in first  # significant...
    residual, novelty = state.lower_mean("residual"), state.lower_mean("novelty")
    assert residual is not None and residual < thresholds.residual_cut  # ...but small
    assert novelty is not None and novelty < thresholds.novelty_gate
    noise, _ = run(rng.uniform(-8, 8, size=(64, DIM)).astype(np.float32), reference, thresholds)
    residual, novelty = noise.lower_mean("residual"), noise.lower_mean("novelty")
    assert residual is not None and residual > thresholds.residual_cut
    assert novelty is not None and novelty > thresholds.novelty_gate
