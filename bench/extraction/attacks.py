"""Extraction attacks and benign clients of the scoreboard, as query generators.

Every client is a generator: it yields a batch of query rows (0..16 pixels, 64 features),
receives the API's answer for them (a list of per-row score dicts ``{class: score}``, or
``None`` when the API refused), and yields the next batch. Attacks that learn from the
answers (Jacobian augmentation) use them; the others ignore them. The answers the attacker
collects are kept by the harness, which trains the substitute from them.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Answer = list[dict[int, float]] | None
Client = Generator[np.ndarray, Answer, None]
N_FEATURES, HI = 64, 16.0


@dataclass
class Spec:
    name: str
    kind: str  # "attack" | "benign"
    keys: int  # API keys the client spreads its queries over
    make: Callable[[np.random.Generator, int], Client]
    budget: int


def _rows(X: np.ndarray, batch: int) -> Iterator[np.ndarray]:
    for start in range(0, len(X), batch):
        yield X[start : start + batch]


def fixed(X: np.ndarray, batch: int = 1) -> Client:
    for rows in _rows(X, batch):
        answer = yield rows
        if answer is None:
            return


def uniform(rng: np.random.Generator, n: int) -> Client:
    """Uniform random queries over the input space (also the equation-solving queries)."""
    return fixed(rng.uniform(0, HI, size=(n, N_FEATURES)).round(2))


def natural_patches(rng: np.random.Generator, n: int) -> np.ndarray:
    """KnockoffNets-style natural images: 8x8 grey patches of the two photographs that ship
    inside scikit-learn, rescaled to the digits' 0..16 range."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    images = [np.asarray(Image.fromarray(img).convert("L"), dtype=np.float64)
              for img in load_sample_images().images]
    out = np.empty((n, N_FEATURES))
    for i in range(n):
        img = images[int(rng.integers(0, len(images)))]
        size = int(rng.integers(16, 129))
        y, x = (int(rng.integers(0, s - size)) for s in img.shape)
        patch = Image.fromarray(img[y : y + size, x : x + size].astype(np.uint8)).resize(
            (8, 8), Image.Resampling.BILINEAR
        )
        arr = np.asarray(patch, dtype=np.float64)
        lo, hi = arr.min(), arr.max()
        arr = (arr - lo) / (hi - lo) * HI if hi > lo else np.zeros_like(arr)
        if rng.random() < 0.5:  # digits are light strokes on dark: half the patches inverted
            arr = HI - arr
        out[i] = arr.ravel().round()
    return out


def natural(rng: np.random.Generator, n: int) -> Client:
    return fixed(natural_patches(rng, n))


def jacobian(pool: np.ndarray, seeds: int = 10, lam: float = 0.1) -> Callable[..., Client]:
    """Papernot et al. 2017: a small seed set, then rounds of Jacobian-based augmentation
    x + λ·sign(∂F_sub[y]/∂x) with a substitute retrained on the victim's labels each round."""

    def make(rng: np.random.Generator, n: int) -> Client:
        from sklearn.linear_model import LogisticRegression

        S = pool[rng.choice(len(pool), size=seeds, replace=False)].astype(np.float64)
        X_all: list[np.ndarray] = []
        y_all: list[int] = []
        new = S
        while len(X_all) < n:
            new = new[: n - len(X_all)]
            answer = yield new
            if answer is None:
                return
            X_all.extend(new)
            y_all.extend(max(a, key=a.__getitem__) for a in answer)
            X = np.asarray(X_all)
            y = np.asarray(y_all)
            if len(set(y_all)) < 2:
                W = np.zeros((10, N_FEATURES))
                classes = np.arange(10)
            else:
                sub = LogisticRegression(max_iter=500).fit(X / HI, y)
                W = sub.coef_ if len(sub.classes_) > 2 else np.vstack([-sub.coef_, sub.coef_])
                classes = sub.classes_
            # For a softmax substitute ∂p_y/∂x ∝ p_y (w_y − Σ_j p_j w_j): its sign.
            Xs = X / HI
            logits = Xs @ W.T
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
            index = {c: i for i, c in enumerate(classes)}
            rows = np.array([index.get(c, 0) for c in y])
            grad = W[rows] - p @ W
            new = np.clip(X + lam * HI * np.sign(grad), 0, HI).round(2)
        return

    return make


def interleaved(attack: Callable[..., Client], pool: np.ndarray) -> Callable[..., Client]:
    """An adaptive attacker: every attack query is followed by a natural in-distribution one."""

    def make(rng: np.random.Generator, n: int) -> Client:
        inner = attack(rng, n // 2)
        try:
            rows = next(inner)
        except StopIteration:
            return
        while True:
            out: list[np.ndarray] = []
            for row in rows:
                out.append(row)
                out.append(pool[int(rng.integers(0, len(pool)))])
            answer = yield np.asarray(out)
            if answer is None:
                return
            try:
                rows = inner.send(answer[0::2])
            except StopIteration:
                return

    return make


def scenario(test_X: np.ndarray, attacker_pool: np.ndarray) -> list[Spec]:
    """The clients of one benchmark run. ``attacker_pool`` is natural data the attacker owns
    (disjoint from the benign users' records); benign users draw from ``test_X``."""
    from controlplane.extraction import calibrate as C
    from controlplane.extraction.calibrate import heavy_user, iid_user, whatif_user
    from controlplane.local.model import load_digits_data, load_model

    model = load_model(0)
    classes = model.predict(test_X).astype(np.int16)
    clusters = C.kmeans(test_X.astype(np.float32), 8, 1)
    images, digit = load_digits_data()

    def pool_fixed(fn: Callable[..., np.ndarray]) -> Callable[..., Client]:
        return lambda rng, n: fixed(fn(rng, test_X, n))

    return [
        Spec("equation-solving (uniform, Tramèr)", "attack", 1, uniform, 1000),
        Spec("jacobian augmentation (Papernot)", "attack", 1, jacobian(attacker_pool), 1000),
        Spec("uniform random", "attack", 1, uniform, 1000),
        Spec("natural OOD (KnockoffNets-style)", "attack", 1, natural, 1000),
        Spec("in-distribution", "attack", 1,
             lambda rng, n: fixed(attacker_pool[rng.integers(0, len(attacker_pool), n)]), 1000),
        Spec("uniform split over 4 keys", "attack", 4, uniform, 1000),
        Spec("jacobian interleaved with benign", "attack", 1,
             interleaved(jacobian(attacker_pool), attacker_pool), 1000),
        Spec("uniform interleaved with benign", "attack", 1,
             interleaved(uniform, attacker_pool), 1000),
        *[Spec(f"benign iid #{i}", "benign", 1, pool_fixed(iid_user), 300) for i in range(8)],
        *[Spec(f"benign heavy #{i}", "benign", 1, pool_fixed(heavy_user), 1500)
          for i in range(4)],
        *[Spec(f"benign what-if #{i}", "benign", 1, pool_fixed(whatif_user), 300)
          for i in range(8)],
        *[Spec(f"benign local (LIME-style) #{i}", "benign", 1, pool_fixed(C.local_user), 600)
          for i in range(4)],
        *[Spec(f"benign single class #{i}", "benign", 1,
               lambda rng, n: fixed(C.segment_user(rng, test_X, n, classes)), 300)
          for i in range(4)],
        # Held out of calibration: generators it never saw, and real images of one class.
        *[Spec(f"held-out sweep #{i}", "held-out", 1, pool_fixed(C.sweep_user), 300)
          for i in range(4)],
        *[Spec(f"held-out SHAP-style #{i}", "held-out", 1, pool_fixed(C.shap_user), 600)
          for i in range(4)],
        *[Spec(f"held-out cluster #{i}", "held-out", 1,
               lambda rng, n: fixed(C.segment_user(rng, test_X, n, clusters)), 300)
          for i in range(4)],
        *[Spec(f"held-out sklearn class {c}", "held-out", 1,
               lambda rng, n, c=c: fixed(images[digit == c][:n]), 200) for c in range(10)],
        *round2_specs(test_X, model.predict, (8, 8)),
    ]


def round2_specs(
    test_X: np.ndarray, predict: Callable[[np.ndarray], np.ndarray],
    image: tuple[int, int] | None = None,
) -> list[Spec]:
    """Held out, round 2 (``controlplane/extraction/held_out.py``): one client of each kind,
    reported apart (kind ``held-out-2``); their stream lengths are the generators' own."""
    from controlplane.extraction.held_out import ROUND2, imputed_user

    pool = np.asarray(test_X, dtype=np.float32)

    def labels(X: np.ndarray) -> np.ndarray:
        return np.asarray(predict(X))

    def make(kind: str) -> Callable[..., Client]:
        if kind == "imputed-zero":
            return lambda rng, n: fixed(imputed_user(rng, pool, n, fill="zero"))
        generator = ROUND2[kind][0]
        return lambda rng, n: fixed(generator(rng, pool, n, labels=labels, image=image))

    lengths = {kind: n for kind, (_, n) in ROUND2.items()} | {"imputed-zero": 300}
    return [Spec(f"held-out-2 {kind}", "held-out-2", 1, make(kind), n)
            for kind, n in lengths.items()]


def sample_image_paths() -> list[Path]:
    import sklearn.datasets

    return sorted((Path(sklearn.datasets.__file__).parent / "images").glob("*.jpg"))
