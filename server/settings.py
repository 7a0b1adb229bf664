"""The sidecar's one typed settings object.

Precedence, highest first: command-line flags > `PURIFIER_<FIELD>` environment variables > a TOML
config file (`--config` or `$PURIFIER_CONFIG`) > the defaults below. Every value is checked when
`Settings` is built, so a bad value stops start-up with a message that names the field and the
allowed values instead of failing on the first request.

The PRF secret itself is never a setting (it would end up in logs and reprs): only the path of
the file holding it is; `purifier.defenses.keyed.load_secret` reads it (or `$PURIFIER_SECRET`).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from purifier.defenses import REGISTRY as DEFENSE_REGISTRY
from purifier.devices import DEVICES
from purifier.errors import ConfigError

DEFENSES = tuple(DEFENSE_REGISTRY)
CONFIDENCE_KINDS = ("probabilities", "logits")
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_UPSTREAM_SERVICE = "inference.GRPCInferenceService"
ENV_PREFIX = "PURIFIER_"
TORCHSERVE_SERVICE = "org.pytorch.serve.grpc.openinference.GRPCInferenceService"
UPSTREAM_CONTENTS = ("auto", "raw", "typed")


@dataclass(frozen=True)
class Settings:
    """Everything `purifier serve` can be told. Exactly one of `model` / `upstream` is set."""

    model: str | None = None              # target directory or bare .onnx: the embedded backend
    upstream: str | None = None           # HOST:PORT of an OIP v2 gRPC server
    upstream_service: str = DEFAULT_UPSTREAM_SERVICE  # TorchServe: org.pytorch.serve.grpc.openinference...
    upstream_contents: str = "auto"       # how inputs travel upstream: raw | typed | auto (typed for TorchServe)
    model_name: str | None = None         # the one model the sidecar defends (embedded default: dir/file stem)
    model_version: str = ""               # accepted besides "" (embedded: "1")
    model_id: str | None = None           # remote: identity the defense must be fitted for (ONNX sha256)
    defense: str = "none"
    defense_dir: str | None = None
    secret_file: str | None = None
    confidence_output: str | None = None  # embedded default: model.json's confidence_output
    confidence_kind: str = "probabilities"
    allow_outputs: tuple[str, ...] = ()   # other outputs passed through; everything else is dropped
    host: str = "0.0.0.0"
    port: int = 8001
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 8002              # 0: any free port; -1: no metrics endpoint
    max_request_rows: int = 4096          # above: RESOURCE_EXHAUSTED
    max_batch_rows: int = 256             # rows coalesced into one defense call
    max_wait_ms: float = 0.0              # extra wait for more rows; 0 = batch only what is queued
    device: str = "cpu"
    reflection: bool = False
    grace_s: float = 5.0
    upstream_timeout_s: float = 30.0      # used when the caller sent no deadline
    health_poll_s: float = 1.0
    log_level: str = "info"
    tls_cert_file: str | None = None      # PEM certificate chain: serve TLS
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None  # PEM CA: require and verify client certificates (mTLS)
    auth_token_file: str | None = None    # file holding the bearer token clients must send

    def __post_init__(self):
        def fail(field: str, why: str):
            raise ConfigError(f"{field}: {why}")

        if (self.model is None) == (self.upstream is None):
            fail("model/upstream", "give exactly one of --model DIR_OR_ONNX (embedded) or --upstream HOST:PORT")
        if self.model is not None and not Path(self.model).exists():
            fail("model", f"{self.model} does not exist (a target directory or an .onnx file)")
        if self.upstream is not None:
            host, _, port = self.upstream.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                fail("upstream", f"{self.upstream!r} is not HOST:PORT")
            if not self.model_name:
                fail("model_name", "required with --upstream (the upstream model the sidecar defends)")
            if not self.confidence_output:
                fail("confidence_output", "required with --upstream (e.g. predict_proba for MLServer sklearn)")
        if self.defense not in DEFENSES:
            fail("defense", f"{self.defense!r} is not one of {', '.join(DEFENSES)}")
        if self.defense != "none" and not self.defense_dir:
            fail("defense_dir", f"required with --defense {self.defense} (a directory from purifier fit-defense)")
        if self.defense_dir is not None and not Path(self.defense_dir).is_dir():
            fail("defense_dir", f"{self.defense_dir} is not a directory")
        if self.confidence_kind not in CONFIDENCE_KINDS:
            fail("confidence_kind", f"{self.confidence_kind!r} is not one of {', '.join(CONFIDENCE_KINDS)}")
        if self.device not in DEVICES:
            fail("device", f"{self.device!r} is not one of {', '.join(DEVICES)}")
        if self.log_level not in LOG_LEVELS:
            fail("log_level", f"{self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        if not 0 <= self.port < 65536:
            fail("port", f"{self.port} is not a port (0-65535; 0 = any free port)")
        if not -1 <= self.metrics_port < 65536:
            fail("metrics_port", f"{self.metrics_port} is not a port (0-65535; 0 = any free port; -1 = off)")
        for name in ("max_request_rows", "max_batch_rows"):
            if getattr(self, name) < 1:
                fail(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("max_wait_ms", "grace_s"):
            if getattr(self, name) < 0:
                fail(name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("upstream_timeout_s", "health_poll_s"):
            if getattr(self, name) <= 0:
                fail(name, f"must be > 0, got {getattr(self, name)}")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            fail("tls_cert_file/tls_key_file", "give both the certificate and the key, or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            fail("tls_client_ca_file", "mutual TLS needs tls_cert_file and tls_key_file as well")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "auth_token_file"):
            if getattr(self, name) and not Path(getattr(self, name)).is_file():
                fail(name, f"{getattr(self, name)} does not exist")
        if self.upstream_contents not in UPSTREAM_CONTENTS:
            fail("upstream_contents", f"{self.upstream_contents!r} is not one of {', '.join(UPSTREAM_CONTENTS)}")
        if not self.upstream_service or "/" in self.upstream_service:
            fail("upstream_service", f"{self.upstream_service!r} is not a gRPC service name (package.Service)")

    @property
    def embedded(self) -> bool:
        return self.model is not None

    @property
    def upstream_encoding(self) -> str | None:
        """How inputs go upstream: "typed", "raw", or None for as the client sent them.

        auto: typed for TorchServe, whose OIP service reads no raw contents (tritonclient and
        perf_analyzer send only raw); as sent for every other server, which reads both.
        """
        if self.upstream_contents == "auto":
            return "typed" if self.upstream_service == TORCHSERVE_SERVICE else None
        return self.upstream_contents

    @classmethod
    def resolve(cls, flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                config: str | os.PathLike | None = None) -> Settings:
        """Merge defaults < config file < environment < flags (None-valued flags are ignored)."""
        env = os.environ if env is None else env
        flags = {k: v for k, v in (flags or {}).items() if v is not None}
        config = config or env.get(f"{ENV_PREFIX}CONFIG")
        merged: dict[str, Any] = {}
        if config:
            merged.update(_read_config(Path(config)))
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                merged[f.name] = _parse(f, raw)
        unknown = set(flags) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"{', '.join(sorted(unknown))}: unknown setting(s)")
        merged.update(flags)
        return cls(**{k: _coerce(k, v) for k, v in merged.items()})

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **changes)


_TYPES = {f.name: f.type for f in fields(Settings)}


def _kind(name: str) -> str:
    t = str(_TYPES[name])
    for kind in ("bool", "int", "float", "tuple"):
        if t.startswith(kind):
            return kind
    return "str"


def _parse(f: dataclasses.Field, raw: str) -> Any:
    """An environment string -> the field's type (tuples are comma-separated)."""
    kind = _kind(f.name)
    if kind == "bool":
        low = raw.strip().lower()
        if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ConfigError(f"{f.name}: {ENV_PREFIX}{f.name.upper()}={raw!r} is not a boolean (true/false)")
        return low in ("1", "true", "yes", "on")
    if kind == "tuple":
        return tuple(s.strip() for s in raw.split(",") if s.strip())
    return raw


def _coerce(name: str, value: Any) -> Any:
    kind = _kind(name)
    try:
        if kind == "bool":
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind == "tuple":
            if isinstance(value, str):
                value = [s.strip() for s in value.split(",") if s.strip()]
            if not all(isinstance(v, str) for v in value):
                raise ValueError
            return tuple(value)
        if value is None or isinstance(value, str):
            return value
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {value!r} is not a valid {kind}") from None


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config: {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config: {path} is not valid TOML ({e})") from None
    data = data.get("serve", data)  # either a [serve] table or top-level keys
    known = {f.name for f in fields(Settings)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"config: unknown key(s) {', '.join(sorted(unknown))} in {path}; "
                          f"valid keys: {', '.join(sorted(known))}")
    return dict(data)
