"""The head's view of the gRPC ring: send a micro-batch to the first stage, await its answers
(sampled tokens, and the vectors of embedding sequences)."""

from __future__ import annotations

import asyncio
import logging

from ..model.sampling import Sampled
from ..proto import p2pllm_pb2 as pb
from ..transport import frames
from ..transport.ring import LinkPool
from .frames import MicroBatch, Pooled
from .scheduler import RingRetry, RingUnavailable
from .timeline import mark

log = logging.getLogger(__name__)

# A backstop only: a lost peer fails its micro-batches as soon as membership notices.
MICRO_BATCH_TIMEOUT = 300.0


class ClusterRing:
    def __init__(self, links: LinkPool, vocab: int, hidden: int):
        self.links = links
        self.vocab = vocab  # sampled ids are checked against it
        self.hidden = hidden  # ... and embeddings' sizes against this
        self.epoch = 0
        self.first_address: str | None = None
        self.n_stages = 1
        # per micro-batch in flight: its answer, and the sequences of its chunks that answer
        self._pending: dict[int, tuple[asyncio.Future, list[int]]] = {}

    def configure(self, epoch: int, stage_addresses: list[str]) -> None:
        """Serve a newly committed plan; micro-batches of the old epoch fail (stages refuse them)."""
        self.epoch = epoch
        self.first_address = stage_addresses[0]
        self.n_stages = len(stage_addresses)

    async def run(self, mb: MicroBatch) -> list[Sampled | Pooled]:
        if self.first_address is None:
            raise RingUnavailable("the cluster has no committed plan yet")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending[mb.mb_id] = (fut, [c.seq_id for c in mb.chunks if c.sample])
        # a timer, not asyncio.wait_for: that wraps the future and costs the answer a loop turn
        timer = loop.call_later(MICRO_BATCH_TIMEOUT, _expire, fut)
        try:
            mark("launch")
            if self.first_address == self.links.local_address:
                # this peer's own stage runs the step right here, on the loop: let the tokens just
                # taken go to their clients first (after the step they would arrive in pairs)
                await asyncio.sleep(0)
            await self.links.get(self.first_address).send(frames.encode(mb))
            return await fut
        finally:
            timer.cancel()
            self._pending.pop(mb.mb_id, None)

    def deliver(self, frame: pb.Frame) -> None:
        """A result frame from the last stage (or an error from any stage)."""
        mark("result")
        fut, answering = self._pending.get(frame.micro_batch, (None, []))
        if fut is None or fut.done():
            log.debug("result for unknown micro-batch %d", frame.micro_batch)
            return
        if frame.error:  # a refusal passed on by the stage that sent the frame: retried like refused()
            fut.set_exception((RingRetry if "refused it:" in frame.error else RingUnavailable)(frame.error))
            return
        try:
            fut.set_result(frames.decode_result(frame, self.vocab, answering, self.hidden))
        except frames.FrameError as e:
            fut.set_exception(RingUnavailable(f"a malformed result: {e}"))

    def refused(self, mb_id: int, error: str) -> None:
        """A stage refused micro-batch `mb_id`: most often one that commits the new epoch a moment
        after this head, or a plan change under way; the scheduler retries it (a bounded number
        of times) or parks it for the new plan."""
        fut = self._pending.get(mb_id)
        if fut is not None and not fut.done():
            fut.set_exception(RingRetry(error))

    def fail_all(self, reason: str) -> None:
        for fut, _ in list(self._pending.values()):
            if not fut.done():
                fut.set_exception(RingUnavailable(reason))


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(RingUnavailable(f"no answer from the ring for {MICRO_BATCH_TIMEOUT:.0f}s"))
