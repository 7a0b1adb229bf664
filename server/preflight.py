"""Before and while serving: is the upstream model the one the defense was fitted for, and can it be defended?

A defense fitted for one model misbehaves silently on another with the same class count (its
thresholds, classifier or reformer learned that model's confidence distribution), and a
misconfigured confidence output fails every request while health says SERVING. So the sidecar
checks the model before it serves it: at start-up (the embedded model, or a remote upstream that
is already up) and each time a remote upstream becomes ready again or reconnects (it may now be
another model). In order:

1. the confidence output exists and is a floating-point tensor: not skl2onnx's default int64
   `label`, not a ZipMap (`seq(map(...))`), with the defense's class count when declared;
2. every output in `allow_outputs` is declared (when the model declares outputs) as an integer
   class index of shape [N] or [N, 1] (`outputs`: the sidecar rebuilds it, never forwards it);
3. the declared inputs agree with the defense's fingerprint (one floating-point input of its
   width): metadata that contradicts the fitted model, or gives no way to probe it, is refused
   unless `--model-id` vouches for the model (the only case `--model-id` stands in for probes);
4. a probe request (the fingerprint's check rows, `Fingerprint.check_rows`, or zeros of the
   declared input shape when the defense has no fingerprint) is answered with finite probability
   rows (rows that are not on the simplex suggest `--logits`; rows that already are, with
   `--logits` set, are refused) of the defense's class count, and every allowed output is the
   argmax of those rows;
5. the answers match the fingerprint (`purifier.defenses.fingerprint`), whenever the model can be
   probed, `--model-id` or not.

While it serves, the sidecar repeats 4 and 5 on a few of the fingerprint's other rows
(`Fingerprint.probe_rows`, which no check sends) at random times (`identity_probe`, scheduled by
readiness.py), in requests that look like any client's.

Each failure is a `ModelRefused` (a ConfigError): one line naming the fix. `purifier serve` exits
with it (code 2) at start-up; later, the sidecar logs it and stays NOT_SERVING.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import grpc
import numpy as np

from purifier.defenses import Defense, Fingerprint
from purifier.errors import ConfigError, InvalidProbabilities
from purifier.probabilities import check_probabilities, softmax
from purifier_server._proto import grpc_service_pb2 as pb
from purifier_server.codec import (
    CONFIDENCE_DATATYPES,
    DATATYPE_OF,
    DTYPES,
    read_answer,
    with_contents,
)
from purifier_server.errors import BadUpstreamOutput, UpstreamFailed
from purifier_server.model_description import Description, NotDescribable, describe
from purifier_server.outputs import (
    ClassIndexOutput,
    NotAClassIndex,
    check_datatype,
    class_index_output,
    declared_shape_fits,
)
from purifier_server.upstream import TensorSpec, Upstream, upstream_request_id

PROBE_TIMEOUT_S = 10.0
ZERO_PROBE_ROWS = 2
ZIPMAP_FIX = "re-export it with skl2onnx options={id(model): {'zipmap': False}}"
LABEL_FIX = ("remove it from allow_outputs (--allow-output): clients take the argmax of the defended vector "
             "themselves")


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
    vouched: bool = False  # --model-id vouches for a remote model, which counts only where it cannot be probed

    @property
    def outputs(self) -> tuple[str, ...]:
        """What every request to the upstream asks for, probes and clients' alike."""
        return (self.output, *self.allow_outputs)


@dataclass(frozen=True)
class Probe:
    """How to ask the upstream the fingerprint's questions: its one input and the stored rows.

    batch: the model's fixed batch size, or None when it takes any number of rows.
    """

    input: TensorSpec
    fingerprint: Fingerprint
    batch: int | None = None

    @property
    def check_rows(self) -> np.ndarray:
        """The rows the model check after a (re)connection asks."""
        return self.fingerprint.check_rows(self.batch)

    @property
    def probe_rows(self) -> np.ndarray:
        """The rows identity probes draw from (none of the check's unless the batch needs them)."""
        return self.fingerprint.probe_rows(self.batch)

    def arrays(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        rest = self.input.shape[1:]
        x = self.fingerprint.inputs[rows]
        x = x.reshape((len(rows), *rest)) if rest and all(d >= 0 for d in rest) else x
        return {self.input.name: x.astype(DTYPES[self.input.datatype])}


@dataclass(frozen=True)
class Checked:
    """What the model check found: a note for the log (warn: the operator should look), how the
    allowed outputs are served, how to probe the model's identity later (None: it cannot be), and
    what clients may be told about the model (`model_description.describe`)."""

    note: str
    warn: bool
    outputs: dict[str, ClassIndexOutput]
    probe: Probe | None
    description: Description = Description()


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
        if other is None:
            raise ModelRefused(f"allow_outputs: the model has no output {name!r}; {LABEL_FIX}")
        if other.datatype in CONFIDENCE_DATATYPES:
            raise ModelRefused(f"allow_outputs: {name!r} is {other.datatype}; a floating-point output beside the "
                               "confidences is a copy or transform of them and would bypass the defense; "
                               "remove it from allow_outputs")
        try:
            check_datatype(other.datatype, classes if classes > 0 else defense.n_classes)
            if not declared_shape_fits(other.shape):
                raise NotAClassIndex(f"its declared shape is {list(other.shape)}; a class index is [N] or [N, 1]")
        except NotAClassIndex as e:
            raise ModelRefused(f"allow_outputs: {name!r} cannot be served: {e}; the sidecar serves only a class "
                               f"index it rebuilds from the defended vector; {LABEL_FIX}") from None


def _declared_outputs(upstream: Upstream, check: ModelCheck) -> dict[str, ClassIndexOutput]:
    """The allowed outputs as declared, for a model that cannot be probed (declared: see _check_outputs)."""
    specs = {s.name: s for s in upstream.outputs}
    missing = [n for n in check.allow_outputs if n not in specs]
    if missing:
        raise ModelRefused(f"allow_outputs: the model cannot be probed and does not declare {missing[0]!r}, so the "
                           f"sidecar cannot tell its datatype and shape; {LABEL_FIX}")
    return {n: ClassIndexOutput(n, specs[n].datatype, len(specs[n].shape) == 2) for n in check.allow_outputs}


def _unprobeable(inputs: list[TensorSpec], fingerprint: Fingerprint) -> str | None:
    """Why the declared inputs cannot take the fingerprint's rows (None: they can)."""
    if not inputs:
        return "it declares no inputs (ModelMetadata)"
    if len(inputs) != 1:
        return f"it declares {len(inputs)} inputs"
    spec = inputs[0]
    if spec.datatype not in CONFIDENCE_DATATYPES:
        return f"its input {spec.name!r} is {spec.datatype or spec.onnx_type}"
    rest = spec.shape[1:]
    width = math.prod(rest) if all(d >= 0 for d in rest) else fingerprint.n_features
    if not spec.shape or width != fingerprint.n_features or (not rest and fingerprint.n_features != 1):
        return f"its input {spec.name!r} takes {list(spec.shape)}"
    if spec.shape[0] > len(fingerprint.inputs):
        return f"its input {spec.name!r} takes a fixed batch of {spec.shape[0]} rows"
    return None


def fingerprint_probe(inputs: list[TensorSpec], fingerprint: Fingerprint, check: ModelCheck) -> Probe | None:
    """The probe for a defense with a fingerprint, whenever the declared inputs can take its rows;
    None when they cannot and the operator vouches for the model with --model-id.

    Raises ModelRefused when the declared inputs contradict the fitted model or give no way to
    probe it: an upstream must not escape the identity check by what its metadata says.
    """
    why = _unprobeable(inputs, fingerprint)
    if why is None:
        spec = inputs[0]
        return Probe(spec, fingerprint, spec.shape[0] if spec.shape[0] > 0 else None)
    if check.vouched:
        return None
    raise ModelRefused(f"defense: the upstream model contradicts the fitted one: {why}, the defense was fitted "
                       f"for one floating-point input of {fingerprint.n_features} features; serve the model it was "
                       "fitted for (declaring that input in its ModelMetadata), or vouch for the model with "
                       "--model-id")


def zero_inputs(inputs: list[TensorSpec]) -> tuple[dict[str, np.ndarray] | None, str]:
    """Rows of zeros for a defense without a fingerprint: (input name -> array or None, why not)."""
    if not inputs:
        return None, "the upstream declares no inputs (ModelMetadata), so no probe request can be built"
    if any(s.shape and s.shape[0] > 0 for s in inputs):
        return None, "the model's batch dimension is fixed, so no probe request can be built"
    arrays = {}
    for spec in inputs:
        if spec.datatype not in DTYPES or any(d < 0 for d in spec.shape[1:]):
            return None, f"input {spec.name!r} ({spec.datatype} {list(spec.shape)}) has no fixed numeric shape"
        arrays[spec.name] = np.zeros((ZERO_PROBE_ROWS, *spec.shape[1:]), DTYPES[spec.datatype])
    return arrays, "zeros"


def probe_request(arrays: dict[str, np.ndarray], check: ModelCheck, request_id: str = "", version: str | None = None,
                  raw: bool = True) -> pb.ModelInferRequest:
    """A ModelInferRequest carrying `arrays` that asks for `check.outputs`, like any forwarded request."""
    request = pb.ModelInferRequest(model_name=check.name, model_version=check.version if version is None else version,
                                   id=request_id)
    for name, array in arrays.items():
        request.inputs.add(name=name, datatype=DATATYPE_OF[array.dtype], shape=array.shape)
        request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    for name in check.outputs:
        request.outputs.add(name=name)
    return request if raw else with_contents(request, typed=True)


async def _ask(upstream: Upstream, request, check: ModelCheck, defense: Defense, rows: int,
               timeout: float = PROBE_TIMEOUT_S) -> tuple[np.ndarray, dict[str, ClassIndexOutput]]:
    """Send a probe; (the confidence rows, the allowed outputs verified on them)."""
    response, _ = await upstream.infer(request, timeout, ())
    try:
        probs = read_answer(response, check.output, [], rows)[check.output]
    except BadUpstreamOutput as e:
        raise ModelRefused(f"confidence_output: the model's answer to {rows} probe rows cannot be defended ({e}); "
                           "check --confidence-output") from None
    try:
        check_probabilities(probs)
        on_simplex = True
    except InvalidProbabilities as e:
        on_simplex, why = False, e
    if check.logits and on_simplex:
        raise ModelRefused(f"confidence_kind: --logits is set, but {check.output!r} already holds probability vectors "
                           f"on the {rows} probe rows; a softmax over them would flatten every answer: drop --logits")
    if check.logits:
        probs = softmax(probs)
    elif not on_simplex:
        raise ModelRefused(f"confidence_output: {check.output!r} does not hold probabilities on the probe rows "
                           f"({why}); if the model answers logits, add --logits")
    if defense.n_classes and probs.shape[1] != defense.n_classes:
        raise ModelRefused(f"defense: fitted for {defense.n_classes} classes, the model answers {probs.shape[1]}; "
                           "fit the defense for this model")
    outputs = {}
    for name in check.allow_outputs:
        try:
            try:
                answer = read_answer(response, None, [name], rows)[name]
            except BadUpstreamOutput as e:
                raise NotAClassIndex(str(e)) from None
            outputs[name] = class_index_output(name, DATATYPE_OF[answer.dtype], answer, probs)
        except NotAClassIndex as e:
            raise ModelRefused(f"allow_outputs: the model's {name!r} cannot be served: {e}; the sidecar serves only "
                               f"a class index it rebuilds from the defended vector; {LABEL_FIX}") from None
    return probs, outputs


def _same_as_declared(upstream: Upstream, outputs: dict[str, ClassIndexOutput]) -> None:
    specs = {s.name: s for s in upstream.outputs}
    for name, out in outputs.items():
        declared = specs.get(name)
        if declared is not None and declared.datatype and declared.datatype != out.datatype:
            raise ModelRefused(f"allow_outputs: the model declares {name!r} as {declared.datatype} and answers "
                               f"{out.datatype}; {LABEL_FIX}")


async def check_model(upstream: Upstream, defense: Defense, check: ModelCheck) -> Checked:
    """Run the checks against a ready upstream.

    Raises ModelRefused (the model must not be served) or UpstreamFailed (the upstream did not
    answer: try again later).
    """
    meta = None
    try:
        meta = await upstream.model_metadata(check.name, check.version)
    except UpstreamFailed as e:
        if e.upstream_code != grpc.StatusCode.UNIMPLEMENTED:
            raise
        # a server without ModelMetadata: nothing to check the outputs against, nothing to probe with
    _check_outputs(upstream, defense, check)
    checked = await _checked_model(upstream, defense, check)
    own = await upstream.model_config(check.name, check.version) if meta is not None else None
    try:
        described = describe(platform=meta.platform if meta is not None else "",
                             backend=own.backend if own is not None and own.backend else upstream.backend,
                             versions=upstream.versions if meta is not None else (),
                             inputs=upstream.inputs if meta is not None else (),
                             outputs=upstream.outputs if meta is not None else (), served=check.outputs,
                             classes=defense.n_classes, max_batch_size=None if own is None else own.max_batch_size)
    except NotDescribable as e:
        raise ModelRefused(f"model metadata: {e}; the sidecar tells clients only what it can vouch for: fix the "
                           "model's metadata") from None
    return dataclasses.replace(checked, description=described)


async def _checked_model(upstream: Upstream, defense: Defense, check: ModelCheck) -> Checked:
    """Steps 2 to 5 of the check, after ModelMetadata."""
    probe = None
    if defense.fingerprint is not None:
        probe = fingerprint_probe(upstream.inputs, defense.fingerprint, check)
        arrays, how = (probe.arrays(probe.check_rows), "fingerprint") if probe is not None \
            else (None, "--model-id vouches for the model and its inputs cannot be probed")
    else:
        arrays, how = zero_inputs(upstream.inputs)
    if arrays is None:
        outputs = _declared_outputs(upstream, check)
        return Checked(f"not probed: {how}; the model's identity is not verified", defense.name != "none"
                       and not check.vouched, outputs, None)
    rows = len(next(iter(arrays.values())))
    probs, outputs = await _ask(upstream, probe_request(arrays, check, upstream_request_id()), check, defense, rows)
    _same_as_declared(upstream, outputs)
    if how != "fingerprint":
        if defense.name == "none":
            return Checked(f"outputs checked on {rows} rows of zeros (no defense: no identity to verify)", False,
                           outputs, None)
        return Checked(f"outputs checked on {rows} rows of zeros; the defense has no fingerprint (fitted before "
                       "fingerprints), so the model's identity is not verified: refit it or pass --model-id", True,
                       outputs, None)
    assert probe is not None  # how == "fingerprint"
    why = probe.fingerprint.mismatch(probs, probe.check_rows)
    if why:
        raise ModelRefused(f"defense: fitted for another model: {why}; serve the model it was fitted for or refit "
                           "it for this one (purifier fit-defense)")
    return Checked(f"fingerprint matched on {rows} probe rows", False, outputs, probe)


async def identity_probe(upstream: Upstream, defense: Defense, check: ModelCheck, probe: Probe, rows: np.ndarray,
                         request_id: str, version: str, raw: bool, encoding: str | None, timeout: float) -> None:
    """Ask the fingerprint's questions `rows` (k,) again, in a request shaped like a client's
    (its id, version, representation and deadline); ModelRefused when the answers are another model's.

    encoding: the sidecar's upstream_contents re-encoding ("typed", "raw" or None), as for clients.
    timeout: the deadline the upstream sees, in seconds (a recent client request's).
    """
    request = probe_request(probe.arrays(rows), check, request_id, version, raw)
    if encoding is not None:
        request = with_contents(request, encoding == "typed")
    probs, _ = await _ask(upstream, request, check, defense, len(rows), timeout)
    why = probe.fingerprint.mismatch(probs, rows)
    if why:
        raise ModelRefused(f"defense: the upstream now answers like another model: {why}; serve the model the "
                           "defense was fitted for")
