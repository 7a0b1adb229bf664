"""One map from errors to gRPC status codes (and those to HTTP statuses) and the text a client may see.

Everything that goes wrong on the request path ends here and becomes a gRPC error; nothing on
that path may fall back to forwarding the upstream's answer (fail closed). Two kinds of text:

* the client's own mistakes (`BadRequest`, `TooLarge`, `UnknownModel`) name what was wrong so
  the client can fix its request;
* everything the upstream said or sent (`UpstreamFailed`, `BadUpstreamOutput`) and every defense
  failure reaches the client as a *fixed* sentence per status code or category: upstream error
  text can hold internal addresses and exception text, and a message computed from an upstream
  answer ("row 0 sums to 0.8") is a function of the clean vector. The detail goes to the log
  (`log_detail`), never to the client.
"""

from __future__ import annotations

import grpc

from purifier.errors import (
    ArtifactError,
    ConfigError,
    DefenseError,
    InvalidProbabilities,
    PurifierError,
)


class RequestError(Exception):
    """An error with a definite gRPC status; raised on the request path."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def public(self) -> str:
        """The text the client gets."""
        return str(self)


class BadRequest(RequestError):
    """The client's request is malformed or asks for something the sidecar refuses."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class TooLarge(RequestError):
    """The request exceeds a configured limit, or the defense queue is full."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnknownModel(RequestError):
    code = grpc.StatusCode.NOT_FOUND


class NotServing(RequestError):
    """The sidecar will not serve right now (upstream model unverified or refused); see the log."""

    code = grpc.StatusCode.UNAVAILABLE


class WaitedTooLong(NotServing):
    """A request's deadline passed while it waited for the upstream to be back and verified.

    UNAVAILABLE (retry later) when the deadline was the sidecar's own `upstream_timeout_s`;
    the servicer answers DEADLINE_EXCEEDED when it was the caller's.
    """


# What a client is told when the upstream answered with an error, per status code. The upstream's
# own text goes to the log only.
UPSTREAM_MESSAGES = {
    grpc.StatusCode.UNAVAILABLE: "the upstream model server is unavailable; retry later",
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline exceeded while waiting for the upstream model server",
    grpc.StatusCode.INVALID_ARGUMENT: "the upstream model rejected the request as invalid; check the inputs "
                                      "against ModelMetadata",
    grpc.StatusCode.NOT_FOUND: "the upstream model server does not know this model or version",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "the upstream model server is out of resources; retry later",
    grpc.StatusCode.UNAUTHENTICATED: "the upstream model server refused the sidecar's credentials",
    grpc.StatusCode.PERMISSION_DENIED: "the upstream model server refused the sidecar's credentials",
    grpc.StatusCode.FAILED_PRECONDITION: "the upstream model server is not in a state to serve this request",
    grpc.StatusCode.OUT_OF_RANGE: "the upstream model rejected the request as invalid; check the inputs "
                                  "against ModelMetadata",
}
# Codes the sidecar passes on as they are; an upstream that cancelled the call (it is stopping)
# is unavailable; anything else becomes INTERNAL (a failure the client cannot act on).
_KEPT_CODES = frozenset(UPSTREAM_MESSAGES) - {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
_TRANSLATED_CODES = {grpc.StatusCode.CANCELLED: grpc.StatusCode.UNAVAILABLE}


class UpstreamFailed(RequestError):
    """The upstream answered with an error, or could not be reached.

    `str(e)` is the detail for the log (the upstream's own text); `public` is the fixed sentence
    for the client. Codes a client can act on are kept; the rest become INTERNAL.
    """

    def __init__(self, detail: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE):
        client_code = _TRANSLATED_CODES.get(code, code)
        super().__init__(detail, client_code if client_code in _KEPT_CODES else grpc.StatusCode.INTERNAL)
        self.upstream_code = code

    @property
    def public(self) -> str:
        if self.code == grpc.StatusCode.INTERNAL:
            return "the upstream model server failed to answer; see the sidecar log"
        return UPSTREAM_MESSAGES[self.code]


class BadUpstreamOutput(RequestError):
    """The upstream's answer cannot be defended (missing output, malformed tensor, NaN, ...).

    Args:
        reason: a fixed category for the client and the metrics label ("malformed tensor", ...).
        detail: what exactly was wrong, for the log only (it may quote upstream values).
    """

    code = grpc.StatusCode.INTERNAL

    def __init__(self, reason: str, detail: str | None = None):
        super().__init__(detail or reason)
        self.reason = reason

    @property
    def public(self) -> str:
        return f"the upstream's answer was rejected ({self.reason}); see the sidecar log"


# gRPC code -> HTTP status for the REST front (gRPC's own mapping, google.rpc.Code): the client's
# mistakes are 4xx, never 500.
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 503,  # the sidecar's configuration or the upstream's state
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.DATA_LOSS: 500,
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, bool]:
    """(code, message for the client, is_bug) for any exception raised on the request path."""
    if isinstance(exc, RequestError):
        return exc.code, exc.public, False
    if isinstance(exc, InvalidProbabilities):
        # the defense validates what the upstream produced: the client did nothing wrong, and the
        # detail ("row 3 sums to 0.8") is computed from the clean vector: log it, do not send it
        return grpc.StatusCode.INTERNAL, BadUpstreamOutput("not probability vectors").public, False
    if isinstance(exc, DefenseError):
        return grpc.StatusCode.INTERNAL, "the defense failed; see the sidecar log", False
    if isinstance(exc, ConfigError | ArtifactError | PurifierError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc), False  # the sidecar's own configuration
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", False
    return grpc.StatusCode.INTERNAL, "internal error; see the sidecar log", True


def log_detail(exc: BaseException) -> str:
    """What the log records about a failed request (may hold upstream text and values)."""
    return f"{type(exc).__name__}: {exc}"
