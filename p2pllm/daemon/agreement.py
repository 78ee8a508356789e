"""Control plane, agreement: who coordinates, the coordinator's loop (replan on loss, join or a
better plan), and the two-phase propose/commit every peer takes part in. The decisions are
cluster/coordinator.py's; this carries them around and takes this peer's part of a plan."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..cluster import coordinator as coord
from ..cluster.membership import Membership
from ..cluster.planner import Plan, PlanOptions
from ..errors import P2PError
from ..model.backends import layers_to_share
from ..model.spec import ModelSpec
from ..proto import p2pllm_pb2 as pb
from ..runtime.recovery import plan_sources
from ..transport.client import ClientPool
from ..wording import counted

if TYPE_CHECKING:
    from .dataplane import DataPlane
    from .loading import StageLoader
    from .pieces import PeerPieces

log = logging.getLogger(__package__)  # "p2pllm.daemon": one logger for the whole peer

SETTLE_SECONDS = 1.0  # membership must be quiet this long before a (re)plan
STARTUP_GRACE = 2.5  # mDNS answers take about a second: give peers started together time to meet


class Agreement:
    """The plan state of one peer: the committed epoch (`epoch`, `committed`, and `committed_plan`
    where this peer made it), proposals accepted but not committed (`pending`), and the peer's
    place in it (`state`: idle, loading, ready, serving, leaving). `dial(address)`: say hello to
    a stage peer not met yet; `gateway_url`: for the "ready" line."""

    def __init__(self, me: str, spec: ModelSpec, options: PlanOptions, membership: Membership, clients: ClientPool,
                 data: DataPlane, loader: StageLoader, pieces: PeerPieces, kv_replicas: int,
                 dial: Callable[[str], None], gateway_url: str, *, started_at: float | None = None):
        self.id = me
        self.spec = spec
        self.options = options
        self.membership = membership
        self.clients = clients
        self.data = data
        self.loader = loader
        self.pieces = pieces
        self.kv_replicas = kv_replicas
        self.dial = dial
        self.gateway_url = gateway_url
        self.epoch = 0
        self.committed: pb.PlanProposal | None = None
        self.committed_plan: Plan | None = None  # the Plan object, where this peer made it
        self.pending: dict[int, tuple[pb.PlanProposal, object]] = {}
        self.state = "idle"
        self.highest_epoch = 0
        self.replan_now = asyncio.Event()
        self.started_at = time.monotonic() if started_at is None else started_at  # for STARTUP_GRACE
        self._proposing = False
        self._last_logged = ""
        self._uncommitted = ""  # why the last commit did not reach every stage peer ('' = it did)
        self._told: dict[str, int] = {}  # peer id -> the epoch this coordinator committed to it
        self._tell_after: dict[str, float] = {}  # peer id -> when to send it the committed plan again

    def coordinator(self) -> str:
        return coord.elect(self.membership, self.epoch, self.committed.coordinator if self.committed else "")

    def saw_epoch(self, epoch: int) -> None:
        self.highest_epoch = max(self.highest_epoch, epoch)

    # ------------------------------------------------------------------ the coordinator
    async def coordinator_loop(self) -> None:
        while True:
            try:  # a lost stage wakes the loop at once; otherwise it looks twice a second
                await asyncio.wait_for(self.replan_now.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
            self.replan_now.clear()
            if self.coordinator() != self.id or self._proposing:
                continue
            broken = self.committed is not None and coord.broken_reason(self.committed, self.membership)
            if not broken and time.monotonic() - self.membership.changed_at < SETTLE_SECONDS:
                continue  # a lost stage is replanned at once; joins wait for membership to settle
            if self.committed is None and time.monotonic() - self.started_at < STARTUP_GRACE:
                continue
            candidate = coord.candidate_plan(self.spec, self.membership, self.options, head=self.id,
                                             running=self.committed)
            scheduler = self.data.scheduler
            if not candidate.feasible:
                if self.committed is None:
                    self._log_once(f"no feasible plan yet: {candidate.reason}")
                elif scheduler is not None and coord.broken_reason(self.committed, self.membership):
                    reason = f"the cluster lost capacity and cannot hold the model: {candidate.reason}"
                    self._log_once(reason)
                    scheduler.pause(reason)
                    scheduler.unavailable = reason  # new requests: 503 until capacity returns
                    scheduler.fail_parked(reason)  # running ones: a clear error now, not a hang
                elif not coord.broken_reason(self.committed, self.membership):  # e.g. a newcomer too small
                    self._log_once(f"keeping plan epoch {self.epoch}: a plan with every peer is not feasible: "
                                   f"{candidate.reason}")
                    await self._share_committed(candidate)
                continue
            why = coord.needs_new_plan(self.committed, self.committed_plan, candidate, self.membership,
                                       self.options.hysteresis, self._not_serving())
            if why:
                self._proposing = True
                try:
                    await self._propose_and_commit(candidate, why)
                finally:
                    self._proposing = False
            else:
                await self._share_committed(candidate)

    def _not_serving(self) -> str:
        """Why the committed plan does not serve though none of its stages is lost ('' = it does)."""
        scheduler = self.data.scheduler
        if scheduler is not None and scheduler.unavailable:
            return "the cluster can hold the model again"
        return self._uncommitted

    async def _share_committed(self, candidate: Plan) -> None:
        """Send the committed plan (the same epoch: proposed, then committed) to the peers outside it
        that do not have it (coord.missing_the_plan), with why they hold no layers. They serve
        no stage, so the ring is untouched; their gateways then forward to this coordinator."""
        now = time.monotonic()
        late = [m for m in coord.missing_the_plan(self.committed, self.membership, self._told)
                if now >= self._tell_after.get(m.info.id, 0.0)]
        if not late:
            return
        epoch = self.epoch

        async def tell(member) -> None:
            pid, reason = member.info.id, coord.why_no_layers(candidate, member, self.options.hysteresis)
            client = self.clients.get(member.info.address)
            try:
                reply = await client.propose(coord.for_unused_peer(self.committed, pid, reason), timeout=10.0)
                if reply.ok:
                    reply = await client.commit(epoch, self.id)
                problem = "" if reply.ok else reply.reason
            except Exception as e:  # unreachable now: its health checks decide whether it is lost
                problem = str(e) or type(e).__name__
            if problem:  # e.g. it has not yet heard that this peer coordinates: try again shortly
                if pid not in self._tell_after:  # once, not every retry
                    log.info("plan epoch %d not yet sent to %s: %s; will retry", epoch, member.info.name, problem)
                self._tell_after[pid] = time.monotonic() + 2.0
                return
            self._told[pid] = epoch
            log.info("sent plan epoch %d to %s, which holds no layers: %s", epoch, member.info.name, reason)

        await asyncio.gather(*(tell(m) for m in late))
        for pid in [p for p in self._told if p not in self.membership.members]:  # forgotten peers
            self._told.pop(pid)
            self._tell_after.pop(pid, None)

    def _log_once(self, msg: str) -> None:
        if msg != self._last_logged:
            self._last_logged = msg
            log.warning(msg)

    async def _propose_and_commit(self, candidate: Plan, why: str) -> None:
        sched = self.data.scheduler
        if sched is not None and self.committed is not None:  # switch between steps, carrying sequences over
            sched.pause(why)
            await sched.drain(timeout=10.0)
        # numbered after the drain: a proposal seen meanwhile (another coordinator's) is older than ours
        epoch = max(self.epoch, self.highest_epoch, *(m.epoch for m in self.membership.members.values())) + 1
        proposal = coord.to_proposal(candidate, epoch, self.id, self.membership, self.spec.fingerprint)
        if sched is not None and self.committed is not None:
            proposal.resume.extend(pb.ResumeSeq(seq_id=s, positions=p) for s, p in sched.resume_points())
        proposal.sources.extend(plan_sources(self.committed, bool(self.kv_replicas), self.membership.is_live))
        proposal.kv_replicas = self.kv_replicas
        log.info("proposing plan epoch %d (%s): %s; carrying %s over", epoch, why,
                 _describe(proposal, self.membership), counted(len(proposal.resume), "sequence"))
        targets, unknown = coord.proposal_targets(proposal, self.membership)
        if unknown:
            log.warning("epoch %d names peers this one has not met (%s); will retry", epoch,
                        ", ".join(u[:8] for u in unknown))
            self.highest_epoch = max(self.highest_epoch, epoch)
            return

        async def ask(member):
            if member.info.id == self.id:
                return await self.on_propose(proposal)
            return await self.clients.get(member.info.address).propose(proposal)

        replies = await asyncio.gather(*(ask(m) for m in targets), return_exceptions=True)
        failed = [(m, r) for m, r in zip(targets, replies) if isinstance(r, BaseException) or not r.ok]
        if failed:
            m, r = failed[0]
            reason = r if isinstance(r, BaseException) else r.reason
            log.warning("epoch %d not accepted by %s: %s; will retry", epoch, m.info.name, reason)
            self.highest_epoch = max(self.highest_epoch, epoch)
            return

        async def commit(member):
            if member.info.id == self.id:
                return await self.on_commit(pb.CommitRequest(epoch=epoch, coordinator=self.id))
            return await self.clients.get(member.info.address).commit(epoch, self.id)

        resume_at: dict[int, int] = {}  # per sequence: the positions every stage rebuilt
        for r in replies:
            for seq in r.restored:
                resume_at[seq.seq_id] = min(resume_at.get(seq.seq_id, seq.positions), seq.positions)
        commits = await asyncio.gather(*(commit(m) for m in targets), return_exceptions=True)
        stage_peers = {s.peer_id for s in proposal.stages}
        missed = [m.info.name for m, r in zip(targets, commits)
                  if m.info.id in stage_peers and (isinstance(r, BaseException) or not r.ok)]
        self._uncommitted = f"{', '.join(missed)} did not take the commit of epoch {epoch}" if missed else ""
        self._told.update({m.info.id: epoch for m, r in zip(targets, commits)  # their health replies lag
                           if not isinstance(r, BaseException) and r.ok})
        if missed:  # that stage refuses the epoch's frames: propose again (a lost peer is replanned without)
            log.warning("epoch %d: %s; proposing again", epoch, self._uncommitted)
            self.replan_now.set()
        self.committed_plan = candidate
        if self.data.scheduler is not None:
            self.data.scheduler.resume(f"epoch {epoch}", resume_at)

    # ------------------------------------------------------------------ every peer's part
    async def on_propose(self, req: pb.PlanProposal) -> pb.PlanReply:
        reason = coord.validate_proposal(req, self.spec, self.spec.fingerprint, self.epoch, self.coordinator())
        if reason:
            log.info("refused plan epoch %d: %s", req.epoch, reason)
            return pb.PlanReply(ok=False, reason=reason)
        self.highest_epoch = max(self.highest_epoch, req.epoch)
        for s in req.stages:  # a stage peer we have not met yet: say hello (the ring needs it anyway)
            if s.peer_id not in self.membership.members and s.peer_id != self.id:
                self.dial(s.address)
        mine = coord.my_assignment(req, self.id)
        carried = None  # the resumed sequences' KV, taken out of a stage freed before the load
        old = self.data.stage
        shared = layers_to_share(old.backend, *mine) if old is not None and mine else None  # kept, not loaded
        tight = self._no_room_for_both(req, mine)
        if tight:
            log.info("freeing layers [%d, %d) before loading [%d, %d): %s", old.start, old.end, *mine, tight)
            self.pending = {e: v for e, v in self.pending.items() if e > req.epoch}  # superseded: their stages go
            self.loader.loaded = None
            carried = await self.data.release_stage(mine, list(req.resume))
        try:
            stage = await self._load(mine, shared) if mine else None
        except P2PError as e:
            return pb.PlanReply(ok=False, reason=str(e))
        superseded = self._superseded(req.epoch)
        if superseded:  # a newer epoch came (and maybe committed) while this one loaded: the ring stays bound
            return pb.PlanReply(ok=False, reason=superseded)
        # the old epoch stops here: refuse its frames, let the one being computed finish
        await self.data.unbind()
        rebuilt = {r.seq_id: r.positions for r in req.resume}  # a peer without layers holds no KV
        if stage is not None:
            rebuilt = await self.data.restore(stage, req, carried)
        superseded = self._superseded(req.epoch)
        if superseded:  # (a newer epoch committed meanwhile has bound the ring to itself)
            return pb.PlanReply(ok=False, reason=superseded)
        # a newer proposal supersedes every older one that never committed: their stages (weights
        # and KV) go now, or a peer would hold two ranges at once and exceed its memory
        self.pending = {e: v for e, v in self.pending.items() if e > req.epoch}
        self.pending[req.epoch] = (req, stage)
        if self.state not in ("serving", "leaving"):
            self.state = "ready"
        return pb.PlanReply(ok=True, restored=[pb.ResumeSeq(seq_id=s, positions=n) for s, n in rebuilt.items()])

    def _no_room_for_both(self, req: pb.PlanProposal, mine: tuple[int, int] | None) -> str:
        """Why the committed stage must go before the proposal's loads ('' = both fit): the two
        stages' planned memory, less the layers both hold (kept, not loaded twice), exceeds what
        this peer offers. Loading beside it is what keeps the ring serving through a plan change;
        past the limit it got peers OOM-killed when one rejoined (docs/performance.md, Mission).
        Freed first (but for the kept layers), the ring pauses for the load instead."""
        old, limit = self.data.stage, int(self.membership.me.caps.mem_bytes)
        if mine is None or old is None or limit <= 0 or self.loader.reusable(mine, old) is not None:
            return ""
        before = coord.stage_memory(self.committed, self.id) if self.committed is not None else None
        after = coord.stage_memory(req, self.id)
        if before is None or after is None:
            return ""
        both = int(before["total"] + after["total"])
        overlap = max(0, min(old.end, mine[1]) - max(old.start, mine[0]))
        both -= int(before["weights"] * overlap / max(1, old.end - old.start))  # held once, by both stages
        if both <= limit:
            return ""
        return (f"both would need {both / 2**30:.2f} GiB, this peer offers {limit / 2**30:.2f} GiB "
                f"(the ring pauses while it loads)")

    async def _load(self, rng: tuple[int, int], shared=None):
        stage = self.loader.reusable(rng, self.data.stage)
        if stage is not None:
            return stage
        await self.pieces.fetch_missing(rng)
        self.state = "loading"
        return await self.loader.load(rng, shared)

    def _superseded(self, epoch: int) -> str:
        """Why a proposal whose load or restore just ended must not be accepted ('' = it may): a
        newer epoch was proposed or committed meanwhile (a coordinator frozen and resumed proposes
        from what it saw before; accepting its older epoch after the newer one split the ring)."""
        newer = max(self.epoch, self.highest_epoch)
        return f"epoch {epoch} was superseded by epoch {newer} while it loaded" if newer > epoch else ""

    async def on_commit(self, req: pb.CommitRequest) -> pb.PlanReply:
        if req.epoch <= self.epoch:  # never go back: an older epoch committed after a newer one split the ring
            self.pending.pop(req.epoch, None)
            return pb.PlanReply(ok=False, reason=f"epoch {req.epoch} is not newer than the committed epoch "
                                                 f"{self.epoch}")
        entry = self.pending.pop(req.epoch, None)
        if entry is None:
            return pb.PlanReply(ok=False, reason=f"epoch {req.epoch} was never accepted here")
        proposal, stage = entry
        if proposal.coordinator != req.coordinator:
            return pb.PlanReply(ok=False, reason="commit from another coordinator than the proposal's")
        self.epoch, self.committed = req.epoch, proposal
        self.data.commit(proposal, stage)
        if self.state != "leaving":
            self.state = "serving"
        mine = coord.my_assignment(proposal, self.id)
        if mine:
            where = f"layers [{mine[0]}, {mine[1]}) loaded in {self.loader.load_seconds:.1f}s"
        else:  # say why: a peer that sits out should not look broken
            own = self.membership.members[self.id].state  # drained or fetching: out of every plan
            why = coord.unused_reason(proposal, self.id) or (own if own in ("drained", "fetching") else "")
            where = f"no layers ({why})" if why else "no layers"
        log.info("plan epoch %d committed: %s; this peer holds %s", req.epoch, _describe(proposal, self.membership),
                 where)
        if self.state == "leaving":  # the plan without this peer, which is on its way out: not "ready"
            log.info("left the plan: epoch %d goes on without this peer's layers", self.epoch)
        else:
            log.info("ready: epoch %d, coordinator %s, %s; gateway %s", self.epoch, proposal.coordinator[:8], where,
                     self.gateway_url)
        return pb.PlanReply(ok=True)


def _describe(proposal: pb.PlanProposal, membership: Membership) -> str:
    parts = []
    for s in proposal.stages:
        m = membership.members.get(s.peer_id)
        parts.append(f"{m.info.name if m else s.peer_id[:8]}[{s.start},{s.end})")
    return " -> ".join(parts)
