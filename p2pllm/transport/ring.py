"""Ring links: one persistent bidirectional gRPC stream per (this peer -> next peer) link.

Frames go into a bounded queue (backpressure: a slow successor slows its predecessor instead
of growing memory); the receiver acks every frame, with an error where it refused one.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import grpc

from ..proto import p2pllm_pb2 as pb
from ..proto import p2pllm_pb2_grpc as pb_grpc
from .client import CHANNEL_OPTIONS
from .security import Security

log = logging.getLogger(__name__)

QUEUE_FRAMES = 32


class RingLink:
    def __init__(self, address: str, security: Security, on_refused: Callable[[str, int, str], None] | None = None):
        self.address = address
        self.security = security
        self.on_refused = on_refused  # (refusing address, micro-batch id, why): a refusal must reach the head, not just a log
        self._channel = security.channel(address, CHANNEL_OPTIONS)
        self._stub = pb_grpc.PeerStub(self._channel)
        self._queue: asyncio.Queue[pb.Frame | None] = asyncio.Queue(QUEUE_FRAMES)
        self._task: asyncio.Task | None = None
        self.frames_sent = 0
        self.bytes_sent = 0

    async def send(self, frame: pb.Frame) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._pump(), name=f"ring->{self.address}")
        await self._queue.put(frame)
        self.frames_sent += 1
        self.bytes_sent += frame.ByteSize()

    async def _requests(self):
        while True:
            frame = await self._queue.get()
            if frame is None:
                return
            yield frame

    async def _pump(self) -> None:
        call = self._stub.Ring(self._requests())
        try:
            async for ack in call:
                if ack.error:
                    log.warning("%s refused micro-batch %d: %s", self.address, ack.micro_batch, ack.error)
                    if self.on_refused is not None and ack.micro_batch:
                        try:
                            self.on_refused(self.address, ack.micro_batch, ack.error)
                        except Exception:  # noqa: BLE001 - the link must keep pumping whatever a listener does
                            log.exception("passing on a refusal of micro-batch %d failed", ack.micro_batch)
        except grpc.aio.AioRpcError as e:
            if not self.security.note_failure(self.address, e):
                log.warning("ring link to %s broke: %s", self.address, e.code().name.lower())
        except asyncio.CancelledError:
            call.cancel()
            raise

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._channel.close()


class LinkPool:
    """The ring links this peer sends on, by address."""

    def __init__(self, security: Security, on_refused: Callable[[str, int, str], None] | None = None):
        self.security = security
        self.on_refused = on_refused
        self._links: dict[str, RingLink] = {}

    def get(self, address: str) -> RingLink:
        link = self._links.get(address)
        if link is None:
            link = self._links[address] = RingLink(address, self.security, self.on_refused)
        return link

    def bytes_sent(self) -> int:
        return sum(link.bytes_sent for link in self._links.values())

    async def close(self) -> None:
        for link in list(self._links.values()):
            await link.close()
        self._links.clear()
