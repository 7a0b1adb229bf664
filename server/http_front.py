"""The REST front: the Open Inference Protocol over HTTP/1.1, a thin adapter over the data plane.

The routes of KServe v2 REST and Triton's HTTP front, for the one model the sidecar defends:

    GET  /v2                                   server metadata
    GET  /v2/health/live, /v2/health/ready     200, or 503 when not ready (no token needed)
    GET  /v2/models/{name}[/versions/{v}]      model metadata (served outputs only)
    GET  .../ready                             200 ready, 503 not ready, 404 another model
    GET  .../config                            Triton's model config (perf_analyzer -i http)
    POST .../infer                             JSON tensors or Triton's binary tensor extension

A request is decoded by `rest_codec` into the `ModelInferRequest` the gRPC front would have
built and answered by the same `DataPlane.infer`, so the defense, the limits, the admission and
the fail-closed rules are the ones gRPC clients get. Errors are `{"error": "..."}` with the HTTP
status of `errors.HTTP_STATUS` (400 for the client's mistakes, never 500 for bad input).

The listener is uvicorn (httptools) on the sidecar's own event loop, beside grpc.aio, with the
gRPC port's TLS settings and bearer token (`Authorization: Bearer ...`, constant-time compared;
health routes stay open). Before a byte of the body is read, a request without the token is
refused (401) and one whose Content-Length exceeds the request limit gets 413 (Payload Too Large); a body is read
only up to that limit, and a compressed one (Content-Encoding gzip or deflate) is inflated only
up to it. The data plane's admission counts REST requests with the gRPC calls: at most
`max_concurrent_rpcs` at once (429 above).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import socket
import ssl
import zlib
from typing import TYPE_CHECKING
from urllib.parse import unquote

import orjson

from purifier.errors import ConfigError
from purifier_server import rest_codec
from purifier_server.dataplane import DataPlane, Failure
from purifier_server.errors import HTTP_STATUS, BadRequest, RequestError, TooLarge
from purifier_server.logs import LOGGER, install
from purifier_server.settings import Settings

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger("purifier_server")
EXTENSIONS = ["binary_tensor_data"]
_METADATA_KEY = re.compile(rb"[0-9a-z_.\-]+")
_METADATA_VALUE = re.compile(rb"[\x20-\x7e]*")
_JSON = [(b"content-type", b"application/json")]


def _json(status: int, doc) -> tuple[int, list, bytes]:
    return status, _JSON, orjson.dumps(doc)


def _error(status: int, message: str) -> tuple[int, list, bytes]:
    return _json(status, {"error": message})


def _failed(f: Failure) -> tuple[int, list, bytes]:
    return _error(HTTP_STATUS.get(f.code, 500), f.message)


class _BodyTooLarge(Exception):
    pass


class RestFront:
    """The ASGI application. `token`: the bearer token (None: none needed); `max_body`: the
    largest request body, compressed or not, in bytes (the gRPC front's receive limit). Every
    route but health goes through the data plane's admission, as a gRPC call does."""

    def __init__(self, plane: DataPlane, *, token: bytes | None, max_body: int):
        self.plane = plane
        self.token = token
        self.max_body = max_body

    # --- plumbing -------------------------------------------------------------------------------

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        if self.token is None:
            return True
        scheme, _, credentials = headers.get(b"authorization", b"").partition(b" ")
        ok = hmac.compare_digest(credentials.strip(b" "), self.token)
        return ok and scheme.lower() == b"bearer"

    async def _body(self, receive, headers: dict[bytes, bytes]) -> bytes:
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            raise _BodyTooLarge
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ConnectionResetError("the client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        encoding = headers.get(b"content-encoding", b"identity").strip().lower()
        if encoding in (b"", b"identity"):
            return body
        if encoding not in (b"gzip", b"deflate"):
            raise BadRequest(f"Content-Encoding {encoding.decode('latin-1')[:20]!r} is not supported; "
                             "use gzip, deflate or none")
        inflater = zlib.decompressobj(31 if encoding == b"gzip" else 15)
        try:
            out = inflater.decompress(body, self.max_body + 1)
        except zlib.error:
            raise BadRequest(f"the body is not valid {encoding.decode()} data") from None
        if len(out) > self.max_body or inflater.unconsumed_tail:
            raise _BodyTooLarge
        return out

    @staticmethod
    def _forwarded(raw_headers) -> tuple[tuple[str, str], ...]:
        """Request headers that can go upstream as gRPC metadata: names gRPC allows (lower-case
        letters, digits, - _ .; not -bin) and printable ASCII values; others stay here (gRPC
        refuses them, and a client's odd header must not fail its request)."""
        out = []
        for key, value in raw_headers:
            if _METADATA_KEY.fullmatch(key) and not key.endswith(b"-bin") and _METADATA_VALUE.fullmatch(value):
                out.append((key.decode("ascii"), value.decode("ascii")))
        return tuple(out)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        headers = dict(scope["headers"])
        status, extra, body = await self._route(scope, receive, headers)
        response_headers = [*extra, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": body})

    # --- routes ---------------------------------------------------------------------------------

    async def _route(self, scope, receive, headers):
        path = scope["path"].rstrip("/")
        method = scope["method"]
        parts = path.split("/")[1:]  # "/v2/models/m/infer" -> ["v2", "models", "m", "infer"]
        if not parts or parts[0] != "v2":
            return _error(404, f"no route {path[:100]!r}; the Open Inference Protocol routes start with /v2")
        if parts[1:2] == ["health"] and len(parts) == 3 and parts[2] in ("live", "ready"):
            if method != "GET":
                return _error(405, "use GET")
            if parts[2] == "live":
                return _json(200, {"live": True})
            ready = await self.plane.server_ready()
            return _json(200 if ready else 503, {"ready": ready})
        if not self._authorized(headers):
            return 401, [*_JSON, (b"www-authenticate", b"Bearer")], orjson.dumps(
                {"error": "missing or wrong bearer token"})
        if len(parts) == 1:
            if method != "GET":
                return _error(405, "use GET")
            meta = self.plane.server_metadata()
            return _json(200, {"name": meta.name, "version": meta.version, "extensions": EXTENSIONS})
        if parts[1] != "models" or len(parts) < 3:
            return _error(404, f"no route {path[:100]!r}")
        name, rest = unquote(parts[2]), parts[3:]
        version = ""
        if rest[:1] == ["versions"]:
            if len(rest) < 2:
                return _error(404, f"no route {path[:100]!r}")
            version, rest = unquote(rest[1]), rest[2:]
        action = rest[0] if len(rest) == 1 else None
        if len(rest) > 1 or action not in (None, "ready", "config", "infer"):
            return _error(404, f"no route {path[:100]!r}")
        if (action == "infer") != (method == "POST") or method not in ("GET", "POST"):
            return _error(405, "use POST" if action == "infer" else "use GET")
        try:
            with self.plane.admitted(infer=action == "infer"):
                return await self._model_route(scope, receive, headers, name, version, action)
        except Failure as f:
            return _failed(f)

    async def _model_route(self, scope, receive, headers, name: str, version: str, action: str | None):
        if action == "infer":
            return await self._infer(scope, receive, headers, name, version)
        try:
            if action == "ready":
                self.plane.check_model(name, version)
                ready = await self.plane.model_ready(name, version)
                return _json(200 if ready else 503, {"name": name, "ready": ready})
            if action == "config":
                config = rest_codec.message_json(await self.plane.model_config(name, version))
                config.setdefault("max_batch_size", 0)
                return _json(200, config)
            return _json(200, rest_codec.metadata_json(await self.plane.model_metadata(name, version)))
        except Failure as f:
            return _failed(f)
        except RequestError as e:  # check_model's UnknownModel: not an inference request, not counted
            return _error(HTTP_STATUS.get(e.code, 500), e.public)

    async def _infer(self, scope, receive, headers, name: str, version: str):
        plane = self.plane
        try:
            body = await self._body(receive, headers)
        except _BodyTooLarge:
            failure = plane.fail(TooLarge(f"the request body exceeds {self.max_body} bytes (max_request_bytes)"))
            return _error(413, failure.message)
        except BadRequest as e:
            return _failed(plane.fail(e))
        header_length = headers.get(rest_codec.HEADER_LENGTH.encode())
        try:
            request, outputs = rest_codec.infer_request(
                body, None if header_length is None else header_length.decode("latin-1"), name, version)
        except BadRequest as e:
            return _failed(plane.fail(e))
        try:
            response, trailing = await plane.infer(request, None, self._forwarded(scope["headers"]))
        except Failure as f:
            return _failed(f)
        out, json_length = rest_codec.infer_response_body(response, outputs)
        extra = [(k.encode(), v.encode()) for k, v in trailing if isinstance(v, str) and v.isascii()]
        if json_length is None:
            return 200, [*_JSON, *extra], out
        return 200, [(b"content-type", b"application/octet-stream"),
                     (rest_codec.HEADER_LENGTH.encode(), str(json_length).encode()), *extra], out


def bind_http(settings: Settings) -> socket.socket:
    """The REST front's listening socket on (host, http_port); a port in use is one line naming the flag."""
    s = settings
    try:
        infos = socket.getaddrinfo(s.host, s.http_port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
        # and without it a response written in two parts waits 40 ms for the client's delayed ACK
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        raise ConfigError(f"http_port: cannot listen on {s.host}:{s.http_port} ({e.strerror or e}); choose "
                          "another with --http-port (0 = any free port, -1 = no REST front)") from None
    sock.setblocking(False)
    return sock


class HttpServer:
    """uvicorn serving a RestFront on the running event loop, beside the gRPC server.

    The port is bound when constructed (a port in use is one line, before anything is loaded);
    `start(app)` serves it, `stop()` lets in-flight requests finish within the grace period.
    """

    def __init__(self, settings: Settings, sock: socket.socket | None = None):
        """sock: a listening socket to serve instead of binding one (a worker serves the one its
        supervisor bound: workers.py)."""
        self.settings = settings
        self._socket = bind_http(settings) if sock is None else sock
        self.port: int = self._socket.getsockname()[1]
        self._server: uvicorn.Server | None = None
        self._ticker: asyncio.Task | None = None

    async def start(self, app: RestFront) -> None:
        import uvicorn

        s = self.settings
        config = uvicorn.Config(
            app, http="httptools", ws="none", lifespan="off", interface="asgi3", log_config=None,
            access_log=False, proxy_headers=False, server_header=False,
            limit_concurrency=max(4 * s.max_concurrent_rpcs, 256), timeout_keep_alive=30,
            timeout_graceful_shutdown=max(1, round(s.grace_s)),
            ssl_certfile=s.tls_cert_file, ssl_keyfile=s.tls_key_file, ssl_ca_certs=s.tls_client_ca_file,
            ssl_cert_reqs=ssl.CERT_REQUIRED if s.tls_client_ca_file else ssl.CERT_NONE)
        config.load()
        _route_uvicorn_logs()
        self._server = server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[self._socket])
        # keeps the Date header current (uvicorn's main loop), until stop()
        self._ticker = asyncio.get_running_loop().create_task(server.main_loop(), name="http-ticker")

    async def stop(self) -> None:
        if self._server is None:
            self._socket.close()
            return
        self._server.should_exit = True
        if self._ticker is not None:
            await asyncio.gather(self._ticker, return_exceptions=True)
        await self._server.shutdown(sockets=[self._socket])
        self._server = None


def _route_uvicorn_logs() -> None:
    """uvicorn's own errors (a malformed HTTP request, a failed TLS handshake) as the sidecar's log
    lines, bounded and rate-limited alike (logs.py)."""
    ours, theirs = logging.getLogger(LOGGER), logging.getLogger("uvicorn.error")
    if ours.handlers:
        theirs.handlers[:] = ours.handlers
        theirs.setLevel(ours.level)
        theirs.propagate = False
    install(theirs)
