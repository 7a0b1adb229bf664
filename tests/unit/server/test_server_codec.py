import numpy as np
import pytest

from purifier_server._proto import grpc_service_pb2 as pb
from purifier_server.codec import (
    Decoded,
    build_response,
    check_request_layout,
    decode_inputs,
    read_answer,
)
from purifier_server.errors import BadRequest, BadUpstreamOutput


def raw_request(x: np.ndarray, datatype="FP32", shape=None):
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="input", datatype=datatype, shape=shape or x.shape)
    req.raw_input_contents.append(x.tobytes())
    return req


def response(arrays: dict, raw: bool):
    resp = pb.ModelInferResponse(model_name="m", id="x")
    for name, a in arrays.items():
        t = resp.outputs.add(name=name, datatype={np.float16: "FP16", np.float32: "FP32",
                                                  np.float64: "FP64"}[a.dtype.type], shape=a.shape)
        if raw:
            resp.raw_output_contents.append(a.tobytes())
        else:
            getattr(t.contents, "fp32_contents" if a.dtype == np.float32 else "fp64_contents").extend(a.ravel())
    return resp


def test_raw_and_typed_inputs_decode_to_the_same_array():
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    typed = pb.ModelInferRequest()
    typed.inputs.add(name="input", datatype="FP32", shape=[3, 4]).contents.fp32_contents.extend(x.ravel())
    for req in (raw_request(x), typed):
        check_request_layout(req)
        (out,) = decode_inputs(req)
        assert out.dtype == np.float32 and np.array_equal(out, x)


@pytest.mark.parametrize("make,msg", [
    (lambda x: raw_request(x, shape=[3, 5]), "needs 60 bytes, raw contents has 48"),
    (lambda x: raw_request(x, datatype="BF16"), "datatype 'BF16' is not supported"),
    (lambda x: raw_request(x, shape=[-1, 4]), "negative dimension"),
    (lambda x: raw_request(x, shape=[1 << 20, 1 << 20]), "elements"),
    (lambda x: raw_request(x[:0], shape=[0, 1 << 40, 1 << 40]), "elements"),  # empty, but numpy cannot shape it
])
def test_bad_raw_inputs_name_the_problem(make, msg):
    req = make(np.zeros((3, 4), np.float32))
    with pytest.raises(BadRequest, match=msg):
        decode_inputs(req)


def test_mixed_raw_and_typed_and_blob_count_are_refused():
    req = raw_request(np.zeros((1, 2), np.float32))
    req.inputs[0].contents.fp32_contents.extend([1.0, 2.0])
    with pytest.raises(BadRequest, match="mixed"):
        check_request_layout(req)
    req = raw_request(np.zeros((1, 2), np.float32))
    req.raw_input_contents.append(b"")
    with pytest.raises(BadRequest, match="2 entries for 1 inputs"):
        check_request_layout(req)
    typed_fp16 = pb.ModelInferRequest()
    typed_fp16.inputs.add(name="input", datatype="FP16", shape=[1])
    with pytest.raises(BadRequest, match="only as raw"):
        decode_inputs(typed_fp16)


@pytest.mark.parametrize("dtype,raw", [(np.float16, True), (np.float32, True), (np.float64, True),
                                       (np.float32, False), (np.float64, False)])  # FP16 travels raw only
def test_read_answer_decodes_the_confidences_in_their_dtype(dtype, raw):
    p = np.array([[0.7, 0.3], [0.2, 0.8]], dtype)
    logits = np.log(p.astype(np.float32))
    arrays = read_answer(response({"logits": logits, "probabilities": p}, raw=raw), "probabilities", [], rows=2)
    assert list(arrays) == ["probabilities"]
    got = arrays["probabilities"]
    assert got.dtype == dtype and np.array_equal(got, p)


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_build_response_holds_exactly_the_given_tensors_in_one_representation(dtype, raw):
    p = np.array([[0.6, 0.4], [0.3, 0.7]], dtype)
    label = np.array([0, 1], np.int64)
    resp = build_response("id-1", "m", "3", {"probabilities": p, "label": label}, raw=raw)
    assert (resp.id, resp.model_name, resp.model_version) == ("id-1", "m", "3")
    assert [o.name for o in resp.outputs] == ["probabilities", "label"] and not resp.parameters
    as_raw = raw or dtype == np.float16  # FP16 has no typed field
    assert len(resp.raw_output_contents) == (2 if as_raw else 0)
    assert all(o.HasField("contents") != as_raw for o in resp.outputs)
    again = read_answer(pb.ModelInferResponse.FromString(resp.SerializeToString()), "probabilities", ["label"], 2)
    assert np.array_equal(again["probabilities"], p) and np.array_equal(again["label"], label)


def test_read_answer_rejects_what_cannot_be_defended():
    def refused(resp, match, wanted=(), rows=1):
        with pytest.raises(BadUpstreamOutput, match=match):
            read_answer(resp, "probabilities", list(wanted), rows)

    refused(response({"logits": np.zeros((1, 2), np.float32)}, True), "no output 'probabilities'")
    resp = response({"probabilities": np.zeros((1, 2), np.float32)}, True)
    resp.outputs[0].datatype = "INT32"
    refused(resp, "INT32")
    refused(response({"probabilities": np.zeros(3, np.float32)}, True), r"shape \[3\]", rows=3)
    refused(response({"probabilities": np.full((2, 2), 0.5, np.float32)}, True), "the request has 1 rows")
    refused(response({"probabilities": np.array([[np.nan, 1.0]], np.float32)}, True), "NaN or Inf")
    typed_and_raw = response({"probabilities": np.full((1, 2), 0.5, np.float32)}, True)
    typed_and_raw.outputs[0].contents.fp32_contents.extend([0.9, 0.1])
    refused(typed_and_raw, "typed contents .*beside raw")
    stray = response({"probabilities": np.full((1, 2), 0.5, np.float32)}, False)
    stray.outputs[0].contents.fp64_contents.extend([0.9, 0.1])
    refused(stray, "fp64_contents beside fp32_contents")
    twice = response({"probabilities": np.full((1, 2), 0.5, np.float32)}, True)
    twice.outputs.add().CopyFrom(twice.outputs[0])
    twice.raw_output_contents.append(twice.raw_output_contents[0])
    refused(twice, "duplicate output names")
    extra_blob = response({"probabilities": np.full((1, 2), 0.5, np.float32)}, True)
    extra_blob.raw_output_contents.append(b"\0" * 8)
    refused(extra_blob, "2 raw blobs for 1 outputs")
    scores = response({"probabilities": np.full((1, 2), 0.5, np.float32), "scores": np.ones((1, 2), np.float32)}, True)
    refused(scores, "floating-point output", wanted=["scores"])


def test_an_in_process_answer_passes_the_same_checks_as_a_message():
    """The embedded model's arrays (codec.Decoded, never encoded) are read like a decoded message:
    the same arrays back when valid, the same refusals when not."""
    p = np.array([[0.7, 0.3], [0.2, 0.8]], np.float32)
    label = np.array([0, 1], np.int64)
    answer = Decoded({"logits": np.log(p), "probabilities": p, "label": label}, "1")
    got = read_answer(answer, "probabilities", ["label"], rows=2)
    assert list(got) == ["probabilities", "label"] and got["probabilities"] is p and got["label"] is label
    assert not answer.parameters and answer.model_version == "1"
    assert not got["probabilities"].flags.writeable  # read-only, as a decoded message's arrays

    def refused(arrays, match, wanted=(), rows=1):
        with pytest.raises(BadUpstreamOutput, match=match):
            read_answer(Decoded(arrays, "1"), "probabilities", list(wanted), rows)
        if all(isinstance(a, np.ndarray) and a.dtype.str in ("<f2", "<f4", "<f8")
               for a in arrays.values()):  # the same refusal for the same tensors as a message
            with pytest.raises(BadUpstreamOutput, match=match):
                read_answer(response(arrays, True), "probabilities", list(wanted), rows)

    refused({"logits": np.zeros((1, 2), np.float32)}, "no output 'probabilities'")
    refused({"probabilities": np.zeros((1, 2), np.int32)}, "INT32")
    refused({"probabilities": np.zeros((1, 2), ">f4")}, "not a tensor of an OIP datatype")
    refused({"probabilities": [{0: 0.5, 1: 0.5}]}, "list , not a tensor")  # a ZipMap's sequence of maps
    refused({"probabilities": np.zeros(3, np.float32)}, r"shape \[3\]", rows=3)
    refused({"probabilities": np.zeros((1, 1), np.float32)}, r"expected \[N, C>=2\]")
    refused({"probabilities": np.full((2, 2), 0.5, np.float32)}, "the request has 1 rows")
    refused({"probabilities": np.array([[np.nan, 1.0]], np.float32)}, "NaN or Inf")
    refused({"probabilities": np.array([[np.inf, 1.0]], np.float64)}, "NaN or Inf")
    refused({"probabilities": np.full((1, 2), 0.5, np.float32), "scores": np.ones((1, 2), np.float32)},
            "floating-point output", wanted=["scores"])
