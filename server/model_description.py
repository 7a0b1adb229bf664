"""What the sidecar tells clients about the model it defends: versions, ModelMetadata and ModelConfig.

Every answer is constructed here from typed values (names, datatypes, shapes, integers), never
copied from an upstream message: protobuf keeps fields it does not know, so a copied message
would pass on whatever else the upstream put there, including outputs the sidecar does not serve.
Only the tensors the sidecar returns (the confidence output and the allowed outputs) are
described.

And never from what the upstream says now: a hostile upstream can write the clean vector of the
request it just answered into its metadata (input names, datatype strings, extra dims, platform,
versions) for the client to read back with one more call. So the description is taken once, when
the model check passes (`describe`: names must be identifiers, datatypes OIP's, dims integers,
the served outputs rebuilt in the shapes the check verified, free text dropped unless it is a
short token), kept by readiness.py, compared with the metadata of every later check (a
description that changes refuses the model), and every ModelMetadata and ModelConfig answer,
over gRPC and REST, is built from it.

ModelConfig is Triton's extension of the Open Inference Protocol (model_config.proto), which
perf_analyzer and Triton users' tools ask for before anything else. It is synthesized from the
description, as Triton would write it: a model whose every input and served output has a
variable first dimension is a batching model with `max_batch_size` rows (the upstream's own,
when it serves a config) and dims without that dimension; else `max_batch_size` is 0 and dims are
full shapes. `max_batch_size` never exceeds the sidecar's `max_request_rows`, because larger
requests are refused (RESOURCE_EXHAUSTED). Of the upstream's own config only max_batch_size is
read: its other fields (parameters, label files, instance groups, free text) are not the
sidecar's to pass on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from purifier_server._proto import grpc_service_pb2 as pb
from purifier_server.upstream import TensorSpec

_TOKEN = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_NAME = re.compile(r"[A-Za-z0-9_.:/\-]{1,128}")  # ONNX and TensorFlow tensor names use : and /
DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
             "FP64", "BF16", "BYTES")
MAX_DIMS = 8


def token(text: str) -> str:
    """`text` if it is a short identifier (a platform, backend or version name), else ""."""
    return text if _TOKEN.fullmatch(text) else ""


def accepted_versions(configured: str, advertised: Sequence[str]) -> tuple[str, ...]:
    """The versions a request may name besides "" (which means the upstream's default version).

    The configured `model_version` when set. Otherwise the upstream's version when it advertises
    exactly one (Triton: "1"): then that version and "" reach the same model, the one the model
    check verified. With several versions advertised and none configured, only "" is accepted:
    another version may be another model, for which the defense was not fitted.
    """
    if configured:
        return (configured,)
    if len(advertised) == 1 and token(advertised[0]):
        return (advertised[0],)
    return ()


class NotDescribable(ValueError):
    """The upstream's metadata holds something no client should be told (see `describe`)."""


@dataclass(frozen=True)
class Description:
    """What clients are told about the model, fixed when the model check passes (`describe`).

    inputs: the model's inputs; outputs: the served outputs (the confidence output, then the
    allowed ones) that the upstream declares, rebuilt from what the check verified;
    max_batch_size: the upstream's own ModelConfig's (Triton), None when it serves none.
    """

    platform: str = ""
    backend: str = ""
    versions: tuple[str, ...] = ()
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    max_batch_size: int | None = None


def _checked(spec, what: str) -> TensorSpec:
    """A TensorSpec of `spec` with a name that is an identifier, an OIP datatype and integer dims."""
    name, datatype, shape = str(spec.name), str(spec.datatype), tuple(spec.shape)
    if not _NAME.fullmatch(name):
        raise NotDescribable(f"an {what} is named {name[:80]!r}, not an identifier (letters, digits, _ . : / -; "
                             "at most 128)")
    if datatype not in DATATYPES:
        raise NotDescribable(f"{what} {name!r} has datatype {datatype[:80]!r}, not one of {', '.join(DATATYPES)}")
    if len(shape) > MAX_DIMS or not all(isinstance(d, int) and -1 <= d < 2 ** 31 for d in shape):
        raise NotDescribable(f"{what} {name!r} has shape {list(shape)[:12]}, not at most {MAX_DIMS} dims of -1 or more")
    return TensorSpec(name, datatype, shape)


def describe(*, platform: str, backend: str, versions: Sequence[str], inputs: Sequence, outputs: Sequence,
             served: Sequence[str], classes: int | None, max_batch_size: int | None) -> Description:
    """The Description of an upstream model that passed the model check, from its metadata.

    Nothing is copied as text: names must be identifiers, datatypes OIP's, dims integers (else
    NotDescribable), platform, backend and versions short tokens (else left out); the confidence
    output (served[0]) is described as [batch, classes] and an allowed class index as [batch] or
    [batch, 1], the shapes the check verified, whatever else the declaration said.
    """
    declared = {str(s.name): s for s in outputs}
    described = []
    for i, name in enumerate(served):
        if name not in declared:
            continue  # the server declares no such output (MLServer without a signature): not described
        spec = _checked(declared[name], "output")
        batch = spec.shape[0] if spec.shape else -1
        if i == 0:
            described.append(TensorSpec(name, spec.datatype, (batch, classes) if classes else spec.shape))
        else:
            described.append(TensorSpec(name, spec.datatype, (batch, 1) if len(spec.shape) == 2 else (batch,)))
    return Description(token(platform), token(backend), tuple(v for v in versions if token(v)),
                       tuple(_checked(s, "input") for s in inputs), tuple(described),
                       None if max_batch_size is None else max(int(max_batch_size), 0))


def description_json(described: Description) -> dict:
    """The Description as JSON (`purifier serve --workers`: worker 0's, given to the others)."""
    def tensors(specs):
        return [[t.name, t.datatype, list(t.shape)] for t in specs]

    return {"platform": described.platform, "backend": described.backend, "versions": list(described.versions),
            "inputs": tensors(described.inputs), "outputs": tensors(described.outputs),
            "max_batch_size": described.max_batch_size}


def description_from_json(doc: dict) -> Description:
    """`description_json`'s inverse, checked again as `describe` checks (NotDescribable)."""
    def tensors(items, what):
        return tuple(_checked(TensorSpec(name, datatype, tuple(shape)), what) for name, datatype, shape in items)

    mbs = doc["max_batch_size"]
    return Description(token(doc["platform"]), token(doc["backend"]), tuple(v for v in doc["versions"] if token(v)),
                       tensors(doc["inputs"], "input"), tensors(doc["outputs"], "output"),
                       None if mbs is None else max(int(mbs), 0))


def _tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=spec.shape)


def metadata_answer(name: str, versions: Sequence[str], described: Description) -> pb.ModelMetadataResponse:
    """ModelMetadata for the sidecar's model, from what the model check described."""
    return pb.ModelMetadataResponse(name=name, versions=list(versions), platform=described.platform,
                                    inputs=[_tensor_metadata(s) for s in described.inputs],
                                    outputs=[_tensor_metadata(s) for s in described.outputs])


def data_type(datatype: str) -> int:
    """OIP datatype ("FP32", "BYTES") -> model_config DataType (TYPE_FP32, TYPE_STRING)."""
    name = "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"
    return pb.DataType.Value(name) if name in pb.DataType.keys() else pb.TYPE_INVALID


def _version_policy(versions: Sequence[str]) -> pb.ModelVersionPolicy | None:
    if versions and all(v.isdigit() and len(v) <= 18 for v in versions):  # int64, as model_config.proto's
        return pb.ModelVersionPolicy(specific=pb.ModelVersionPolicy.Specific(versions=[int(v) for v in versions]))
    return None


def config_answer(name: str, versions: Sequence[str], described: Description, max_request_rows: int) -> pb.ModelConfig:
    """The ModelConfig of what the sidecar serves, built from what the model check described.

    A model whose inputs and served outputs all have a variable first dimension is a batching
    model (unless the upstream's own config says max_batch_size 0): `max_batch_size` rows (the
    upstream's, at most `max_request_rows`), dims without that dimension, as in Triton's
    convention; else `max_batch_size` is 0 and dims are full shapes.
    """
    config = pb.ModelConfig(name=name, platform=described.platform, backend=described.backend)
    if (policy := _version_policy(versions)) is not None:
        config.version_policy.CopyFrom(policy)
    tensors = (*described.inputs, *described.outputs)
    batching = bool(tensors) and all(len(s.shape) >= 1 and s.shape[0] == -1 for s in tensors) \
        and described.max_batch_size != 0
    config.max_batch_size = min(described.max_batch_size or max_request_rows, max_request_rows) if batching else 0
    for s in described.inputs:
        config.input.add(name=s.name, data_type=data_type(s.datatype), dims=list(s.shape[1:] if batching else s.shape))
    for s in described.outputs:
        config.output.add(name=s.name, data_type=data_type(s.datatype), dims=list(s.shape[1:] if batching else s.shape))
    return config
