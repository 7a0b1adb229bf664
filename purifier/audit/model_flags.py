"""The command-line flags that name a model, shared by `purifier fit-defense` and `purifier audit`.

A model is either run in this process (`--model MODEL.onnx`) or reached through an Open
Inference Protocol endpoint (`--endpoint HOST:PORT --model-name NAME`, with `--tls-ca`,
`--tls-cert`/`--tls-key` and `--token-file` as the deployment requires); `open_model` turns the
flags into one `TargetAccess`, and nothing after it knows which it was.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from purifier.errors import ConfigError

if TYPE_CHECKING:
    from purifier.models.access import OnnxTarget, RemoteTarget


def add_model_flags(p: argparse.ArgumentParser, *, endpoint_help: str) -> None:
    g = p.add_argument_group("the model (one of --model or --endpoint)")
    g.add_argument("--model", default=None, help="an .onnx file (or a target directory) run in this process")
    g.add_argument("--endpoint", default=None, metavar="HOST:PORT", help=endpoint_help)
    g.add_argument("--model-name", default=None, help="with --endpoint: the served model's name")
    g.add_argument("--output-name", default=None,
                   help="the confidence output (default: 'probabilities' if present, else the only one)")
    g.add_argument("--logits", action="store_true", help="the output holds logits: softmax them first")
    g.add_argument("--tls-ca", default=None, metavar="PEM", help="with --endpoint: connect with TLS, trust this CA")
    g.add_argument("--tls-cert", default=None, metavar="PEM", help="mutual TLS: client certificate chain")
    g.add_argument("--tls-key", default=None, metavar="PEM", help="mutual TLS: client private key")
    g.add_argument("--token-file", default=None, metavar="FILE",
                   help="with --endpoint: file holding the bearer token the endpoint requires")


def open_model(args: argparse.Namespace, n_classes: int | None = None,
               defense=None) -> OnnxTarget | RemoteTarget:
    """A `TargetAccess` from the flags: OnnxTarget for --model, RemoteTarget for --endpoint."""
    from purifier.models.access import OnnxTarget, RemoteTarget

    access: OnnxTarget | RemoteTarget

    if args.model and args.endpoint:
        raise ConfigError("give either --model (in process) or --endpoint (a served model), not both")
    if args.model:
        remote_only = [f for f, v in (("--model-name", args.model_name), ("--tls-ca", args.tls_ca),
                                      ("--tls-cert", args.tls_cert), ("--token-file", args.token_file)) if v]
        if remote_only:
            raise ConfigError(f"{', '.join(remote_only)} only apply with --endpoint, not with --model")
        access = OnnxTarget(args.model, args.output_name, args.logits, defense=defense)
    elif args.endpoint:
        if not args.model_name:
            raise ConfigError("--endpoint needs --model-name NAME (the model served there)")
        access = RemoteTarget(args.endpoint, args.model_name, args.output_name, n_classes, logits=args.logits,
                              tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                              token_file=args.token_file)
    else:
        raise ConfigError("name the model: --model MODEL.onnx, or --endpoint HOST:PORT --model-name NAME")
    if n_classes is not None and access.n_classes != n_classes:
        access.close()
        raise ConfigError(f"class-count mismatch: the model answers {access.n_classes} classes, the records "
                          f"have {n_classes}")
    return access
