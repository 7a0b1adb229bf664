"""The sidecar's ModelMetadata and ModelConfig answers: constructed, reduced to the served outputs."""

from __future__ import annotations

import pytest

from purifier_server._proto import grpc_service_pb2 as pb
from purifier_server.model_description import (
    accepted_versions,
    config_answer,
    data_type,
    metadata_answer,
)
from purifier_server.upstream import TensorSpec

mc = pytest.importorskip("tritonclient.grpc.model_config_pb2")

INPUTS = [TensorSpec("input", "FP32", (-1, 64))]
OUTPUTS = [TensorSpec("logits", "FP32", (-1, 10)), TensorSpec("probabilities", "FP32", (-1, 10))]


def triton_config(max_batch_size: int = 256) -> pb.ModelConfig:
    """A Triton ModelConfig as Triton sends it (with fields the sidecar must not pass on), read as ours."""
    full = mc.ModelConfig(name="digits", platform="", backend="python", max_batch_size=max_batch_size,
                          input=[mc.ModelInput(name="input", data_type=mc.TYPE_FP32, dims=[64])],
                          output=[mc.ModelOutput(name="logits", data_type=mc.TYPE_FP32, dims=[10]),
                                  mc.ModelOutput(name="probabilities", data_type=mc.TYPE_FP32, dims=[10],
                                                 label_filename="labels.txt")],
                          instance_group=[mc.ModelInstanceGroup(count=2, kind=mc.ModelInstanceGroup.KIND_CPU)],
                          parameters={"secret": mc.ModelParameter(string_value="do not leak")})
    return pb.ModelConfig.FromString(full.SerializeToString())


def as_triton(config: pb.ModelConfig):
    return mc.ModelConfig.FromString(config.SerializeToString())


def test_config_from_the_upstreams_keeps_only_served_outputs_and_known_fields():
    answer = as_triton(config_answer("digits", ["1"], INPUTS, OUTPUTS, ["probabilities"], 4096, triton_config()))
    assert [o.name for o in answer.output] == ["probabilities"]
    assert list(answer.output[0].dims) == [10] and answer.output[0].data_type == mc.TYPE_FP32
    assert [(i.name, list(i.dims), i.data_type) for i in answer.input] == [("input", [64], mc.TYPE_FP32)]
    assert answer.max_batch_size == 256 and answer.backend == "python"
    # nothing else of the upstream's message: no instance groups, parameters or label file
    assert not answer.instance_group and not answer.parameters and not answer.output[0].label_filename
    assert list(answer.version_policy.specific.versions) == [1]


@pytest.mark.parametrize(("upstream", "rows", "expected"), [(256, 100, 100), (256, 4096, 256), (0, 100, 0)])
def test_max_batch_size_never_exceeds_the_sidecars_row_limit(upstream, rows, expected):
    answer = config_answer("digits", ["1"], INPUTS, OUTPUTS, ["probabilities"], rows, triton_config(upstream))
    assert answer.max_batch_size == expected


def test_config_synthesized_from_metadata_for_a_batching_model():
    answer = as_triton(config_answer("digits", [], INPUTS, OUTPUTS, ["probabilities"], 512, platform="onnxruntime_onnx"))
    assert answer.max_batch_size == 512
    assert [(i.name, list(i.dims)) for i in answer.input] == [("input", [64])]
    assert [(o.name, list(o.dims)) for o in answer.output] == [("probabilities", [10])]
    assert answer.platform == "onnxruntime_onnx" and not answer.HasField("version_policy")


def test_config_synthesized_with_full_shapes_when_the_first_dimension_is_fixed():
    answer = config_answer("m", [], [TensorSpec("x", "FP64", (1, 8))], [TensorSpec("p", "FP64", (1, 3))], ["p"], 512)
    assert answer.max_batch_size == 0
    assert list(answer.input[0].dims) == [1, 8] and answer.input[0].data_type == pb.TYPE_FP64


def test_an_upstream_config_without_the_served_output_falls_back_to_metadata():
    partial = triton_config()
    del partial.output[1]
    answer = config_answer("digits", [], INPUTS, OUTPUTS, ["probabilities"], 64, partial)
    assert [o.name for o in answer.output] == ["probabilities"] and answer.max_batch_size == 64


def test_metadata_is_constructed_with_only_the_served_outputs():
    answer = metadata_answer("digits", ["1"], "python\nplatform text", INPUTS, OUTPUTS, ["probabilities"])
    assert [o.name for o in answer.outputs] == ["probabilities"] and list(answer.outputs[0].shape) == [-1, 10]
    assert answer.platform == ""  # not an identifier: not repeated
    assert list(answer.versions) == ["1"]


def test_accepted_versions():
    assert accepted_versions("", ["1"]) == ("1",)           # Triton's one version
    assert accepted_versions("", []) == ()                 # KServe advertises none
    assert accepted_versions("", ["1", "2"]) == ()         # which one the defense was fitted for is unknown
    assert accepted_versions("2", ["1", "2"]) == ("2",)
    assert accepted_versions("", ["bad version"]) == ()


def test_data_types():
    assert data_type("FP32") == pb.TYPE_FP32 and data_type("BYTES") == pb.TYPE_STRING
    assert data_type("NOPE") == pb.TYPE_INVALID
