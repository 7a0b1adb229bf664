"""The audit as a victim: an endpoint's own strings (error text, model and output names) reach the
terminal, report.md and report.html only as plain characters, with no escape sequence, carriage
return or bell, and report.md shows markdown and HTML as text (issue 21, item 8). The model's name
is the one the endpoint lists, passed on with --model-name as a user would copy it."""

from __future__ import annotations

import re

import grpc
import numpy as np
import pytest
from oip_fake import FakeUpstream, softmax

from purifier.cli import main
from purifier.data.records import save_records
from purifier_server._proto import grpc_service_pb2 as pb

pytest.importorskip("tritonclient.grpc")
pytestmark = pytest.mark.integration

ESCAPES = ("\x1b", "\r", "\x07", "\x9b", "\u202e")
OUTPUT = "probs\x1b]0;pwned\x07\x1b[2J\x1b[H<img src=x onerror=alert(1)>[click](javascript:alert(1))\u202e"
ERROR = "model crashed\r\x1b[2K\x1b[32maudit PASSED: no membership leakage\x1b[0m\n\x1b]0;owned\x07"
MODEL_NAMES = ("good", "evil\x1b[31m\r\nfake line")
HOSTILE_MODEL = "m\x1b]0;pwned\x07\x1b[2J<img src=x onerror=alert(1)>[click](javascript:alert(1))*x*\u202e"


class HostileEndpoint(FakeUpstream):
    """Softmax answers under a hostile output name; `fail` makes every inference fail with hostile text;
    `outputs` more than one declares several hostile outputs."""

    fail = False
    outputs = (OUTPUT,)

    def _model_metadata(self, request, context):
        spec = pb.ModelMetadataResponse.TensorMetadata
        if request.name not in ("m", HOSTILE_MODEL):
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.name}\x1b[2J")
        return pb.ModelMetadataResponse(name=request.name, versions=["1"], platform="fake\x1b[5m",
                                        inputs=[spec(name="x", datatype="FP32", shape=[-1, self.width])],
                                        outputs=[spec(name=o, datatype="FP32", shape=[-1, self.width])
                                                 for o in self.outputs])

    def _model_infer(self, request, context):
        if self.fail:
            context.abort(grpc.StatusCode.INTERNAL, ERROR)
        t = request.inputs[0]
        x = np.frombuffer(request.raw_input_contents[0], np.float32).reshape(tuple(t.shape))
        resp = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        resp.outputs.add(name=OUTPUT, datatype="FP32", shape=x.shape)
        resp.raw_output_contents.append(softmax(x * 3).tobytes())
        return resp

    def _handler(self, details):
        method = details.method.rpartition("/")[2]
        if method == "ServerLive":
            return grpc.unary_unary_rpc_method_handler(
                lambda req, ctx: pb.ServerLiveResponse(live=True), pb.ServerLiveRequest.FromString,
                pb.ServerLiveResponse.SerializeToString)
        if method == "RepositoryIndex":  # Triton's repository extension (not in the OIP core stubs)
            from tritonclient.grpc import service_pb2 as triton

            index = triton.RepositoryIndexResponse(models=[triton.RepositoryIndexResponse.ModelIndex(name=n)
                                                           for n in MODEL_NAMES])
            return grpc.unary_unary_rpc_method_handler(lambda req, ctx: index, triton.RepositoryIndexRequest.FromString,
                                                       triton.RepositoryIndexResponse.SerializeToString)
        return super()._handler(details)


@pytest.fixture
def hostile():
    upstream = HostileEndpoint(width=4).start()
    try:
        yield upstream
    finally:
        upstream.stop()


@pytest.fixture
def records(tmp_path):
    rng = np.random.default_rng(0)
    paths = {}
    for role, n in (("members", 60), ("nonmembers", 60), ("pool", 240)):
        X = rng.normal(size=(n, 4)).astype(np.float32)
        paths[role] = save_records(tmp_path / f"{role}.npz", X, X.argmax(1))
    return ["--members", str(paths["members"]), "--nonmembers", str(paths["nonmembers"]),
            "--attacker-pool", str(paths["pool"])]


def _clean(text: str, where: str) -> None:
    for c in ESCAPES:
        assert c not in text, f"{c!r} in {where}"


def test_hostile_names_reach_the_reports_as_plain_text(hostile, records, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["audit", "--endpoint", f"127.0.0.1:{hostile.port}", "--model-name", HOSTILE_MODEL, *records, "--shadows", "2",
               "--shadow-epochs", "5", "--attacks", "confidence", "gap", "--bootstrap", "20", "--out", str(out),
               "--quiet"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    _clean(printed.out + printed.err, "the terminal")
    for name in ("report.json", "report.md", "report.html"):
        _clean((out / name).read_text(), name)
    md = (out / "report.md").read_text()
    assert "onerror" in md  # the name is kept, as characters
    assert re.search(r"(?<!\\)<img", md) is None and re.search(r"(?<!\\)\]\(javascript", md) is None
    html = (out / "report.html").read_text()
    assert "<img src=x" not in html


def test_hostile_error_text_is_one_plain_line(hostile, records, tmp_path, capsys):
    hostile.fail = True
    rc = main(["audit", "--endpoint", f"127.0.0.1:{hostile.port}", "--model-name", "m", *records,
               "--out", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    _clean(err, "the error line")
    assert len(err.strip().splitlines()) == 1 and "model crashed" in err  # no fake line of its own after it
    rc = main(["audit", "--endpoint", f"127.0.0.1:{hostile.port}", "--model-name", "nope", *records,
               "--out", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "fake line" in err
    _clean(err, "the served-models line")
    assert len(err.strip().splitlines()) == 1
    hostile.fail, hostile.outputs = False, (OUTPUT, OUTPUT + "2")
    rc = main(["audit", "--endpoint", f"127.0.0.1:{hostile.port}", "--model-name", "m", *records,
               "--out", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "several outputs" in err and "onerror" in err
    _clean(err, "the several-outputs line")
    assert len(err.strip().splitlines()) == 1
