"""MemGuard's fast Phase I (`phase1.Phase1Solver`: the whole search as one onnxruntime graph):
constant work (every row executes the same graph nodes on the same shapes, whatever h says),
rows independent of the batch and of their position in it, and row for row the numpy solver it
replaced (`numpy_phase1_frozen`, a frozen copy) on the digits target and on 100 classes."""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from numpy_phase1_frozen import numpy_phase1
from random_h import random_weights

from purifier.defenses.base import FitData
from purifier.defenses.membership_classifier import MembershipClassifier, TrainSettings
from purifier.defenses.phase1 import LOG_FLOOR, Phase1Solver, _Ops, build_graph
from purifier.defenses.phase1_faithful import TorchMLP
from purifier.models.onnx_graph import GraphBuilder

# Every operator the graph may use: row-wise arithmetic, reductions, sorting and selection whose
# work depends on shapes only. No control flow (If, Loop, Scan) and nothing whose output size
# depends on values (NonZero, Compress, Unique).
FIXED_WORK_OPS = {
    "Abs", "Add", "And", "ArgMax", "ArgMin", "Cast", "Concat", "Div", "Equal", "Exp", "Expand", "Gather",
    "GatherElements", "Gemm", "Greater", "Identity", "Less", "LessOrEqual", "Log", "MatMul",
    "Max", "Min", "Mul", "Neg", "Pad", "ReduceL1", "ReduceL2", "ReduceMax", "ReduceSum", "Relu", "Reshape",
    "ScatterElements", "Shape", "Sign", "Slice", "Sqrt", "Squeeze", "Sub", "TopK", "Unsqueeze", "Where",
}


def classifier(n_classes, seed):
    """A real (untrained, seeded) 256-128-64-1 classifier, its output bias set so that its 0.5
    boundary cuts the rows of `rows(..., n_classes, seed)` in half (else nothing can cross)."""
    weights = random_weights(n_classes, seed)
    out = MembershipClassifier(weights).logit(np.sort(rows(12, n_classes, seed), axis=1))
    weights["b4"] = weights["b4"] - np.median(out)
    return MembershipClassifier(weights)


def rows(n, c, seed):
    """Dirichlet rows from flat to saturated, plus a tied top, a uniform row and a one-hot row."""
    rng = np.random.default_rng(seed)
    p = np.concatenate([rng.dirichlet(np.full(c, a), size=n) for a in (0.05, 0.3, 3.0)])
    tied = np.full(c, 0.1 / max(c - 2, 1))
    tied[:2] = 0.45 if c > 2 else 0.5
    onehot = np.zeros(c)
    onehot[c // 2] = 1.0
    extra = np.stack([tied, np.full(c, 1.0 / c), onehot])
    return np.concatenate([p, extra / extra.sum(1, keepdims=True)])


def anchor(p):
    """The sorted vector the solver starts from (softmax of the sorted logits), numpy."""
    e = np.log(np.maximum(np.sort(p, axis=1), LOG_FLOOR))
    z = np.exp(e - e.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def with_boundary_row(h, p, i):
    """h shifted so that row i sits on its boundary (h0 ~ 0: the no-noise early exit)."""
    weights = {k: v.copy() for k, v in h.arrays.items()}
    weights["b4"] = weights["b4"] - h.logit(anchor(p[i:i + 1]))
    return MembershipClassifier(weights)


_COINS = np.random.default_rng(11)


def feed(batch: np.ndarray) -> dict:
    """The graph's inputs for a batch: coins drawn afresh for every batch (near 0 releases a noised
    row, near 1 keeps it clean), so runs compared with each other differ in their coins too."""
    n = len(batch)
    return {"probs": batch, "coin": _COINS.choice([0.0, 0.001, 0.5, 0.999], n), "epsilon": np.full(n, 0.05)}


def executed_nodes(model: bytes, batches, tmp_path: Path) -> list[list[tuple]]:
    """Run each batch through a profiling onnxruntime session; per run, the executed nodes in
    order with their operator and input/output shapes (the release coin's included)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp_path / "phase1")
    session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    for batch in batches:
        session.run(None, feed(batch))
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run"]
    assert len(runs) == len(batches)
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    return [[(e["name"], e["args"]["op_name"], json.dumps(e["args"].get("input_type_shape")),
              json.dumps(e["args"].get("output_type_shape"))) for e in nodes if start <= e["ts"] <= stop]
            for start, stop in runs]


def test_graph_has_no_control_flow_and_only_fixed_work_operators():
    ops = build_graph(classifier(10, 1)).op_types
    assert set(ops) <= FIXED_WORK_OPS, set(ops) - FIXED_WORK_OPS
    assert ops == build_graph(classifier(10, 2)).op_types  # the schedule, not h, shapes the graph


@pytest.mark.parametrize("c", [2, 10, 100])
def test_every_row_executes_the_same_nodes_whatever_h_says(c, tmp_path):
    h = classifier(c, 1)
    p = rows(4, c, 1)
    h = with_boundary_row(h, p, 0)
    solver = Phase1Solver(h)
    _, ok = solver(p)
    verdict = h.logit(anchor(p)) > 0
    # member-like and non-member-like rows, rows carried across and rows that fail (saturated,
    # tied, uniform, one-hot), and a row on the boundary: one at a time, and in batches of 3
    assert verdict.any() and (~verdict).any() and ok.any() and (~ok).any() and not ok[0]
    for n in (1, 3):
        batches = [p[i:i + n] for i in range(0, len(p) - n + 1, n)]
        traces = executed_nodes(build_graph(h).model_bytes(), batches, tmp_path)
        assert len(traces[0]) > 100
        assert all(t == traces[0] for t in traces)


def test_float32_probes_carry_no_subnormal_numbers():
    """Confident rows hold probabilities far below float32's smallest normal; as subnormal numbers
    they would make h's float32 products slower on some CPUs for exactly the rows a member-like
    target answers. Every float32 tensor the graph makes is normal or zero."""
    import onnx

    c = 10
    h = classifier(c, 4)
    rng = np.random.default_rng(4)
    p = np.full((16, c), 1e-40) * rng.uniform(0.5, 2.0, (16, c))
    p[np.arange(16), rng.integers(0, c, 16)] = 1.0
    p = np.r_[p / p.sum(1, keepdims=True), rows(4, c, 4)]
    assert (p < np.finfo(np.float32).tiny).any()
    model = onnx.load_from_string(build_graph(h).model_bytes())
    cast32 = [n.output[0] for n in model.graph.node
              if n.op_type == "Cast" and onnx.helper.get_attribute_value(n.attribute[0]) == 1]
    assert cast32
    model.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                              for name in cast32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for probes in session.run(cast32, feed(p)):
        assert np.all((probes == 0) | (np.abs(probes) >= np.finfo(np.float32).tiny))


class RecordingSession:
    """An onnxruntime session behind a log of every run's input shapes."""

    def __init__(self, session, log):
        self.session, self.log = session, log

    def run(self, outputs, feed):
        self.log.append({k: v.shape for k, v in feed.items()})
        return self.session.run(outputs, feed)


def test_one_graph_call_per_batch_shaped_by_the_batch_size_alone():
    h = classifier(10, 3)
    p = rows(10, 10, 3)
    solver = Phase1Solver(h)
    log = []
    solver.graph.session = RecordingSession(solver.graph.session, log)

    def trace(batch):
        log.clear()
        solver(batch)
        return list(log)

    verdict = h.logit(anchor(p)) > 0
    member_like, other = p[verdict][:3], p[~verdict][:3]
    assert len(member_like) == len(other) == 3
    shapes = {"probs": (3, 10), "coin": (3,), "epsilon": (3,)}
    assert trace(member_like) == trace(other) == trace(p[-3:]) == [shapes]
    assert trace(p[:1]) == [{"probs": (1, 10), "coin": (1,), "epsilon": (1,)}]


@pytest.mark.parametrize("c", [3, 10])
def test_row_result_independent_of_batch_and_position(c):
    h = classifier(c, 5)
    p = rows(25, c, 5)  # 78 rows
    solver = Phase1Solver(h)
    full, ok = solver(p)
    assert ok.sum() > 0.5 * len(p) and not np.array_equal(full, p)
    # any row, alone or in any batch at any position (C = 3: rows that straddle SIMD packets)
    for i in (0, 7, 30, len(p) - 2, len(p) - 1):
        one, one_ok = solver(p[i:i + 1])
        np.testing.assert_array_equal(one[0], full[i])
        assert one_ok[0] == ok[i]
    perm = np.random.default_rng(0).permutation(len(p))
    np.testing.assert_array_equal(solver(p[perm])[0], full[perm])
    for start, n in ((0, 2), (1, 3), (5, 5), (11, 6), (3, 17)):
        np.testing.assert_array_equal(solver(p[start:start + n])[0], full[start:start + n])
    # and the release coin tossed in the same graph
    coin, eps = np.random.default_rng(1).uniform(size=len(p)), np.full(len(p), 0.02)
    released = solver.released(p, coin, eps)
    noised_rows = np.flatnonzero((released != p).any(axis=1))
    assert 0 < len(noised_rows) < ok.sum()
    for i in (*noised_rows[:3], 0, len(p) - 1):  # released noised rows and others, alone
        np.testing.assert_array_equal(solver.released(p[i:i + 1], coin[i:i + 1], eps[:1])[0], released[i])
    np.testing.assert_array_equal(solver.released(p[perm], coin[perm], eps), released[perm])


def test_success_means_crossed_with_the_top_kept():
    h = classifier(10, 2)
    p = rows(30, 10, 2)
    out, ok = Phase1Solver(h)(p)
    before = h.predict_member(p)
    after = h.predict_member(out)
    assert ok.sum() > 0.5 * len(p)
    assert (after[ok] != before[ok]).all()  # as an attacker sorting the released vector sees it
    np.testing.assert_allclose(out[~ok], p[~ok], rtol=0, atol=1e-12)  # the clean row (softmax(log p))
    assert np.array_equal(out.argmax(1), p.argmax(1))
    np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-12)


def test_h_and_its_gradient_in_the_graph_match_torch_autograd():
    h = classifier(10, 7)
    x = np.sort(rows(10, 10, 7), axis=1)
    g = GraphBuilder("h")
    o = _Ops(g, h)
    assert o.width == 16  # the graph pads the 10 classes at the front with 6 entries h ignores
    inp = g.input("x", np.float64, ("N", 16))
    out, grad = o.h_logit_and_grad(inp)
    crossed = o.crossed(o.unsqueeze(inp, 1), o.k(np.ones((1, 1)), np.float32), (1,))
    g.output(out, "out", np.float64, ("N", 1))
    g.output(grad, "grad", np.float64, ("N", 16))
    g.output(crossed, "crossed", np.bool_, ("N", 1))
    padded = np.pad(x, ((0, 0), (6, 0)), constant_values=0.5)
    got_out, got_grad, got_crossed = ort.InferenceSession(g.model_bytes()).run(None, {"x": padded})
    assert not got_grad[:, :6].any()
    got_grad = got_grad[:, 6:]
    xt = torch.from_numpy(x).requires_grad_(True)
    ref = TorchMLP(h).logit(xt)
    (ref_grad,) = torch.autograd.grad(ref.sum(), xt)
    # h runs in float32: within float32's rounding of the float64 reference
    scale_out, scale_grad = np.abs(ref.detach().numpy()).max(), np.abs(ref_grad.numpy()).max()
    np.testing.assert_allclose(got_out[:, 0], ref.detach().numpy(), rtol=1e-5, atol=1e-6 * scale_out)
    np.testing.assert_allclose(got_grad, ref_grad.numpy(), rtol=1e-4, atol=1e-6 * scale_grad)
    np.testing.assert_array_equal(got_crossed[:, 0], ref.detach().numpy() <= 0)  # same sign here
    np.testing.assert_allclose(h.logit(x), got_out[:, 0], rtol=1e-5, atol=1e-6 * scale_out)


def assert_matches_the_numpy_solver(h, p):
    """Same rows carried across, per-row L1 within 1% of the numpy solver's, argmax kept."""
    before, before_ok = numpy_phase1(h.arrays, p)
    now, now_ok = Phase1Solver(h)(p)
    np.testing.assert_array_equal(now_ok, before_ok)
    assert before_ok.mean() > 0.5
    l1_before = np.abs(before - p).sum(1)[before_ok]
    l1_now = np.abs(now - p).sum(1)[now_ok]
    assert np.all(np.abs(l1_now - l1_before) <= 0.01 * l1_before), np.max(np.abs(l1_now / l1_before - 1))
    assert np.array_equal(now.argmax(1), p.argmax(1))
    np.testing.assert_allclose(now[~now_ok], p[~now_ok], rtol=0, atol=1e-12)


def test_matches_the_numpy_solver_it_replaced_on_the_digits_target(digits_target):
    data = FitData.from_target(digits_target)
    h = MembershipClassifier.train(data.member_probs, data.reference_probs,
                                   TrainSettings(epochs=20, optimizer="adam"), seed=0)
    assert_matches_the_numpy_solver(h, np.r_[data.member_probs, data.reference_probs])


def test_matches_the_numpy_solver_it_replaced_on_100_classes():
    h = classifier(100, 11)
    assert_matches_the_numpy_solver(h, rows(150, 100, 11))
