"""Held-out benign generators, round 2: real users' streams no calibration ever sees.

``calibrate.py`` calibrates every profile on its CALIBRATION generators and keeps a first
held-out set apart (sweeps, SHAP-style coalitions, cluster segments). After an external
check quarantined benign clients we had never written, these are a second held-out set,
written as real users produce them: explanation tools run over several instances in a row,
test-time augmentation, a population measured by a drifted sensor, retries, low-precision
and imputed inputs, batch jobs in sorted order, counterfactual searches and partial-
dependence plots. Nothing in ``controlplane`` imports this module: only tests
(``tests/unit/test_held_out_round2.py``) and the benchmark
(``bench/extraction/held_out_round2.py``) run them, and report them apart.

Every generator takes ``(rng, pool, n, **context)``: ``pool`` the natural records a user
has (a model's test split), ``n`` the queries it sends, ``context`` what some need besides
(``labels``: the model's class of any rows; ``image``: the rows' image shape). Streams are
float32 rows, like the calibration generators'.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
Labels = Callable[[FloatArray], npt.NDArray[np.int64]]


def _spread(pool: FloatArray) -> FloatArray:
    spread: FloatArray = pool.std(axis=0) + 1e-6
    return spread


def shap_kernel_user(rng: np.random.Generator, pool: FloatArray, n: int, **_: Any) -> FloatArray:
    """SHAP's KernelExplainer over several instances in a row, as the library runs it.

    A background set (10-20 records, or their k-means summary as ``shap.kmeans`` gives),
    then per instance: coalitions whose sizes follow the Shapley kernel (mostly very small
    or very large), and for each coalition one query per background record: the instance's
    inputs where the coalition says so, the background record's elsewhere. So a stream
    holds near-copies of the background and of the instance, and half-and-half chimeras.
    """
    d = pool.shape[1]
    m = int(rng.integers(10, 21))
    background = pool[rng.choice(len(pool), size=min(m, len(pool)), replace=False)]
    if rng.random() < 0.5:  # shap.kmeans: a summary of the data by cluster means
        from controlplane.extraction.calibrate import kmeans

        ids = kmeans(pool, len(background), int(rng.integers(0, 1000)))
        background = np.asarray(
            [pool[ids == j].mean(axis=0) for j in np.unique(ids)], dtype=np.float32
        )
    sizes = np.arange(1, d)
    kernel = (d - 1) / (sizes * (d - sizes))
    kernel /= kernel.sum()
    per_instance = int(rng.integers(100, 301))
    out: list[FloatArray] = []
    while len(out) < n:
        x = pool[int(rng.integers(0, len(pool)))]
        sent = 0
        while sent < per_instance and len(out) < n:
            size = int(rng.choice(sizes, p=kernel))
            keep = np.zeros(d, dtype=bool)
            keep[rng.choice(d, size=size, replace=False)] = True
            for b in background:
                out.append(np.where(keep, x, b).astype(np.float32))
                sent += 1
    return np.asarray(out[:n], dtype=np.float32)


def shap_instances_user(
    rng: np.random.Generator, pool: FloatArray, n: int, **_: Any
) -> FloatArray:
    """The first held-out SHAP-style client (small coalitions of background values put
    into one instance), explaining 2-5 instances one after the other: the known weak
    point (one such client was quarantined at query 112 on its second instance)."""
    from controlplane.extraction.calibrate import shap_user

    k = int(rng.integers(2, 6))
    parts = [shap_user(rng, pool, -(-n // k)) for _ in range(k)]
    rows: FloatArray = np.concatenate(parts)[:n]
    return rows


def _shift(img: FloatArray, dy: int, dx: int) -> FloatArray:
    out = np.zeros_like(img)
    h, w = img.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = img[ys, xs]
    return out


def augment_user(
    rng: np.random.Generator,
    pool: FloatArray,
    n: int,
    image: tuple[int, int] | None = None,
    **_: Any,
) -> FloatArray:
    """Test-time augmentation: each record sent as it is, then 2-6 augmented copies (the
    model's answer averaged over them). Images: one-pixel shifts, small rotations, sensor
    noise; tabular records: measurement noise of a few percent on every input."""
    from scipy import ndimage  # type: ignore[import-untyped]

    lo, hi = pool.min(axis=0), pool.max(axis=0)
    noise = float(rng.uniform(0.02, 0.1))
    out: list[FloatArray] = []
    while len(out) < n:
        x = pool[int(rng.integers(0, len(pool)))]
        out.append(x)
        for _copy in range(int(rng.integers(2, 7))):
            if image is not None:
                img = x.reshape(image)
                kind = int(rng.integers(0, 3))
                if kind == 0:
                    y = _shift(img, int(rng.integers(-1, 2)), int(rng.integers(-1, 2)))
                elif kind == 1:
                    y = ndimage.rotate(img, float(rng.uniform(-15, 15)), reshape=False,
                                       order=1, mode="constant")
                else:
                    y = img + rng.normal(0, noise * float(hi.max()), img.shape)
                row = np.clip(y.reshape(-1), lo.min(), hi.max())
            else:
                row = x * (1 + rng.normal(0, noise, x.shape))
            out.append(row.astype(np.float32))
    return np.asarray(out[:n], dtype=np.float32)


def drift_user(rng: np.random.Generator, pool: FloatArray, n: int, **_: Any) -> FloatArray:
    """A population measured by a new sensor: each input's gain a few percent off and a
    small offset (a tenth of its spread), the same for every record; natural records
    otherwise, each once."""
    d = pool.shape[1]
    gain = 1 + rng.normal(0, 0.05, d)
    offset = rng.normal(0, 0.1, d) * _spread(pool) * (pool.std(axis=0) > 0)
    idx = rng.permutation(len(pool))[:n]
    rows: FloatArray = (pool[idx] * gain + offset).astype(np.float32)
    if n > len(idx):  # a longer stream: the records again, drifted the same way
        rows = rows[np.resize(np.arange(len(idx)), n)]
    return rows


def retry_user(rng: np.random.Generator, pool: FloatArray, n: int, **_: Any) -> FloatArray:
    """Retries: every request sent 1-4 times in a row (timeouts, an impatient client), and
    now and then a whole earlier batch of 8 sent again."""
    out: list[FloatArray] = []
    while len(out) < n:
        if len(out) >= 8 and rng.random() < 0.1:
            start = int(rng.integers(0, len(out) - 7))
            out.extend(out[start : start + 8])
            continue
        x = pool[int(rng.integers(0, len(pool)))]
        out.extend([x] * int(rng.integers(1, 5)))
    return np.asarray(out[:n], dtype=np.float32)


def rounded_user(rng: np.random.Generator, pool: FloatArray, n: int, **_: Any) -> FloatArray:
    """Low-precision inputs: every input quantised to a grid of a fifth to half its
    spread (a coarse sensor, a form that keeps one decimal)."""
    step = _spread(pool) * float(rng.uniform(0.2, 0.5))
    idx = rng.choice(len(pool), size=n, replace=n > len(pool))
    rows: FloatArray = (np.round(pool[idx] / step) * step).astype(np.float32)
    return rows


def imputed_user(
    rng: np.random.Generator, pool: FloatArray, n: int, fill: str = "mean", **_: Any
) -> FloatArray:
    """Missing values imputed: each input missing with probability 5-20%, filled with the
    column's mean (scikit-learn's SimpleImputer default) or, ``fill="zero"``, with 0."""
    p = float(rng.uniform(0.05, 0.2))
    idx = rng.choice(len(pool), size=n, replace=n > len(pool))
    rows = pool[idx].copy()
    missing = rng.random(rows.shape) < p
    value = pool.mean(axis=0) if fill == "mean" else np.zeros(pool.shape[1], dtype=np.float32)
    rows[missing] = np.broadcast_to(value, rows.shape)[missing]
    return rows.astype(np.float32)


def sorted_user(
    rng: np.random.Generator,
    pool: FloatArray,
    n: int,
    labels: Labels | None = None,
    **_: Any,
) -> FloatArray:
    """A batch job scoring a table in its stored order: sorted by one input, or by the
    model's class (records grouped by their label), each record once."""
    idx = rng.permutation(len(pool))[:n]
    rows = pool[idx]
    if labels is not None and rng.random() < 0.5:
        order = np.argsort(labels(rows), kind="stable")
    else:
        order = np.argsort(rows[:, int(rng.integers(0, pool.shape[1]))], kind="stable")
    result: FloatArray = rows[order]
    return result


def counterfactual_user(
    rng: np.random.Generator,
    pool: FloatArray,
    n: int,
    labels: Labels | None = None,
    **_: Any,
) -> FloatArray:
    """Counterfactual explanations: an analyst walks a real record toward the nearest
    record of another class in the 1-3 inputs where they differ most (in spreads), a tenth
    of the gap a step, until the model's answer changes, then takes another record."""
    if labels is None:
        raise ValueError("counterfactual_user needs labels")
    spread = _spread(pool)
    classes = labels(pool)
    out: list[FloatArray] = []
    while len(out) < n:
        i = int(rng.integers(0, len(pool)))
        others = np.flatnonzero(classes != classes[i])
        if len(others) == 0:
            return np.asarray([pool[i]] * n, dtype=np.float32)
        gaps = (pool[others] - pool[i]) / spread
        target = pool[others[int(np.einsum("ij,ij->i", gaps, gaps).argmin())]]
        diff = np.abs((target - pool[i]) / spread)
        features = np.argsort(diff)[::-1][: int(rng.integers(1, 4))]
        x = pool[i].copy()
        out.append(x.copy())
        for _step in range(20):
            x[features] += 0.1 * (target[features] - pool[i][features])
            out.append(x.copy())
            if labels(x[None, :])[0] != classes[i]:
                break
    return np.asarray(out[:n], dtype=np.float32)


def pdp_user(rng: np.random.Generator, pool: FloatArray, n: int, **_: Any) -> FloatArray:
    """A partial-dependence plot (scikit-learn's ``partial_dependence``, brute method):
    for each of 20 grid values of one input (its 5th to 95th percentile), every record of
    a sample of the data with that input set to the value; then another input."""
    sample = pool[rng.choice(len(pool), size=min(int(rng.integers(20, 101)), len(pool)),
                             replace=False)]
    varying = np.flatnonzero(pool.std(axis=0) > 0)
    out: list[FloatArray] = []
    while len(out) < n:
        f = int(rng.choice(varying))
        for v in np.quantile(pool[:, f], np.linspace(0.05, 0.95, 20)):
            rows = sample.copy()
            rows[:, f] = v
            out.extend(rows)
    return np.asarray(out[:n], dtype=np.float32)


Generator = Callable[..., FloatArray]
# Kind → generator and its stream length (queries). Counterfactual walks resemble attacks
# (small steps toward the decision boundary); they are reported, and a test may not
# require them to pass unthrottled. ``imputed-zero`` fills missing inputs with 0, values
# many inputs never take: reported too, not required.
ROUND2: dict[str, tuple[Generator, int]] = {
    "shap-kernel": (shap_kernel_user, 600),
    "shap-instances": (shap_instances_user, 600),
    "augment": (augment_user, 400),
    "drift": (drift_user, 300),
    "retry": (retry_user, 400),
    "rounded": (rounded_user, 300),
    "imputed-mean": (imputed_user, 300),
    "sorted": (sorted_user, 300),
    "counterfactual": (counterfactual_user, 300),
    "pdp": (pdp_user, 600),
}
REPORTED_ONLY = ("counterfactual", "imputed-zero")


def round2_clients(
    rng: np.random.Generator,
    pool: FloatArray,
    per_kind: int,
    labels: Labels,
    image: tuple[int, int] | None = None,
    kinds: tuple[str, ...] = (*ROUND2, "imputed-zero"),
) -> Iterator[tuple[str, FloatArray]]:
    """``per_kind`` clients of each kind, named ``<kind>-<i>``, in a fixed order."""
    pool = np.asarray(pool, dtype=np.float32)
    for i in range(per_kind):
        for kind in kinds:
            if kind == "imputed-zero":
                yield f"{kind}-{i}", imputed_user(rng, pool, 300, fill="zero")
                continue
            make, n = ROUND2[kind]
            yield f"{kind}-{i}", make(rng, pool, n, labels=labels, image=image)
