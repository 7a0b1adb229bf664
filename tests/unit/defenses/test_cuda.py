"""The defenses' onnxruntime graphs on the CUDA provider (`--device cuda`): MemGuard's fast solver
and PURIFIER's reformer. Runs only where onnxruntime can open a CUDA session; skipped elsewhere,
with one reason."""

import numpy as np
import onnxruntime as ort
import pytest
from random_h import random_weights
from strong_secret import SECRET

from purifier.defenses.membership_classifier import MembershipClassifier
from purifier.defenses.phase1 import Phase1Solver
from purifier.errors import ConfigError
from purifier.models.onnx_runner import OnnxClassifier


def _cuda_usable() -> bool:
    """onnxruntime-gpu lists the CUDA provider even without a GPU or its libraries: open a session."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    from purifier.models.onnx_graph import GraphBuilder

    g = GraphBuilder("probe")
    x = g.input("x", np.float32, ("N",))
    g.output(g.op("Relu", x), "y", np.float32, ("N",))
    try:
        return OnnxClassifier(g.model_bytes(), device="cuda").providers[0] == "CUDAExecutionProvider"
    except ConfigError:
        return False


pytestmark = pytest.mark.skipif(not _cuda_usable(), reason="no usable CUDA device for onnxruntime "
                                "(needs onnxruntime-gpu and a GPU)")


def classifier(c, seed, p):
    weights = random_weights(c, seed)
    weights["b4"] = weights["b4"] - np.median(MembershipClassifier(weights).logit(np.sort(p, axis=1)))
    return MembershipClassifier(weights)


def dirichlet_rows(c, seed):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.dirichlet(np.full(c, a), size=100) for a in (0.05, 0.3, 3.0)])


@pytest.mark.parametrize("c", [3, 10, 100])
def test_memguard_solver_on_cuda_matches_the_cpu_solver(c):
    p = dirichlet_rows(c, 1)
    h = classifier(c, 1, p)
    gpu, cpu = Phase1Solver(h, device="cuda"), Phase1Solver(h)
    assert gpu.graph.providers[0] == "CUDAExecutionProvider"
    out, ok = gpu(p)
    ref, ref_ok = cpu(p)
    np.testing.assert_array_equal(ok, ref_ok)  # the same rows carried across
    assert ok.mean() > 0.5
    l1, ref_l1 = np.abs(out - p).sum(1)[ok], np.abs(ref - p).sum(1)[ok]
    assert np.all(np.abs(l1 - ref_l1) <= 0.01 * ref_l1)
    assert np.array_equal(out.argmax(1), p.argmax(1))


@pytest.mark.parametrize("c", [3, 10])
def test_memguard_solver_on_cuda_rows_do_not_depend_on_the_batch(c):
    p = dirichlet_rows(c, 2)
    solver = Phase1Solver(classifier(c, 2, p), device="cuda")
    full, ok = solver(p)
    for i in (0, 5, 150, len(p) - 1):
        one, one_ok = solver(p[i:i + 1])
        np.testing.assert_array_equal(one[0], full[i])
        assert one_ok[0] == ok[i]
    for start, n in ((1, 3), (10, 7), (40, 64)):
        np.testing.assert_array_equal(solver(p[start:start + n])[0], full[start:start + n])
    np.testing.assert_array_equal(solver(p)[0], full)  # and across runs


def test_memguard_and_purifier_serve_on_cuda(digits_target):
    from purifier.defenses.base import FitData
    from purifier.defenses.memguard import MemGuard
    from purifier.defenses.purifier_net import PurifierNet

    data = FitData.from_target(digits_target)
    p = data.reference_probs[:64]
    for defense in (MemGuard(epochs=5, secret=SECRET),
                    PurifierNet(epochs=5, secret=SECRET)):
        defense.fit(data)
        on_cpu = defense.transform(p)
        defense.serve_on("cuda")
        on_gpu = defense.transform(p)
        assert np.array_equal(on_gpu.argmax(1), p.argmax(1))
        np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-3)
        np.testing.assert_array_equal(defense.transform(p[:5]), on_gpu[:5])
