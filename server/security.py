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
    assert settings.tls_key_file is not None  # Settings takes the certificate only with its key
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
    """Rejects calls without `authorization: Bearer <token>` (constant-time comparison).

    The scheme is matched case-insensitively (RFC 7235 section 2.1). A refused call is answered
    by a client-streaming handler that aborts before reading the request: the message is never
    assembled, decompressed or parsed, so a caller without the token cannot make the sidecar
    allocate for its payload.
    """

    def __init__(self, token: bytes):
        self._token = token

    def _authorized(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                got = value if isinstance(value, bytes) else value.encode()
                scheme, _, credentials = got.partition(b" ")
                # compare the token whatever the scheme, so that timing does not tell which part was wrong
                ok = hmac.compare_digest(credentials.strip(b" "), self._token)
                return ok and scheme.lower() == b"bearer"
        return False

    async def intercept_service(self, continuation, details):
        if details.method.startswith(OPEN_METHODS) or self._authorized(details.invocation_metadata):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None  # UNIMPLEMENTED, as for an authorized caller: the method list is not a secret

        async def deny(request_iterator, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        async def deny_stream(request_iterator, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
            yield  # pragma: no cover  (makes this an async generator, as streaming handlers must be)

        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny_stream)
        return grpc.stream_unary_rpc_method_handler(deny)
