"""tritonclient (sync and aio), unmodified, against the sidecar with the embedded ONNX backend."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from purifier_server._proto import grpc_service_pb2 as pb
from purifier_server.app import BackgroundSidecar
from purifier_server.settings import Settings

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.integration
MAX_ROWS = 64


@pytest.fixture(scope="module")
def sidecar(digits_target, flatten_cls):
    settings = Settings.resolve({"model": str(digits_target.directory), "host": "127.0.0.1", "port": 0, "http_port": 0,
                                 "metrics_port": 0, "health_poll_s": 0.2, "max_request_rows": MAX_ROWS,
                                 "reflection": True}, env={})
    with BackgroundSidecar(settings, defense=flatten_cls()) as sc:
        yield sc


@pytest.fixture(scope="module")
def rows(digits_target):
    X, _ = digits_target.role("eval_nonmembers")
    return np.ascontiguousarray(X[:8], dtype=np.float32)


def expected(sidecar, target, x):
    """(clean ORT probabilities, what the sidecar's defense makes of them), both (N, C) FP32."""
    clean = target.classifier().run(x)["probabilities"]
    return clean, type(sidecar.defense)().transform(clean)


def triton_input(x, datatype="FP32"):
    inp = grpcclient.InferInput("input", list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return inp


def assert_serves(client, sidecar, target, x):
    res = client.infer(sidecar.model_name, [triton_input(x)], request_id="after")
    clean, defended = expected(sidecar, target, x)
    np.testing.assert_allclose(res.as_numpy("probabilities"), defended, rtol=1e-6)


def test_sync_client_gets_defended_vectors_with_id_and_argmax(sidecar, client, digits_target, rows):
    res = client.infer(sidecar.model_name, [triton_input(rows)], request_id="req-42")
    got = res.as_numpy("probabilities")
    clean, defended = expected(sidecar, digits_target, rows)
    assert got.dtype == np.float32 and got.shape == clean.shape
    np.testing.assert_allclose(got, defended, rtol=1e-6)
    assert np.array_equal(got.argmax(1), clean.argmax(1))
    assert np.abs(got - clean).sum(1).min() > 1e-3          # really rewritten
    response = res.get_response()
    assert response.id == "req-42" and response.model_name == sidecar.model_name
    assert [o.name for o in response.outputs] == ["probabilities"]  # logits never leave
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(sidecar.model_name)
    meta = client.get_model_metadata(sidecar.model_name)
    assert [o.name for o in meta.outputs] == ["probabilities"] and meta.inputs[0].shape == [-1, 64]


def test_aio_client_concurrent_requests_each_get_their_own_rows(sidecar, digits_target, rows):
    import tritonclient.grpc.aio as aioclient

    _, defended = expected(sidecar, digits_target, rows)

    async def main():
        client = aioclient.InferenceServerClient(f"127.0.0.1:{sidecar.port}")
        try:
            calls = [client.infer(sidecar.model_name, [triton_input(rows[i:i + 1])], request_id=f"r{i}")
                     for i in range(len(rows))]
            return await asyncio.gather(*calls)
        finally:
            await client.close()

    results = asyncio.run(main())
    for i, res in enumerate(results):
        assert res.get_response().id == f"r{i}"
        np.testing.assert_allclose(res.as_numpy("probabilities")[0], defended[i], rtol=1e-5)


def test_typed_request_gets_typed_defended_answer(sidecar, stub, digits_target, rows):
    req = pb.ModelInferRequest(model_name=sidecar.model_name, id="typed")
    req.inputs.add(name="input", datatype="FP32", shape=rows.shape).contents.fp32_contents.extend(rows.ravel())
    res = stub.ModelInfer(req)
    assert not res.raw_output_contents
    got = np.asarray(res.outputs[0].contents.fp32_contents, np.float32).reshape(rows.shape[0], -1)
    np.testing.assert_allclose(got, expected(sidecar, digits_target, rows)[1], rtol=1e-6)


def raw_req(name, x, datatype="FP32", shape=None, input_name="input"):
    req = pb.ModelInferRequest(model_name=name)
    req.inputs.add(name=input_name, datatype=datatype, shape=x.shape if shape is None else shape)
    req.raw_input_contents.append(x.tobytes())
    return req


@pytest.mark.parametrize("case,code,message", [
    ("unknown model", grpc.StatusCode.NOT_FOUND, "not served here"),
    ("missing input", grpc.StatusCode.INVALID_ARGUMENT, "do not match the model's inputs"),
    ("extra input", grpc.StatusCode.INVALID_ARGUMENT, "do not match the model's inputs"),
    ("wrong datatype", grpc.StatusCode.INVALID_ARGUMENT, "datatype FP64, the model expects FP32"),
    ("shape vs bytes", grpc.StatusCode.INVALID_ARGUMENT, "needs 2560 bytes, raw contents has 2048"),
    ("raw and typed", grpc.StatusCode.INVALID_ARGUMENT, "mixed"),
    ("wrong width", grpc.StatusCode.INVALID_ARGUMENT, "does not fit"),
    ("nan input", grpc.StatusCode.INVALID_ARGUMENT, "input 'input' holds NaN or Inf"),
    ("too many rows", grpc.StatusCode.RESOURCE_EXHAUSTED, "limit is 64"),
    ("logits output", grpc.StatusCode.INVALID_ARGUMENT, "output 'logits' is not served"),
    ("shared memory", grpc.StatusCode.INVALID_ARGUMENT, "shared_memory_region"),
    ("no inputs", grpc.StatusCode.INVALID_ARGUMENT, "no inputs"),
])
def test_bad_input_gets_a_clear_status_and_the_server_keeps_serving(sidecar, stub, client, digits_target,
                                                                     rows, case, code, message):
    name = sidecar.model_name
    req = {
        "unknown model": lambda: raw_req("nope", rows),
        "missing input": lambda: raw_req(name, rows, input_name="x"),
        "wrong datatype": lambda: raw_req(name, rows.astype(np.float64), "FP64"),
        "shape vs bytes": lambda: raw_req(name, rows, shape=[10, 64]),
        "wrong width": lambda: raw_req(name, rows.reshape(16, 32)),
        "nan input": lambda: raw_req(name, np.full_like(rows, np.nan)),
        "too many rows": lambda: raw_req(name, np.zeros((MAX_ROWS + 1, 64), np.float32)),
        "no inputs": lambda: pb.ModelInferRequest(model_name=name),
    }.get(case, lambda: raw_req(name, rows))()
    if case == "extra input":
        req.inputs.add(name="other", datatype="FP32", shape=[1])
        req.raw_input_contents.append(np.zeros(1, np.float32).tobytes())
    if case == "raw and typed":
        req.inputs[0].contents.fp32_contents.extend([1.0])
    if case == "logits output":
        req.outputs.add(name="logits")
    if case == "shared memory":
        req.outputs.add(name="probabilities").parameters["shared_memory_region"].string_param = "r"
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(req)
    assert info.value.code() == code and message in info.value.details(), info.value.details()
    assert_serves(client, sidecar, digits_target, rows)


def test_tritonclient_bypass_parameters_are_refused(sidecar, client, digits_target, rows):
    out = grpcclient.InferRequestedOutput("probabilities", class_count=3)
    with pytest.raises(InferenceServerException, match="classification"):
        client.infer(sidecar.model_name, [triton_input(rows)], outputs=[out])
    out = grpcclient.InferRequestedOutput("probabilities")
    out.set_shared_memory("region", 1024)
    with pytest.raises(InferenceServerException, match="shared_memory"):
        client.infer(sidecar.model_name, [triton_input(rows)], outputs=[out])
    assert_serves(client, sidecar, digits_target, rows)


def test_health_reflection_and_metrics(sidecar, client, digits_target, rows):
    with grpc.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
            ProtoReflectionDescriptorDatabase,
        )

        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert services == {"inference.GRPCInferenceService", "grpc.health.v1.Health",
                            "grpc.reflection.v1alpha.ServerReflection"}
        assert db.FindFileContainingSymbol("inference.ModelInferRequest").name == "grpc_service.proto"
        # every advertised service resolves to its methods and their message types (what grpcurl does)
        pool = descriptor_pool.DescriptorPool(db)
        for name in services:
            assert pool.FindServiceByName(name).methods
        check = pool.FindServiceByName("grpc.health.v1.Health").methods_by_name["Check"]
        assert check.input_type.full_name == "grpc.health.v1.HealthCheckRequest"
        assert "status" in check.output_type.fields_by_name
        config = pool.FindServiceByName("inference.GRPCInferenceService").methods_by_name["ModelConfig"]
        assert config.output_type.full_name == "inference.ModelConfigResponse"

    def scrape():
        text = urllib.request.urlopen(f"http://127.0.0.1:{sidecar.metrics_port}/metrics", timeout=5).read().decode()
        return {f.name: f for f in text_string_to_metric_families(text)}

    def ok_count(fams):
        return sum(s.value for s in fams["purifier_requests"].samples
                   if s.name.endswith("_total") and s.labels["outcome"] == "OK")

    before = scrape()
    for _ in range(3):
        assert_serves(client, sidecar, digits_target, rows)
    after = scrape()
    assert ok_count(after) == ok_count(before) + 3
    stage = after["purifier_stage_seconds"]
    bounds = {s.labels["le"] for s in stage.samples if s.name.endswith("_bucket")}
    assert "5e-05" in bounds and "0.0005" in bounds            # sub-millisecond buckets
    totals = {s.labels["stage"]: s.value for s in stage.samples if s.name.endswith("_count")}
    assert totals["total"] >= 3 and totals["upstream"] >= 3 and totals["defense"] >= 3
    assert after["purifier_upstream_up"].samples[0].value == 1
    released = after["purifier_noise_released_rows"].samples[0].value
    assert released - before["purifier_noise_released_rows"].samples[0].value == 3 * len(rows)


def test_model_config_and_versions_of_the_embedded_model(sidecar, client, digits_target, rows):
    """perf_analyzer's calls: ModelMetadata, ModelConfig (synthesized from the graph: a batching
    model capped at max_request_rows, the confidence output only), then an inference under the
    advertised version, whose answer names it."""
    meta = client.get_model_metadata(sidecar.model_name)
    assert list(meta.versions) == ["1"] and [o.name for o in meta.outputs] == ["probabilities"]
    config = client.get_model_config(sidecar.model_name, "1").config
    assert config.max_batch_size == MAX_ROWS and config.platform == "onnxruntime_onnx"
    assert [(i.name, list(i.dims)) for i in config.input] == [("input", [rows.shape[1]])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("probabilities", [10])]
    answer = client.infer(sidecar.model_name, [triton_input(rows)], model_version="1")
    assert answer.get_response().model_version == "1"
    assert client.get_model_config(sidecar.model_name).config == config
    with pytest.raises(InferenceServerException, match="version '2'"):
        client.get_model_config(sidecar.model_name, "2")
