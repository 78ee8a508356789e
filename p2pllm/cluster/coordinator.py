"""Agreement on one plan: the elected coordinator proposes epoch N+1, every peer loads its layers
and acks, then the coordinator commits. Peers serve only the committed epoch.

This module decides (what to propose, whether a proposal is acceptable); the daemon carries the
messages. The plan itself comes from planner.plan, the same function `p2pllm plan` runs.
"""

from __future__ import annotations

import json
import logging

from ..model.spec import ModelSpec
from ..proto import p2pllm_pb2 as pb
from .membership import Member, Membership
from .planner import Held, Links, PeerCaps, Plan, PlanOptions, plan, should_replace

log = logging.getLogger(__name__)


def peer_caps(member: Member, serving: tuple[int, int] | None = None) -> PeerCaps:
    """`serving`: the layers the member has loaded (its stage in the running plan)."""
    c = member.info.caps
    return PeerCaps(
        id=member.info.id,
        name=member.info.name,
        mem_bytes=int(c.mem_bytes),
        flops=max(float(c.flops), 1.0),
        mem_bw=max(float(c.mem_bw), 1.0),
        net_bw=float(c.net_bw) if c.net_bw > 0 else 125e6,  # unmeasured: assume 1 Gbit/s
        held=None if member.holds is None else
        Held(frozenset(member.holds.layers), bool(member.holds.embed), bool(member.holds.head)),
        serving=serving,
    )


def measured_links(members: list[Member]) -> Links:
    links = Links()
    ids = {m.info.id for m in members}
    for m in members:
        for other, (rtt, bw) in m.links.items():
            if other in ids and bw > 0:
                links.set(m.info.id, other, bw, rtt, symmetric=True)
    return links


OUT_OF_PLAN = ("leaving", "drained", "fetching")  # states of live peers that get no layers


def candidate_plan(spec: ModelSpec, membership: Membership, options: PlanOptions, exclude: frozenset = frozenset(),
                   head: str | None = None, running: pb.PlanProposal | None = None) -> Plan:
    """The plan over the live, compatible peers that are neither leaving nor drained (nor in `exclude`);
    `head`: the coordinator, which runs the scheduler (planner.plan puts it at an end of the ring);
    `running`: the committed plan, whose peers keep the layers they have loaded where that costs
    little."""
    members = [m for m in membership.live_compatible() if m.state not in OUT_OF_PLAN and m.info.id not in exclude]
    serving = {s.peer_id: (s.start, s.end) for s in running.stages} if running is not None else {}
    return plan(spec, [peer_caps(m, serving.get(m.info.id)) for m in members], measured_links(members), options,
                head=head)


def needs_new_plan(current: pb.PlanProposal | None, current_plan: Plan | None, candidate: Plan,
                   membership: Membership, hysteresis: float, not_serving: str = "") -> str:
    """Why a new plan should be proposed now ('' = keep the current one). `not_serving`: why the
    committed plan does not serve although no stage of it is lost now (the ring paused when the
    survivors could not hold the model; a stage peer never took the commit): a feasible candidate
    is proposed then even if it is the same plan, as a new epoch every stage peer accepts again."""
    if not candidate.feasible:
        return ""
    if current is None:
        return "no plan yet"
    broken = broken_reason(current, membership)
    if broken:
        return broken
    if not_serving:
        return not_serving
    if candidate.strategy == "even" and {s.peer_id for s in current.stages} != {s.peer for s in candidate.stages}:
        return "the strategy is even and the set of peers changed"  # even means every compatible peer
    same = [(s.peer_id, s.start, s.end) for s in current.stages] == [(s.peer, s.start, s.end) for s in candidate.stages]
    if not same and current_plan is not None and should_replace(current_plan, candidate, hysteresis):
        return "a better plan is available"
    return ""


def missing_the_plan(current: pb.PlanProposal | None, membership: Membership, told: dict[str, int]) -> list[Member]:
    """Live compatible peers outside the committed plan that do not have its epoch: they joined
    after the commit and the plan with them was not proposed (the same plan, not better by the
    hysteresis, or infeasible with them). No proposal would reach them, and without the plan their
    gateway has no coordinator to forward to (503 for good), so the coordinator sends it to them.
    `told`: peer id -> the epoch the coordinator already committed to it (health replies lag)."""
    if current is None:
        return []
    stage_peers = {s.peer_id for s in current.stages}
    return [m for m in membership.live_compatible()
            if m.info.id != membership.me.id and m.info.id not in stage_peers and m.state != "leaving"
            and m.epoch < current.epoch and told.get(m.info.id) != current.epoch]


def why_no_layers(candidate: Plan, member: Member, hysteresis: float) -> str:
    """Why `member`, outside the committed plan, gets no layers now (`candidate`: the plan over the
    peers as they are now, which the coordinator did not propose)."""
    if member.state in OUT_OF_PLAN:
        return f"it is {member.state}"
    if not candidate.feasible:
        return f"no plan that gives it layers is feasible: {candidate.reason}"
    for pid, why in candidate.excluded:
        if pid == member.info.id:
            return why
    if any(s.peer == member.info.id for s in candidate.stages):
        return f"a plan that gives it layers is not {hysteresis:.0%} better than the committed one"
    return "the planner left it out"


def for_unused_peer(current: pb.PlanProposal, peer_id: str, reason: str) -> pb.PlanProposal:
    """The committed plan as sent to a peer outside it (missing_the_plan): the same epoch and stages,
    its reason among the planner JSON's unused_peers, no sequences to resume (it holds no KV)."""
    proposal = pb.PlanProposal()
    proposal.CopyFrom(current)
    proposal.ClearField("resume")
    try:
        data = json.loads(proposal.plan_json)
        data["unused_peers"] = [u for u in data.get("unused_peers", []) if u.get("peer") != peer_id] + \
            [{"peer": peer_id, "reason": reason}]
        proposal.plan_json = json.dumps(data)
    except (ValueError, TypeError, AttributeError):
        pass
    return proposal


def unused_reason(proposal: pb.PlanProposal, peer_id: str) -> str:
    """The reason the plan's JSON gives for `peer_id` having no layers ('' = none given)."""
    try:
        for u in json.loads(proposal.plan_json).get("unused_peers", []):
            if u.get("peer") == peer_id:
                return str(u.get("reason", ""))
    except (ValueError, TypeError, AttributeError):
        pass
    return ""


def proposal_targets(proposal: pb.PlanProposal, membership: Membership) -> tuple[list[Member], list[str]]:
    """Who a proposal goes to: every live compatible member, and every stage peer even if it does
    not answer at this moment (one that misses it must fail the round, not be left out of it:
    a plan committed without one of its stages would never serve). Second: stage peer ids this
    peer has no entry for."""
    targets = membership.live_compatible()
    asked = {m.info.id for m in targets}
    unknown = []
    for s in proposal.stages:
        if s.peer_id in asked:
            continue
        member = membership.members.get(s.peer_id)
        if member is None:
            unknown.append(s.peer_id)
        else:
            targets.append(member)
            asked.add(s.peer_id)
    return targets, unknown


def nobody_to_plan(membership: Membership) -> str:
    """Why no plan can be made whoever coordinates ('' = some live peer could hold layers): every
    live compatible peer is drained, leaving or fetching. Every peer sees it alike."""
    out = membership.live_compatible()
    if any(m.state not in OUT_OF_PLAN for m in out):
        return ""
    drained = sorted(m.info.name for m in out if m.state == "drained")
    hint = f" (`p2pllm peers admit {drained[0]}` brings one back)" if drained else ""
    return "every live peer is drained, leaving or fetching: none can hold layers" + hint


def broken_reason(current: pb.PlanProposal, membership: Membership) -> str:
    """Why the running plan cannot go on ('' = it can): a stage's peer is lost, leaving or drained."""
    for s in current.stages:
        if not membership.is_live(s.peer_id):
            return f"peer {s.peer_id[:8]} of the running plan is lost"
        member = membership.members.get(s.peer_id)
        if member is not None and member.state in OUT_OF_PLAN:
            return f"peer {member.info.name} is {member.state}"
    return ""


def kv_budget(proposal: pb.PlanProposal, positions: int, context: int) -> int | None:
    """KV positions (summed over sequences) that every stage of a committed plan has room for: its
    peer's usable memory less weights and workspace, over the KV one position costs there (the
    plan sized `kv` for `positions`: PlanOptions.kv_positions). The head admits sequences (and
    keeps its prefix cache) against it, so a burst of requests queues instead of pushing a peer
    past its memory; it is never below one sequence of `context`. None: not known."""
    try:
        stages = json.loads(proposal.plan_json)["stages"]
        budgets = []
        for s in stages:
            m = s["memory"]
            per_position = m["kv"] / positions
            if per_position <= 0:
                return None
            budgets.append(int(kv_room(m) // per_position))
    except (ValueError, KeyError, TypeError, ZeroDivisionError):
        return None
    return max(context, min(budgets)) if budgets else None


def plan_context(proposal: pb.PlanProposal | None) -> int | None:
    """The context a committed plan serves (its coordinator's --context; None: not said)."""
    try:
        context = json.loads(proposal.plan_json)["context"] if proposal is not None else None
    except (ValueError, KeyError, TypeError):
        return None
    return context if isinstance(context, int) and not isinstance(context, bool) and context > 0 else None


def stage_memory(proposal: pb.PlanProposal, peer_id: str) -> dict[str, float] | None:
    """The memory the proposal's plan sized for `peer_id`'s stage, in all and for its weights
    (None: it has none, or unknown)."""
    try:
        for s in json.loads(proposal.plan_json)["stages"]:
            if s["peer"] == peer_id:
                return {k: float(s["memory"][k]) for k in ("total", "weights")}
    except (ValueError, KeyError, TypeError):
        pass
    return None


def kv_room(memory: dict) -> int:
    """Bytes a stage's plan leaves for KV (its planner JSON `memory`): the peer's usable memory
    less weights and workspace; without a known limit (0), the KV the plan sized."""
    if memory["limit"] <= 0:
        return int(memory["kv"])
    return int(memory["limit"] - memory["weights"] - memory["workspace"])


def to_proposal(p: Plan, epoch: int, coordinator: str, membership: Membership, fingerprint: str) -> pb.PlanProposal:
    stages = [
        pb.StageAssignment(peer_id=s.peer, address=membership.members[s.peer].info.address, start=s.start, end=s.end)
        for s in p.stages
    ]
    return pb.PlanProposal(
        epoch=epoch,
        coordinator=coordinator,
        stages=stages,
        plan_json=json.dumps(p.to_json()),
        model_fingerprint=fingerprint,
        head_address=membership.members[coordinator].info.address,
    )


def elect(membership: Membership, committed_epoch: int, committed_coordinator: str) -> str:
    """The coordinator: the one of the newest committed plan while it lives (incumbency keeps the
    cluster stable when peers join), else the smallest id among live, compatible peers.

    Two plans of the same epoch (peers that each planned alone before they met) are ranked by
    coordinator id, so both sides pick the same one instead of refusing each other forever.
    """
    claims = [(committed_epoch, committed_coordinator)] if committed_coordinator else []
    claims += [(m.epoch, m.coordinator) for m in membership.live_compatible() if m.coordinator and m.epoch]
    for _, coordinator in sorted(claims, key=lambda c: (-c[0], c[1])):
        member = membership.members.get(coordinator)
        if member is not None and member.compatible and membership.is_live(coordinator):
            return coordinator
    return membership.coordinator_id()


def validate_proposal(proposal: pb.PlanProposal, spec: ModelSpec, fingerprint: str, committed_epoch: int,
                      coordinator: str) -> str:
    """Why a proposal must be refused ('' = acceptable)."""
    if proposal.epoch <= committed_epoch:
        return f"epoch {proposal.epoch} is not newer than the committed epoch {committed_epoch}"
    if proposal.model_fingerprint != fingerprint:
        return "the proposal is for another model"
    if proposal.coordinator != coordinator:
        return f"{proposal.coordinator[:8]} is not the coordinator this peer sees ({coordinator[:8]})"
    expect = 0
    for s in proposal.stages:
        if s.start != expect or s.end <= s.start:
            return f"stages do not cover the layers contiguously (stage at {s.start}, expected {expect})"
        expect = s.end
    if expect != spec.n_layers:
        return f"stages cover {expect} of {spec.n_layers} layers"
    if len({s.peer_id for s in proposal.stages}) != len(proposal.stages):
        return "a peer appears twice in the plan"
    return ""


def my_assignment(proposal: pb.PlanProposal | None, my_id: str) -> tuple[int, int] | None:
    for s in proposal.stages if proposal is not None else ():
        if s.peer_id == my_id:
            return s.start, s.end
    return None
