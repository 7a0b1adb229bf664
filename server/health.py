"""grpc.health.v1 for the sidecar: Check and Watch, with Watch streams that end when shutdown begins.

The reference asyncio servicer (`grpc_health.v1.health.aio`) keeps a Watch stream open until the
server cancels it at the end of the grace period, so a SIGTERM with an orchestrator's Watch open
takes the whole grace period (and more under load) even with no request in flight, and it
drops the shared per-service condition when any one watcher leaves, so the other watchers of that
service stop hearing about changes. Here every watcher waits on one condition with a version
counter (no update is missed between a write and the next wait), and `enter_graceful_shutdown`
sends NOT_SERVING to every watcher and then ends its stream (status OK): the grace period is left
to in-flight inference calls.

Health needs no bearer token (orchestrators probe without one), so Watch streams are bounded on
their own: at most `max_watchers` at once (more: RESOURCE_EXHAUSTED, with Check as the
alternative) and each ends (status OK; a client watches again) after `max_lifetime_s`. They are
counted apart from inference calls (app.py), so open streams never take the slots inference
needs.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health_pb2_grpc.HealthServicer):
    """Serving status per service name ("" = the whole server), set by the sidecar."""

    def __init__(self, max_watchers: int = 16, max_lifetime_s: float = 300.0) -> None:
        self._status: dict[str, int] = {"": SERVING}
        self._changed = asyncio.Condition()
        self._version = 0
        self._stopping = False
        self.max_watchers, self.max_lifetime_s = max_watchers, max_lifetime_s
        self.watchers = 0

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
