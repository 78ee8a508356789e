"""Ring links: one persistent bidirectional gRPC stream per (this peer -> next peer) link.

The sender writes each frame itself (gRPC's flow control is the backpressure: a slow successor
slows its predecessor instead of growing memory); the receiver answers only the frames it refuses
(an ack with the error). A broken stream shows on the reader of those answers all the same.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

import grpc

from ..proto import p2pllm_pb2 as pb
from ..proto import p2pllm_pb2_grpc as pb_grpc
from .client import CHANNEL_OPTIONS
from .security import Security

log = logging.getLogger(__name__)


class RingLink:
    def __init__(self, address: str, security: Security, on_refused: Callable[[str, int, str], None] | None = None,
                 on_broken: Callable[[str], None] | None = None):
        self.address = address
        self.security = security
        self.on_refused = on_refused  # (refusing address, micro-batch id, why): a refusal must reach the head, not just a log
        self.on_broken = on_broken  # (address): the stream broke; most often the peer died this moment
        self._channel = security.channel(address, CHANNEL_OPTIONS)
        self._stub = pb_grpc.PeerStub(self._channel)
        self._call = None  # the open Ring stream; opened on the first frame, again after it broke
        self._acks: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # one writer at a time keeps the frames in order
        self.frames_sent = 0
        self.bytes_sent = 0
        self._closed = False

    async def send(self, frame: pb.Frame) -> None:
        """Write `frame` on the stream (waits while gRPC's flow control holds it: a slow successor
        slows its predecessor). Written by the caller itself, not handed to a task: one event-loop
        turn less on every hop. A frame on a broken stream is lost; the stream opens again for the
        next one (a lost peer's micro-batches fail through membership)."""
        async with self._lock:
            if self._closed:  # its peer left the plan (LinkPool.retain): a late old-epoch frame has nowhere to go
                return
            if self._call is None:
                self._call = self._stub.Ring()
                self._acks = asyncio.create_task(self._read_acks(self._call), name=f"acks<-{self.address}")
            try:
                await self._call.write(frame)
            except (grpc.RpcError, asyncio.InvalidStateError) as e:
                self._broken(e)
                return
        self.frames_sent += 1
        self.bytes_sent += frame.ByteSize()

    def _broken(self, e: BaseException) -> None:
        if self._closed:  # closed by this peer (its peer left the plan): nothing broke
            return
        if not (isinstance(e, grpc.aio.AioRpcError) and self.security.note_failure(self.address, e)):
            why = e.code().name.lower() if isinstance(e, grpc.aio.AioRpcError) else "closed"
            log.warning("ring link to %s broke: %s", self.address, why)
        self._call = None
        if self.on_broken is not None:
            self.on_broken(self.address)

    async def _read_acks(self, call) -> None:
        try:
            async for ack in call:
                if ack.error:
                    log.warning("%s refused micro-batch %d: %s", self.address, ack.micro_batch, ack.error)
                    if self.on_refused is not None and ack.micro_batch:
                        try:
                            self.on_refused(self.address, ack.micro_batch, ack.error)
                        except Exception:  # noqa: BLE001 - the link must keep reading whatever a listener does
                            log.exception("passing on a refusal of micro-batch %d failed", ack.micro_batch)
        except grpc.aio.AioRpcError as e:
            if self._call is call:
                self._broken(e)
        except asyncio.CancelledError:
            call.cancel()
            raise

    async def close(self) -> None:
        self._closed = True
        if self._acks is not None:
            self._acks.cancel()
            await asyncio.gather(self._acks, return_exceptions=True)
        await self._channel.close()


class LocalLink:
    """A link to this peer itself (the head's own stage, the last stage's answers to its own head):
    the frame goes straight to the handler, no TLS, no gRPC, no thread (a process's loopback round
    trip was two ring messages of about 0.5 ms each)."""

    def __init__(self, address: str, handler: Callable[[pb.Frame], Awaitable[pb.FrameAck]],
                 on_refused: Callable[[str, int, str], None] | None):
        self.address = address
        self.handler = handler
        self.on_refused = on_refused
        self.frames_sent = 0
        self.bytes_sent = 0

    async def send(self, frame: pb.Frame) -> None:
        self.frames_sent += 1
        try:
            ack = await self.handler(frame)
        except Exception as e:  # noqa: BLE001 - as the gRPC server does: refuse the frame, keep serving
            log.exception("frame (micro-batch %d, epoch %d) failed", frame.micro_batch, frame.epoch)
            ack = pb.FrameAck(micro_batch=frame.micro_batch, error=f"internal error: {type(e).__name__}")
        if ack.error and self.on_refused is not None and ack.micro_batch:
            self.on_refused(self.address, ack.micro_batch, ack.error)

    async def close(self) -> None:
        pass


class LinkPool:
    """The ring links this peer sends on, by address."""

    def __init__(self, security: Security, on_refused: Callable[[str, int, str], None] | None = None,
                 local: tuple[str, Callable[[pb.Frame], Awaitable[pb.FrameAck]]] | None = None,
                 on_broken: Callable[[str], None] | None = None):
        self.security = security
        self.on_refused = on_refused
        self.on_broken = on_broken
        self.local = local  # (this peer's address, its frame handler): frames to itself skip the network
        self._links: dict[str, RingLink | LocalLink] = {}
        self._closed_bytes = 0  # bytes sent on links closed since (retain)

    @property
    def local_address(self) -> str | None:
        """This peer's own address (frames to it skip the network); None without a local handler."""
        return self.local[0] if self.local is not None else None

    def get(self, address: str) -> RingLink | LocalLink:
        link = self._links.get(address)
        if link is None:
            if address == self.local_address:
                link = LocalLink(address, self.local[1], self.on_refused)
            else:
                link = RingLink(address, self.security, self.on_refused, self.on_broken)
            self._links[address] = link
        return link

    def bytes_sent(self) -> int:
        return sum(link.bytes_sent for link in self._links.values()) + self._closed_bytes

    def retain(self, addresses: set[str]) -> None:
        """Close the links to every address but `addresses` (the committed plan's peers). A link
        kept to a peer that left the plan outlived it: its stream broke when that peer exited, a
        WARNING "ring link ... broke" after a clean leave, and its channel stayed open for good."""
        for address in [a for a in self._links if a not in addresses]:
            link = self._links.pop(address)
            self._closed_bytes += link.bytes_sent  # the ring_bytes_sent counter only grows
            asyncio.get_running_loop().create_task(link.close())

    async def close(self) -> None:
        for link in list(self._links.values()):
            await link.close()
        self._links.clear()
