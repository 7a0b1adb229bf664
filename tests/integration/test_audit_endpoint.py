"""`purifier audit` against a live OIP v2 endpoint on loopback.

Until the sidecar merges, the endpoint is a tiny Open Inference Protocol server written here
with tritonclient's generated servicer base class: it serves the digits target's ONNX outputs
(raw FP32 in, raw FP32 out), exactly what an undefended model server answers.
"""

from __future__ import annotations

from concurrent import futures

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from purifier.audit.results import Report
from purifier.cli import main
from purifier.serve_process import free_port

pytestmark = pytest.mark.integration

REPORT_ATTACKS = ["gap", "confidence", "nn", "lira_offline", "label_augment", "repeated_query"]


class FakeOIP(pb_grpc.GRPCInferenceServiceServicer):
    """Serves named models: name -> (fn X (N, D) float32 -> (N, C) float32, D, C)."""

    def __init__(self, models: dict):
        self.models = models
        self.rows = 0

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=request.name in self.models)

    def _model(self, name, context):
        if name not in self.models:
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {name} not found")
        return self.models[name]

    def ModelMetadata(self, request, context):
        _, d, c = self._model(request.name, context)
        return pb.ModelMetadataResponse(
            name=request.name, versions=["1"], platform="onnx",
            inputs=[pb.ModelMetadataResponse.TensorMetadata(name="input", datatype="FP32", shape=[-1, d])],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, c])])

    def RepositoryIndex(self, request, context):
        return pb.RepositoryIndexResponse(
            models=[pb.RepositoryIndexResponse.ModelIndex(name=n, state="READY") for n in self.models])

    def ModelInfer(self, request, context):
        fn, d, c = self._model(request.model_name, context)
        shape = list(request.inputs[0].shape)
        x = np.frombuffer(request.raw_input_contents[0], dtype="<f4").reshape(shape)
        self.rows += len(x)
        probs = np.ascontiguousarray(fn(x), dtype="<f4")
        out = pb.ModelInferResponse.InferOutputTensor(name="probabilities", datatype="FP32", shape=list(probs.shape))
        return pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id,
                                     outputs=[out], raw_output_contents=[probs.tobytes()])


@pytest.fixture
def endpoint(digits_target):
    clf = digits_target.classifier()

    def probs(x):
        return clf.run(x.astype(np.float32))["probabilities"]

    def three(x):
        p = probs(x)[:, :3] + 1e-6
        return p / p.sum(axis=1, keepdims=True)

    servicer = FakeOIP({"digits": (probs, 64, 10), "three": (three, 64, 3)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(0).wait(5)


def _audit_args(addr, target, out, *extra):
    return ["audit", "--endpoint", addr, "--model-name", "digits", "--target", str(target), "--out", str(out),
            "--shadows", "2", "--shadow-epochs", "40", "--bootstrap", "20", "--quiet", *extra]


def test_audit_through_the_endpoint_writes_the_report(endpoint, digits_target, tmp_path, capsys):
    addr, servicer = endpoint
    out = tmp_path / "report"
    rc = main(_audit_args(addr, digits_target.directory, out, "--baseline", addr,
                          "--attacks", *REPORT_ATTACKS))
    assert rc == 0
    report = Report.read(out)
    assert report.defense == "unknown" and report.dataset == "digits"
    # the baseline is the same endpoint: full agreement, no distortion
    cost = report.utility.cost
    assert cost.argmax_agreement == 1.0 and cost.l1_nonmembers.max == 0.0 == cost.l1_members.max
    assert set(report.attacks) == set(REPORT_ATTACKS)
    n = report.n_members + report.n_nonmembers
    for a in report.attacks.values():
        r = a.ranking
        for t in (r.tpr_1pct, r.tpr_01pct):
            assert t.negatives == report.n_nonmembers
        assert r.tpr_01pct.measurable is False  # 400 negatives
        assert r.auc_ci95[0] <= r.auc <= r.auc_ci95[1]
        assert a.queries >= n
    assert report.attacks["label_augment"].family == "label_only"
    assert report.attacks["label_augment"].queries == 11 * n  # original + 8 shifts + 2 rotations
    # every row queried reached the server: eval (x2 with baseline) + every attack's queries but
    # the confidence attacks and the gap attack (label-only), which reuse the single evaluation query
    reused = sum(a.queries for n, a in report.attacks.items() if a.family == "confidence" or n == "gap")
    assert servicer.rows == 2 * n + sum(a.queries for a in report.attacks.values()) - reused
    # the undefended digits target leaks beyond the gap floor
    strongest = max(report.attacks[a].ranking.auc for a in ("confidence", "nn", "lira_offline"))
    assert strongest > report.gap_floor.auc + 0.05
    assert (out / "report.md").read_text().startswith("# Membership inference audit: digits")
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "label-only floor" in printed and "lira_offline" in printed and "TPR@1%FPR" in printed
    assert printed.startswith("verdict (unknown):") and "Record-level exposure" in printed
    html = (out / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and report.verdict.attacker in html


@pytest.mark.parametrize("case,message", [
    ("unreachable", "is unreachable"),
    ("model", "model 'nope' is not served at .*served models: digits, three"),
    ("classes", "class-count mismatch: endpoint output 'probabilities' has 3 classes, the records have 10"),
    ("attack", "unknown attack 'lira2'; choose from gap, confidence"),
    ("splits", "has no splits.json"),
    ("output", "output 'logits' is not an output of model 'digits'; choose one of: probabilities"),
])
def test_bad_input_is_one_line_naming_the_choices(endpoint, digits_target, tmp_path, capsys, case, message):
    import re
    import shutil

    addr, _ = endpoint
    target = digits_target.directory
    args = _audit_args(addr, target, tmp_path / "r")
    if case == "unreachable":
        args[2] = f"127.0.0.1:{free_port()}"
    elif case == "model":
        args[4] = "nope"
    elif case == "classes":
        args[4] = "three"
    elif case == "attack":
        args += ["--attacks", "gap,lira2"]
    elif case == "splits":
        bare = tmp_path / "bare"
        bare.mkdir()
        for f in ("model.onnx", "model.json"):
            shutil.copy(target / f, bare / f)
        args[6] = str(bare)
    elif case == "output":
        args += ["--output-name", "logits"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "r").exists()
