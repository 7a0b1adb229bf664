"""Where MemGuard's time depends on the row: the defense call, its solver graph, and each operator
of the graph that could take data-dependent time, timed on member and non-member rows.

The solver runs the same operators on the same shapes for every row, but an operator's own time
can still depend on the values (a comparison sort does). Each operator of the types in `--ops`
is run alone, as a one-node onnxruntime graph, on the inputs it gets inside the solver for each
row; members and non-members are timed interleaved in a random order per pass, every row copied
into the same buffers first (rows of one array would sit at different addresses, which alone can
separate two halves of an array). Score: thread CPU time per call, median over passes; AUC of
that time as a membership score (members vs non-members), and the members' minus the
non-members' median. Beside them, an alternative that is not shipped: the ray's sorts written as
pairwise ranks (every pair compared whatever the values), its cost and whether the difference
goes away with it.

Run: `.venv/bin/python -m benchmarks.profile_memguard_timing [--dataset purchase_like] [--out FILE]`
(target and defense from `benchmarks/bench_timing.py`'s directory, built when missing; needs the
`onnx` package for shape inference). One onnxruntime thread, as the sidecar runs the defense.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import commit_of, thread_cpu_per_row  # noqa: E402

OPS = ("TopK", "ArgMax", "ArgMin", "Exp", "Log", "Div", "ReduceL1", "ReduceL2", "Gather", "GatherElements",
       "ScatterElements", "Gemm")


def score(ns: np.ndarray, member: np.ndarray) -> tuple[float, float]:
    """(AUC of the per-row median as a membership score, members' minus non-members' median ns)."""
    from purifier.evaluation import roc_auc

    med = np.median(ns, axis=0)
    return roc_auc(med, member), float(np.median(med[member]) - np.median(med[~member]))


def ranked_graph(h) -> bytes:
    """The solver graph with every values-only sort (the ray's) written as pairwise ranks: element i
    goes to position #{j: x_j < x_i} + #{j < i: x_j == x_i} (stable, as TopK), by ScatterElements."""
    from purifier.defenses import phase1

    topk = phase1._Ops.sort

    def by_ranks(self, x, length, outputs=1):
        if outputs != 1:
            return topk(self, x, length, outputs)
        a, b = self.unsqueeze(x, -1), self.unsqueeze(x, -2)  # [..., i, j] compares x_j with x_i
        earlier = self.k(np.tril(np.ones((length, length), bool), -1), np.bool_)
        before = self.Or(self.Less(b, a), self.And(self.Equal(b, a), earlier))
        rank = self.ReduceSum(self.Cast(before, to=7), self.i(-1), keepdims=0)
        return self.ScatterElements(self.Mul(x, self.k(0.0)), rank, x, axis=-1)

    phase1._Ops.sort = by_ranks
    try:
        return phase1.build_graph(h).model_bytes()
    finally:
        phase1._Ops.sort = topk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="purchase_like", help="built-in dataset of the target (default purchase_like)")
    parser.add_argument("--rows", type=int, default=800, help="members and non-members each (default 800)")
    parser.add_argument("--passes", type=int, default=9)
    parser.add_argument("--ops", default=",".join(OPS), help="operator types timed one by one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the summary to this file")
    args = parser.parse_args()

    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from purifier.defenses import load_defense
    from purifier.defenses.keyed import load_secret
    from purifier.defenses.phase1 import build_graph
    from purifier.demo import prepare_defense, prepare_secret, prepare_target
    from purifier.models.target import PROBS_NAME
    from purifier.threads import limit_threads

    limit_threads()
    work = ROOT / "build" / "bench-timing" / args.dataset
    (work / "defenses").mkdir(parents=True, exist_ok=True)
    target = prepare_target(work, args.dataset, args.seed)
    secret = load_secret(file=str(prepare_secret(work)))
    defense = load_defense(prepare_defense("memguard", target, work, secret, args.seed), secret=secret)
    n = min(args.rows, len(target.role("eval_members")[0]), len(target.role("eval_nonmembers")[0]))
    clf = target.classifier()
    clean = np.concatenate([clf.run(target.role(role)[0][:n].astype(np.float32))[PROBS_NAME]
                            for role in ("eval_members", "eval_nonmembers")])
    member = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    p = clean.astype(np.float64)
    p /= p.sum(axis=1, keepdims=True)  # the solver's input: the validated row, renormalized
    coin, epsilon = np.array([0.5]), np.array([float(defense.epsilon)])
    feeds = [{"probs": p[i:i + 1], "coin": coin, "epsilon": epsilon} for i in range(len(p))]

    lines = [f"MemGuard's time by row on {args.dataset} ({n} members + {n} non-members, {args.passes} passes, "
             f"thread CPU, one row per call), commit {commit_of(ROOT)}",
             f"load average at start: {tuple(round(x, 2) for x in os.getloadavg())}", "",
             "    AUC  members - non-members  what"]
    rows = [{"probs": clean[i:i + 1]} for i in range(len(clean))]
    ns = thread_cpu_per_row(lambda b: defense.transform(b["probs"]), rows, {"probs": np.empty_like(clean[:1])}, args.passes,
               args.seed)
    auc, diff = score(ns, member)
    lines.append(f"  {auc:.3f}  {diff:+8.0f} ns  the defense call (transform), {np.median(ns) / 1e3:.1f} us per call")
    solver = defense._fast_solver(defense.classifier)
    ns = thread_cpu_per_row(lambda b: solver.released(b["probs"], b["coin"], b["epsilon"]), feeds,
               {k: np.empty_like(v) for k, v in feeds[0].items()}, args.passes, args.seed)
    auc, diff = score(ns, member)
    lines.append(f"  {auc:.3f}  {diff:+8.0f} ns  the solver graph, {np.median(ns) / 1e3:.1f} us per call")

    # the alternative not shipped: the ray's sorts (TopK, values only) as pairwise ranks and a scatter,
    # which compare every pair whatever the values: its cost, and whether the difference goes away
    ranked = ort.InferenceSession(ranked_graph(defense.classifier), solver.graph.session.get_session_options(),
                                  providers=["CPUExecutionProvider"])
    agree = all(np.array_equal(ranked.run(["released"], f)[0], solver.released(f["probs"], coin, epsilon))
                for f in feeds)
    ns = thread_cpu_per_row(lambda b: ranked.run(["released"], b), feeds, {k: np.empty_like(v) for k, v in feeds[0].items()},
               args.passes, args.seed)
    auc, diff = score(ns, member)
    lines.append(f"  {auc:.3f}  {diff:+8.0f} ns  the solver graph with the ray's sorts as pairwise ranks (not "
                 f"shipped), {np.median(ns) / 1e3:.1f} us per call; answers {'identical' if agree else 'DIFFERENT'}")

    model = onnx.shape_inference.infer_shapes(onnx.load_from_string(build_graph(defense.classifier).model_bytes()))
    g = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    infos = {v.name: v for v in [*g.value_info, *g.input, *g.output]}
    nodes = [node for node in g.node if node.op_type in args.ops.split(",")]
    wanted = sorted({i for node in nodes for i in node.input if i and i not in consts})
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    del exposed.graph.output[:]
    exposed.graph.output.extend(infos[name] for name in wanted)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(exposed.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    values = [dict(zip(wanted, session.run(wanted, feed), strict=True)) for feed in feeds]
    per_op = []
    for node in nodes:
        dynamic = [i for i in node.input if i and i not in consts]
        one = helper.make_model(
            helper.make_graph([node], node.name, [infos[i] for i in dynamic], [infos[o] for o in node.output if o],
                              initializer=[numpy_helper.from_array(consts[i], i) for i in node.input if i in consts]),
            opset_imports=model.opset_import, ir_version=model.ir_version)
        alone = ort.InferenceSession(one.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        outputs = [o for o in node.output if o]
        ns = thread_cpu_per_row(lambda b, s=alone, o=outputs: s.run(o, b), [{i: v[i] for i in dynamic} for v in values],
                   {i: np.empty_like(values[0][i]) for i in dynamic}, args.passes, args.seed)
        auc, diff = score(ns, member)
        shapes = " ".join(str(list(values[0][i].shape)) for i in dynamic)
        per_op.append((abs(auc - 0.5), f"  {auc:.3f}  {diff:+8.0f} ns  {node.op_type} {node.name} on {shapes}"))
    lines += ["", f"each operator alone ({len(nodes)} of types {args.ops}), the farthest from AUC 0.5 first:"]
    lines += [line for _, line in sorted(per_op, reverse=True)]
    lines.append(f"load average at end: {tuple(round(x, 2) for x in os.getloadavg())}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
