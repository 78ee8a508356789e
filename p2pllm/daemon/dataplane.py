"""Data plane: the ring this peer's stage is bound into for the committed epoch, the frames it is
sent (activations, results for the head, KV replicas), KV fetched and served across a plan change,
and the head (ClusterRing + Scheduler) on the coordinator."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ..cluster import coordinator as coord
from ..cluster.membership import Membership
from ..cluster.planner import PlanOptions
from ..errors import P2PError
from ..model.spec import ModelSpec
from ..proto import p2pllm_pb2 as pb
from ..runtime.cluster_engine import serve_embed, serve_generate
from ..runtime.cluster_ring import ClusterRing
from ..runtime.compute_lane import ComputeLane
from ..runtime.recovery import plan_sources, restore_kv, serve_fetch
from ..runtime.replica import ReplicaStore, from_cache
from ..runtime.ring_stage import Binding, RingStage
from ..runtime.scheduler import Scheduler
from ..transport import frames
from ..transport.client import ClientPool
from ..transport.ring import LinkPool
from ..transport.security import Security

log = logging.getLogger(__package__)  # "p2pllm.daemon": one logger for the whole peer


class DataPlane:
    """The committed epoch's stage (`stage`; None: no layers here), its ring links and binding,
    the KV replicas this peer holds for its predecessor, and on the coordinator the head
    (`ring`, `scheduler`). `on_broken(address)`: a ring link to a peer broke."""

    def __init__(self, me: str, address: str, spec: ModelSpec, options: PlanOptions, security: Security,
                 clients: ClientPool, membership: Membership, compute: ComputeLane, tokenizer,
                 model_name: str, micro_batches: int | None, wire_dtype: str | None,
                 on_broken: Callable[[str], None]):
        self.id = me
        self.address = address
        self.spec = spec
        self.options = options
        self.clients = clients
        self.membership = membership
        self.compute = compute
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.micro_batches = micro_batches
        self.stage = None  # runtime.stage.Stage of the committed epoch (None: no layers here)
        self.links = LinkPool(security, on_refused=self._frame_refused, local=(address, self.on_frame),
                              on_broken=on_broken)
        self.ring_stage = RingStage(spec, self.links, compute, wire_dtype)
        self.ring: ClusterRing | None = None  # the head's ring, on the coordinator
        self.replicas = ReplicaStore(spec, options.context)
        self.scheduler: Scheduler | None = None

    # ------------------------------------------------------------------ frames
    def _frame_refused(self, address: str, mb_id: int, error: str) -> None:
        """A peer refused a micro-batch this one sent on. The head must hear of it at once (else it
        waits for the micro-batch until a timeout): here, or by a result frame carrying the error.
        Only a peer that had not committed the epoch yet: refusals during a plan change are the
        plan change's to handle (it parks and replays), and retrying them broke identical text."""
        if "switching plans" not in error:
            return
        if self.ring is not None:
            self.ring.refused(mb_id, error)
            return
        b = self.ring_stage.binding
        if b is not None and address != b.head_address:  # (the head refusing our result: nothing to tell it)
            result = frames.result_frame(b.epoch, mb_id, error=f"{address} refused it: {error}")
            asyncio.get_running_loop().create_task(self.links.get(b.head_address).send(result))

    async def on_frame(self, frame: pb.Frame) -> pb.FrameAck:
        # the predecessor's KV deltas: alone (`replica`), or riding on its next frame to this peer
        try:
            for delta in frame.kv[:4096]:
                self.replicas.add(delta)
        except P2PError as e:
            log.warning("refused KV replica deltas: %s", e)
            if frame.replica:
                return pb.FrameAck(micro_batch=frame.micro_batch, error=str(e))
        if frame.replica:
            return pb.FrameAck(micro_batch=frame.micro_batch)
        # finished sequences need no replica either, nor kept ones (a plan change empties the prefix cache)
        for seq_id in [*frame.finished[:4096], *frame.retained[:4096]]:
            self.replicas.free(seq_id)
        if frame.to_head:
            if self.ring is None:
                return pb.FrameAck(micro_batch=frame.micro_batch, error="this peer is not the head")
            self.ring.deliver(frame)
            return pb.FrameAck(micro_batch=frame.micro_batch)
        return pb.FrameAck(micro_batch=frame.micro_batch, error=await self.ring_stage.handle(frame))

    def on_generate(self, req: pb.GenerateRequest):
        return serve_generate(self.scheduler, req)

    async def on_embed(self, req: pb.EmbedRequest) -> pb.EmbedReply:
        return await serve_embed(self.scheduler, req, self.spec.hidden)

    # ------------------------------------------------------------------ KV across plan changes
    async def on_fetch_kv(self, req: pb.FetchKVRequest) -> list[pb.KVDelta]:
        stage = self.stage
        return await self.compute.run(serve_fetch, req, stage, self.replicas)

    async def _fetch_kv(self, address: str, req: pb.FetchKVRequest) -> list[pb.KVDelta]:
        member = self.membership.by_address(address)
        if member is not None and not self.membership.is_live(member.info.id):
            return []  # lost: asking would only wait for a timeout
        call = self.clients.get(address).stub.FetchKV(req, timeout=30.0)
        return [delta async for delta in call]

    async def unbind(self) -> None:
        """The old epoch stops here: refuse its frames, let the one being computed finish."""
        self.ring_stage.bind(None)
        await self.compute.drain()

    async def restore(self, stage, req: pb.PlanProposal, carried: dict | None = None) -> dict[int, int]:
        """The proposal's carried-over sequences' KV in `stage`: per sequence, the positions rebuilt
        (`carried`: what release_stage took out of the stage it freed)."""
        return await restore_kv(stage, self.stage, self.replicas, list(req.resume), list(req.sources),
                                self._fetch_kv, self.spec, self.options.context, self.address, carried)

    async def release_stage(self, rng: tuple[int, int], resume: list[pb.ResumeSeq]) -> dict:
        """Free the committed stage before a new one loads, when both would not fit: the ring stops
        here (its frames are refused; the head parks and replays, as for any plan change), the KV
        the new range [start, end) can reuse is copied out, and the stage's memory is released.
        Peers asking this one for its old layers' KV then find none and fall back to replicas or
        a replay."""
        await self.unbind()
        old, self.stage = self.stage, None
        if old is None:
            return {}
        a, b = rng

        def take() -> dict:
            kept = {r.seq_id: from_cache(old.kv, old.start, r.seq_id, a, b, r.positions, at_most=True) for r in resume}
            old.close()
            return {seq_id: kv for seq_id, kv in kept.items() if kv is not None}

        return await self.compute.run(take)

    # ------------------------------------------------------------------ ring binding
    def commit(self, proposal: pb.PlanProposal, stage) -> None:
        """Serve `proposal` (just committed) with `stage`."""
        self.stage = stage
        # the old epoch's replicas are done with; the new predecessor's first delta of each sequence
        # carries it from position 0 (RingStage._deltas), and may have arrived already
        self.replicas.keep_from(proposal.epoch)
        self._bind_ring(proposal, stage)

    def _bind_ring(self, proposal: pb.PlanProposal, stage) -> None:
        addresses = [s.address for s in proposal.stages]
        mine = [i for i, s in enumerate(proposal.stages) if s.peer_id == self.id]
        nxt = addresses[mine[0] + 1] if mine and mine[0] + 1 < len(addresses) else None
        # the replica holder is the one plan_sources names, so failover looks where deltas went
        replica = None
        if mine:
            replica = plan_sources(proposal, bool(proposal.kv_replicas))[mine[0]].replica_address or None
        binding = Binding(proposal.epoch, stage, nxt, proposal.head_address, self.options.context, replica)
        self.ring_stage.bind(binding)
        # links to peers out of this plan go (a peer that left would break its stream on exit, a
        # false WARNING; a link comes back on its first frame if the peer returns to a plan)
        self.links.retain(set(addresses) | {proposal.head_address})
        if proposal.coordinator == self.id:
            if self.ring is None:
                self.ring = ClusterRing(self.links, self.spec.vocab, self.spec.hidden)
                self.scheduler = Scheduler(self.ring, self.tokenizer, model_name=self.model_name,
                                           context=self.options.context, vocab=self.spec.vocab,
                                           micro_batches=self.micro_batches,
                                           prefix_cache=self.options.prefix_cache)
                asyncio.get_running_loop().create_task(self.scheduler.start())
            self.ring.configure(proposal.epoch, addresses)
            self.scheduler.kv_budget = coord.kv_budget(proposal, self.options.kv_positions, self.options.context)
        elif self.scheduler is not None:  # no longer the head: its requests fail cleanly
            scheduler, self.scheduler, self.ring = self.scheduler, None, None
            asyncio.get_running_loop().create_task(scheduler.stop())

    def peers_lost(self, lost: list[str], committed: pb.PlanProposal | None) -> None:
        """A lost stage parks the ring's sequences at once (the head only)."""
        if self.ring is not None and committed is not None:
            stage_peers = {s.peer_id for s in committed.stages}
            for pid in lost:
                if pid in stage_peers:
                    self.scheduler.pause(f"peer {pid[:8]} of the ring was lost")
                    self.ring.fail_all(f"peer {pid[:8]} of the ring was lost")
