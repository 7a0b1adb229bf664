"""The sidecar's one typed settings object.

Precedence, highest first: command-line flags > `PURIFIER_<FIELD>` environment variables > a TOML
config file (`--config` or `$PURIFIER_CONFIG`) > the defaults below. Every value is checked when
`Settings` is built, so a bad value stops start-up with a message that names the field and the
allowed values instead of failing on the first request.

Each setting is declared once, as a field below: type, default, help and flag (`setting(...)`);
`purifier serve`'s flags are generated from those declarations (`add_arguments`).

The PRF secret itself is never a setting (it would end up in logs and reprs): only the path of
the file holding it is; `purifier.defenses.keyed.load_secret` reads it (or `$PURIFIER_SECRET`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from purifier.attacks.shadow_cache import CACHE_DIR_ENV
from purifier.defenses import REGISTRY as DEFENSE_REGISTRY
from purifier.defenses.keyed import SECRET_ENV, SECRET_FILE_ENV
from purifier.devices import DEVICES
from purifier.errors import ConfigError

DEFENSES = tuple(DEFENSE_REGISTRY)
CONFIDENCE_KINDS = ("probabilities", "logits")
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_UPSTREAM_SERVICE = "inference.GRPCInferenceService"
ENV_PREFIX = "PURIFIER_"
TORCHSERVE_SERVICE = "org.pytorch.serve.grpc.openinference.GRPCInferenceService"
UPSTREAM_CONTENTS = ("auto", "raw", "typed")
CONFIG_ENV = f"{ENV_PREFIX}CONFIG"
# PURIFIER_* variables the project reads that are not settings; any other PURIFIER_* is a typo
# (PURIFIER_AUTH_TOKEN for PURIFIER_AUTH_TOKEN_FILE, say) that would be ignored silently.
OTHER_VARIABLES = (CONFIG_ENV, SECRET_ENV, SECRET_FILE_ENV, CACHE_DIR_ENV)


# Fragments of the names confidence outputs go by: an allowed parameter or trailer named so is refused.
CONFIDENCE_WORDS = ("prob", "logit", "confidence", "score", "softmax")


def named_like_confidences(key: str, confidence_output: str | None) -> bool:
    """Whether a response parameter or trailer key reads like the confidences (case, '-', '_' ignored)."""
    def squash(text: str) -> str:
        return "".join(c for c in text.lower() if c.isalnum())

    k, c = squash(key.removesuffix("-bin")), squash(confidence_output or "")
    return bool(c) and (c in k or k in c) or any(w in k for w in CONFIDENCE_WORDS)


def setting(default: Any, help: str, **meta: Any) -> Any:
    """A settings field declared once: its default, its help and how `purifier serve` spells it.

    meta: `flag` (default `--field-name`), `choices`, `metavar`, `group` (mutually exclusive
    flags), `const` (a flag that stores this constant, such as `--logits`).
    """
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def usable_cpus() -> int:
    """The CPU cores this process may use: its affinity mask, lowered to a cgroup v2 CPU quota
    (`cpu.max`, a container's CPU limit, rounded up), which the affinity mask does not show."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return cpus
    if quota == "max":
        return cpus
    return max(1, min(cpus, -(-int(quota) // int(period))))


@dataclass(frozen=True)
class Settings:
    """Everything `purifier serve` can be told. Exactly one of `model` / `upstream` is set."""

    model: str | None = setting(None, "embedded backend: a target directory or an .onnx file", group="backend")
    upstream: str | None = setting(None, "an OIP v2 server (Triton, KServe, MLServer, TorchServe): HOST:PORT for "
                                   "its gRPC front, http://HOST:PORT or https://HOST:PORT for its REST front",
                                   group="backend", metavar="HOST:PORT|URL")
    upstream_service: str = setting(DEFAULT_UPSTREAM_SERVICE, "upstream gRPC service (TorchServe: "
                                    "org.pytorch.serve.grpc.openinference.GRPCInferenceService)")
    upstream_contents: str = setting("auto", "how inputs travel upstream: raw, typed, or auto (typed for "
                                     "TorchServe, whose OIP service ignores raw contents; as sent otherwise)",
                                     choices=UPSTREAM_CONTENTS)
    model_name: str | None = setting(None, "the one model clients ask for (required with --upstream; "
                                     "embedded: the directory name or file stem)")
    model_version: str = setting("", "model version accepted besides '' (embedded: 1)")
    model_id: str | None = setting(None, "with --upstream: sha256 of the ONNX file the defense was fitted for; "
                                   "vouches for a model that cannot be probed (no input the fingerprint's rows fit); "
                                   "one that can is always probed")
    defense: str | None = setting(None, "defense to serve (default: the one in --defense-dir's defense.json); "
                                  "'none' serves undefended on purpose, the only way to do so", choices=DEFENSES)
    defense_dir: str | None = setting(None, "fitted defense directory (from purifier fit-defense)")
    secret_file: str | None = setting(None, "PRF secret file (else $PURIFIER_SECRET / $PURIFIER_SECRET_FILE)")
    confidence_output: str | None = setting(None, "output holding the confidences (required with --upstream; "
                                            "embedded: from model.json)")
    confidence_kind: str = setting("probabilities", "the confidence output holds logits: softmax before defending",
                                   flag="--logits", const="logits", choices=CONFIDENCE_KINDS)
    allow_outputs: tuple[str, ...] = setting((), "also serve this class-index output (repeatable), e.g. a label: "
                                             "rebuilt by the sidecar as the argmax of the defended vector, never "
                                             "the upstream's own values; refused at start unless the model's "
                                             "output is an integer [N] or [N, 1] equal to the argmax of its "
                                             "confidences", flag="--allow-output", metavar="NAME")
    allow_parameters: tuple[str, ...] = setting((), "forward this response parameter of the upstream VERBATIM "
                                                "(repeatable; none by default; the sidecar cannot vouch for its "
                                                "contents)", flag="--allow-parameter", metavar="KEY")
    allow_trailers: tuple[str, ...] = setting((), "forward this trailing-metadata key of the upstream VERBATIM "
                                              "(repeatable; none by default; the sidecar cannot vouch for its "
                                              "contents)", flag="--allow-trailer", metavar="KEY")
    host: str = setting("0.0.0.0", "listen address")
    port: int = setting(8001, "gRPC port (0 = any free port)")
    http_port: int = setting(8000, "REST port (OIP v2 over HTTP; 0 = any free port; -1 = off)")
    metrics_host: str = setting("127.0.0.1", "Prometheus endpoint address")
    metrics_port: int = setting(8002, "Prometheus port (0 = any free port; -1 = off)")
    workers: str = setting("1", "serving processes sharing the gRPC, REST and metrics ports, each with the whole "
                           "request path (N, or auto: one per CPU core available); docs/serving.md#workers",
                           metavar="N|auto")
    max_request_rows: int = setting(4096, "rows per request; above: RESOURCE_EXHAUSTED")
    max_request_bytes: int = setting(0, "largest request message accepted, in bytes (0 = derived from "
                                     "max_request_rows x the model's input width)")
    max_queued_rows: int = setting(16384, "rows waiting for the defense; above: RESOURCE_EXHAUSTED")
    max_concurrent_rpcs: int = setting(128, "inference-service calls handled at once (health Watch streams are "
                                       "counted apart); above: RESOURCE_EXHAUSTED")
    max_connections: int = setting(1024, "gRPC client connections open at once (each carries at most "
                                   "max_concurrent_rpcs + max_watch_streams + 128 streams: together they bound the "
                                   "calls all callers, with or without the token, can hold open); above: refused")
    max_watch_streams: int = setting(16, "health Watch streams open at once (they need no token); above: "
                                     "RESOURCE_EXHAUSTED")
    watch_max_s: float = setting(300.0, "longest a health Watch stream stays open, in seconds (then it ends and "
                                 "the client watches again)", flag="--watch-max")
    max_batch_rows: int = setting(256, "most rows per defense call (larger requests are defended in chunks, "
                                  "interleaved with other requests)")
    max_wait_ms: float = setting(0.0, "wait for more rows before defending (0 = batch only what is queued)")
    gather_ms: float = setting(4.0, "longest a defense call waits for more rows while other requests are "
                               "still waiting for their upstream answers (a lone request never waits; "
                               "0 = never wait): fewer, larger defense calls under concurrency")
    max_defense_slice_ms: float = setting(5.0, "longest one defense call should take: rows per call come from the "
                                          "measured cost per row, so a large request yields to others at "
                                          "least this often (0 = always max_batch_rows rows)")
    device: str = setting("cpu", "where the embedded model and the defense's onnxruntime graphs (MemGuard's "
                          "fast solver, PURIFIER's reformer) run: cuda needs onnxruntime-gpu and a GPU",
                          choices=DEVICES)
    reflection: bool = setting(False, "enable gRPC server reflection")
    grace_s: float = setting(5.0, "seconds to drain on SIGTERM", flag="--grace")
    upstream_timeout_s: float = setting(30.0, "upstream deadline when the caller sets none, in seconds",
                                        flag="--upstream-timeout")
    health_poll_s: float = setting(1.0, "upstream readiness poll interval, in seconds", flag="--health-poll")
    identity_check_s: float = setting(60.0, "longest time between two identity probes of a remote upstream's "
                                      "model, in seconds (each interval is random, up to this)",
                                      flag="--identity-check")
    max_waiting_requests: int = setting(128, "requests that wait for a restarting or reconnecting upstream to be "
                                        "back and verified (each within its own deadline); above: UNAVAILABLE")
    log_level: str = setting("info", "log level", choices=LOG_LEVELS)
    otel: bool = setting(False, "record OpenTelemetry spans (the otel extra; exported as the OTEL_* environment "
                         "says unless a TracerProvider is set up); off: trace context is passed upstream as it came")
    tls_cert_file: str | None = setting(None, "PEM certificate chain: serve TLS", flag="--tls-cert")
    tls_key_file: str | None = setting(None, "PEM private key for --tls-cert", flag="--tls-key")
    tls_client_ca_file: str | None = setting(None, "PEM CA: require and verify client certificates (mTLS)",
                                             flag="--tls-client-ca")
    auth_token_file: str | None = setting(None, "file with the bearer token clients must send "
                                          "(health checks stay open)")

    def __post_init__(self):
        def fail(field: str, why: str):
            raise ConfigError(f"{field}: {why}")

        if (self.model is None) == (self.upstream is None):
            fail("model/upstream", "give exactly one of --model DIR_OR_ONNX (embedded) or --upstream HOST:PORT")
        if self.model is not None and not Path(self.model).exists():
            fail("model", f"{self.model} does not exist (a target directory or an .onnx file)")
        if self.upstream is not None:
            scheme, sep, address = self.upstream.partition("://")
            if sep and scheme not in ("http", "https"):
                fail("upstream", f"{self.upstream!r}: the scheme must be http or https (or give HOST:PORT for gRPC)")
            host, _, port = (address if sep else self.upstream).rstrip("/").rpartition(":")
            if not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
                fail("upstream", f"{self.upstream!r} is not HOST:PORT, http://HOST:PORT or https://HOST:PORT")
            if not self.model_name:
                fail("model_name", "required with --upstream (the upstream model the sidecar defends)")
            if not self.confidence_output:
                fail("confidence_output", "required with --upstream (e.g. predict_proba for MLServer sklearn)")
        if self.defense is not None and self.defense not in DEFENSES:
            fail("defense", f"{self.defense!r} is not one of {', '.join(DEFENSES)}")
        if self.defense not in (None, "none") and not self.defense_dir:
            fail("defense_dir", f"required with --defense {self.defense} (a directory from purifier fit-defense)")
        if self.defense == "none" and self.defense_dir:
            fail("defense", f"'none' contradicts defense_dir {self.defense_dir}: drop --defense none to serve the "
                            "fitted defense, or drop --defense-dir to serve undefended")
        if self.defense_dir is not None and not Path(self.defense_dir).is_dir():
            fail("defense_dir", f"{self.defense_dir} is not a directory")
        for name in self.allow_outputs:
            if name == self.confidence_output:
                fail("allow_outputs", f"{name!r} is the confidence output: a second, undefended copy of it "
                                      "would bypass the defense; remove it from allow_outputs")
            if "logit" in name.lower():
                fail("allow_outputs", f"{name!r} looks like a logits output, which gives away the undefended "
                                      "confidences; remove it from allow_outputs")
        for name in ("allow_parameters", "allow_trailers"):
            for key in getattr(self, name):
                if named_like_confidences(key, self.confidence_output):
                    fail(name, f"{key!r} is named like the confidence output; a {name[6:-1]} is forwarded verbatim, "
                               "so one that carries the confidences would bypass the defense: remove it")
        if self.confidence_kind not in CONFIDENCE_KINDS:
            fail("confidence_kind", f"{self.confidence_kind!r} is not one of {', '.join(CONFIDENCE_KINDS)}")
        if self.device not in DEVICES:
            fail("device", f"{self.device!r} is not one of {', '.join(DEVICES)}")
        if self.log_level not in LOG_LEVELS:
            fail("log_level", f"{self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        if self.workers != "auto" and not (self.workers.isdigit() and int(self.workers) >= 1):
            fail("workers", f"{self.workers!r} is not a number of processes (an integer >= 1, or auto)")
        if self.device != "cpu" and self.worker_count > 1:  # untested: no GPU here; N contexts on one device
            fail("workers", f"several workers serve on the CPU only (each would hold its own {self.device} context "
                            f"and copy of the model); run --device {self.device} with --workers 1")
        if not 0 <= self.port < 65536:
            fail("port", f"{self.port} is not a port (0-65535; 0 = any free port)")
        if not -1 <= self.http_port < 65536:
            fail("http_port", f"{self.http_port} is not a port (0-65535; 0 = any free port; -1 = off)")
        if not -1 <= self.metrics_port < 65536:
            fail("metrics_port", f"{self.metrics_port} is not a port (0-65535; 0 = any free port; -1 = off)")
        for name in ("max_request_rows", "max_batch_rows", "max_concurrent_rpcs", "max_watch_streams",
                     "max_connections"):
            if getattr(self, name) < 1:
                fail(name, f"must be >= 1, got {getattr(self, name)}")
        # a request larger than one defense call must leave one call's worth of room (batcher.py)
        needed = self.max_request_rows + (self.max_batch_rows if self.max_request_rows > self.max_batch_rows else 0)
        if self.max_queued_rows < needed:
            fail("max_queued_rows", f"{self.max_queued_rows} is below {needed} (max_request_rows + max_batch_rows): "
                                    "a request of the allowed size could never be queued")
        for name in ("max_wait_ms", "gather_ms", "max_defense_slice_ms", "grace_s", "max_request_bytes", "max_waiting_requests"):
            if getattr(self, name) < 0:
                fail(name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("upstream_timeout_s", "health_poll_s", "watch_max_s", "identity_check_s"):
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
    def worker_count(self) -> int:
        """How many serving processes `workers` asks for (auto: `usable_cpus()`)."""
        if self.workers == "auto":
            return usable_cpus()
        return int(self.workers)

    @property
    def embedded(self) -> bool:
        return self.model is not None

    @property
    def upstream_rest(self) -> bool:
        """The upstream is reached over REST (an http:// or https:// URL)."""
        return self.upstream is not None and self.upstream.startswith(("http://", "https://"))

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
        config = config or env.get(CONFIG_ENV)
        _refuse_unknown_variables(env)
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


def _refuse_unknown_variables(env: Mapping[str, str]) -> None:
    """A PURIFIER_* variable that is neither a setting nor one the project reads is refused, not ignored."""
    known = {ENV_PREFIX + f.name.upper() for f in fields(Settings)} | set(OTHER_VARIABLES)
    unknown = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in known)
    if unknown:
        def closest(name: str) -> str:
            near = [k for k in sorted(known) if k.startswith(name) or name.startswith(k)]
            return f" (did you mean {near[0]}?)" if near else ""
        raise ConfigError(f"environment: unknown variable(s) {', '.join(u + closest(u) for u in unknown)}; "
                          f"unset them, or use one of the PURIFIER_<SETTING> names in docs/configuration.md "
                          f"or {', '.join(OTHER_VARIABLES)}")


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
    if "serve" in data:  # either a [serve] table or top-level keys, never both (the others would be dropped)
        beside = sorted(k for k in data if k != "serve")
        if beside:
            raise ConfigError(f"config: key(s) {', '.join(beside)} beside the [serve] table in {path} would be "
                              "ignored; move them into [serve] (or drop the [serve] header)")
        data = data["serve"]
        if not isinstance(data, dict):
            raise ConfigError(f"config: serve in {path} is not a table; write the settings under [serve]")
    known = {f.name for f in fields(Settings)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"config: unknown key(s) {', '.join(sorted(unknown))} in {path}; "
                          f"valid keys: {', '.join(sorted(known))}")
    return dict(data)


# --- `purifier serve`'s command line, generated from the fields above ------------------------------

def _help(f: dataclasses.Field) -> str:
    text = f.metadata["help"]
    # defaults of 0 / off / none are explained by the help text itself
    if "const" in f.metadata or f.default in (None, (), "", False, 0) or "default" in text:
        return text
    if text.endswith(")"):
        return f"{text[:-1]}; default {f.default})"
    return f"{text} (default {f.default})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field (`--field-name` unless the field names its own), plus --config."""
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in fields(Settings):
        meta = f.metadata
        target: argparse._ActionsContainer = parser
        if "group" in meta:
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_mutually_exclusive_group()
            target = groups[meta["group"]]
        kw: dict[str, Any] = {"dest": f.name, "help": _help(f)}
        kind = _kind(f.name)
        if "const" in meta:
            kw.update(action="store_const", const=meta["const"])
        elif kind == "bool":
            kw.update(action="store_true", default=None)
        elif kind == "tuple":
            kw.update(action="append")
        else:
            kw["type"] = {"int": int, "float": float}.get(kind, str)
            if "choices" in meta:
                kw["choices"] = list(meta["choices"])
        if "metavar" in meta:
            kw["metavar"] = meta["metavar"]
        target.add_argument(meta.get("flag") or "--" + f.name.replace("_", "-"), **kw)
    parser.add_argument("--config", help="TOML settings file (keys as in the [serve] table; "
                        "default $PURIFIER_CONFIG)")


def parse_arguments(argv: list[str], env: Mapping[str, str] | None = None, prog: str = "purifier serve") -> Settings:
    """argv (flags only) -> Settings, merged with the environment (default os.environ) and the config file."""
    parser = argparse.ArgumentParser(prog=prog, description="Run the gRPC sidecar (OIP v2) in front of a model "
                                     "server or an ONNX model. Settings: flags > PURIFIER_<SETTING> environment "
                                     "> --config TOML > defaults.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    flags = {f.name: getattr(args, f.name) for f in fields(Settings)}
    flags = {k: tuple(v) if isinstance(v, list) else v for k, v in flags.items()}
    return Settings.resolve(flags, env, config=args.config)
