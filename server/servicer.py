"""The gRPC front: `inference.GRPCInferenceService` as a thin adapter over the data plane.

Each method turns its protobuf request into a data-plane call (`dataplane.DataPlane`: every rule
of validation, limits, admission, identity, defense and response construction lives there) and
the outcome back into a protobuf answer or a gRPC status. Requests are parsed here (an
undecodable message is INVALID_ARGUMENT, counted and logged like any failed request).

`ModelStreamInfer` (bidirectional; tritonclient's `stream_infer`, `perf_analyzer --streaming`)
runs every request it carries through the same `DataPlane.infer` as a unary `ModelInfer`, so a
streamed request is defended, limited and refused exactly as a unary one; a failed request is
answered in the stream by a `ModelStreamInferResponse` holding its error message (and the
request's id), and the stream goes on. At most `STREAM_WINDOW` requests of one stream are in
flight at once; further ones wait unread (HTTP/2 flow control pushes back on the client).
Answers are written as they complete, each carrying its request's id.

To serve another method, implement it here and list it in `METHODS`; methods not listed are
UNIMPLEMENTED (repository, shared-memory, model-control and trace RPCs stay that way).
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from purifier_server._proto import grpc_service_pb2 as pb
from purifier_server.dataplane import DataPlane, Failure
from purifier_server.errors import BadRequest, log_detail

log = logging.getLogger("purifier_server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
STREAM_WINDOW = 16


class Malformed:
    """A request message that did not parse (kept so the handler can count, log and answer it)."""

    def __init__(self, error: Exception):
        self.error = error
        self.id = None


def _parser(message_type):
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends: the client's bytes
            return Malformed(e)

    return parse


def _undecodable(plane: DataPlane, request: Malformed) -> Failure:
    log.warning("undecodable request: %s", log_detail(request.error))
    return plane.fail(BadRequest("the message is not a valid inference.ModelInferRequest"))


class InferenceServicer:
    """The gRPC methods over one `DataPlane`."""

    def __init__(self, plane: DataPlane):
        self.plane = plane

    async def ModelInfer(self, request, context):
        """Admitted here rather than by `admitted`'s wrapper: the hot path runs one coroutine per call."""
        plane = self.plane
        try:
            with plane.admitted(True):
                if isinstance(request, Malformed):
                    raise _undecodable(plane, request)
                response, trailing = await plane.infer(request, context.time_remaining(),
                                                       context.invocation_metadata())
        except Failure as f:
            await context.abort(f.code, f.message)
        if trailing:
            context.set_trailing_metadata(trailing)
        return response

    async def ModelStreamInfer(self, requests, context):
        plane = self.plane
        metadata = context.invocation_metadata()
        answers: asyncio.Queue = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)
        running: set[asyncio.Task] = set()

        async def one(request) -> None:
            try:
                if isinstance(request, Malformed):
                    raise _undecodable(plane, request)
                response, _ = await plane.infer(request, context.time_remaining(), metadata)
                answer = pb.ModelStreamInferResponse(infer_response=response)
            except Failure as f:
                answer = pb.ModelStreamInferResponse(error_message=f.message)
                if request.id is not None:
                    answer.infer_response.id = request.id
                    answer.infer_response.model_name = plane.model_name
            finally:
                window.release()
            answers.put_nowait(answer)

        async def read() -> None:
            try:
                async for request in requests:
                    await window.acquire()
                    task = asyncio.get_running_loop().create_task(one(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                while running:
                    await asyncio.gather(*running, return_exceptions=True)
            finally:
                answers.put_nowait(None)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
            await reader  # a client's stream that broke off raises here
        finally:
            for task in (reader, *running):
                task.cancel()

    async def _refuse_malformed(self, request, context) -> None:
        if isinstance(request, Malformed):
            log.warning("undecodable request: %s", log_detail(request.error))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the message is not a valid request of this method")

    async def ServerLive(self, request, context):
        await self._refuse_malformed(request, context)
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        await self._refuse_malformed(request, context)
        return pb.ServerReadyResponse(ready=await self.plane.server_ready())

    async def ModelReady(self, request, context):
        await self._refuse_malformed(request, context)
        return pb.ModelReadyResponse(ready=await self.plane.model_ready(request.name, request.version))

    async def ServerMetadata(self, request, context):
        await self._refuse_malformed(request, context)
        return self.plane.server_metadata()

    async def ModelMetadata(self, request, context):
        await self._refuse_malformed(request, context)
        try:
            return await self.plane.model_metadata(request.name, request.version)
        except Failure as f:
            await context.abort(f.code, f.message)

    async def ModelConfig(self, request, context):
        await self._refuse_malformed(request, context)
        try:
            return pb.ModelConfigResponse(config=await self.plane.model_config(request.name, request.version))
        except Failure as f:
            await context.abort(f.code, f.message)


# method -> (request type, response type, streaming): every method the sidecar serves.
METHODS = {
    "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse, False),
    "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse, False),
    "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse, False),
    "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse, False),
    "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse, False),
    "ModelConfig": (pb.ModelConfigRequest, pb.ModelConfigResponse, False),
    "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse, False),
    "ModelStreamInfer": (pb.ModelInferRequest, pb.ModelStreamInferResponse, True),
}


def admitted(plane: DataPlane, method, streaming: bool):
    """`method` behind the data plane's admission (`DataPlane.admitted`: at most
    `max_concurrent_rpcs` calls of the service at once, a stream counting as one)."""
    infer = method.__name__ in ("ModelInfer", "ModelStreamInfer")
    if streaming:
        async def stream(requests, context):
            try:
                with plane.admitted(infer):
                    async for answer in method(requests, context):
                        yield answer
            except Failure as f:  # refused admission (the method answers its requests' failures itself)
                await context.abort(f.code, f.message)

        return stream

    async def unary(request, context):
        try:
            with plane.admitted(infer):
                return await method(request, context)
        except Failure as f:
            await context.abort(f.code, f.message)

    return unary


def add_to_server(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """Register the methods of METHODS, each behind the data plane's admission (`admitted`;
    ModelInfer admits its calls itself); requests are parsed by the handlers (see `Malformed`)."""
    handlers = {}
    for name, (req, resp, streaming) in METHODS.items():
        make = grpc.stream_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
        method = getattr(servicer, name)
        handlers[name] = make(method if name == "ModelInfer" else admitted(servicer.plane, method, streaming),
                              request_deserializer=_parser(req), response_serializer=resp.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)  # gRPC's fast path for known methods
