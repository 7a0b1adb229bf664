import json

import numpy as np
import pytest

from purifier_server import rest_codec
from purifier_server._proto import grpc_service_pb2 as pb
from purifier_server.codec import build_response, decode_inputs
from purifier_server.errors import BadRequest, BadUpstreamOutput


def body(inputs, **extra) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


@pytest.mark.parametrize("datatype,values", [
    ("FP32", [[0.5, -1.25], [3.0, 1e-3]]), ("FP64", [[1e300, -2.5]]), ("FP16", [[0.5, 2.0]]),
    ("INT8", [[-128, 127]]), ("UINT8", [[0, 255]]), ("INT64", [[-(2**62), 2**62]]), ("BOOL", [[True, False]]),
])
def test_json_inputs_become_raw_contents_of_their_datatype(datatype, values):
    expected = np.asarray(values, rest_codec.DTYPES[datatype])
    for data in (values, expected.ravel().tolist()):  # nested in the shape, or flat
        request, outputs = rest_codec.infer_request(
            body([{"name": "x", "datatype": datatype, "shape": list(expected.shape), "data": data}], id="r1"), None,
            "m", "1")
        assert (request.model_name, request.model_version, request.id) == ("m", "1", "r1")
        (got,) = decode_inputs(request)
        assert got.dtype == expected.dtype and np.array_equal(got, expected)
        assert not outputs.binary("anything")


def test_binary_inputs_and_output_wishes():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    y = np.array([[1, 2]], np.int64)
    head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3],
                                   "parameters": {"binary_data_size": 24}},
                                  {"name": "y", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]}],
                       "outputs": [{"name": "p", "parameters": {"binary_data": True}}, {"name": "q"}],
                       "parameters": {"binary_data_output": False, "priority": 3}}).encode()
    request, outputs = rest_codec.infer_request(head + x.tobytes(), str(len(head)), "m", "")
    got_x, got_y = decode_inputs(request)
    assert np.array_equal(got_x, x) and np.array_equal(got_y, y)
    assert outputs.binary("p") and not outputs.binary("q")
    assert dict(request.parameters)["priority"].int64_param == 3
    assert "binary_data_output" not in request.parameters and "binary_data" not in request.outputs[0].parameters
    assert "binary_data_size" not in request.inputs[0].parameters  # REST-only: never forwarded


@pytest.mark.parametrize("tensor,message", [
    ({"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0]}, "needs 2 values, 'data' has 1"),
    ({"name": "x", "datatype": "FP32", "shape": [2], "data": ["1", "2"]}, "holds numbers"),
    ({"name": "x", "datatype": "FP32", "shape": [2], "data": [True, False]}, "holds numbers"),
    ({"name": "x", "datatype": "INT32", "shape": [2], "data": [1.5, 2]}, "holds integers"),
    ({"name": "x", "datatype": "UINT8", "shape": [1], "data": [-1]}, "UINT8 range"),
    ({"name": "x", "datatype": "BOOL", "shape": [1], "data": [1]}, "holds booleans"),
    ({"name": "x", "datatype": "FP16", "shape": [1], "data": [1e6]}, "FP16 range"),
    ({"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1.0, 2.0], [3.0]]}, "ragged"),
    ({"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1.0, 2.0, 3.0, 4.0]]}, "shaped"),
    ({"name": "x", "datatype": "FP32", "shape": [2, "2"], "data": []}, "list of integers"),
    ({"name": "x", "datatype": "FP32", "shape": [2, True], "data": []}, "list of integers"),
    ({"name": "x", "datatype": "FP32", "shape": [-2], "data": []}, "negative dimension"),
    ({"name": "x", "datatype": "FP32", "shape": [1 << 40, 1 << 40], "data": []}, "elements"),
    ({"name": "x", "datatype": "BF16", "shape": [1], "data": [1.0]}, "not supported"),
    ({"name": "x", "shape": [1], "data": [1.0]}, "needs 'datatype' and 'shape'"),
    ({"datatype": "FP32", "shape": [1], "data": [1.0]}, "has no 'name'"),
    ({"name": "x", "datatype": "FP32", "shape": [1]}, "neither 'data' nor 'binary_data_size'"),
    ({"name": "x", "datatype": "FP32", "shape": [1], "data": 1.0}, "must be a list"),
    ({"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0], "parameters": {"binary_data_size": 4}},
     "'data' beside 'binary_data_size'"),
    ({"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0], "parameters": {"p": [1]}}, "boolean, number"),
])
def test_bad_json_tensors_name_the_problem(tensor, message):
    with pytest.raises(BadRequest, match=message):
        rest_codec.infer_request(body([tensor]), None, "m", "")


@pytest.mark.parametrize("raw,header_length,message", [
    (b"{", None, "not valid JSON"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [NaN]}]}', None, "not valid JSON"),
    (b"[]", None, "JSON object"),
    (b'{"inputs": {}}', None, "'inputs' must be a list"),
    (b'{"id": 7, "inputs": []}', None, "'id' must be a string"),
    (b'{"inputs": []}', "x", "not a length"),
    (b'{"inputs": []}', "99", "not a length"),
    (b'{"inputs": []}' + b"\0", "14", "1 bytes after the last binary input"),
])
def test_bad_bodies_name_the_problem(raw, header_length, message):
    with pytest.raises(BadRequest, match=message):
        rest_codec.infer_request(raw, header_length, "m", "")


def test_a_constructed_response_round_trips_as_json_and_binary():
    p = np.array([[0.1, 0.9], [0.75, 0.25]], np.float32)
    label = np.array([1, 0], np.int64)
    response = build_response("r", "m", "1", {"probs": p, "label": label}, raw=True)
    for binary in (False, True):
        data, length = rest_codec.infer_response_body(response, rest_codec.RestOutputs(binary, {"label": False}))
        assert (length is None) == (not binary)
        back = rest_codec.infer_response(data, None if length is None else str(length))
        arrays = {t.name: a for t, a in rest_codec._response_arrays(back)}
        assert arrays["probs"].dtype == np.float32 and np.array_equal(arrays["probs"], p)
        assert np.array_equal(arrays["label"], label)
        head = json.loads(data[:length] if length else data)
        assert head["id"] == "r" and head["model_version"] == "1"
        assert "data" in head["outputs"][1]  # the label as JSON either way (its own wish)


def test_upstream_answers_are_refused_as_upstream_faults():
    with pytest.raises(BadUpstreamOutput) as info:
        rest_codec.infer_response(b'{"outputs": [{"name": "p", "datatype": "FP32", "shape": [1, 2], '
                                  b'"data": ["0.5", "0.5"]}]}', None)
    assert info.value.reason == "malformed response"


def test_request_body_for_a_rest_upstream_carries_the_values_as_json():
    request = pb.ModelInferRequest(model_name="m", id="")
    x = np.array([[0.25, -1.5]], np.float32)
    request.inputs.add(name="x", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    request.outputs.add(name="probs")
    doc = json.loads(rest_codec.request_body(request))
    assert doc == {"id": "", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [0.25, -1.5]}],
                   "outputs": [{"name": "probs"}]}


def test_config_json_writes_integers_as_numbers():
    config = pb.ModelConfig(name="m", max_batch_size=8)
    config.input.add(name="x", data_type=pb.TYPE_FP32, dims=[64])
    config.version_policy.specific.versions.append(1)
    doc = rest_codec.message_json(config)
    assert doc == {"name": "m", "max_batch_size": 8, "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [64]}],
                   "version_policy": {"specific": {"versions": [1]}}}


def test_every_upstream_implements_the_whole_protocol():
    """versions and backend are part of the Upstream protocol (the data plane reads them directly)."""
    import typing

    from purifier_server.rest_upstream import RestUpstream
    from purifier_server.upstream import EmbeddedUpstream, RemoteUpstream, Upstream

    attributes = set(typing.get_type_hints(Upstream)) | {"infer", "ready", "model_metadata", "model_config", "close"}
    assert {"versions", "backend"} <= attributes
    for cls in (RemoteUpstream, EmbeddedUpstream, RestUpstream):
        import inspect

        source = inspect.getsource(cls)
        missing = [a for a in attributes if not hasattr(cls, a) and f"self.{a} " not in source
                   and f"self.{a}," not in source and f"self.{a}:" not in source]
        assert not missing, (cls.__name__, missing)
