"""grpc.health.v1 for the sidecar: Check and Watch, with Watch streams that end when shutdown begins.

The reference asyncio servicer (`grpc_health.v1.health.aio`) keeps a Watch stream open until the
server cancels it at the end of the grace period, so a SIGTERM with an orchestrator's Watch open
takes the whole grace period (and more under load) even with no request in flight, and it
drops the shared per-service condition when any one watcher leaves, so the other watchers of that
service stop hearing about changes. Here every watcher waits on one condition with a version
counter (no update is missed between a write and the next wait), and `enter_graceful_shutdown`
sends NOT_SERVING to every watcher and then ends its stream (status OK): the grace period is left
to in-flight inference calls.

Health needs no bearer token (orchestrators probe without one), so it is bounded on its own.
Check and Watch are served as handlers that read their one request message themselves, within
MESSAGE_TIMEOUT_S, and at most MAX_PENDING calls wait that long for it (past it, a call whose
message does not come with its headers ends at once): gRPC reads the message of an ordinary unary-request method before any handler
runs, so a caller that sends headers and never a message would hold its call (and, under a
server-wide cap, a slot authorized inference needs) for as long as it likes, never reaching a
limit of ours. Watch streams are then bounded: at most `max_watchers` at once (more:
RESOURCE_EXHAUSTED, with Check as the alternative), each ending (status OK; a client watches
again) after `max_lifetime_s`. Nothing here is counted with inference calls (the data plane
admits those), so open health calls never take the slots inference needs.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE = "grpc.health.v1.Health"
# Longest wait for a health call's request message after its headers; a client sends both at once.
MESSAGE_TIMEOUT_S = 5.0
# Health calls waiting for their message at once; past it a call gets a moment for its message
# (which a client sends with the headers) and is ended if it has none.
MAX_PENDING = 64
MOMENT_S = 0.05
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health_pb2_grpc.HealthServicer):
    """Serving status per service name ("" = the whole server), set by the sidecar; `add_to(server)`
    serves it (Check and Watch reading their message within `message_timeout_s`)."""

    def __init__(self, max_watchers: int = 16, max_lifetime_s: float = 300.0,
                 message_timeout_s: float = MESSAGE_TIMEOUT_S, max_pending: int = MAX_PENDING) -> None:
        self._status: dict[str, int] = {"": SERVING}
        self._changed = asyncio.Condition()
        self._version = 0
        self._stopping = False
        self.max_watchers, self.max_lifetime_s = max_watchers, max_lifetime_s
        self.message_timeout_s, self.max_pending = message_timeout_s, max_pending
        self.watchers = self.pending = 0

    def add_to(self, server: grpc.aio.Server) -> None:
        """Serve Check and Watch on `server` as request-streaming handlers (wire-compatible with the
        unary-request methods every health client calls), so that they run before the message arrives."""
        async def check(requests, context):
            return await self.Check(await self._message(context), context)

        async def watch(requests, context):
            request = await self._message(context)
            await self.Watch(request, context)

        def handler(make, method):
            return make(method, request_deserializer=health_pb2.HealthCheckRequest.FromString,
                        response_serializer=health_pb2.HealthCheckResponse.SerializeToString)

        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
            "Check": handler(grpc.stream_unary_rpc_method_handler, check),
            "Watch": handler(grpc.stream_stream_rpc_method_handler, watch),
        }),))

    async def _message(self, context) -> health_pb2.HealthCheckRequest:
        """The call's one request message, or the call ends: a caller that sends headers and no
        message holds it at most `message_timeout_s`, and only `max_pending` callers at once do."""
        wait = self.message_timeout_s if self.pending < self.max_pending else MOMENT_S
        self.pending += 1
        try:
            request = await asyncio.wait_for(context.read(), wait)
        except TimeoutError:
            request = None
        finally:
            self.pending -= 1
        if request is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"no HealthCheckRequest within {wait:g} s of the call's headers")
        if request is grpc.aio.EOF:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no HealthCheckRequest in the call")
        return request

    async def Check(self, request, context):
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, context):
        if self.watchers >= self.max_watchers:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self.watchers} health Watch streams are open (max_watch_streams); use Check")
        self.watchers += 1
        try:
            await self._watch(request, context)
        finally:
            self.watchers -= 1

    async def _watch(self, request, context) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + self.max_lifetime_s
        sent, seen = None, -1
        while True:
            async with self._changed:
                while self._version == seen:
                    try:
                        await asyncio.wait_for(self._changed.wait(), max(end - loop.time(), 0.0))
                    except TimeoutError:
                        return  # lifetime over: the stream ends OK and the client watches again
                seen = self._version
                status = self._status.get(request.service, SERVICE_UNKNOWN)
                stopping = self._stopping
            if status != sent:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status
            if stopping:
                return

    async def _update(self, statuses: dict[str, int], stopping: bool = False) -> None:
        async with self._changed:
            self._status.update(statuses)
            self._stopping = self._stopping or stopping
            self._version += 1
            self._changed.notify_all()

    async def set(self, service: str, status: int) -> None:
        """Set a service's status (ignored once shutdown has begun)."""
        if not self._stopping:
            await self._update({service: status})

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING for good; Watch streams send it and end."""
        await self._update(dict.fromkeys(self._status, NOT_SERVING), stopping=True)
