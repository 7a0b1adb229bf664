"""What the sidecar tells clients about the model it defends: versions, ModelMetadata and ModelConfig.

Every answer is constructed here from typed values (names, datatypes, shapes, integers), never
copied from an upstream message: protobuf keeps fields it does not know, so a copied message
would pass on whatever else the upstream put there, including outputs the sidecar does not serve.
Only the tensors the sidecar returns (the confidence output and the allowed outputs) are
described.

ModelConfig is Triton's extension of the Open Inference Protocol (model_config.proto), which
perf_analyzer and Triton users' tools ask for before anything else. The answer is built from the
upstream's own ModelConfig when it serves one (Triton) and synthesized from its ModelMetadata
otherwise (KServe, MLServer, TorchServe, the embedded model): a model whose every input and
served output has a variable first dimension is a batching model with `max_batch_size` rows and
dims without that dimension, as in Triton's convention; else `max_batch_size` is 0 and dims are
full shapes. `max_batch_size` never exceeds the sidecar's `max_request_rows`, because larger
requests are refused (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from purifier_server._proto import grpc_service_pb2 as pb

_TOKEN = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_DATA_TYPES = frozenset(pb.DataType.values())


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


def _tensor_metadata(spec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=spec.shape)


def metadata_answer(name: str, versions: Sequence[str], platform: str, inputs: Sequence, outputs: Sequence,
                    served: Sequence[str]) -> pb.ModelMetadataResponse:
    """ModelMetadata for the sidecar's model; inputs/outputs: TensorSpecs from the upstream's metadata,
    of which only the outputs named in `served` are described (in that order)."""
    by_name = {s.name: s for s in outputs}
    return pb.ModelMetadataResponse(name=name, versions=list(versions), platform=token(platform),
                                    inputs=[_tensor_metadata(s) for s in inputs],
                                    outputs=[_tensor_metadata(by_name[n]) for n in served if n in by_name])


def data_type(datatype: str) -> int:
    """OIP datatype ("FP32", "BYTES") -> model_config DataType (TYPE_FP32, TYPE_STRING)."""
    name = "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"
    return pb.DataType.Value(name) if name in pb.DataType.keys() else pb.TYPE_INVALID


def _version_policy(versions: Sequence[str]) -> pb.ModelVersionPolicy | None:
    if versions and all(v.isdigit() for v in versions):
        return pb.ModelVersionPolicy(specific=pb.ModelVersionPolicy.Specific(versions=[int(v) for v in versions]))
    return None


def config_answer(name: str, versions: Sequence[str], inputs: Sequence, outputs: Sequence, served: Sequence[str],
                  max_request_rows: int, upstream: pb.ModelConfig | None = None, platform: str = "",
                  backend: str = "") -> pb.ModelConfig:
    """The ModelConfig of what the sidecar serves.

    Args:
        name, versions: the sidecar's model name and accepted versions.
        inputs, outputs: TensorSpecs (name, datatype, shape with -1 for any) from the upstream's metadata.
        served: the outputs the sidecar returns, in order.
        max_request_rows: the sidecar's row limit per request.
        upstream: the upstream's own ModelConfig, if it serves one.
        platform, backend: used when the upstream's config names none.
    """
    config = pb.ModelConfig(name=name, platform=token(platform), backend=token(backend))
    if (policy := _version_policy(versions)) is not None:
        config.version_policy.CopyFrom(policy)
    by_name = {s.name: s for s in outputs}
    served_outputs = [by_name[n] for n in served if n in by_name]
    if upstream is not None and upstream.input and all(o.name in {u.name for u in upstream.output}
                                                       for o in served_outputs):
        config.platform = token(upstream.platform) or config.platform
        config.backend = token(upstream.backend) or config.backend
        config.max_batch_size = min(max(upstream.max_batch_size, 0), max_request_rows)
        for i in upstream.input:
            config.input.add(name=i.name, dims=list(i.dims), optional=i.optional, is_shape_tensor=i.is_shape_tensor,
                             data_type=i.data_type if i.data_type in _DATA_TYPES else pb.TYPE_INVALID,
                             format=i.format if i.format in pb.ModelInput.Format.values() else pb.ModelInput.FORMAT_NONE)
        upstream_outputs = {o.name: o for o in upstream.output}
        for spec in served_outputs:
            o = upstream_outputs[spec.name]
            config.output.add(name=o.name, dims=list(o.dims), is_shape_tensor=o.is_shape_tensor,
                              data_type=o.data_type if o.data_type in _DATA_TYPES else pb.TYPE_INVALID)
        return config
    tensors = [*inputs, *served_outputs]
    batching = bool(tensors) and all(len(s.shape) >= 1 and s.shape[0] == -1 for s in tensors)
    config.max_batch_size = max_request_rows if batching else 0
    for s in inputs:
        config.input.add(name=s.name, data_type=data_type(s.datatype), dims=list(s.shape[1:] if batching else s.shape))
    for s in served_outputs:
        config.output.add(name=s.name, data_type=data_type(s.datatype), dims=list(s.shape[1:] if batching else s.shape))
    return config
