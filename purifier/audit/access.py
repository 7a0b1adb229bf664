"""Target access as an outside attacker has it: probabilities (or labels only) for query rows.

Every access counts the rows it was asked about, so each attack can report its query cost.
`RemoteTarget` speaks the Open Inference Protocol (KServe v2) over gRPC with the stock
`tritonclient.grpc` client and raw FP32 inputs, exactly like any client of the sidecar or of an
undefended model server; `InProcessTarget` runs the target's ONNX model (plus an optional
`Defense`) in this process, for tests and demos. Membership-inference threat model: Shokri et
al. 2017, Choquette-Choo et al. 2021 (label-only access).
"""

from __future__ import annotations

import abc

import numpy as np

from purifier.errors import ConfigError

DEFAULT_BATCH = 512


class TargetAccess(abc.ABC):
    """Black-box access. `query(X (N, D)) -> (N, C) float64` probabilities; `labels(X) -> (N,)`.

    Attributes:
        n_classes: C.
        queries: rows queried so far (a label-only query counts like any other).
    """

    n_classes: int
    description: str = ""

    def __init__(self) -> None:
        self.queries = 0

    def query(self, X: np.ndarray) -> np.ndarray:
        X = np.ascontiguousarray(X, np.float32)
        if X.ndim != 2:
            raise ValueError(f"query rows must be 2-D (N, D), got shape {X.shape}")
        self.queries += len(X)
        if len(X) == 0:
            return np.zeros((0, self.n_classes))
        probs = np.asarray(self._query(X), np.float64)
        if probs.shape != (len(X), self.n_classes):
            raise ConfigError(f"{self.description}: answered shape {probs.shape}, expected "
                              f"({len(X)}, {self.n_classes})")
        return probs

    def labels(self, X: np.ndarray) -> np.ndarray:
        """(N, D) -> (N,) int64 predicted labels (first index on ties)."""
        return self.query(X).argmax(axis=1)

    @abc.abstractmethod
    def _query(self, X: np.ndarray) -> np.ndarray:
        """X (N, D) float32 -> (N, C) probabilities."""

    def close(self) -> None:  # noqa: B027 - optional hook, most accesses hold no connection
        """Release connections (no-op by default)."""


class InProcessTarget(TargetAccess):
    """The target's ONNX model, optionally behind a fitted `Defense` (what the sidecar serves)."""

    def __init__(self, target, defense=None, batch: int = 4096):
        super().__init__()
        self._clf = target.classifier()
        self._output = target.manifest["confidence_output"]
        self.n_classes = target.n_classes
        self.defense = defense
        self.batch = batch
        name = defense.name if defense is not None else "none"
        self.description = f"in-process {target.manifest['dataset']} target (defense {name})"

    def _query(self, X):
        outs = []
        for i in range(0, len(X), self.batch):
            xb = X[i:i + self.batch]
            p = self._clf.run(xb, outputs=[self._output])[self._output]
            if self.defense is not None:
                p = self.defense.transform(p, xb if self.defense.needs_inputs else None)
            outs.append(p.astype(np.float64))
        return np.concatenate(outs)


def parse_endpoint(endpoint: str) -> str:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"endpoint: {endpoint!r} is not HOST:PORT (e.g. 127.0.0.1:8001)")
    return endpoint


class RemoteTarget(TargetAccess):
    """An OIP v2 gRPC endpoint (the sidecar, Triton, MLServer, KServe), via `tritonclient.grpc`.

    Args:
        endpoint: "HOST:PORT".
        model_name: the served model.
        output_name: the confidence output; default the model's "probabilities" output if it
            has one, else its only output.
        n_classes: expected C (from the target's splits); a mismatch is a ConfigError.
        timeout_s: per-request deadline.
    """

    def __init__(self, endpoint: str, model_name: str, output_name: str | None = None,
                 n_classes: int | None = None, batch: int = DEFAULT_BATCH, timeout_s: float = 30.0):
        super().__init__()
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        self._grpcclient, self._exc = grpcclient, InferenceServerException
        self.endpoint, self.model_name, self.batch, self.timeout_s = parse_endpoint(endpoint), model_name, batch, timeout_s
        self.description = f"endpoint {endpoint} model {model_name!r}"
        self._client = grpcclient.InferenceServerClient(endpoint)
        try:
            self._connect(output_name, n_classes)
        except BaseException:
            self._client.close()
            raise

    def _connect(self, output_name, n_classes):
        try:
            live = self._client.is_server_live(client_timeout=self.timeout_s)
        except self._exc as e:
            raise ConfigError(f"endpoint {self.endpoint} is unreachable ({_first_line(e)}); "
                              "check --endpoint HOST:PORT and that the server is running") from None
        if not live:
            raise ConfigError(f"endpoint {self.endpoint} answers but is not live")
        try:
            meta = self._client.get_model_metadata(self.model_name, client_timeout=self.timeout_s)
        except self._exc as e:
            raise ConfigError(f"model {self.model_name!r} is not served at {self.endpoint} "
                              f"({_first_line(e)}); served models: {self._served_models()}") from None
        if len(meta.inputs) != 1:
            raise ConfigError(f"model {self.model_name!r} has {len(meta.inputs)} inputs; the audit needs exactly one")
        self.input_name = meta.inputs[0].name
        outputs = {o.name: list(o.shape) for o in meta.outputs}
        if output_name is None:
            output_name = "probabilities" if "probabilities" in outputs else (
                next(iter(outputs)) if len(outputs) == 1 else None)
            if output_name is None:
                raise ConfigError(f"model {self.model_name!r} has several outputs; choose one with "
                                  f"--output-name from: {', '.join(outputs)}")
        if output_name not in outputs:
            raise ConfigError(f"output {output_name!r} is not an output of model {self.model_name!r}; "
                              f"choose one of: {', '.join(outputs)}")
        self.output_name = output_name
        shape = outputs[output_name]
        served = int(shape[-1]) if shape and int(shape[-1]) > 0 else None
        if served is None:  # dynamic class axis: ask once
            served = int(self._infer(np.zeros((1, int(meta.inputs[0].shape[-1])), np.float32)).shape[1])
        if n_classes is not None and served != n_classes:
            raise ConfigError(f"class-count mismatch: endpoint output {output_name!r} has {served} classes, "
                              f"the target's splits have {n_classes}")
        self.n_classes = served

    def _served_models(self) -> str:
        try:
            index = self._client.get_model_repository_index(client_timeout=self.timeout_s)
            names = sorted({m.name for m in index.models})
            return ", ".join(names) if names else "(none listed)"
        except self._exc:
            return "(the server does not list its models)"

    def _infer(self, X: np.ndarray) -> np.ndarray:
        inp = self._grpcclient.InferInput(self.input_name, list(X.shape), "FP32")
        inp.set_data_from_numpy(X)  # binary: travels as raw_input_contents
        out = self._grpcclient.InferRequestedOutput(self.output_name)
        try:
            res = self._client.infer(self.model_name, [inp], outputs=[out], client_timeout=self.timeout_s)
        except self._exc as e:
            raise ConfigError(f"{self.description}: inference failed ({_first_line(e)})") from None
        arr = res.as_numpy(self.output_name)
        if arr is None:
            raise ConfigError(f"{self.description}: response lacks output {self.output_name!r}")
        return arr.reshape(len(X), -1)

    def _query(self, X):
        return np.concatenate([self._infer(X[i:i + self.batch]).astype(np.float64)
                               for i in range(0, len(X), self.batch)])

    def close(self) -> None:
        self._client.close()


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
