"""Before serving: is the upstream model the one the defense was fitted for, and can it be defended?

A defense fitted for one model misbehaves silently on another with the same class count (its
thresholds, classifier or reformer learned that model's confidence distribution), and a
misconfigured confidence output fails every request while health says SERVING. So the sidecar
checks the model before it serves it: at start-up (the embedded model, or a remote upstream that
is already up) and each time a remote upstream becomes ready again or reconnects (it may now be
another model). In order:

1. the confidence output exists and is a floating-point tensor: not skl2onnx's default int64
   `label`, not a ZipMap (`seq(map(...))`), with the defense's class count when declared;
2. no output in `allow_outputs` is floating point (a copy or transform of the confidences);
3. a probe request (the defense fingerprint's probe rows, or zeros of the declared input shape
   when the defense has no fingerprint) is answered with finite probability rows (rows that are
   not on the simplex suggest `--logits`) of the defense's class count;
4. the answers match the fingerprint (`purifier.defenses.fingerprint`) unless `--model-id`
   overrides it.

Each failure is a `ModelRefused` (a ConfigError): one line naming the fix. `purifier serve` exits
with it (code 2) at start-up; later, the sidecar logs it and stays NOT_SERVING.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc
import numpy as np

from purifier.defenses import Defense
from purifier.defenses.base import check_probabilities
from purifier.errors import ConfigError, InvalidProbabilities
from purifier_server._proto import grpc_service_pb2 as pb
from purifier_server.codec import CONFIDENCE_DATATYPES, DATATYPE_OF, DTYPES, read_answer, softmax
from purifier_server.errors import BadUpstreamOutput, UpstreamFailed
from purifier_server.upstream import TensorSpec, Upstream

PROBE_TIMEOUT_S = 10.0
ZERO_PROBE_ROWS = 2
ZIPMAP_FIX = "re-export it with skl2onnx options={id(model): {'zipmap': False}}"


class ModelRefused(ConfigError):
    """The upstream model cannot be served with this defense and these settings."""


@dataclass(frozen=True)
class ModelCheck:
    """What to check: the served model's name/version/output and the operator's settings."""

    name: str
    version: str
    output: str
    logits: bool
    allow_outputs: tuple[str, ...]
    use_fingerprint: bool  # False when --model-id vouches for the model instead


def _is_zipmap(spec: TensorSpec) -> bool:
    return spec.onnx_type.startswith(("seq(", "map("))


def _check_outputs(upstream: Upstream, defense: Defense, check: ModelCheck) -> None:
    specs = {s.name: s for s in upstream.outputs}
    if not specs:
        return  # the server declares no outputs (MLServer without a declared signature): the probe decides
    zipmaps = [s.name for s in upstream.outputs if _is_zipmap(s)]
    floats = [s.name for s in upstream.outputs if s.datatype in CONFIDENCE_DATATYPES]
    spec = specs.get(check.output)
    if spec is None:
        raise ModelRefused(f"confidence_output: the model has no output {check.output!r}; choose one of "
                           f"{', '.join(floats) or ', '.join(specs)}")
    if _is_zipmap(spec):
        raise ModelRefused(f"confidence_output: {check.output!r} is an ONNX ZipMap ({spec.onnx_type}), not a "
                           f"tensor; {ZIPMAP_FIX} and serve its probabilities output")
    if spec.datatype not in CONFIDENCE_DATATYPES:
        fix = (f"the probabilities are in the ZipMap output {zipmaps[0]!r}: {ZIPMAP_FIX}" if zipmaps and not floats
               else f"choose a probabilities output with --confidence-output ({', '.join(floats) or 'none is'} "
                    "floating point)")
        raise ModelRefused(f"confidence_output: {check.output!r} is {spec.datatype or spec.onnx_type}, not a "
                           f"floating-point confidence vector; {fix}")
    classes = spec.shape[-1] if len(spec.shape) >= 2 else -1
    if defense.n_classes and classes > 0 and classes != defense.n_classes:
        raise ModelRefused(f"defense: fitted for {defense.n_classes} classes, the model's {check.output!r} has "
                           f"{classes}; fit the defense for this model")
    for name in check.allow_outputs:
        other = specs.get(name)
        if other is not None and other.datatype in CONFIDENCE_DATATYPES:
            raise ModelRefused(f"allow_outputs: {name!r} is {other.datatype}; a floating-point output beside the "
                               "confidences is a copy or transform of them and would bypass the defense; "
                               "remove it from allow_outputs")


def probe_inputs(inputs: list[TensorSpec], defense: Defense) -> tuple[dict[str, np.ndarray] | None, str]:
    """(input name -> probe array, or None when the model cannot be probed; a note for the log)."""
    if not inputs:
        return None, "the upstream declares no inputs (ModelMetadata), so no probe request can be built"
    if any(s.shape and s.shape[0] > 0 for s in inputs):
        return None, "the model's batch dimension is fixed, so no probe request can be built"
    fingerprint = defense.fingerprint
    if fingerprint is not None:
        if len(inputs) != 1:
            return None, f"the model has {len(inputs)} inputs; a fingerprint probes single-input models only"
        spec = inputs[0]
        if spec.datatype not in CONFIDENCE_DATATYPES:
            return None, f"input {spec.name!r} is {spec.datatype}; fingerprint probes are floating point"
        rest = spec.shape[1:]
        width = math.prod(rest) if all(d >= 0 for d in rest) else fingerprint.n_features
        if width != fingerprint.n_features or (not rest and fingerprint.n_features != 1):
            raise ModelRefused(f"defense: its probe rows have {fingerprint.n_features} features, the model's input "
                               f"{spec.name!r} takes {list(spec.shape)}: the defense was fitted for another model")
        shape = (len(fingerprint.inputs), *rest) if all(d >= 0 for d in rest) else fingerprint.inputs.shape
        return {spec.name: fingerprint.inputs.reshape(shape).astype(DTYPES[spec.datatype])}, "fingerprint"
    arrays = {}
    for spec in inputs:
        if spec.datatype not in DTYPES or any(d < 0 for d in spec.shape[1:]):
            return None, f"input {spec.name!r} ({spec.datatype} {list(spec.shape)}) has no fixed numeric shape"
        arrays[spec.name] = np.zeros((ZERO_PROBE_ROWS, *spec.shape[1:]), DTYPES[spec.datatype])
    return arrays, "zeros"


def probe_request(arrays: dict[str, np.ndarray], check: ModelCheck) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=check.name, model_version=check.version, id="purifier-probe")
    for name, array in arrays.items():
        request.inputs.add(name=name, datatype=DATATYPE_OF[array.dtype], shape=array.shape)
        request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    request.outputs.add(name=check.output)
    return request


async def check_model(upstream: Upstream, defense: Defense, check: ModelCheck) -> tuple[str, bool]:
    """Run the checks against a ready upstream.

    Returns (what was verified, in words; True when the operator should be warned that the
    model's identity could not be verified). Raises ModelRefused (the model must not be served)
    or UpstreamFailed (the upstream did not answer: try again later).
    """
    try:
        await upstream.model_metadata(check.name, check.version)
    except UpstreamFailed as e:
        if e.upstream_code != grpc.StatusCode.UNIMPLEMENTED:
            raise
        # a server without ModelMetadata: nothing to check the outputs against, nothing to probe with
    _check_outputs(upstream, defense, check)
    arrays, how = probe_inputs(upstream.inputs, defense)
    if arrays is None:
        return f"not probed: {how}; the model's identity is not verified", defense.name != "none"
    rows = len(next(iter(arrays.values())))
    response, _ = await upstream.infer(probe_request(arrays, check), PROBE_TIMEOUT_S, ())
    try:
        probs = read_answer(response, check.output, [], rows)[check.output]
    except BadUpstreamOutput as e:
        raise ModelRefused(f"confidence_output: the model's answer to {rows} probe rows cannot be defended ({e}); "
                           "check --confidence-output") from None
    if check.logits:
        probs = softmax(probs)
    else:
        try:
            check_probabilities(probs)
        except InvalidProbabilities as e:
            raise ModelRefused(f"confidence_output: {check.output!r} does not hold probabilities on the probe rows "
                               f"({e}); if the model answers logits, add --logits") from None
    if defense.n_classes and probs.shape[1] != defense.n_classes:
        raise ModelRefused(f"defense: fitted for {defense.n_classes} classes, the model answers {probs.shape[1]}; "
                           "fit the defense for this model")
    if how != "fingerprint":
        if defense.name == "none":
            return f"outputs checked on {rows} rows of zeros (no defense: no identity to verify)", False
        return (f"outputs checked on {rows} rows of zeros; the defense has no fingerprint (fitted before "
                "fingerprints), so the model's identity is not verified: refit it or pass --model-id"), True
    if not check.use_fingerprint:
        return f"outputs checked on {rows} probe rows; identity vouched for by --model-id (fingerprint not compared)", False
    why = defense.fingerprint.mismatch(probs)
    if why:
        raise ModelRefused(f"defense: fitted for another model: {why}; serve the model it was fitted for or refit "
                           "it for this one (purifier fit-defense)")
    return f"fingerprint matched on {rows} probe rows", False
