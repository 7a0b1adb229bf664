"""Label-only attacks: they see predicted labels only, so confidence masking cannot stop them.

* Augmentation robustness (Choquette-Choo et al. 2021, "Label-Only Membership Inference
  Attacks"): query shifted and rotated copies of an image (for tabular rows: random bit flips
  of binary features, as the paper does for Purchase and Texas, and bounded uniform noise on
  the others); members stay correctly labelled under more of them. Score = fraction correct.
  The calibrated variant subtracts the fraction the attacker's shadow models that did not
  train on the record keep correct on the same copies (difficulty calibration, Watson et al.,
  ICLR 2022), which gives the attack power at low false-positive rates.
* Decision-boundary distance (Choquette-Choo et al. 2021; Li & Zhang 2021, "Membership Leakage
  in Label-Only Exposures"): the L2 distance from the input to the nearest label change, found
  by a decision-based search in the style of HopSkipJump (Chen, Jordan, Wainwright 2020):
  random start, binary search to the boundary, Monte-Carlo sign estimate of the boundary's
  normal, geometric step, binary search again. The search is batched over records and stops at
  an explicit per-record query budget. Score = distance (0 if already misclassified).

Thresholds come from the same procedure run against the attacker's shadow models.
"""

from __future__ import annotations

import numpy as np

from purifier.attacks.base import Attack, Coverage, Family, LabelOnly, fit_threshold
from purifier.attacks.reference_stats import leave_one_shadow_out, masked_stats


def image_augmentations(X: np.ndarray, image_shape: tuple[int, int, int], max_shift: int = 1,
                        angles: tuple[float, ...] = (-15.0, 15.0)) -> np.ndarray:
    """X (N, D) flat images -> (A, N, D) shifted (all |dx|, |dy| <= max_shift but (0, 0)) and
    rotated copies, zero-filled at the borders."""
    from scipy import ndimage

    imgs = X.reshape(-1, *image_shape)
    copies = []
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            if dx or dy:
                copies.append(ndimage.shift(imgs, (0, 0, dy, dx), order=0, cval=0.0))
    for angle in angles:
        copies.append(ndimage.rotate(imgs, angle, axes=(2, 3), reshape=False, order=1, cval=0.0))
    return np.stack(copies).reshape(len(copies), len(X), -1).astype(np.float32)


def binary_columns(X: np.ndarray) -> np.ndarray:
    """(N, D) -> (D,) bool: columns whose values are all 0 or 1."""
    return ((X == 0) | (X == 1)).all(axis=0)


def tabular_augmentations(X: np.ndarray, scale: np.ndarray, n_copies: int = 10, radius: float = 0.1,
                          seed: int | tuple[int, ...] = 0, binary: np.ndarray | None = None,
                          flip_prob: float = 0.03) -> np.ndarray:
    """X (N, D) -> (n_copies, N, D) float32 copies: the `binary` (D,) columns flipped with
    probability `flip_prob` each, the others moved by uniform noise in [-radius, radius] * scale."""
    rng = np.random.default_rng(seed)
    shape = (n_copies, *X.shape)
    noise = (2.0 * rng.random(shape, dtype=np.float32) - 1.0) * np.float32(radius) * scale.astype(np.float32)
    copies = X[None].astype(np.float32) + noise
    if binary is not None and binary.any():
        flip = rng.random(shape, dtype=np.float32) < flip_prob
        copies = np.where(binary, np.where(flip, 1.0 - X[None], X[None]), copies).astype(np.float32)
    return copies


class AugmentationAttack(Attack):
    """Fraction of (original + augmented) copies still labelled correctly."""

    name = "label_augment"
    family = Family.LABEL_ONLY
    coverage = Coverage.LABEL_AUGMENTATION

    def __init__(self, *, max_shift: int = 1, angles: tuple[float, ...] = (-15.0, 15.0),
                 n_noise: int = 10, radius: float = 0.1, flip_prob: float = 0.03,
                 calibration_shadows: int = 2, seed: int = 0):
        super().__init__(seed=seed)
        self.max_shift, self.angles, self.n_noise, self.radius = max_shift, angles, n_noise, radius
        self.flip_prob, self.calibration_shadows = flip_prob, calibration_shadows

    CHUNK = 1024  # records augmented at a time: (A + 1) x CHUNK x D stays tens of MB

    def augment(self, X: np.ndarray, offset: int = 0) -> np.ndarray:
        """(N, D) -> (A + 1, N, D), the original first. Tabular noise is seeded by (seed, offset),
        so the same rows at the same offset give the same copies (target and shadows alike)."""
        if self.image_shape is not None:
            aug = image_augmentations(X, self.image_shape, self.max_shift, self.angles)
        else:
            aug = tabular_augmentations(X, self.scale, self.n_noise, self.radius, (self.seed, offset),
                                        self.binary, self.flip_prob)
        return np.concatenate([X[None].astype(np.float32), aug])

    def _fractions(self, labels_fns, X, y, skip: np.ndarray | None = None) -> np.ndarray:
        """(F, N): per label function X (M, D) -> (M,), the fraction of each record's copies it
        labels y. Each chunk of records is augmented once and its copies shown to every function.
        skip (F, N) bool: records a function need not label (their fraction is left NaN)."""
        out = np.full((len(labels_fns), len(X)), np.nan)
        for s in range(0, len(X), self.CHUNK):  # a loop over chunks of records, not rows
            n = min(self.CHUNK, len(X) - s)
            copies = self.augment(X[s:s + n], s)
            want_y = y[None, s:s + n]
            for j, fn in enumerate(labels_fns):  # a loop over models
                keep = np.ones(n, bool) if skip is None else ~skip[j, s:s + n]
                if not keep.any():
                    continue
                rows = copies[:, keep] if not keep.all() else copies
                pred = fn(rows.reshape(-1, X.shape[1])).reshape(len(copies), -1)
                out[j, s + np.nonzero(keep)[0]] = (pred == want_y[:, keep]).mean(axis=0)
        return out

    def _fit_augmentation(self, ctx) -> None:
        pool_X = ctx.shadows.pool_X
        self.image_shape = ctx.image_shape if ctx.kind == "image" else None
        self.scale = pool_X.std(axis=0) + 1e-6
        self.binary = binary_columns(pool_X)

    def fit(self, ctx):
        sh = ctx.shadows
        self._fit_augmentation(ctx)
        k = min(self.calibration_shadows, sh.n_shadows)
        scores = self._fractions([sh.labels_fn(i) for i in range(k)], sh.pool_X, sh.pool_y)
        self.threshold = fit_threshold(scores.reshape(-1), sh.pool_in[:k].reshape(-1))
        return self

    def run(self, target, X, y, outputs):
        view = LabelOnly(target)
        before = view.queries
        scores = self._fractions([view.labels], X, y)[0]
        self.queries = view.queries - before
        self.details = {"copies_per_record": int(self.queries // max(len(X), 1))}
        return scores


class CalibratedAugmentationAttack(AugmentationAttack):
    """Fraction of copies the target labels correctly, minus the fraction the attacker's shadow
    models that did not train on the record label correctly on the same copies.

    Args:
        max_shadows: shadow models whose labels on the copies are computed (the first ones);
            a record's OUT shadows among them give its expected fraction.
        calibration_size: attacker-pool records for the leave-one-shadow-out threshold.
    """

    name = "label_augment_calibrated"

    def __init__(self, *, max_shadows: int = 8, calibration_size: int = 2000, **kwargs):
        super().__init__(**kwargs)
        self.max_shadows, self.calibration_size = max_shadows, calibration_size

    def fit(self, ctx):
        sh = ctx.shadows
        if ctx.candidate_labels is None:
            raise ValueError(f"{self.name} needs the candidates' labels (AttackContext.candidate_labels)")
        self._fit_augmentation(ctx)
        k = min(self.max_shadows, sh.n_shadows)
        self._labels_fns = [sh.labels_fn(i) for i in range(k)]
        self._cand_y, self._cand_in = np.asarray(ctx.candidate_labels), sh.cand_in[:k]
        rng = np.random.default_rng(self.seed)
        pick = np.sort(rng.permutation(len(sh.pool_y))[: self.calibration_size])
        frac = self._fractions(self._labels_fns, sh.pool_X[pick], sh.pool_y[pick])
        pool_in = sh.pool_in[:k, pick]
        loo = leave_one_shadow_out(k, pool_in, lambda i, rest: frac[i] - out_mean(frac[rest], pool_in[rest]))
        self.threshold = fit_threshold(*loo) if loo is not None else 0.0
        self._fit_details = {"shadows_used": k, "calibration_records": int(len(pick)),
                        "threshold_from": "leave-one-shadow-out on the attacker pool" if loo is not None
                        else "fixed 0 (one shadow: nothing to hold out)"}
        return self

    def run(self, target, X, y, outputs):
        if len(y) != len(self._cand_y) or not np.array_equal(y, self._cand_y):
            raise ValueError(f"{self.name} scores only the candidates its shadow models were trained for")
        view = LabelOnly(target)
        before = view.queries
        # the target and the shadows label the same copies, made once; a shadow's fraction is only
        # needed where it did not train on the record (the expected fraction is an OUT mean)
        skip = np.r_[np.zeros((1, len(X)), bool), self._cand_in]
        frac = self._fractions([view.labels, *self._labels_fns], X, y, skip)
        self.queries = view.queries - before
        self.details = {"copies_per_record": int(self.queries // max(len(X), 1)), **self._fit_details}
        return frac[0] - out_mean(np.nan_to_num(frac[1:]), self._cand_in)


def out_mean(values: np.ndarray, in_mask: np.ndarray) -> np.ndarray:
    """values, in_mask (K, N) -> (N,) mean over OUT rows; a record without OUT rows gets the
    mean of all OUT values."""
    mean, _, n = masked_stats(values, ~in_mask)
    fallback = float(values[~in_mask].mean()) if (~in_mask).any() else float(values.mean())
    return np.where(n > 0, mean, fallback)


def boundary_distance(labels_fn, X: np.ndarray, y: np.ndarray, budget: int, lo: np.ndarray,
                      hi: np.ndarray, seed: int = 0, chunk: int = 128, init_tries: int = 20,
                      bsearch_steps: int = 12, geo_tries: int = 8, b0: int = 20,
                      b_max: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """HopSkipJump-style L2 distance to the nearest label change, batched, budgeted.

    Args:
        labels_fn: X (M, D) -> (M,) labels; every row passed counts as one query.
        X (N, D), y (N,): records and true labels. lo, hi (D,): valid input bounds.
        budget: the most queries spent on any one record.
    Returns:
        distances (N,) (0 if misclassified; the domain diameter if no label change was found)
        and queries (N,) int spent per record (each <= budget).
    """
    rng = np.random.default_rng(seed)
    n, d = X.shape
    diameter = float(np.linalg.norm(hi - lo))
    dist = np.zeros(n)
    spent = np.zeros(n, np.int64)
    for s in range(0, n, chunk):
        sl = slice(s, s + chunk)
        dist[sl], spent[sl] = _search_chunk(labels_fn, X[sl].astype(np.float64), y[sl], budget, lo, hi, rng,
                                            diameter, init_tries, bsearch_steps, geo_tries, b0, b_max)
    return dist, spent


def _search_chunk(labels_fn, x0, y, budget, lo, hi, rng, diameter, init_tries, bsearch_steps,
                  geo_tries, b0, b_max):
    n, d = x0.shape
    q = np.ones(n, np.int64)
    correct = labels_fn(x0.astype(np.float32)) == y
    out = np.zeros(n)
    idx = np.nonzero(correct)[0]
    if len(idx) == 0 or budget < 1 + init_tries + bsearch_steps:
        out[idx] = diameter
        return out, q
    x, yy = x0[idx], y[idx]

    def ask(rows, who):
        q[idx[who]] += 1
        return labels_fn(rows.astype(np.float32)) != yy[who]  # True: label changed

    # random starting points with a different label
    adv, found = x.copy(), np.zeros(len(idx), bool)
    for _ in range(init_tries):
        need = np.nonzero(~found)[0]
        if len(need) == 0:
            break
        cand = rng.uniform(lo, hi, size=(len(need), d))
        ok = ask(cand, need)
        adv[need[ok]], found[need[ok]] = cand[ok], True
    out[idx[~found]] = diameter  # never left the class: as robust as anything we can measure
    sel = np.nonzero(found)[0]
    if len(sel) == 0:
        return out, q

    def bsearch(xa, who):
        a_lo, a_hi = np.zeros(len(who)), np.ones(len(who))
        base = x[who]
        for _ in range(bsearch_steps):
            mid = 0.5 * (a_lo + a_hi)
            changed = ask(base + mid[:, None] * (xa - base), who)
            a_hi, a_lo = np.where(changed, mid, a_hi), np.where(changed, a_lo, mid)
        return base + a_hi[:, None] * (xa - base)

    xb = bsearch(adv[sel], sel)
    cur = np.linalg.norm(xb - x[sel], axis=1)
    best = cur.copy()
    t = 0
    while True:
        n_dir = min(int(b0 * np.sqrt(t + 1)), b_max)
        active = q[idx[sel]] + n_dir + geo_tries + bsearch_steps <= budget
        if not active.any():
            break
        a = np.nonzero(active)[0]
        who, xa, da = sel[a], xb[a], cur[a]
        # Monte-Carlo estimate of the boundary normal from label changes around xb
        delta = np.maximum(da / d, 1e-6)
        u = rng.standard_normal((len(a), n_dir, d))
        u /= np.linalg.norm(u, axis=2, keepdims=True)
        probe = np.clip(xa[:, None] + delta[:, None, None] * u, lo, hi)
        q[idx[who]] += n_dir
        sign = np.where(labels_fn(probe.reshape(-1, d).astype(np.float32)).reshape(len(a), n_dir)
                        != yy[who][:, None], 1.0, -1.0)
        mean = sign.mean(axis=1, keepdims=True)
        sign = np.where(np.abs(mean) < 1.0, sign - mean, sign)  # baseline, unless all agree
        g = (sign[:, :, None] * u).mean(axis=1)
        g /= np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
        # geometric step along the estimate, halving until the label stays changed
        eps = da / np.sqrt(t + 1)
        new = xa.copy()
        pending = np.arange(len(a))
        for _ in range(geo_tries):
            if len(pending) == 0:
                break
            cand = np.clip(xa[pending] + eps[pending, None] * g[pending], lo, hi)
            ok = ask(cand, who[pending])
            new[pending[ok]] = cand[ok]
            eps[pending] /= 2
            pending = pending[~ok]
        xb[a] = bsearch(new, who)
        cur[a] = np.linalg.norm(xb[a] - x[who], axis=1)
        best[a] = np.minimum(best[a], cur[a])
        t += 1
    out[idx[sel]] = best
    return out, q


class BoundaryAttack(Attack):
    """Decision-boundary distance with a HopSkipJump-style search and a per-record budget."""

    name = "label_boundary"
    family = Family.LABEL_ONLY
    coverage = Coverage.LABEL_BOUNDARY

    def __init__(self, *, budget: int = 1000, calibration_size: int = 200, seed: int = 0):
        super().__init__(seed=seed)
        if not 50 <= budget <= 100_000:
            from purifier.errors import ConfigError

            raise ConfigError(f"boundary budget: {budget} queries per record; choose 50..100000")
        self.budget, self.calibration_size = budget, calibration_size

    def fit(self, ctx):
        sh = ctx.shadows
        self.lo, self.hi = (np.asarray(v, np.float64) for v in ctx.feature_range)
        rng = np.random.default_rng(self.seed)
        m = sh.pool_in[0]
        half = self.calibration_size // 2
        pick = np.r_[rng.permutation(np.nonzero(m)[0])[:half], rng.permutation(np.nonzero(~m)[0])[:half]]
        dist, _ = boundary_distance(sh.labels_fn(0), sh.pool_X[pick], sh.pool_y[pick], self.budget,
                                    self.lo, self.hi, seed=self.seed + 1)
        self.threshold = fit_threshold(dist, m[pick])
        return self

    def run(self, target, X, y, outputs):
        view = LabelOnly(target)
        before = view.queries
        dist, spent = boundary_distance(view.labels, X, y, self.budget, self.lo, self.hi, seed=self.seed + 2)
        self.queries = view.queries - before
        self.details = {"budget_per_record": self.budget, "max_queries_per_record": int(spent.max()),
                        "mean_queries_per_record": float(spent.mean())}
        return dist
