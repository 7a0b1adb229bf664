"""Access control on the sidecar's listener: TLS, mutual TLS and bearer-token authentication.

TLS uses the certificate and key files named in settings; with a client CA the listener requires
and verifies client certificates (mutual TLS). The optional bearer token is read from a file
(never from a flag, so it does not show in `ps`, and never logged) and compared in constant time
(`hmac.compare_digest`). Health checks stay open so orchestrator probes work without the token;
every other RPC without the right `authorization: Bearer <token>` gets UNAUTHENTICATED. The
token is the sidecar's own: `servicer.forwardable` never passes `authorization` upstream.
"""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc

from purifier.errors import ConfigError
from purifier_server.settings import Settings

OPEN_METHODS = ("/grpc.health.v1.Health/",)
MIN_TOKEN_BYTES = 16


def _read(path: str, field: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{field}: {p} does not exist")
    return p.read_bytes()


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from settings, or None for a plaintext listener."""
    if not settings.tls_cert_file:
        return None
    cert = _read(settings.tls_cert_file, "tls_cert_file")
    key = _read(settings.tls_key_file, "tls_key_file")
    ca = _read(settings.tls_client_ca_file, "tls_client_ca_file") if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def read_token(settings: Settings) -> bytes | None:
    if not settings.auth_token_file:
        return None
    token = _read(settings.auth_token_file, "auth_token_file").strip()
    if len(token) < MIN_TOKEN_BYTES:
        raise ConfigError(f"auth_token_file: the token must be at least {MIN_TOKEN_BYTES} bytes")
    return token


class BearerAuth(grpc.aio.ServerInterceptor):
    """Rejects calls without `authorization: Bearer <token>` (constant-time comparison)."""

    def __init__(self, token: bytes):
        self._expected = b"Bearer " + token

    def _authorized(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                got = value if isinstance(value, bytes) else value.encode()
                return hmac.compare_digest(got, self._expected)
        return False

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS) or self._authorized(details.invocation_metadata):
            return handler

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        async def deny_stream(request_iterator, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
            yield  # pragma: no cover  (makes this an async generator, as stream handlers must be)

        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(deny_stream)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny_stream)
        return grpc.unary_unary_rpc_method_handler(deny)
