"""The gRPC service a peer exposes. It only translates: the daemon decides."""

from __future__ import annotations

import logging
from typing import AsyncIterator, Protocol

import grpc

from ..errors import P2PError
from ..proto import p2pllm_pb2 as pb
from ..proto import p2pllm_pb2_grpc as pb_grpc
from .client import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

MAX_PING_REPLY = 16 * 1024 * 1024
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 3000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.so_reuseport", 0),
]


class ControlHandler(Protocol):
    async def on_hello(self, req: pb.HelloRequest, peer: str) -> pb.HelloReply: ...
    def on_health(self, req: pb.HealthRequest) -> pb.HealthReply: ...
    async def on_propose(self, req: pb.PlanProposal) -> pb.PlanReply: ...
    async def on_commit(self, req: pb.CommitRequest) -> pb.PlanReply: ...
    def on_status(self) -> str: ...
    async def on_frame(self, frame: pb.Frame) -> pb.FrameAck: ...
    def on_generate(self, req: pb.GenerateRequest) -> AsyncIterator[pb.GenerateEvent]: ...


class PeerService(pb_grpc.PeerServicer):
    def __init__(self, handler: ControlHandler):
        self.handler = handler

    async def Hello(self, request, context):
        return await self.handler.on_hello(request, context.peer())

    async def Health(self, request, context):
        return self.handler.on_health(request)

    async def Propose(self, request, context):
        return await self.handler.on_propose(request)

    async def Commit(self, request, context):
        return await self.handler.on_commit(request)

    async def Status(self, request, context):
        return pb.StatusReply(json=self.handler.on_status())

    async def Ping(self, request, context):
        if request.reply_bytes > MAX_PING_REPLY:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"reply_bytes above {MAX_PING_REPLY}")
        return pb.PingReply(payload=bytes(request.reply_bytes))

    async def Ring(self, request_iterator, context):
        async for frame in request_iterator:
            yield await self.handler.on_frame(frame)

    async def Generate(self, request, context):
        async for event in self.handler.on_generate(request):
            yield event


async def start_server(handler: ControlHandler, host: str, port: int) -> grpc.aio.Server:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_PeerServicer_to_server(PeerService(handler), server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise P2PError(f"cannot listen on {host}:{port} (is the port in use?)")
    await server.start()
    return server
