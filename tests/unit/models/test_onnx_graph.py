"""The ONNX writer (`purifier.models.onnx_graph`) against the `onnx` package: its bytes parse, pass
the full checker, carry every attribute kind and tensor type as written, and run in onnxruntime."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from purifier.models.onnx_graph import IR_VERSION, OPSET, GraphBuilder


def test_writer_output_parses_checks_and_runs():
    g = GraphBuilder("writer-test")
    x = g.input("x", np.float64, ("N", 4))
    w = g.const(np.arange(12, dtype=np.float64).reshape(4, 3) - 5.5)
    y = g.op("Relu", g.op("Gemm", x, w, g.const(np.array([0.5, -1.0, 2.0]))))
    values, indices = g.op("TopK", y, g.const(np.array([3], np.int64)), axis=-1, largest=0, sorted=1, outputs=2)
    clipped = g.op("LeakyRelu", g.op("Neg", values), alpha=0.25)  # a float attribute
    summed = g.op("ReduceSum", clipped, g.const(np.array([-1], np.int64)), keepdims=0)
    mask = g.op("Greater", g.op("Cast", summed, to=1), g.const(np.float32(-1e9)))
    padded = g.op("Pad", y, g.const(np.array([0, 0, 0, -1], np.int64)), mode="constant")  # negative ints, a string
    g.output(clipped, "clipped", np.float64, ("N", 3))
    g.output(indices, "order", np.int64, ("N", 3))
    g.output(mask, "mask", np.bool_, ("N",))
    g.output(padded, "padded", np.float64, ("N", 2))
    model = onnx.load_from_string(g.model_bytes())
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == IR_VERSION and model.opset_import[0].version == OPSET
    assert [n.op_type for n in model.graph.node] == g.op_types
    topk = next(n for n in model.graph.node if n.op_type == "TopK")
    assert {a.name: onnx.helper.get_attribute_value(a) for a in topk.attribute} == {"axis": -1, "largest": 0, "sorted": 1}
    leaky = next(n for n in model.graph.node if n.op_type == "LeakyRelu")
    assert onnx.helper.get_attribute_value(leaky.attribute[0]) == np.float32(0.25)
    pad = next(n for n in model.graph.node if n.op_type == "Pad")
    assert onnx.helper.get_attribute_value(pad.attribute[0]) == b"constant"
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert any(a.dtype == np.int64 and a.tolist() == [0, 0, 0, -1] for a in consts.values())
    assert any(a.dtype == np.float32 and a.shape == () for a in consts.values())

    xv = np.random.default_rng(0).normal(size=(5, 4))
    got = dict(zip(["clipped", "order", "mask", "padded"], ort.InferenceSession(g.model_bytes()).run(None, {"x": xv}),
                   strict=True))
    ref_y = np.maximum(xv @ consts[w] + np.array([0.5, -1.0, 2.0]), 0.0)
    ref_sorted = np.sort(ref_y, axis=1)
    np.testing.assert_allclose(got["clipped"], np.where(-ref_sorted > 0, -ref_sorted, -0.25 * ref_sorted), rtol=1e-12)
    np.testing.assert_array_equal(np.take_along_axis(ref_y, got["order"], axis=1), ref_sorted)
    assert got["mask"].all() and got["padded"].shape == (5, 2)
