"""`purifier audit` against a live OIP v2 endpoint on loopback.

Until the sidecar merges, the endpoint is a tiny Open Inference Protocol server written here
with tritonclient's generated servicer base class: it serves the digits target's ONNX outputs
(raw FP32 in, raw FP32 out), exactly what an undefended model server answers.
"""

from __future__ import annotations

from concurrent import futures
from dataclasses import replace

import grpc
import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from purifier.audit.results import Report
from purifier.cli import main
from purifier.serve_process import free_port

pytestmark = pytest.mark.integration

REPORT_ATTACKS = ["gap", "confidence", "nn", "lira_offline", "label_augment", "repeated_query"]


class FakeOIP(pb_grpc.GRPCInferenceServiceServicer):
    """Serves named models: name -> (fn X (N, D) float32 -> (N, C) float32, D, C)."""

    def __init__(self, models: dict, max_batch: int = 0, declare: bool = False, words: str = "<= {}"):
        self.models = models
        self.rows = 0
        # a server that refuses requests above max_batch rows (Triton's answer), and declares the
        # limit in ModelConfig when `declare` (else ModelConfig is unimplemented, as in MLServer)
        self.max_batch, self.declare, self.words = max_batch, declare, words
        self.refused: list[int] = []
        self.sizes: list[int] = []

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

    def ModelConfig(self, request, context):
        if not self.declare:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "ModelConfig is not implemented")
        return pb.ModelConfigResponse(config=mc.ModelConfig(name=request.name, max_batch_size=self.max_batch))

    def ModelInfer(self, request, context):
        fn, d, c = self._model(request.model_name, context)
        shape = list(request.inputs[0].shape)
        if self.max_batch and shape[0] > self.max_batch:
            self.refused.append(shape[0])
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "inference request batch-size must be "
                          + self.words.format(self.max_batch) + f" for '{request.model_name}'")
        self.sizes.append(shape[0])
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
    # every row queried reached the server: eval + every attack's queries but the confidence attacks
    # and the gap attack (label-only), which reuse the single evaluation query; twice, as the same
    # attacks ran against the baseline (here the same endpoint) with the same shadow models
    reused = sum(a.queries for n, a in report.attacks.items() if a.family == "confidence" or n == "gap")
    assert servicer.rows == 2 * (n + sum(a.queries for a in report.attacks.values()) - reused)
    assert report.baseline.undefended and set(report.baseline.attacks) == set(REPORT_ATTACKS)
    assert report.baseline.attacks["gap"] == replace(report.attacks["gap"], seconds=report.baseline.attacks["gap"].seconds)
    # the undefended digits target leaks beyond the gap floor
    strongest = max(report.attacks[a].ranking.auc for a in ("confidence", "nn", "lira_offline"))
    assert strongest > report.gap_floor.auc + 0.05
    assert (out / "report.md").read_text().startswith("# Membership inference audit: digits")
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "label-only floor" in printed and "lira_offline" in printed and "TPR@1%FPR" in printed
    assert printed.startswith("verdict (provisional), digits, defense not named:")
    assert "Record-level exposure" in printed
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


@pytest.mark.parametrize(("declare", "words", "refused"), [
    (True, "<= {}", []),  # ModelConfig declares max_batch_size: no request is ever refused
    (False, "<= {}", [512]),  # only the refusal names the limit (Triton's words): one refused request
    (False, "smaller", [512, 256]),  # the refusal names no limit: halved until it passes
])
def test_requests_fit_the_servers_max_batch(digits_target, declare, words, refused):
    """The README's Triton recipe serves max batch 256; the audit's default requests are 512 rows."""
    from purifier.models.access import RemoteTarget

    clf = digits_target.classifier()
    servicer = FakeOIP({"digits": (lambda x: clf.run(x)["probabilities"], 64, 10)}, max_batch=200 if words ==
                       "smaller" else 256, declare=declare, words=words)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        X = np.concatenate([digits_target.role(r)[0] for r in ("eval_members", "eval_nonmembers")])
        with RemoteTarget(f"127.0.0.1:{port}", "digits") as access:
            got = access.query(X)
            assert access.batch <= servicer.max_batch and len(access.refused) == len(refused)
    finally:
        server.stop(0).wait(5)
    np.testing.assert_allclose(got, clf.run(X)["probabilities"], rtol=1e-6)
    assert servicer.refused == refused and max(servicer.sizes) <= servicer.max_batch
    assert sum(servicer.sizes) == len(X)  # every row once


def test_a_logits_output_gets_the_logits_advice(endpoint, digits_target, tmp_path, capsys):
    addr, servicer = endpoint
    clf = digits_target.classifier()
    servicer.models["logits"] = (lambda x: clf.run(x)["logits"], 64, 10)
    assert main(["audit", "--endpoint", addr, "--model-name", "logits", "--target", str(digits_target.directory),
                 "--out", str(tmp_path / "r"), "--quiet", "--attacks", "gap"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pass --logits" in err and "--output-name" in err, err


def test_a_defended_audit_beside_an_earlier_undefended_report(endpoint, digits_target, tmp_path, capsys):
    """The own-model steps in two commands: the undefended endpoint's report first (titled as
    such), then an audit that takes it as its "before" (checked to be on the same records)."""
    addr, _ = endpoint
    attacks = ("--attacks", "gap", "mentr", "label_calibrated")
    undefended = tmp_path / "undefended"
    assert main(_audit_args(addr, digits_target.directory, undefended, "--defense-name", "none", *attacks)) == 0
    before = Report.read(undefended)
    assert before.undefended and before.baseline is None
    html = (undefended / "report.html").read_text()
    assert "<title>Privacy audit: digits, undefended</title>" in html and "With unknown" not in html
    assert capsys.readouterr().out.startswith("verdict (provisional), digits, undefended:")
    out = tmp_path / "defended"
    assert main(_audit_args(addr, digits_target.directory, out, "--baseline", str(undefended), *attacks)) == 0
    after = Report.read(out)
    assert after.baseline == before and after.source.baseline_endpoint == str(undefended)
    html = (out / "report.html").read_text()
    assert "not audited" not in html and f"{before.strongest().auc.value:.3f}" in html
    printed = capsys.readouterr().out
    assert "Without defense" in printed and "cost to users" in printed
