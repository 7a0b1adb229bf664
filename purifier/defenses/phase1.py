"""MemGuard's Phase I, fast and in constant work: the smallest noise that carries a vector across
the defender's 0.5 boundary, found by a boundary search along three short paths, as one ONNX graph.

Jia et al., "MemGuard", CCS 2019 (docs/design.md#memguard-fast-solver). Rows p (N, C) float64
in class order come back as (noised (N, C) in class order, success (N,) bool); a row that fails is
its clean self. The search works on the sorted vector (ascending; softmax is monotone, so sorted
logits map to sorted probabilities). A candidate succeeds when its top class is still on top
(first index on ties, as numpy's argmax) and `h`'s pre-sigmoid output, on the candidate re-sorted
as an attacker sorting the released vector sees it, has changed sign versus the clean vector
(h * sign(h0) <= 0).

Three paths t -> vector leave the clean sorted vector s (t = 0):

* the ray along h's steepest logit direction (the faithful solver's first step), logits
  re-sorted so the released vector keeps the clean ranking, t in (0, T_MAX];
* two order-keeping mixtures s + t (v - s), t in (0, 1): towards the one-hot top (more
  confident) and towards the top two at 1/2 each (mass moved to the runner-up, what the faithful
  solver does on saturated rows).

A grid of 8 probes per path (multiples of the linearised boundary distance, and fixed fractions
of the path), all paths in one pass of h, brackets each path's first crossing; the path whose
grid crossing is nearest in L1 is narrowed by LEVELS rounds of bisection (2**-8 of its bracket)
and released.

**One graph, one call.** The whole schedule (the sort and its inverse, h0 and its gradient, the
24 grid probes, the bisection, and MemGuard's release coin for rows whose coin comes as an input:
output `released`, `Phase1Solver.released`) is written as one ONNX graph (`build_graph`, from the fitted weights when
the defense is loaded, `purifier.models.onnx_graph`) that onnxruntime runs in a single call per
batch: no per-probe Python or numpy call overhead, the GIL released for the whole search, and the
same graph runs on the CUDA provider. Selection is Where/Gather/ArgMax, never a branch. At one row
onnxruntime's cost is mostly per operator, so the graph is written for few of them (one table
lookup per bisection pass, the class axis padded once; docs/design.md#memguard-fast-solver).

**Constant work.** Every row takes exactly the same operations, whatever `h` says about it: the
graph has no control flow (no If/Loop/Scan) and no operator whose work depends on a row's values
beyond sorting; all three paths, the full grid and every bisection level run for rows that cross
early, late, never, or sit on the boundary (|sigmoid(h0) - 0.5| <= EARLY_EXIT: no noise) alike,
and results are selected with masks. MemGuard's running time therefore carries no trace of its
membership verdict beyond the sorts: onnxruntime's TopK takes data-dependent time, a fraction of
a microsecond per call (docs/design.md#memguard-fast-solver; benchmarks/bench_timing.py measures
both the sidecar's latency and the defense call alone). The schedule is the same for every batch size
too (one graph, one session). Rows are independent of the batch around them (every operator is
row-wise; onnxruntime's float32 Gemm on the prepacked constant weights rounds a row the same way
whatever the row count, one row included, and the class axis padded to a multiple of 8 (`_Ops`)
does the rest; checked by tests/unit/defenses/test_memguard_fast.py, on the machine it runs on).

`phase1_faithful` (torch) is the original algorithm, the reference this solver is checked against.
Arrays: p (N, C); sorted, padded probabilities s (N, width); paths P = 3; probes (N, P, K).
"""

from __future__ import annotations

import numpy as np

from purifier.defenses.membership_classifier import MembershipClassifier
from purifier.models.onnx_graph import GraphBuilder

STEP, MAX_STEPS = 0.1, 299  # the faithful solver's step length and step budget per c3 level
EARLY_EXIT = 1e-5  # |sigmoid(h0) - 0.5| at or below this: already on the boundary, no noise
# the same band on h's pre-sigmoid output: |sigmoid(h0) - 0.5| <= EARLY_EXIT <=> |h0| <= this
EARLY_EXIT_LOGIT = float(np.log((0.5 + EARLY_EXIT) / (0.5 - EARLY_EXIT)))
LOG_FLOOR = 1e-30  # zero probabilities get logit log(1e-30): finite, and softmax barely moves them
PAD_LOGIT = -1e3  # added to the pads' logits: exp underflows to exactly 0, below any real class

# The ray is probed up to the faithful solver's longest path; a mixture up to (almost) its target.
T_MAX = STEP * MAX_STEPS
MIX_T_MAX = 1.0 - 1e-9
# Grid per path, all paths in one pass: GRID_PREDICTED multiples of the linearised boundary
# distance and GRID_ABSOLUTE fractions of the path's length (neighbouring probes ~2.5x apart).
GRID_PREDICTED = np.geomspace(0.5, 8.0, 4)
GRID_ABSOLUTE = np.geomspace(1e-2 / T_MAX, 1.0, 4)
N_GRID = len(GRID_PREDICTED) + len(GRID_ABSOLUTE)
# Bisection levels on the chosen path: the crossing to 2**-8 of its grid bracket (~0.6% of t).
LEVELS = 8
# Bisection levels settled per pass of h: 3 speculative probes settle 2 levels, so 4 passes of 3
# probes instead of 8 passes of 1. Each pass has a fixed cost in onnxruntime (about 26 nodes,
# 14 us at one row), so this is the faster schedule for the small batches that dominate serving,
# at a few percent more work on large ones (3 levels per pass, 3 passes, measured no faster at one
# row in the serving process; 4 levels would need a 2**15-entry decoding table); one schedule for
# every batch size is one session to build at start-up.
LEVELS_PER_PASS = 2
N_PATHS = 3
F64 = np.float64
# h runs in float32, on the clean vector (h0 and its gradient) and on the probes: onnxruntime's
# float32 Gemm costs about half float64's; the paths and the released vectors are float64.
# h's sign can differ from float64's only where |h| < ~1e-6, far inside the EARLY_EXIT band
# (|h0| <= 4e-5 gets no noise) (docs/design.md#memguard-fast-solver).
PROBE_DTYPE, PROBE_ONNX_TYPE = np.float32, 1


def sort_rows(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """p (N, C) -> (order (N, C) stable ascending argsort, sorted logits e0 (N, C), top (N,)).

    The stable sort puts the original first-index argmax first among tied maxima, so the sorted
    top position `top` is exactly the class the output must keep.
    """
    order = np.argsort(p, axis=1, kind="stable")
    s = p[_row_index(len(p)), order]
    return order, np.log(np.maximum(s, LOG_FLOOR)), s.argmax(axis=1)


def unsort_rows(sorted_rows: np.ndarray, order: np.ndarray) -> np.ndarray:
    out = np.empty_like(sorted_rows)
    out[_row_index(len(order)), order] = sorted_rows
    return out


def _row_index(n: int) -> np.ndarray:
    """(n, 1) row numbers: with an (n, C) order, fancy indexing picks each row's entries (what
    take_along_axis and put_along_axis do, at a third of their cost on one row)."""
    return np.arange(n)[:, None]


class _Ops:
    """The graph vocabulary the search is written in: numpy-like helpers over a GraphBuilder.

    The class axis is padded at the front (the low end of an ascending row) to `width`, a multiple
    of 8 (`pad` entries): onnxruntime's float64 Exp, Log and ReduceSum run in SIMD packets aligned
    to the tensor's memory, and elements outside whole packets take scalar code that rounds (Exp,
    Log) or groups a sum differently, so a row's result would depend on where it lies in the batch.
    With rows of a multiple of 8 elements every row is split into packets the same way. The pads
    carry logit PAD_LOGIT (probability exactly 0, below every real class in every sort) and zero
    weights in h's first layer, so they change nothing h or a path computes.
    """

    n: str  # the row count N as a graph value, once `build_graph` has the input

    def __init__(self, g: GraphBuilder, h: MembershipClassifier):
        self.g, self.c = g, h.n_classes
        self.pad = -self.c % 8
        self.width = self.c + self.pad
        self._consts: dict[tuple, str] = {}
        a = h.arrays
        w1 = np.concatenate([np.zeros((a["w1"].shape[0], self.pad)), a["w1"]], axis=1)
        layers = [w1, a["w2"], a["w3"]]
        # one PROBE_DTYPE copy of each layer, transposed: x @ W.T + b as Gemm(x, W.T, b), and the
        # gradient g @ W as Gemm(g, W.T, transB=1)
        self.wt = [self.k(w.T, PROBE_DTYPE) for w in [*layers, a["w4"]]]
        self.b = [self.k(a[f"b{i}"], PROBE_DTYPE) for i in (1, 2, 3, 4)]
        self.w4_row = self.k(a["w4"][0], PROBE_DTYPE)

    def k(self, value, dtype=F64) -> str:
        """A constant, shared by every node that uses the same value."""
        arr = np.asarray(value, dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.g.const(arr)
        return self._consts[key]

    def i(self, *values: int) -> str:
        return self.k(list(values), np.int64)

    def __getattr__(self, op_type: str):  # o.Add(a, b) -> g.op("Add", a, b)
        return lambda *inputs, **attrs: self.g.op(op_type, *inputs, **attrs)

    def sum(self, x: str, keepdims: int = 1) -> str:
        """Sum over the last axis."""
        return self.g.op("ReduceSum", x, self.i(-1), keepdims=keepdims)

    def unsqueeze(self, x: str, *axes: int) -> str:
        return self.g.op("Unsqueeze", x, self.i(*axes))

    def squeeze(self, x: str, *axes: int) -> str:
        return self.g.op("Squeeze", x, self.i(*axes))

    def part(self, x: str, axis: int, start: int, stop: int) -> str:
        return self.g.op("Slice", x, self.i(start), self.i(stop), self.i(axis))

    def sort(self, x: str, length: int, outputs: int = 1):
        """Ascending sort of the last axis (of `length`); stable (onnxruntime's TopK puts the lower
        index first among equal values). Values, or (values, indices) with outputs=2."""
        out = self.g.op("TopK", x, self.i(length), axis=-1, largest=0, sorted=1, outputs=2)
        return out[0] if outputs == 1 else out

    def normalized(self, z: str) -> str:
        """z (..., width) >= 0 divided by its sum over the last axis (softmax's last step). Not
        LpNormalization, one operator fewer on the CPU: the CUDA provider has no kernel for it."""
        return self.Div(z, self.sum(z))

    def f64(self, x: str) -> str:
        return self.Cast(x, to=11)

    def rows(self, x: str, *dims: int) -> str:
        """x broadcast to (N, *dims), N the batch's row count (`self.n`, a shape tensor)."""
        return self.Expand(x, self.Concat(self.n, self.i(*dims), axis=0))

    # --- h, the defender's MLP ------------------------------------------------------------

    def h_logit_and_grad(self, x: str) -> tuple[str, str]:
        """(N, width) float64 -> ((N, 1) pre-sigmoid output, its gradient (N, width)), float64 from
        h in PROBE_DTYPE; ReLU'(0) = 0 as in torch. The anchor's real entries are at least
        LOG_FLOOR / C, normal numbers in float32, and its pads are 0."""
        wt, b = self.wt, self.b
        z1 = self.Gemm(self.Cast(x, to=PROBE_ONNX_TYPE), wt[0], b[0])
        z2 = self.Gemm(self.Relu(z1), wt[1], b[1])
        z3 = self.Gemm(self.Relu(z2), wt[2], b[2])
        out = self.Gemm(self.Relu(z3), wt[3], b[3])
        zero = self.k(0.0, PROBE_DTYPE)
        g3 = self.Where(self.Greater(z3, zero), self.w4_row, zero)
        g2 = self.Where(self.Greater(z2, zero), self.Gemm(g3, wt[2], transB=1), zero)
        g1 = self.Where(self.Greater(z1, zero), self.Gemm(g2, wt[1], transB=1), zero)
        return self.f64(out), self.f64(self.Gemm(g1, wt[0], transB=1))

    def crossed(self, vectors: str, sign: str, lead: tuple[int, ...]) -> str:
        """Sorted vectors (N, *lead, width) -> (N, *lead) bool: h's sign on them is not h0's
        (h * sign(h0) <= 0); `sign` is sign(h0) in PROBE_DTYPE, shaped (N, 1, ...) to broadcast."""
        a = self.Reshape(vectors, self.i(-1, self.width))
        # probabilities below float32's smallest normal (common in confident rows) would become
        # subnormal numbers, which some CPUs multiply far more slowly: a timing difference
        # between confident and unsure rows. They go to 0 (a change far below h's resolution).
        tiny = self.k(float(np.finfo(PROBE_DTYPE).tiny))
        a = self.Cast(self.Where(self.Less(a, tiny), self.k(0.0), a), to=PROBE_ONNX_TYPE)
        for w, b in zip(self.wt[:3], self.b[:3], strict=True):
            a = self.Relu(self.Gemm(a, w, b))
        out = self.Reshape(self.Gemm(a, self.wt[3], self.b[3]), self.i(-1, *lead))
        return self.LessOrEqual(self.Mul(out, sign), self.k(0.0, PROBE_DTYPE))


def bisection_table(levels: int) -> np.ndarray:
    """Where one pass of bisection over `levels` levels lands, for every outcome of its probes.

    A pass probes the 2**levels - 1 points j = 1 .. 2**levels - 1 of its bracket at once; bisection
    then reads them in order (the midpoint first: crossed -> the lower half, else the upper), which
    leaves it `offset` points above the bracket's start. Entry `code` (bit j - 1 set when probe j
    crossed) holds that offset, so the graph decodes a pass with one lookup instead of a chain of
    `levels` selections. (2**(2**levels - 1),) int64.
    """
    count = 2 ** levels - 1
    table = np.empty(2 ** count, np.int64)
    for code in range(2 ** count):
        offset = 0
        for level in range(levels):
            half = 2 ** (levels - level - 1)
            if not code >> (offset + half - 1) & 1:
                offset += half
        table[code] = offset
    return table


def build_graph(h: MembershipClassifier) -> GraphBuilder:
    """The whole search for one fitted h.

    Graph inputs `probs` (N, C) float64 in class order, `coin` and `epsilon` (N,) float64;
    outputs `noised` (N, C) float64 in class order, `success` (N,) bool and `released` (N, C),
    each row noised or clean by its coin (`Phase1Solver.released`). The graph sorts each row
    (stable ascending, `sort_rows`' order) and puts the answer back in class order itself.
    """
    g = GraphBuilder("memguard_phase1")
    o = _Ops(g, h)
    c, width, pad = h.n_classes, o.width, o.pad
    x = g.input("probs", F64, ("N", c))
    o.n = o.part(o.Shape(x), 0, 0, 1)
    x_sorted, order = o.sort(x, c, outputs=2)
    xs = o.Pad(x_sorted, o.i(0, pad, 0, 0), o.k(0.0)) if pad else x_sorted  # (N, width)
    top = o.ArgMax(xs, axis=1, keepdims=1)  # (N, 1): first index, as numpy's argmax
    e0 = o.Log(o.Max(xs, o.k(LOG_FLOOR)))
    if pad:
        e0 = o.Add(e0, o.k(np.r_[np.full(pad, PAD_LOGIT), np.zeros(c)][None]))
    z = o.Exp(o.Sub(e0, o.ReduceMax(e0, axes=[-1], keepdims=1)))
    s = o.normalized(z)  # the anchor: softmax(e0), shifted by the row maximum as numpy computes it
    h0, gp = o.h_logit_and_grad(s)  # (N, 1), (N, width)
    # |sigmoid(h0) - 0.5| > EARLY_EXIT, as |h0| > logit(0.5 + EARLY_EXIT)
    off_boundary = o.Greater(o.Abs(h0), o.k(EARLY_EXIT_LOGIT))  # (N, 1)
    sign_h0 = o.Sign(h0)
    sign_2 = o.Cast(sign_h0, to=PROBE_ONNX_TYPE)  # (N, 1)
    sign_3 = o.unsqueeze(sign_2, 2)  # (N, 1, 1)

    # --- the three paths ------------------------------------------------------------------
    # the ray: h's gradient carried back through softmax to the logits, towards the boundary
    ge = o.Mul(s, o.Sub(gp, o.sum(o.Mul(gp, s))))
    norm = o.ReduceL2(ge, axes=[-1], keepdims=1)  # (N, 1)
    d = o.Mul(ge, o.Div(o.Neg(sign_h0), o.Where(o.Greater(norm, o.k(0.0)), norm, o.k(1.0))))
    e0_3, d_3, s_3 = o.unsqueeze(e0, 1), o.unsqueeze(d, 1), o.unsqueeze(s, 1)  # (N, 1, width)
    # the mixtures s + t (v - s): released towards the one-hot top and the top two (the last two
    # positions), (N, 2, width); as h sees them once re-sorted, the one-hot top re-sorted is the
    # last position (the entries after `top` tie with it), the top two are sorted already
    onehot = o.f64(o.Equal(o.k(np.arange(width)[None, :], np.int64), top))  # (N, width)
    toptwo, last = np.zeros(width), np.zeros(width)
    toptwo[-2:], last[-1] = 0.5, 1.0
    targets = o.Concat(o.unsqueeze(onehot, 1), o.rows(o.k(toptwo[None, None]), 1, width), axis=1)
    towards = o.Sub(targets, s_3)  # (N, 2, width), released
    towards_h = o.Sub(o.k(np.stack([last, toptwo])[None]), s_3)  # (N, 2, width), as h sees it

    def ray(t: str) -> str:
        """t (N, K, 1) -> (N, K, width): sorted logits (the released vector keeps the clean
        ranking); softmax keeps the order, so the vector is sorted as h sees it. No max shift:
        the logits lie in [log(LOG_FLOOR) - T_MAX, T_MAX] (d is a unit vector), far from exp's
        overflow and underflow."""
        return o.normalized(o.Exp(o.sort(o.Add(e0_3, o.Mul(t, d_3)), width)))

    def mix(t: str, direction: str) -> str:
        """s + t (v - s) for t (..., K, 1) and the direction v - s (..., C)."""
        return o.Add(s_3, o.Mul(t, direction))

    # linearised distance to the boundary along each path (the grid's unit): |h0| / slope
    slope_mix = o.Mul(o.Neg(sign_h0), o.sum(o.Mul(o.unsqueeze(gp, 1), towards), keepdims=0))  # (N, 2)
    slope = o.Concat(norm, slope_mix, axis=1)  # (N, 3)
    t_pred = o.Div(o.Abs(h0), o.Where(o.Greater(slope, o.k(0.0)), slope, o.k(1e-300)))
    t_max = np.array([T_MAX, MIX_T_MAX, MIX_T_MAX])

    # --- 1. the grid, every path in one pass: the first crossing on each path brackets it ---
    predicted = o.Min(o.Mul(o.unsqueeze(t_pred, 2), o.k(GRID_PREDICTED[None, None, :])),
                      o.k(t_max[None, :, None]))  # (N, 3, 4)
    # t = 0 and the fixed fractions; t = 0 sorts first (every grid point is >= 0) and is not probed
    absolute = np.c_[np.zeros(N_PATHS), t_max[:, None] * GRID_ABSOLUTE][None]
    from_zero = o.sort(o.Concat(predicted, o.rows(o.k(absolute), N_PATHS, absolute.shape[2]), axis=2),
                       N_GRID + 1)  # (N, 3, 9) ascending
    grid = o.part(from_zero, 2, 1, N_GRID + 1)  # (N, 3, 8)
    ray_grid = ray(o.Reshape(o.part(grid, 1, 0, 1), o.i(-1, N_GRID, 1)))  # (N, 8, width)
    mix_grid = o.Add(o.unsqueeze(s_3, 1), o.Mul(o.unsqueeze(o.part(grid, 1, 1, 3), 3),
                                                o.unsqueeze(towards_h, 2)))  # (N, 2, 8, width)
    probes = o.Concat(o.unsqueeze(ray_grid, 1), mix_grid, axis=1)
    crossed = o.Cast(o.crossed(probes, sign_3, (N_PATHS, N_GRID)), to=6)  # (N, 3, 8) int32
    first = o.ArgMax(crossed, axis=2, keepdims=1)  # (N, 3, 1): the first crossing (0 if none)
    hi = o.GatherElements(grid, first, axis=2)
    lo = o.GatherElements(from_zero, first, axis=2)  # (N, 3, 1): the grid point before, or 0
    any_crossed = o.Cast(o.ReduceMax(crossed, axes=[2], keepdims=0), to=9)  # (N, 3)

    # --- 2. the path whose grid crossing is nearest in L1 (top class kept), for every row ---
    row_shape = o.Concat(o.n, o.i(1, width), axis=0)  # (N, 1, width), to gather whole vectors
    ray_hi = o.GatherElements(ray_grid, o.Expand(o.part(first, 1, 0, 1), row_shape), axis=1)  # the probe itself
    at_hi = o.Concat(ray_hi, mix(o.part(hi, 1, 1, 3), towards), axis=1)  # (N, 3, width), released
    kept = o.Equal(o.ArgMax(at_hi, axis=2, keepdims=0), top)  # (N, 3)
    ok = o.And(o.And(any_crossed, kept), off_boundary)
    l1 = o.ReduceL1(o.Sub(at_hi, s_3), axes=[-1], keepdims=0)
    best = o.ArgMin(o.Where(ok, l1, o.k(np.inf)), axis=1, keepdims=1)  # (N, 1)
    success = o.GatherElements(ok, best, axis=1)  # (N, 1)
    best3 = o.unsqueeze(best, 2)  # (N, 1, 1)
    lo_b = o.GatherElements(lo, best3, axis=1)  # (N, 1, 1)
    step = o.Mul(o.Sub(o.GatherElements(hi, best3, axis=1), lo_b), o.k(1.0 / 2 ** LEVELS))
    # the chosen path of every row: the ray, or a mixture (its direction released, as h sees it)
    on_ray = o.Equal(best3, o.i(0))
    to_top = o.Equal(best3, o.i(1))
    chosen_h = o.Where(to_top, o.part(towards_h, 1, 0, 1), o.part(towards_h, 1, 1, 2))  # (N, 1, width)
    chosen_released = o.Where(to_top, o.part(towards, 1, 0, 1), o.part(towards, 1, 1, 2))

    def chosen(ks: str, direction: str) -> str:
        """Probe steps ks (N or 1, K, 1), whole numbers in float64 -> the chosen path's vectors
        (N, K, width) at lo + ks * step."""
        t = o.Add(lo_b, o.Mul(step, ks))
        return o.Where(on_ray, ray(t), mix(t, direction))

    # --- 3. bisection on the chosen path of every row (failed rows narrow a bracket nobody
    # uses): each pass probes 2**levels - 1 points and settles `levels` levels from them at once
    k_lo, done = None, 0
    while done < LEVELS:
        levels = min(LEVELS_PER_PASS, LEVELS - done)
        unit = 2 ** (LEVELS - done - levels)  # spacing of this pass's probes, in steps
        count = 2 ** levels - 1
        ks = o.k(unit * np.arange(1, count + 1)[None, :, None])  # (1, count, 1)
        hit = o.crossed(chosen(ks if k_lo is None else o.Add(k_lo, ks), chosen_h), sign_2, (count,))
        code = o.sum(o.Where(hit, o.k(2 ** np.arange(count), np.int64), o.k(0, np.int64)))  # (N, 1)
        offset = o.Gather(o.k(unit * bisection_table(levels)[:, None]), code, axis=0)  # (N, 1, 1)
        k_lo = offset if k_lo is None else o.Add(k_lo, offset)
        done += levels
    refined = o.squeeze(chosen(o.Add(k_lo, o.k(1.0)), chosen_released), 1)  # (N, width)
    refined_kept = o.Equal(o.ArgMax(refined, axis=1, keepdims=1), top)  # else the grid point, which kept it
    at_hi_best = o.squeeze(o.GatherElements(at_hi, o.Expand(best3, row_shape), axis=1), 1)
    noised = o.Where(o.And(success, refined_kept), refined, o.Where(success, at_hi_best, s))
    if pad:
        noised = o.part(noised, 1, pad, width)
    noised = o.ScatterElements(x, order, noised, axis=1)  # class order
    g.output(noised, "noised", F64, ("N", c))
    g.output(o.squeeze(success, 1), "success", np.bool_, ("N",))
    # MemGuard's release coin (`MemGuard.release_probability` is the rule): the noised row where
    # coin < min(epsilon / ||noised - p||_1, 1), else p; never where the search failed or moved
    # nothing. The coin is in [0, 1), so comparing it with epsilon / ||noised - p||_1 decides the same,
    # up to the rounding of the L1 sum (onnxruntime's order of addition, not numpy's).
    coin = o.unsqueeze(g.input("coin", F64, ("N",)), 1)
    epsilon = o.unsqueeze(g.input("epsilon", F64, ("N",)), 1)
    dist = o.ReduceL1(o.Sub(noised, x), axes=[-1], keepdims=1)  # (N, 1)
    moved = o.Greater(dist, o.k(0.0))
    below = o.Less(coin, o.Div(epsilon, o.Where(moved, dist, o.k(1.0))))
    g.output(o.Where(o.And(o.And(success, moved), below), noised, x), "released", F64, ("N", c))
    return g


class Phase1Solver:
    """The constant-work boundary search for one fitted h, on onnxruntime.

    `solver(p)` maps p (N, C) float64 in class order to (noised (N, C), success (N,)) in one run of
    one session, built here so that no request pays for it; the session is thread-safe and
    releases the GIL while it runs.
    """

    def __init__(self, h: MembershipClassifier, device: str = "cpu"):
        from purifier.models.onnx_runner import OnnxClassifier

        self.h, self.device = h, device
        self.graph = OnnxClassifier(build_graph(h).model_bytes(), device=device)

    def __call__(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        no_coin = np.zeros(len(p))
        noised, success = self.graph.session.run(["noised", "success"], {
            "probs": np.ascontiguousarray(p, F64), "coin": no_coin, "epsilon": no_coin})
        return noised, success

    def released(self, p: np.ndarray, coin: np.ndarray, epsilon: np.ndarray) -> np.ndarray:
        """MemGuard's answer to p (N, C): each row noised or clean by its coin in [0, 1) and budget
        epsilon (both (N,) float64), decided in the same run (`MemGuard.release_probability` is
        the rule, up to the rounding of the L1 sum). Epsilon comes per row: onnxruntime keys its cache of memory plans by the XOR of
        every input dimension, and inputs (N, C), (N,) and (1,) would cancel N out of it, so that
        after one large batch every one-row call ran without a plan (40 us slower)."""
        return self.graph.session.run(["released"], {"probs": np.ascontiguousarray(p, F64), "coin": coin,
                                                     "epsilon": epsilon})[0]
