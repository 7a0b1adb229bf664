"""One map from errors to gRPC status codes.

Everything that goes wrong on the request path ends here and becomes a gRPC error; nothing on
that path may fall back to forwarding the upstream's answer (fail closed). Messages name what was
wrong so a client can fix its request; internal bugs get a generic message (the traceback goes to
the log, not to the client).
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


class BadRequest(RequestError):
    """The client's request is malformed or asks for something the sidecar refuses."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class TooLarge(RequestError):
    """The request exceeds a configured limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnknownModel(RequestError):
    code = grpc.StatusCode.NOT_FOUND


class UpstreamFailed(RequestError):
    """The upstream answered with an error (its code is kept) or could not be reached."""

    code = grpc.StatusCode.UNAVAILABLE


class BadUpstreamOutput(RequestError):
    """The upstream's answer cannot be defended (missing output, NaN, not probabilities...)."""

    code = grpc.StatusCode.INTERNAL


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, bool]:
    """(code, message for the client, is_bug) for any exception raised on the request path."""
    if isinstance(exc, RequestError):
        return exc.code, str(exc), False
    if isinstance(exc, InvalidProbabilities):
        # the defense validates what the upstream produced: the client did nothing wrong
        return grpc.StatusCode.INTERNAL, f"upstream output is not a probability vector: {exc}", False
    if isinstance(exc, DefenseError):
        return grpc.StatusCode.INTERNAL, f"defense failed: {exc}", False
    if isinstance(exc, ConfigError | ArtifactError | PurifierError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc), False
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", False
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the sidecar log", True
