"""Model access, as fitting and auditing both need it: probabilities (or labels only) for rows.

One interface, two ways in; nothing downstream knows which:

* `OnnxTarget`: an ONNX model run in this process (`--model MODEL.onnx`, or a target directory),
  optionally behind a fitted `Defense` (what the sidecar would serve);
* `RemoteTarget`: an Open Inference Protocol (KServe v2) gRPC endpoint (`--endpoint HOST:PORT
  --model-name NAME`), queried with the stock `tritonclient.grpc` client and raw tensors exactly
  like any client of the sidecar or of an undefended model server, over TLS or mutual TLS and
  with a bearer token when the deployment requires them.

Every access counts the rows it was asked about, so each attack can report its query cost, and
knows the model's class count C (and input width D when the model declares it). Membership
inference threat model: Shokri et al. 2017; label-only access: Choquette-Choo et al. 2021.
"""

from __future__ import annotations

import abc
import re
import socket
from pathlib import Path

import numpy as np

from purifier.errors import ConfigError
from purifier.probabilities import served_undefended, softmax
from purifier.untrusted import printable

DEFAULT_BATCH = 512
# a refusal for size names its limit: Triton "batch-size must be <= 256", the sidecar "the limit is 4096"
SIZE_LIMIT = re.compile(r"(?:<=|limit is|at most|maximum(?: batch size)?(?: is)?|max_batch_size(?: is)?)\s*(\d+)",
                        re.IGNORECASE)
SIZE_CODES = ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED")
FLOAT_TYPES = {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(float16)": "FP16"}
WIRE_DTYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16}


class TargetAccess(abc.ABC):
    """Black-box access. `query(X (N, D)) -> (N, C) float64` probabilities; `labels(X) -> (N,)`.

    Attributes:
        n_classes: C.
        n_features: D if the model declares it, else None.
        model_id: the model's identity if known (an ONNX file's sha256), else "".
        queries: rows queried so far (a label-only query counts like any other).
    """

    n_classes: int
    n_features: int | None = None
    model_id: str = ""
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

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def not_probabilities(where: str, problem: str) -> ConfigError:
    """The one message for a model output that is not probability vectors, with both fixes."""
    return ConfigError(f"{where} does not answer probability vectors ({problem}); if the output holds logits pass "
                       "--logits, else choose the probabilities output with --output-name")


class OnnxTarget(TargetAccess):
    """An ONNX classifier run with onnxruntime, optionally behind a fitted `Defense`.

    Args:
        model: an .onnx file or a target directory (model.onnx + model.json).
        output_name: the confidence output; default the target's, else `probabilities` if the
            graph has it, else its only floating-point output.
        logits: the output holds logits (softmaxed here, as `purifier serve --logits` does).
        defense: applied to the model's probabilities, as the sidecar would; without one, the rows
            are what the undefended sidecar answers (`purifier.probabilities.served_undefended`).
    """

    def __init__(self, model: str | Path, output_name: str | None = None, logits: bool = False,
                 defense=None, batch: int = 4096, device: str = "cpu"):
        super().__init__()
        from purifier.artifacts import sha256_file
        from purifier.models.onnx_runner import OnnxClassifier

        path = Path(model)
        if path.is_dir():
            from purifier.models.target import Target

            target = Target.load(path)
            path, self.model_id = target.onnx_path, target.model_id
            output_name = output_name or target.manifest["confidence_output"]
        elif path.suffix != ".onnx" or not path.is_file():
            raise ConfigError(f"--model: {path} is not an .onnx file or a target directory"
                              + ("" if path.exists() else " (it does not exist)"))
        else:
            self.model_id = sha256_file(path)
        self._clf = OnnxClassifier(path, device=device)
        session = self._clf.session
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise ConfigError(f"--model {path}: the graph has {len(inputs)} inputs; Purifier needs one (N, D) input")
        width = inputs[0].shape[-1] if inputs[0].shape else None
        self.n_features = width if isinstance(width, int) and width > 0 else None
        self._in_dtype = WIRE_DTYPES.get(FLOAT_TYPES.get(inputs[0].type, ""), np.float32)
        outputs = {o.name: o for o in session.get_outputs()}
        floats = [n for n, o in outputs.items() if o.type in FLOAT_TYPES]
        if output_name is None:
            output_name = "probabilities" if "probabilities" in floats else (floats[0] if len(floats) == 1 else None)
            zipmaps = [n for n, o in outputs.items() if o.type.startswith("seq(map")]
            if output_name is None and zipmaps:
                output_name = zipmaps[0]  # refused below, with the fix
            if output_name is None:
                raise ConfigError(f"--model {path}: choose the confidence output with --output-name from: "
                                  f"{', '.join(outputs)}")
        if output_name not in outputs:
            raise ConfigError(f"--output-name: {output_name!r} is not an output of {path}; choose one of: "
                              f"{', '.join(outputs)}")
        kind = outputs[output_name].type
        if kind.startswith("seq(map"):
            raise ConfigError(f"--model {path}: output {output_name!r} is an ONNX ZipMap ({kind}), not a tensor; "
                              "export with skl2onnx options={id(model): {'zipmap': False}}")
        if kind not in FLOAT_TYPES:
            raise ConfigError(f"--model {path}: output {output_name!r} is {kind}, not floating-point confidences"
                              + (f"; choose one of: {', '.join(floats)} with --output-name" if floats else ""))
        self.output_name, self.logits, self.defense, self.batch = output_name, logits, defense, batch
        classes = outputs[output_name].shape[-1] if outputs[output_name].shape else None
        if not (isinstance(classes, int) and classes > 0):  # dynamic class axis: ask once
            probe = np.zeros((1, self.n_features or 1), self._in_dtype)
            classes = int(self._clf.run(probe, outputs=[output_name])[output_name].shape[-1])
        self.n_classes = classes
        name = defense.name if defense is not None else "none"
        self.description = f"in-process model {path.name} (output {output_name!r}, defense {name})"

    def _query(self, X):
        outs = []
        for i in range(0, len(X), self.batch):
            xb = X[i:i + self.batch]
            p = self._clf.run(xb.astype(self._in_dtype, copy=False), outputs=[self.output_name])[self.output_name]
            p = softmax(p) if self.logits else p
            if self.defense is not None:
                p = self.defense.transform(p, xb if self.defense.needs_inputs else None)
            else:
                p = served_undefended(p)
            outs.append(np.asarray(p, np.float64))
        return np.concatenate(outs)


class InProcessTarget(OnnxTarget):
    """A `purifier train-target` target's ONNX model, optionally behind a `Defense` (tests, demos)."""

    def __init__(self, target, defense=None, batch: int = 4096):
        super().__init__(target.directory, defense=defense, batch=batch)
        self.description = f"in-process {target.manifest['dataset']} target (defense {getattr(defense, 'name', 'none')})"


def parse_endpoint(endpoint: str) -> str:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"endpoint: {endpoint!r} is not HOST:PORT (e.g. 127.0.0.1:8001)")
    return endpoint


def _read_file(path: str | None, flag: str) -> str | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{flag}: {p} does not exist")
    return str(p)


class RemoteTarget(TargetAccess):
    """An OIP v2 gRPC endpoint (the sidecar, Triton, MLServer, KServe), via `tritonclient.grpc`.

    Args:
        endpoint: "HOST:PORT".
        model_name: the served model.
        output_name: the confidence output; default the model's "probabilities" output if it
            has one, else its only output.
        n_classes: expected C; a mismatch is a ConfigError.
        logits: the output holds logits (softmaxed here).
        tls_ca: PEM CA file: connect with TLS and verify the server against it.
        tls_cert, tls_key: PEM client certificate chain and key (mutual TLS; need tls_ca).
        token_file: a file holding the bearer token sent as `authorization: Bearer <token>`.
        timeout_s: per-request deadline.
    """

    def __init__(self, endpoint: str, model_name: str, output_name: str | None = None,
                 n_classes: int | None = None, batch: int = DEFAULT_BATCH, timeout_s: float = 30.0, *,
                 logits: bool = False, tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, token_file: str | None = None):
        super().__init__()
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        self._grpcclient, self._exc = grpcclient, InferenceServerException
        self.endpoint, self.model_name, self.batch, self.timeout_s = parse_endpoint(endpoint), model_name, batch, timeout_s
        self.logits = logits
        self.refused: list[str] = []  # requests the server refused for their size, and why
        self.description = f"endpoint {endpoint} model {model_name!r}"
        if (tls_cert is None) != (tls_key is None):
            raise ConfigError("--tls-cert and --tls-key: mutual TLS needs both the client certificate and its key")
        if tls_cert and not tls_ca:
            raise ConfigError("--tls-cert/--tls-key: mutual TLS also needs --tls-ca (the server's CA)")
        self.tls = tls_ca is not None
        self.token_file = _read_file(token_file, "--token-file")
        self._headers = None
        if self.token_file:
            token = Path(self.token_file).read_text().strip()
            if not token:
                raise ConfigError(f"--token-file: {self.token_file} is empty")
            self._headers = {"authorization": f"Bearer {token}"}
        tls = {}
        if self.tls:
            tls = {"ssl": True, "root_certificates": _read_file(tls_ca, "--tls-ca"),
                   "private_key": _read_file(tls_key, "--tls-key"),
                   "certificate_chain": _read_file(tls_cert, "--tls-cert")}
        self._client = grpcclient.InferenceServerClient(endpoint, **tls)
        try:
            self._connect(output_name, n_classes)
        except BaseException:
            self._client.close()
            raise

    def _refused(self, e) -> ConfigError:
        """The one-line reason a call failed before inference: token, TLS, or reachability."""
        status, text = str(e.status() or ""), _first_line(e)
        if "UNAUTHENTICATED" in status or "PERMISSION_DENIED" in status:
            if self.token_file is None:
                return ConfigError(f"endpoint {self.endpoint} requires a bearer token ({text}); pass --token-file FILE")
            return ConfigError(f"endpoint {self.endpoint} rejected the token in {self.token_file} ({text}); "
                               "check --token-file")
        if "UNAVAILABLE" in status and _port_open(self.endpoint):
            if not self.tls:
                return ConfigError(f"endpoint {self.endpoint} accepts connections but does not answer plaintext "
                                   f"gRPC ({text}); if it serves TLS pass --tls-ca (and --tls-cert/--tls-key "
                                   "for mutual TLS)")
            return ConfigError(f"TLS with endpoint {self.endpoint} failed ({text}); check that it serves TLS, that "
                               "--tls-ca signed its certificate, and --tls-cert/--tls-key if it requires "
                               "client certificates")
        return ConfigError(f"endpoint {self.endpoint} is unreachable ({text}); check --endpoint HOST:PORT and "
                           "that the server is running")

    def _connect(self, output_name, n_classes):
        try:
            live = self._client.is_server_live(headers=self._headers, client_timeout=self.timeout_s)
        except self._exc as e:
            raise self._refused(e) from None
        if not live:
            raise ConfigError(f"endpoint {self.endpoint} answers but is not live")
        try:
            meta = self._client.get_model_metadata(self.model_name, headers=self._headers,
                                                   client_timeout=self.timeout_s)
        except self._exc as e:
            raise ConfigError(f"model {self.model_name!r} is not served at {self.endpoint} "
                              f"({_first_line(e)}); served models: {self._served_models()}") from None
        if len(meta.inputs) != 1:
            raise ConfigError(f"model {self.model_name!r} declares {len(meta.inputs)} inputs; Purifier needs exactly "
                              "one (N, D) input (MLServer: declare it under \"inputs\" in model-settings.json)")
        self.input_name = meta.inputs[0].name
        self.input_datatype = meta.inputs[0].datatype if meta.inputs[0].datatype in WIRE_DTYPES else "FP32"
        width = int(meta.inputs[0].shape[-1]) if meta.inputs[0].shape else -1
        self.n_features = width if width > 0 else None
        outputs = {o.name: list(o.shape) for o in meta.outputs}
        if output_name is None and outputs:
            output_name = "probabilities" if "probabilities" in outputs else (
                next(iter(outputs)) if len(outputs) == 1 else None)
            if output_name is None:
                raise ConfigError(f"model {self.model_name!r} has several outputs; choose one with "
                                  f"--output-name from: {', '.join(printable(o, 80) for o in outputs)}")
        if outputs and output_name not in outputs:
            raise ConfigError(f"output {output_name!r} is not an output of model {self.model_name!r}; "
                              f"choose one of: {', '.join(printable(o, 80) for o in outputs)}")
        self.output_name = output_name  # None: the model declares no outputs; take the only one answered
        self.max_batch_size = self._max_batch_size()
        if self.max_batch_size:
            self.batch = min(self.batch, self.max_batch_size)
        shape = outputs.get(output_name)
        served = int(shape[-1]) if shape and int(shape[-1]) > 0 else None
        if served is None:  # dynamic or undeclared class axis: ask once
            served = int(self._infer(np.zeros((1, self.n_features or 1), np.float32)).shape[1])
        if n_classes is not None and served != n_classes:
            raise ConfigError(f"class-count mismatch: endpoint output {self.output_name!r} has {served} classes, "
                              f"the records have {n_classes}")
        self.n_classes = served

    def _max_batch_size(self) -> int | None:
        """The model's `max_batch_size` from ModelConfig (Triton, the sidecar), None when the server
        has no such call (MLServer) or declares none (0)."""
        try:
            cfg = self._client.get_model_config(self.model_name, headers=self._headers, client_timeout=self.timeout_s)
        except self._exc:
            return None
        size = int(getattr(getattr(cfg, "config", None), "max_batch_size", 0) or 0)
        return size if size > 0 else None

    def _served_models(self) -> str:
        try:
            index = self._client.get_model_repository_index(headers=self._headers, client_timeout=self.timeout_s)
            names = sorted({printable(m.name, 80) for m in index.models})
            return ", ".join(names) if names else "(none listed)"
        except self._exc:
            return "(the server does not list its models)"

    def _infer(self, X: np.ndarray) -> np.ndarray:
        inp = self._grpcclient.InferInput(self.input_name, list(X.shape), self.input_datatype)
        inp.set_data_from_numpy(X.astype(WIRE_DTYPES[self.input_datatype], copy=False))  # raw_input_contents
        outs = None if self.output_name is None else [self._grpcclient.InferRequestedOutput(self.output_name)]
        try:
            res = self._client.infer(self.model_name, [inp], outputs=outs, headers=self._headers,
                                     client_timeout=self.timeout_s)
        except self._exc as e:
            text = _first_line(e)
            if len(X) > 1 and any(code in str(e.status() or "") for code in SIZE_CODES):
                m = SIZE_LIMIT.search(text)
                limit = int(m.group(1)) if m and 0 < int(m.group(1)) < len(X) else len(X) // 2
                raise _TooLarge(limit, text) from None
            raise ConfigError(f"{self.description}: inference failed ({text})") from None
        if self.output_name is None:
            answered = [o.name for o in res.get_response().outputs]
            if len(answered) != 1:
                raise ConfigError(f"model {self.model_name!r} declares no outputs and answered "
                                  f"{[printable(a, 80) for a in answered]}; "
                                  "choose the confidence output with --output-name")
            self.output_name = answered[0]
        arr = res.as_numpy(self.output_name)
        if arr is None:
            raise ConfigError(f"{self.description}: response lacks output {self.output_name!r}")
        arr = arr.reshape(len(X), -1)
        return softmax(arr) if self.logits else arr

    def _query(self, X):
        """Requests of at most `batch` rows; a request refused for its size (INVALID_ARGUMENT or
        RESOURCE_EXHAUSTED) is sent again smaller (the limit the answer names, else half), and
        `batch` keeps the size that passed. A refusal at one row is the server's own answer."""
        out, i = [], 0
        while i < len(X):
            rows = X[i:i + self.batch]
            try:
                out.append(self._infer(rows).astype(np.float64))
            except _TooLarge as e:
                self.batch = e.limit
                self.refused.append(f"{len(rows)} rows: {e.text}")
                continue
            i += len(rows)
        return np.concatenate(out)

    def close(self) -> None:
        self._client.close()


class _TooLarge(Exception):
    """A request refused for its size: `limit` rows to try next."""

    def __init__(self, limit: int, text: str):
        super().__init__(text)
        self.limit, self.text = max(1, limit), text


def _port_open(endpoint: str, timeout_s: float = 2.0) -> bool:
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def _first_line(e: Exception) -> str:
    """The first line of an endpoint's error text, as plain characters (`purifier.untrusted`)."""
    text = str(e).strip()
    return printable(text.splitlines()[0], 200) if text else type(e).__name__
