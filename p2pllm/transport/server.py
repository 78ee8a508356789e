"""The gRPC service a peer exposes. It only translates: the daemon decides."""

from __future__ import annotations

import contextlib
import logging
from typing import AsyncIterator, Protocol

import grpc

from ..errors import P2PError
from ..sockets import bind_tcp
from ..proto import p2pllm_pb2 as pb
from ..proto import p2pllm_pb2_grpc as pb_grpc
from .client import MAX_MESSAGE_BYTES
from .security import Security

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


class RpcRefused(Exception):
    """A handler's refusal of one call: the status code and one line for the caller."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class ControlHandler(Protocol):
    async def on_hello(self, req: pb.HelloRequest, peer: str) -> pb.HelloReply: ...
    def on_health(self, req: pb.HealthRequest) -> pb.HealthReply: ...
    async def on_propose(self, req: pb.PlanProposal) -> pb.PlanReply: ...
    async def on_commit(self, req: pb.CommitRequest) -> pb.PlanReply: ...
    def on_status(self) -> str: ...
    async def on_manage(self, req: pb.ManageRequest) -> pb.ManageReply: ...
    async def on_frame(self, frame: pb.Frame) -> pb.FrameAck: ...
    def on_generate(self, req: pb.GenerateRequest) -> AsyncIterator[pb.GenerateEvent]: ...
    async def on_embed(self, req: pb.EmbedRequest) -> pb.EmbedReply: ...
    async def on_fetch_kv(self, req: pb.FetchKVRequest) -> list[pb.KVDelta]: ...
    # optional (a handler without them answers UNIMPLEMENTED): model pieces for --from-peers,
    # cluster/fetch.py's PieceSource; either may raise RpcRefused
    async def on_manifest(self, req: pb.ManifestRequest) -> pb.Manifest: ...
    def on_fetch_piece(self, req: pb.FetchPieceRequest) -> AsyncIterator[pb.PieceChunk]: ...


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

    async def Manage(self, request, context):
        return await self.handler.on_manage(request)

    async def Ping(self, request, context):
        if request.reply_bytes > MAX_PING_REPLY:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"reply_bytes above {MAX_PING_REPLY}")
        return pb.PingReply(payload=bytes(request.reply_bytes))

    async def Ring(self, request_iterator, context):
        async for frame in request_iterator:
            try:
                ack = await self.handler.on_frame(frame)
            except Exception as e:  # a frame that got past the checks and still failed: refuse it, keep serving
                log.exception("frame (micro-batch %d, epoch %d) from %s failed", frame.micro_batch, frame.epoch,
                              context.peer())
                ack = pb.FrameAck(micro_batch=frame.micro_batch, error=f"internal error: {type(e).__name__}")
            if ack.error:  # only a refusal is answered: an ack per accepted frame was one more gRPC message per hop
                yield ack

    async def FetchKV(self, request, context):
        for delta in await self.handler.on_fetch_kv(request):
            yield delta

    async def Generate(self, request, context):
        async for event in self.handler.on_generate(request):
            yield event

    async def Embed(self, request, context):
        return await self.handler.on_embed(request)

    async def ModelManifest(self, request, context):
        on_manifest = getattr(self.handler, "on_manifest", None)
        if on_manifest is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this peer serves no model pieces")
        try:
            return await on_manifest(request)
        except RpcRefused as e:
            await context.abort(e.code, e.message)

    async def FetchPiece(self, request, context):
        on_fetch_piece = getattr(self.handler, "on_fetch_piece", None)
        if on_fetch_piece is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this peer serves no model pieces")
        try:
            # closed here, not by the garbage collector: the source's stream count drops at once
            async with contextlib.aclosing(on_fetch_piece(request)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except RpcRefused as e:
            await context.abort(e.code, e.message)


class _UndecodableMessages(logging.Filter):
    """grpc logs a traceback for every request that is not valid protobuf; one warning line is enough
    (the call already ends with a status, the server goes on)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg.startswith("Unexpected [DecodeError] raised by servicer method"):
            record.msg, record.args, record.exc_info, record.exc_text = (
                "refused a request that is not valid protobuf on " + msg.rsplit("[", 1)[-1].rstrip("]"), None, None, None)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


logging.getLogger("grpc._cython.cygrpc").addFilter(_UndecodableMessages())


async def start_server(handler: ControlHandler, hosts: str | list[str], port: int,
                       security: Security) -> grpc.aio.Server:
    """The peer's gRPC server on each of `hosts`; with a secret, only holders of it complete the
    TLS handshake."""
    hosts = [hosts] if isinstance(hosts, str) else hosts
    for host in hosts:  # taken or foreign: our one line, before gRPC logs its own
        bind_tcp(host, port, "the gRPC server").close()
    server = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_PeerServicer_to_server(PeerService(handler), server)
    for host in hosts:
        try:
            bound = security.add_port(server, f"{host}:{port}")
        except RuntimeError:
            bound = 0
        if bound == 0:
            raise P2PError(f"cannot listen on {host}:{port} (is the port in use?)")
    await server.start()
    return server
