"""A peer's part of the ring: check each frame against the committed plan, run its layers,
pass the result on (to the next stage, or the sampled tokens and pooled embeddings back to the head)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from ..errors import P2PError
from ..model.spec import ModelSpec
from ..proto import p2pllm_pb2 as pb
from ..transport import frames
from ..transport.ring import LinkPool
from .compute_lane import ComputeLane
from .frames import LayerKV
from .replica import exported
from .stage import Stage
from .timeline import mark

log = logging.getLogger(__name__)

# A step runs on the event loop (no thread hop) when it is this small and such steps take this
# little: a loop busy longer would delay health checks, ring acks and the gateway.
INLINE_MAX_TOKENS = 8
INLINE_MAX_SECONDS = 0.05
# A stage's KV deltas wait for its next frame to the replica holder (its ring successor) and ride
# on it: one message per hop instead of two. A delta nothing took within this long goes alone.
REPLICA_HOLD_SECONDS = 0.25


@dataclass(frozen=True)
class Binding:
    """What the committed plan says this peer does."""

    epoch: int
    stage: Stage | None  # None: no layers here in this epoch
    next_address: str | None  # None on the last stage
    head_address: str
    context: int
    replica_address: str | None = None  # where this stage's KV deltas go (its ring successor)
    # the sequences whose replica holder was sent their KV from position 0 under this binding: a
    # sequence's later deltas continue that; its first one starts at 0 (see RingStage._deltas)
    replicated: set[int] = field(default_factory=set, compare=False, repr=False)


class RingStage:
    def __init__(self, spec: ModelSpec, links: LinkPool, compute: ComputeLane, wire_dtype: str | None = None):
        self.spec = spec
        self.links = links
        self.compute = compute
        self.wire_dtype = wire_dtype
        self.binding: Binding | None = None
        self.compute_seconds = 0.0
        self.frames = 0
        self.replica_bytes = 0
        self.small_step_seconds = 0.0  # the last small step's time (decides whether the next runs inline)
        self._held: list[pb.KVDelta] = []  # deltas waiting for the next frame to the replica holder
        self._held_binding: Binding | None = None
        self._flush: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task] = set()  # held deltas going alone (a task the loop only weakly holds)

    def bind(self, binding: Binding | None) -> None:
        self.binding = binding
        threads = getattr(binding.stage.backend, "threads", None) if binding and binding.stage else None
        if threads is not None:  # a stage holding the whole model may have every core (daemon/loading.py)
            self.compute.follow(threads)
        self._take_held()  # an old epoch's: its holder may be gone (a live owner serves FetchKV)

    async def handle(self, frame: pb.Frame) -> str:
        """Process one frame from the predecessor; returns the refusal reason ('' when accepted)."""
        b = self.binding
        mark("recv")
        try:
            if b is None:
                raise frames.FrameError(f"this peer is switching plans (frame of epoch {frame.epoch} refused)")
            if b.stage is None:
                raise frames.FrameError(f"this peer holds no layers in epoch {b.epoch}")
            if self._inline(frame):
                out = self._process(b, frame)
            else:
                out = await self.compute.run(self._process, b, frame)
        except P2PError as e:
            log.warning("refused micro-batch %d (epoch %d): %s", frame.micro_batch, frame.epoch, e)
            if b is not None:
                await self.links.get(b.head_address).send(frames.result_frame(frame.epoch, frame.micro_batch,
                                                                              error=str(e)))
            return str(e)
        mb, outgoing = out
        mark("computed")
        target = b.head_address if b.stage.is_last else b.next_address
        held = self._take_held() if target == b.replica_address and self._held_binding is b else []
        outgoing.kv.extend(held)
        await self.links.get(target).send(outgoing)
        mark("sent")
        self.replica_bytes += sum(d.ByteSize() for d in held)
        # this step's deltas after the result, off the critical path (a failover recomputes a step
        # whose deltas never left); none once the epoch is over: its stage may be gone
        if b.replica_address and target == self.links.local_address:
            # the result went to this peer's own head: let it take the answers and launch the next
            # micro-batch first (two loop turns: its task wakes, then the one it starts runs)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        if b.replica_address and self.binding is b:
            deltas = self._deltas(b, mb) if self.compute.may_inline() else await self.compute.run(self._deltas, b, mb)
            if deltas and self.binding is b:
                encoded = [frames.encode_kv(d, b.epoch) for d in deltas]
                if target == b.replica_address:
                    self._hold(b, encoded)
                else:
                    await self.send_replica(b, encoded)
        mark("done")
        return ""

    async def send_replica(self, b: Binding, deltas: list[pb.KVDelta]) -> None:
        frame = pb.Frame(epoch=b.epoch, replica=True, kv=deltas)
        self.replica_bytes += frame.ByteSize()
        await self.links.get(b.replica_address).send(frame)

    def _hold(self, b: Binding, deltas: list[pb.KVDelta]) -> None:
        """Keep a step's deltas for the next frame to the replica holder. Until then the replica
        lags one step: a failover that needs it recomputes that step's token (docs/cluster.md)."""
        self._held.extend(deltas)
        self._held_binding = b
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(REPLICA_HOLD_SECONDS, self._send_held)

    def _take_held(self) -> list[pb.KVDelta]:
        held, self._held, self._held_binding = self._held, [], None
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        return held

    def _send_held(self) -> None:
        """No frame took the held deltas in time (the ring went quiet): they go alone."""
        self._flush = None
        b = self._held_binding
        held = self._take_held()
        if held and b is not None and self.binding is b:
            task = asyncio.get_running_loop().create_task(self.send_replica(b, held))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    def _inline(self, frame: pb.Frame) -> bool:
        """Whether this frame's step may run on the event loop (see compute_lane.py)."""
        return (self.compute.may_inline() and len(frame.chunks) <= INLINE_MAX_TOKENS
                and sum(c.length for c in frame.chunks) <= INLINE_MAX_TOKENS
                and self.small_step_seconds <= INLINE_MAX_SECONDS)

    def _process(self, b: Binding, frame: pb.Frame):
        t0 = time.perf_counter()
        stage = b.stage
        mb, hidden = frames.decode(frame, self.spec, b.epoch, b.context, stage.is_first,
                                   device=stage.backend.device, dtype=stage.backend.activation_dtype,
                                   known=stage, live=len(stage.sequences()))
        if stage.is_last:
            missing = [c.seq_id for c in mb.chunks if c.sample and c.seq_id not in stage.samplers
                       and c.seq_id not in stage.pools and c.seq_id not in {s.seq_id for s in mb.starts}]
            if missing:
                raise frames.FrameError(f"sequence {missing[0]} was never started on this stage")
        mark("decoded")
        result = stage.process(mb, hidden)
        mark("stepped")
        # encoded here, where the step ran: on the compute thread, copying the activations into
        # the message is work the event loop (ring, health checks, the gateway) need not wait for
        if stage.is_last:
            outgoing = frames.result_frame(mb.epoch, mb.mb_id, result)
        else:
            outgoing = frames.encode(mb, result, self.wire_dtype)
        seconds = time.perf_counter() - t0
        self.compute_seconds += seconds
        self.frames += 1
        if mb.n_tokens <= INLINE_MAX_TOKENS:
            self.small_step_seconds = seconds
        return mb, outgoing

    def _deltas(self, b: Binding, mb) -> list[LayerKV]:
        """The KV entries a step added, for the replica holder (not an embedding's: after a plan
        change it is computed again from its start, its pooled sum being gone; nor a sequence a
        later frame freed meanwhile).

        A sequence's first delta under a binding starts at position 0: its KV may hold positions
        no step of this binding computed (a copy of the prefix cache or of another choice's prompt,
        KV rebuilt at a plan change), and a holder keeps only a replica complete from 0 (it drops
        one whose beginning is missing). Later deltas carry just the step's positions."""
        stage = b.stage
        sent = b.replicated
        for seq_id in (*mb.finished, *mb.retained):
            sent.discard(seq_id)
        out = []
        for c in mb.chunks:
            if (c.seq_id not in stage.kv or c.seq_id in stage.embeddings
                    or stage.kv.length(c.seq_id) < c.start + c.length):
                continue
            start = c.start if c.seq_id in sent else 0
            out.append(exported(stage.kv, stage.start, c.seq_id, start, c.start + c.length))
            sent.add(c.seq_id)
        return out
