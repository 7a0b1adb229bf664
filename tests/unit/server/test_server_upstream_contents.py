"""upstream_contents: requests re-encoded for upstreams that read only typed (TorchServe) or raw contents."""

from __future__ import annotations

import numpy as np
import pytest

from purifier.errors import ConfigError
from purifier_server._proto import grpc_service_pb2 as pb
from purifier_server.codec import decode_inputs, with_contents
from purifier_server.errors import BadRequest
from purifier_server.settings import TORCHSERVE_SERVICE, Settings


def raw_request(*arrays: np.ndarray, datatypes=("FP32", "INT64")) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m", id="7")
    request.parameters["priority"].int64_param = 2
    for i, (a, dt) in enumerate(zip(arrays, datatypes, strict=False)):
        request.inputs.add(name=f"in{i}", datatype=dt, shape=a.shape)
        request.raw_input_contents.append(a.tobytes())
    request.outputs.add(name="probabilities")
    return request


def test_raw_to_typed_and_back_keeps_every_value_and_field():
    x = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    k = np.arange(3, dtype=np.int64).reshape(3, 1) - 1
    request = raw_request(x, k)
    typed = with_contents(request, typed=True)
    assert not typed.raw_input_contents and typed.inputs[0].contents.fp32_contents
    assert list(typed.inputs[1].contents.int64_contents) == [-1, 0, 1]
    assert (typed.id, typed.model_name, typed.parameters["priority"].int64_param) == ("7", "m", 2)
    assert [o.name for o in typed.outputs] == ["probabilities"]
    for a, b in zip(decode_inputs(typed), (x, k), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    back = with_contents(typed, typed=False)
    assert list(back.raw_input_contents) == list(request.raw_input_contents)
    assert all(not t.HasField("contents") for t in back.inputs)
    assert request.raw_input_contents  # the client's request is left as it was


def test_a_request_already_in_the_wanted_encoding_is_passed_as_is():
    request = raw_request(np.ones((2, 2), np.float32))
    assert with_contents(request, typed=False) is request


def test_fp16_cannot_travel_typed():
    with pytest.raises(BadRequest, match="FP16 travels only raw"):
        with_contents(raw_request(np.ones((2, 2), np.float16), datatypes=("FP16",)), typed=True)


@pytest.mark.parametrize(("contents", "service", "expected"), [
    ("auto", TORCHSERVE_SERVICE, "typed"), ("auto", "inference.GRPCInferenceService", None),
    ("raw", TORCHSERVE_SERVICE, "raw"), ("typed", "inference.GRPCInferenceService", "typed")])
def test_upstream_encoding(contents, service, expected):
    s = Settings.resolve({"upstream": "127.0.0.1:1", "model_name": "m", "confidence_output": "p",
                          "upstream_service": service, "upstream_contents": contents}, env={})
    assert s.upstream_encoding == expected


def test_unknown_upstream_contents_is_a_config_error():
    with pytest.raises(ConfigError, match="upstream_contents: 'binary' is not one of auto, raw, typed"):
        Settings.resolve({"upstream": "127.0.0.1:1", "model_name": "m", "confidence_output": "p",
                          "upstream_contents": "binary"}, env={})
