"""The committed stubs match the .proto, live in a private pool, and are wire-compatible with Triton's."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
STUBS = ROOT / "server" / "_proto"


def test_committed_stubs_match_the_proto(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    generated = sorted(p.name for p in tmp_path.glob("*.py"))
    assert generated == sorted(p.name for p in STUBS.glob("*.py"))
    for name in generated:
        assert (tmp_path / name).read_text() == (STUBS / name).read_text(), f"{name} drifted: run `make proto`"


def test_stubs_and_tritonclient_work_in_one_process():
    grpcclient = pytest.importorskip("tritonclient.grpc")
    import numpy as np
    from tritonclient.grpc import service_pb2 as triton_pb

    from purifier_server._proto import grpc_service_pb2 as pb

    assert pb.DESCRIPTOR.pool is pb.POOL  # not the default pool tritonclient registers into
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    inp = grpcclient.InferInput("input", [2, 3], "FP32")
    inp.set_data_from_numpy(x)
    triton_req = triton_pb.ModelInferRequest(model_name="m", id="r1")
    triton_req.inputs.extend([inp._get_tensor()])
    triton_req.raw_input_contents.append(inp._get_content())
    triton_req.parameters["priority"].uint64_param = 7
    ours = pb.ModelInferRequest.FromString(triton_req.SerializeToString())
    assert ours.id == "r1" and ours.parameters["priority"].uint64_param == 7
    assert np.array_equal(np.frombuffer(ours.raw_input_contents[0], np.float32).reshape(2, 3), x)
    assert triton_pb.ModelInferRequest.FromString(ours.SerializeToString()) == triton_req


def _fields(desc):
    return {f.name: (f.number, f.type, f.label) for f in desc.fields}


def test_every_message_matches_tritons_field_numbers():
    pytest.importorskip("tritonclient.grpc")
    from tritonclient.grpc import service_pb2 as triton_pb

    from purifier_server._proto import grpc_service_pb2 as pb

    def walk(desc):
        yield desc
        for nested in desc.nested_types:
            yield from walk(nested)

    checked = 0
    for top in pb.DESCRIPTOR.message_types_by_name.values():
        for desc in walk(top):
            if desc.GetOptions().map_entry:
                continue
            theirs = triton_pb.DESCRIPTOR.pool.FindMessageTypeByName(desc.full_name)
            mine, their_fields = _fields(desc), _fields(theirs)
            assert mine.items() <= their_fields.items(), desc.full_name
            checked += 1
    assert checked >= 17
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == theirs.full_name == "inference.GRPCInferenceService"
    for m in service.methods:
        t = theirs.methods_by_name[m.name]
        assert (m.input_type.full_name, m.output_type.full_name) == (t.input_type.full_name, t.output_type.full_name)
