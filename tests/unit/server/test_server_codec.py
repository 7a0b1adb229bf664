import numpy as np
import pytest

from purifier_server._proto import grpc_service_pb2 as pb
from purifier_server.codec import check_request_layout, decode_inputs, extract, rewrite, softmax
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


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_rewrite_raw_keeps_dtype_and_drops_other_outputs(dtype):
    p = np.array([[0.7, 0.3], [0.2, 0.8]], dtype)
    logits = np.log(p.astype(np.float32))
    resp = response({"logits": logits, "probabilities": p}, raw=True)
    index, got = extract(resp, "probabilities")
    assert index == 1 and got.dtype == dtype and np.array_equal(got, p)
    defended = np.array([[0.6, 0.4], [0.3, 0.7]], dtype)
    rewrite(resp, index, defended, frozenset(), raw_request=True)
    assert [o.name for o in resp.outputs] == ["probabilities"] and len(resp.raw_output_contents) == 1
    assert np.array_equal(np.frombuffer(resp.raw_output_contents[0], dtype).reshape(2, 2), defended)


def test_typed_response_becomes_raw_for_raw_requests_and_stays_typed_otherwise():
    p = np.array([[0.7, 0.3]], np.float64)
    extra = np.array([[1.0, 2.0]], np.float32)
    resp = response({"probabilities": p, "extra": extra}, raw=False)
    rewrite(resp, 0, p[:, ::-1].copy(), frozenset({"extra"}), raw_request=True)
    assert len(resp.raw_output_contents) == 2 and not resp.outputs[0].HasField("contents")
    assert np.array_equal(np.frombuffer(resp.raw_output_contents[0], "<f8"), [0.3, 0.7])
    assert np.array_equal(np.frombuffer(resp.raw_output_contents[1], "<f4"), [1.0, 2.0])
    resp = response({"probabilities": p}, raw=False)
    rewrite(resp, 0, p[:, ::-1].copy(), frozenset(), raw_request=False)
    assert list(resp.outputs[0].contents.fp64_contents) == [0.3, 0.7] and not resp.raw_output_contents


def test_extract_rejects_what_cannot_be_defended():
    with pytest.raises(BadUpstreamOutput, match="no output 'probabilities'"):
        extract(response({"logits": np.zeros((1, 2), np.float32)}, True), "probabilities")
    resp = response({"probabilities": np.zeros((1, 2), np.float32)}, True)
    resp.outputs[0].datatype = "INT32"
    with pytest.raises(BadUpstreamOutput, match="INT32"):
        extract(resp, "probabilities")
    with pytest.raises(BadUpstreamOutput, match=r"shape \[3\]"):
        extract(response({"probabilities": np.zeros(3, np.float32)}, True), "probabilities")


def test_softmax_matches_formula_and_is_stable():
    z = np.array([[1000.0, 999.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
    out = softmax(z)
    expected = np.exp(z.astype(np.float64) - 1000.0)[0] / np.exp(z.astype(np.float64) - 1000.0)[0].sum()
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], expected, rtol=1e-6)
    np.testing.assert_allclose(out[1], 1 / 3, rtol=1e-6)
