"""Every route around the defense (docs/design.md#side-doors) is refused and never reaches the upstream.

The upstream here is `oip_fake.FakeUpstream`, which answers *any* method of the service with
success: a bypass that the sidecar forwarded would therefore show up both as a success at the
client and as a recorded call at the upstream. Each test checks both.
"""

from __future__ import annotations

import queue

import grpc
import numpy as np
import pytest
from oip_fake import FakeUpstream, infer_request, softmax

from purifier_server.app import BackgroundSidecar
from purifier_server.settings import Settings

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.integration
X = np.array([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]], np.float32)


@pytest.fixture(scope="module")
def upstream():
    fake = FakeUpstream().start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture(scope="module")
def sidecar(upstream, flatten_cls):
    settings = Settings.resolve({"upstream": f"127.0.0.1:{upstream.port}", "model_name": "m",
                                 "model_version": "1", "confidence_output": "probs", "host": "127.0.0.1",
                                 "port": 0, "http_port": 0, "metrics_port": -1}, env={})
    with BackgroundSidecar(settings, defense=flatten_cls()) as sc:
        yield sc


def assert_defended(stub, sidecar):
    """A plain request still gets the defended vector, and only that output."""
    resp = stub.ModelInfer(infer_request(X), timeout=5)
    assert [o.name for o in resp.outputs] == ["probs"]
    got = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(X.shape)
    expected = type(sidecar.defense)().transform(softmax(X))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert np.abs(got - softmax(X)).sum() > 1e-2  # defended differs from raw, so the check can fail


def refused(stub, upstream, req, code=grpc.StatusCode.INVALID_ARGUMENT) -> str:
    before = upstream.infer_count
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(req, timeout=5)
    assert info.value.code() == code, info.value.details()
    assert upstream.infer_count == before, "a refused request reached the upstream"
    return info.value.details()


@pytest.mark.parametrize("where", ["request", "input", "output"])
@pytest.mark.parametrize("key", ["shared_memory_region", "shared_memory_offset", "shared_memory_byte_size"])
def test_every_shared_memory_parameter_is_refused_everywhere(stub, sidecar, upstream, where, key):
    req = infer_request(X)
    params = {"request": lambda: req.parameters, "input": lambda: req.inputs[0].parameters,
              "output": lambda: req.outputs.add(name="probs").parameters}[where]()
    if key == "shared_memory_region":
        params[key].string_param = "region0"
    else:
        params[key].int64_param = 64
    assert key in refused(stub, upstream, req)
    assert_defended(stub, sidecar)


@pytest.mark.parametrize("where", ["request", "output"])
def test_classification_is_refused_per_output_and_per_request(stub, sidecar, upstream, where):
    req = infer_request(X)
    params = req.parameters if where == "request" else req.outputs.add(name="probs").parameters
    params["classification"].int64_param = 2
    assert "classification" in refused(stub, upstream, req)
    assert_defended(stub, sidecar)


def test_tritonclient_classification_and_shared_memory_outputs_are_refused(client, upstream, stub, sidecar):
    inp = grpcclient.InferInput("x", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    before = upstream.infer_count
    with pytest.raises(InferenceServerException, match="classification"):
        client.infer("m", [inp], outputs=[grpcclient.InferRequestedOutput("probs", class_count=2)])
    out = grpcclient.InferRequestedOutput("probs")
    out.set_shared_memory("region0", 24, offset=8)
    with pytest.raises(InferenceServerException, match="shared_memory"):
        client.infer("m", [inp], outputs=[out])
    inp.set_shared_memory("region0", X.nbytes)
    with pytest.raises(InferenceServerException, match="shared_memory"):
        client.infer("m", [inp])
    assert upstream.infer_count == before
    assert_defended(stub, sidecar)


def test_non_defended_outputs_are_refused_or_dropped(stub, sidecar, upstream):
    req = infer_request(X)
    req.outputs.add(name="logits")
    assert "'logits' is not served" in refused(stub, upstream, req)
    req = infer_request(X)
    req.outputs.add(name="probs")
    req.outputs.add(name="logits")
    refused(stub, upstream, req)
    # asking for nothing in particular: the upstream sends logits too, the sidecar drops them
    assert_defended(stub, sidecar)


@pytest.mark.parametrize("model,version", [("other", ""), ("M", ""), ("m", "2"), ("m", "latest"), ("", "")])
def test_models_and_versions_not_defended_are_not_forwarded(stub, client, sidecar, upstream, model, version):
    req = infer_request(X, model=model)
    req.model_version = version
    assert "not served here" in refused(stub, upstream, req, grpc.StatusCode.NOT_FOUND)
    since = len(upstream.calls)
    assert not client.is_model_ready(model, version)
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata(model, version)
    assert "NOT_FOUND" in str(info.value.status())
    assert upstream.forwarded(since) == []
    assert_defended(stub, sidecar)


UNPROXIED = {
    "RepositoryIndex": lambda c: c.get_model_repository_index(),
    "RepositoryModelLoad": lambda c: c.load_model("m"),
    "RepositoryModelUnload": lambda c: c.unload_model("m"),
    "ModelStatistics": lambda c: c.get_inference_statistics("m"),
    "TraceSetting": lambda c: c.get_trace_settings(),
    "LogSettings": lambda c: c.update_log_settings({"log_verbose_level": 1}),
    "SystemSharedMemoryStatus": lambda c: c.get_system_shared_memory_status(),
    "SystemSharedMemoryRegister": lambda c: c.register_system_shared_memory("r", "/purifier-test", 64),
    "SystemSharedMemoryUnregister": lambda c: c.unregister_system_shared_memory("r"),
    "CudaSharedMemoryStatus": lambda c: c.get_cuda_shared_memory_status(),
    "CudaSharedMemoryRegister": lambda c: c.register_cuda_shared_memory("r", b"\0" * 64, 0, 64),
    "CudaSharedMemoryUnregister": lambda c: c.unregister_cuda_shared_memory("r"),
}


@pytest.mark.parametrize("rpc", sorted(UNPROXIED))
def test_repository_shared_memory_and_control_rpcs_are_unimplemented(client, stub, sidecar, upstream, rpc):
    since = len(upstream.calls)
    with pytest.raises(InferenceServerException) as info:
        UNPROXIED[rpc](client)
    assert "UNIMPLEMENTED" in str(info.value.status()), info.value
    assert upstream.forwarded(since) == []
    assert_defended(stub, sidecar)


def test_model_config_is_answered_by_the_sidecar_itself(client, stub, sidecar, upstream):
    """ModelConfig and ModelMetadata are served (perf_analyzer asks for them first) and constructed
    from the description the model check took: the upstream is not asked when a client asks, the
    answer names the sidecar's model and only outputs it serves (the construction is unit-tested
    in test_server_model_description; real Triton in test_sidecar_model_servers; a hostile
    upstream's metadata in test_model_description_channel)."""
    since = len(upstream.calls)
    config = client.get_model_config("m").config
    meta = client.get_model_metadata("m")
    assert config.name == meta.name == "m"
    assert {o.name for o in config.output} <= {"probs"} and {o.name for o in meta.outputs} <= {"probs"}
    assert not {"ModelMetadata", "ModelConfig"} & set(upstream.forwarded(since))  # an identity probe may come
    assert_defended(stub, sidecar)


def test_the_fake_upstream_would_answer_those_rpcs(upstream):
    """Guard for the test above: the same calls straight to the upstream succeed."""
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{upstream.port}")
    try:
        since = len(upstream.calls)
        for call in UNPROXIED.values():
            call(c)
        assert set(upstream.forwarded(since)) == set(UNPROXIED)
    finally:
        c.close()


def test_streamed_requests_are_defended_and_never_forwarded_as_a_stream(client, stub, sidecar, upstream):
    """ModelStreamInfer is served (tritonclient stream_infer, perf_analyzer --streaming), each request
    through the data plane as a unary one: the upstream sees ModelInfer calls, never a stream (whose
    answers the sidecar could not read one by one), and the client gets the defended vector; a
    refused request (a logits output) is an error in the stream, not forwarded."""
    since = len(upstream.calls)
    answers: queue.Queue = queue.Queue()
    inp = grpcclient.InferInput("x", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer("m", [inp], request_id="s1")
        client.async_stream_infer("m", [inp], request_id="s2", outputs=[grpcclient.InferRequestedOutput("logits")])
        got = [answers.get(timeout=10) for _ in range(2)]
    finally:
        client.stop_stream()
    results = [r for r, e in got if e is None]
    errors = [e for _, e in got if e is not None]
    assert len(results) == 1 and len(errors) == 1 and "logits" in errors[0].message()
    expected = type(sidecar.defense)().transform(softmax(X))
    np.testing.assert_allclose(results[0].as_numpy("probs"), expected, rtol=1e-6)
    assert results[0].get_response().id == "s1"
    assert upstream.forwarded(since) == ["ModelInfer"]
    assert_defended(stub, sidecar)


def test_an_upstream_that_answers_classification_strings_is_an_error(stub, sidecar, upstream, monkeypatch):
    """Defense in depth: if an upstream turned the confidence output into top-k strings anyway."""
    original = upstream._model_infer

    def classification_answer(request, context):
        resp = original(request, context)
        resp.outputs[0].datatype = "BYTES"
        resp.outputs[0].shape[:] = [len(X), 1]
        resp.raw_output_contents[0] = b"\x0e\x00\x00\x000.88:0:class0" * len(X)
        return resp

    monkeypatch.setattr(upstream, "_model_infer", classification_answer)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(infer_request(X), timeout=5)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "confidence output not floating point" in info.value.details() and "0.88" not in info.value.details()
    monkeypatch.undo()
    assert_defended(stub, sidecar)


def test_server_metadata_does_not_advertise_the_upstream(client, upstream):
    """The sidecar answers ServerMetadata itself (no extensions such as shared memory)."""
    since = len(upstream.calls)
    meta = client.get_server_metadata()
    assert meta.name == "purifier" and list(meta.extensions) == []
    assert upstream.forwarded(since) == []


def test_reflection_is_off_by_default(sidecar):
    with grpc.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
            ProtoReflectionDescriptorDatabase,
        )

        with pytest.raises(grpc.RpcError) as info:
            ProtoReflectionDescriptorDatabase(channel).get_services()
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED

