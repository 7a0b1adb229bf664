"""An upstream reached over the Open Inference Protocol's REST front (`--upstream http(s)://HOST:PORT`).

For deployments that expose only REST (KServe and MLServer serve both, some clusters route only
HTTP). `RestUpstream` implements the `upstream.Upstream` protocol: inference requests go out as
`POST /v2/models/{name}[/versions/{v}]/infer` with JSON tensors (MLServer reads no binary
inputs) and come back as JSON or binary tensors (Triton's extension),
which `rest_codec.infer_response` turns into the `ModelInferResponse` a gRPC upstream would have
sent, so `codec.read_answer` validates every answer exactly as it validates a gRPC one. An HTTP
error becomes `UpstreamFailed` with the gRPC code of its status (the upstream's text goes to the
log only, as for gRPC).

The HTTP/1.1 client is small and strict on purpose: keep-alive connections in a pool, httptools'
parser (the one the REST front's uvicorn uses), an answer larger than `MAX_RESPONSE_BYTES` is
refused as it arrives (never buffered whole), every call is bounded by the caller's deadline or
`default_timeout`, and a request that could not reach the upstream (refused or reset before an
answer, 503) is retried with backoff within that deadline, as the gRPC upstream's retry policy
does. `generation` grows each time the upstream answers after a connection failure (a restart
may bring another model), so the sidecar checks the model again. https uses the system's CA
store (`SSL_CERT_FILE` names another).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from urllib.parse import quote

import grpc
import httptools
import orjson

from purifier_server import rest_codec
from purifier_server._proto import grpc_service_pb2 as pb
from purifier_server.errors import BadUpstreamOutput, UpstreamFailed
from purifier_server.upstream import MAX_RESPONSE_BYTES, TRANSIENT_CODES, TensorSpec, _specs

# HTTP status -> the gRPC code the data plane reasons with (gRPC's HTTP mapping)
GRPC_CODE = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
             403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
             409: grpc.StatusCode.ABORTED, 422: grpc.StatusCode.INVALID_ARGUMENT,
             429: grpc.StatusCode.RESOURCE_EXHAUSTED, 499: grpc.StatusCode.CANCELLED,
             500: grpc.StatusCode.INTERNAL, 501: grpc.StatusCode.UNIMPLEMENTED,
             502: grpc.StatusCode.UNAVAILABLE, 503: grpc.StatusCode.UNAVAILABLE,
             504: grpc.StatusCode.DEADLINE_EXCEEDED}
RETRY_BACKOFF_S = (0.05, 0.1, 0.2)  # then give up (4 attempts, as the gRPC upstream's retry policy)
MAX_IDLE_CONNECTIONS = 32
MAX_HEADER_BYTES = 64 << 10


class _Unreached(Exception):
    """The request did not reach the upstream (connection refused or closed before an answer)."""


class _Answer:
    """httptools callbacks: status, headers and a size-bounded body."""

    def __init__(self, limit: int):
        self.limit = limit
        self.headers: dict[bytes, bytes] = {}
        self.chunks: list[bytes] = []
        self.size = self.header_bytes = 0
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > MAX_HEADER_BYTES:
            raise BadUpstreamOutput("malformed response", f"more than {MAX_HEADER_BYTES} bytes of HTTP headers")
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.limit:
            raise BadUpstreamOutput("answer too large", f"the HTTP answer exceeds {self.limit} bytes")
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    def usable(self) -> bool:
        return not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()

    async def exchange(self, head: bytes, body: bytes, limit: int) -> tuple[int, dict[bytes, bytes], bytes, bool]:
        """(status, headers, body, keep-alive) of one request on this connection."""
        self.writer.write(head)
        if body:
            self.writer.write(body)
        await self.writer.drain()
        answer = _Answer(limit)
        parser = httptools.HttpResponseParser(answer)
        received = False
        while not answer.complete:
            data = await self.reader.read(1 << 16)
            if not data:
                if not received:
                    raise _Unreached("the connection closed before an answer")
                raise UpstreamFailed("upstream closed the connection mid-answer", grpc.StatusCode.UNAVAILABLE)
            received = True
            try:
                parser.feed_data(data)
            except httptools.HttpParserError as e:
                if isinstance(e.__context__, BadUpstreamOutput):
                    raise e.__context__ from None
                raise BadUpstreamOutput("malformed response", f"not an HTTP answer ({e})") from None
        return parser.get_status_code(), answer.headers, b"".join(answer.chunks), parser.should_keep_alive()


class RestUpstream:
    """An OIP v2 REST server at `url` ("http://host:port" or "https://host:port").

    Args:
        name, version, confidence_output: the model the sidecar defends, from settings.
        default_timeout: deadline for calls whose caller sent none.
    """

    model_id = None
    backend = ""

    def __init__(self, url: str, default_timeout: float, *, name: str, version: str = "", confidence_output: str = ""):
        scheme, _, address = url.partition("://")
        self.host, _, port = address.rstrip("/").rpartition(":")
        self.port = int(port)
        self.tls = ssl.create_default_context() if scheme == "https" else None
        self.authority = f"{self.host}:{self.port}"
        self.name, self.version, self.confidence_output = name, version, confidence_output
        self.default_timeout = default_timeout
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        self.versions: tuple[str, ...] = ()
        self.generation = 0
        self._connected = False
        self._idle: list[_Connection] = []

    # --- HTTP -----------------------------------------------------------------------------------

    def _observe(self, reached: bool) -> None:
        if reached and not self._connected:
            self.generation += 1
        self._connected = reached

    async def _connection(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable():
                return conn
            conn.close()
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.tls,
                                                           limit=1 << 16)
        except OSError as e:
            raise _Unreached(str(e)) from None
        return _Connection(reader, writer)

    async def _call(self, method: str, path: str, body: bytes = b"", headers=(), timeout: float | None = None,
                    limit: int | None = None) -> tuple[int, dict[bytes, bytes], bytes]:
        """One request with retries on connection failure (and 503) within the deadline."""
        timeout = self.default_timeout if timeout is None else timeout
        limit = MAX_RESPONSE_BYTES if limit is None else limit
        deadline = time.monotonic() + timeout
        lines = [f"{method} {path} HTTP/1.1", f"host: {self.authority}", f"content-length: {len(body)}",
                 "accept: application/json, application/octet-stream"]
        lines += [f"{k}: {v}" for k, v in headers]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        for attempt in range(len(RETRY_BACKOFF_S) + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                raise UpstreamFailed("deadline exceeded before the upstream answered", grpc.StatusCode.DEADLINE_EXCEEDED)
            conn = None
            try:
                async with asyncio.timeout(left):
                    conn = await self._connection()
                    status, answer_headers, answer, keep = await conn.exchange(head, body, limit)
            except _Unreached as e:
                if conn is not None:
                    conn.close()
                self._observe(False)
                failure = UpstreamFailed(f"upstream unreachable: {e}", grpc.StatusCode.UNAVAILABLE)
            except TimeoutError:
                if conn is not None:
                    conn.close()
                raise UpstreamFailed("deadline exceeded while waiting for the upstream",
                                     grpc.StatusCode.DEADLINE_EXCEEDED) from None
            except (OSError, UpstreamFailed, BadUpstreamOutput) as e:
                if conn is not None:
                    conn.close()
                if isinstance(e, OSError):
                    self._observe(False)
                    raise UpstreamFailed(f"upstream connection failed: {e}", grpc.StatusCode.UNAVAILABLE) from None
                raise
            else:
                self._observe(True)
                if keep and len(self._idle) < MAX_IDLE_CONNECTIONS:
                    self._idle.append(conn)
                else:
                    conn.close()
                if status != 503:
                    return status, answer_headers, answer
                failure = UpstreamFailed(f"upstream HTTP 503: {answer[:200]!r}", grpc.StatusCode.UNAVAILABLE)
            if attempt < len(RETRY_BACKOFF_S):
                await asyncio.sleep(min(RETRY_BACKOFF_S[attempt], max(0.0, deadline - time.monotonic())))
        raise failure

    def _path(self, name: str, version: str, action: str = "") -> str:
        path = f"/v2/models/{quote(name, safe='')}"
        if version:
            path += f"/versions/{quote(version, safe='')}"
        return path + (f"/{action}" if action else "")

    @staticmethod
    def _failed(status: int, body: bytes) -> UpstreamFailed:
        return UpstreamFailed(f"upstream HTTP {status}: {body[:500]!r}", GRPC_CODE.get(status, grpc.StatusCode.UNKNOWN))

    # --- the Upstream protocol ------------------------------------------------------------------

    async def infer(self, request, timeout, metadata):
        body = rest_codec.request_body(request)
        headers = [("content-type", rest_codec.JSON_TYPE)]
        headers += [(k, v) for k, v in metadata or () if isinstance(v, str) and v.isascii() and "\n" not in v
                    and "\r" not in v]
        status, answer_headers, answer = await self._call(
            "POST", self._path(request.model_name, request.model_version, "infer"), body, headers, timeout)
        if status != 200:
            raise self._failed(status, answer)
        length = answer_headers.get(rest_codec.HEADER_LENGTH.encode())
        return rest_codec.infer_response(answer, None if length is None else length.decode("latin-1")), ()

    async def ready(self, name, version):
        try:
            status, _, _ = await self._call("GET", self._path(name, version, "ready"), timeout=2.0, limit=1 << 16)
        except (UpstreamFailed, BadUpstreamOutput):
            return False
        return status == 200

    async def _json(self, path: str, timeout: float):
        status, _, body = await self._call("GET", path, timeout=timeout, limit=1 << 24)
        if status != 200:
            raise self._failed(status, body)
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise UpstreamFailed(f"upstream metadata is not JSON: {body[:200]!r}", grpc.StatusCode.INTERNAL) from None

    async def model_metadata(self, name, version):
        doc = await self._json(self._path(name, version), 5.0)
        try:
            meta = rest_codec.metadata_from_json(doc)
        except BadUpstreamOutput as e:
            raise UpstreamFailed(f"upstream metadata: {e}", grpc.StatusCode.INTERNAL) from None
        self.inputs, self.outputs = _specs(meta.inputs), _specs(meta.outputs)
        self.versions = tuple(meta.versions)
        return meta

    async def model_config(self, name, version):
        # KServe and MLServer serve no config (404): then None
        from google.protobuf import json_format

        try:
            doc = await self._json(self._path(name, version, "config"), 5.0)
            return json_format.ParseDict(doc.get("config", doc), pb.ModelConfig(), ignore_unknown_fields=True)
        except UpstreamFailed as e:
            if e.upstream_code in TRANSIENT_CODES:  # away for now: see upstream.RemoteUpstream.model_config
                raise
            return None
        except (BadUpstreamOutput, json_format.ParseError, AttributeError, TypeError, ValueError):
            return None

    async def close(self):
        for conn in self._idle:
            with contextlib.suppress(Exception):
                conn.close()
        self._idle.clear()
