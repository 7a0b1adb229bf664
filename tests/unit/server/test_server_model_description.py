"""The sidecar's ModelMetadata and ModelConfig answers: constructed, reduced to the served outputs."""

from __future__ import annotations

import pytest

from purifier_server._proto import grpc_service_pb2 as pb
from purifier_server.model_description import (
    Description,
    NotDescribable,
    accepted_versions,
    config_answer,
    data_type,
    describe,
    description_from_json,
    description_json,
    metadata_answer,
)
from purifier_server.upstream import TensorSpec

mc = pytest.importorskip("tritonclient.grpc.model_config_pb2")

INPUTS = [TensorSpec("input", "FP32", (-1, 64))]
OUTPUTS = [TensorSpec("logits", "FP32", (-1, 10)), TensorSpec("probabilities", "FP32", (-1, 10))]


def described(inputs=INPUTS, outputs=OUTPUTS, served=("probabilities",), classes=10, max_batch_size=None,
              platform="onnxruntime_onnx", backend="", versions=("1",)) -> Description:
    return describe(platform=platform, backend=backend, versions=versions, inputs=inputs, outputs=outputs,
                    served=served, classes=classes, max_batch_size=max_batch_size)


def as_triton(config: pb.ModelConfig):
    return mc.ModelConfig.FromString(config.SerializeToString())


@pytest.mark.parametrize(("upstream", "rows", "expected"), [(256, 100, 100), (256, 4096, 256), (0, 100, 0),
                                                            (None, 512, 512)])
def test_max_batch_size_is_the_upstreams_and_never_exceeds_the_sidecars_row_limit(upstream, rows, expected):
    answer = config_answer("digits", ["1"], described(max_batch_size=upstream), rows)
    assert answer.max_batch_size == expected


def test_config_synthesized_from_the_description_for_a_batching_model():
    answer = as_triton(config_answer("digits", ["1"], described(backend="python"), 512))
    assert answer.max_batch_size == 512
    assert [(i.name, list(i.dims), i.data_type) for i in answer.input] == [("input", [64], mc.TYPE_FP32)]
    assert [(o.name, list(o.dims)) for o in answer.output] == [("probabilities", [10])]
    assert answer.platform == "onnxruntime_onnx" and answer.backend == "python"
    assert list(answer.version_policy.specific.versions) == [1]
    assert not as_triton(config_answer("digits", [], described(), 512)).HasField("version_policy")


def test_config_synthesized_with_full_shapes_when_the_first_dimension_is_fixed():
    d = described([TensorSpec("x", "FP64", (1, 8))], [TensorSpec("p", "FP64", (1, 3))], ("p",), classes=3)
    answer = config_answer("m", [], d, 512)
    assert answer.max_batch_size == 0
    assert list(answer.input[0].dims) == [1, 8] and answer.input[0].data_type == pb.TYPE_FP64
    assert list(answer.output[0].dims) == [1, 3]


def test_metadata_is_constructed_with_only_the_served_outputs():
    answer = metadata_answer("digits", ["1"], described(platform="python\nplatform text"))
    assert [o.name for o in answer.outputs] == ["probabilities"] and list(answer.outputs[0].shape) == [-1, 10]
    assert answer.platform == ""  # not an identifier: not repeated
    assert list(answer.versions) == ["1"]


def test_the_description_rebuilds_the_served_outputs_in_the_verified_shapes():
    """Extra dims on a declared output, or another class count, are not repeated: the confidence
    output is [batch, classes], an allowed class index [batch] or [batch, 1]."""
    outputs = [TensorSpec("probabilities", "FP32", (-1, 10, 123456, 7)), TensorSpec("label", "INT64", (-1, 1))]
    d = described(outputs=outputs, served=("probabilities", "label"))
    assert d.outputs == (TensorSpec("probabilities", "FP32", (-1, 10)), TensorSpec("label", "INT64", (-1, 1)))
    assert described(outputs=outputs[:1], served=("probabilities", "label")).outputs[1:] == ()  # undeclared


@pytest.mark.parametrize("inputs,why", [
    ([TensorSpec("x;0.123456,0.876544", "FP32", (-1, 64))], "not an identifier"),
    ([TensorSpec("x" * 129, "FP32", (-1, 64))], "not an identifier"),
    ([TensorSpec("x", "FP32;0.123456", (-1, 64))], "datatype"),
    ([TensorSpec("x", "FP32", (-1, 64, *range(8)))], "shape"),
    ([TensorSpec("x", "FP32", (-2, 64))], "shape"),
])
def test_metadata_that_could_carry_values_is_not_describable(inputs, why):
    with pytest.raises(NotDescribable, match=why):
        described(inputs)
    ok = described([TensorSpec("serving_default/input_1:0", "FP32", (-1, 64))])   # TensorFlow's names pass
    assert ok.inputs[0].name == "serving_default/input_1:0"


def test_free_text_is_left_out_unless_it_is_a_short_token():
    d = described(platform="p" + "_123456" * 20, backend="b;x", versions=("1", "2;x", "v" * 65))
    assert (d.platform, d.backend, d.versions) == ("", "", ("1",))


def test_a_version_too_large_for_int64_gets_no_version_policy():
    answer = config_answer("digits", ["9" * 19], described(versions=("9" * 19,)), 512)
    assert not answer.HasField("version_policy") and answer.max_batch_size == 512


def test_a_description_survives_json_and_is_checked_again():
    """`serve --workers`: worker 0's description travels to the others as JSON."""
    import json

    d = described(max_batch_size=256, backend="python")
    assert description_from_json(json.loads(json.dumps(description_json(d)))) == d
    doc = description_json(d)
    doc["inputs"][0][0] = "x;0.123456"
    with pytest.raises(NotDescribable):
        description_from_json(doc)


def test_accepted_versions():
    assert accepted_versions("", ["1"]) == ("1",)           # Triton's one version
    assert accepted_versions("", []) == ()                 # KServe advertises none
    assert accepted_versions("", ["1", "2"]) == ()         # which one the defense was fitted for is unknown
    assert accepted_versions("2", ["1", "2"]) == ("2",)
    assert accepted_versions("", ["bad version"]) == ()


def test_data_types():
    assert data_type("FP32") == pb.TYPE_FP32 and data_type("BYTES") == pb.TYPE_STRING
    assert data_type("NOPE") == pb.TYPE_INVALID
