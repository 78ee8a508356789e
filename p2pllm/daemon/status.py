"""What one peer reports: `p2pllm status --json`'s peer rows, the health numbers the alert rules
watch (docs/monitoring/), the head's load. Plain functions of the membership and the plan, so
they are tested without a daemon."""

from __future__ import annotations

import json

from ..cluster import coordinator as coord
from ..cluster.membership import Membership
from ..model.pieces import layer_ranges
from ..proto import p2pllm_pb2 as pb


def health_stats(membership: Membership, committed: pb.PlanProposal | None, stage, me: str, *, serving: bool,
                  mem_limit: int) -> dict:
    """What the alert rules (docs/monitoring/) watch, as this peer sees it: its peer table, whether
    a plan is committed and served, its stage's KV against the room the plan left it, its memory."""
    members = list(membership.members.values())
    live = sum(1 for m in members if m.compatible and membership.is_live(m.info.id))
    kv_held = kv_allocated = 0
    if stage is not None:
        kv_held, kv_allocated = stage.kv_memory()
    return {
        "peers_known": len(members),  # this peer included, excluded (incompatible) peers too
        "peers_live": live,
        "peers_lost": sum(1 for m in members if m.compatible and not membership.is_live(m.info.id)),
        "peers_excluded": sum(1 for m in members if not m.compatible),
        "plan_committed": int(committed is not None),
        "serving": int(serving),
        "kv_bytes": kv_held,
        "kv_allocated_bytes": kv_allocated,
        "kv_capacity_bytes": _kv_room(committed, me) if committed is not None else 0,
        "memory_used_bytes": resident_bytes(),
        "memory_limit_bytes": mem_limit,
    }


def head_load(scheduler) -> pb.HeadLoad | None:
    if scheduler is None:
        return None
    stats = scheduler.stats()
    return pb.HeadLoad(queued=stats.queued, running=stats.running, tokens_generated=scheduler.tokens_generated)


def ring_load(load: pb.HeadLoad | None, committed: pb.PlanProposal | None, membership: Membership) -> dict | None:
    """The head's numbers: its own here (`load`), else from the coordinator's last health reply."""
    if load is None and committed is not None:
        member = membership.members.get(committed.coordinator)
        load = member.head if member is not None else None
    if load is None:
        return None
    return {"queued": load.queued, "running": load.running, "tokens_generated": load.tokens_generated}


def peer_rows(membership: Membership, me: str, committed: pb.PlanProposal | None, coordinator: str, epoch: int,
               links: dict[str, tuple[float, float]], my_state: str, holding: pb.Holding | None,
               fetch: pb.FetchProgress | None) -> list[dict]:
    """`status`'s "peers": every member as this peer sees it (its own row from its own state)."""
    layers = {}
    if committed is not None:
        layers = {s.peer_id: [s.start, s.end] for s in committed.stages}
    peers = []
    for m in sorted(membership.members.values(), key=lambda m: m.info.id):
        mine, live = m.info.id == me, membership.is_live(m.info.id)
        state = my_state if mine else m.state if live else "lost"
        rtt = links.get(m.info.id, (None, None))[0]
        peers.append({
            "id": m.info.id,
            "name": m.info.name,
            "address": m.info.address,
            "layers": layers.get(m.info.id),
            "healthy": live,
            "excluded_reason": m.reason or None,
            "state": state,
            "epoch": epoch if mine else m.epoch,
            "drained": state == "drained",
            "coordinator": m.info.id == coordinator,
            "device": m.info.caps.device,
            "mem_used": resident_bytes() if mine else (m.mem_used or None),  # from its last health reply
            "mem_limit": int(m.info.caps.mem_bytes),  # what it offers the planner
            "rtt_ms": round(rtt * 1e3, 3) if rtt is not None else None,  # this peer's measurement
            "holds": holding_json(holding if mine else m.holds),
            # a lost peer fetches nothing, whatever its last health reply said
            "fetch": fetch_json(fetch if mine else m.fetch if membership.is_live(m.info.id) else None),
        })
    return peers


def holding_json(h: pb.Holding | None) -> dict | None:
    """A partial copy's layers as ranges (None: the whole file)."""
    if h is None:
        return None
    return {"layers": [list(r) for r in layer_ranges(sorted(set(h.layers)))], "embed": h.embed, "head": h.head}


def fetch_json(f: pb.FetchProgress | None) -> dict | None:
    if f is None:
        return None
    left = max(0, f.total - f.done)
    return {"layers": [f.start, f.end], "done": f.done, "total": f.total, "mb_s": round(f.rate / 1e6, 2),
            "eta_s": round(left / f.rate, 1) if f.rate > 0 else None}


def resident_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _kv_room(proposal: pb.PlanProposal, peer_id: str) -> int:
    """Bytes the plan leaves a peer's stage for KV: its memory limit less weights and workspace.

    Both KV caches grow on demand, so no allocation says how far they may go; this room is what
    the head's admission budget is computed from (coordinator.kv_budget), so KV held near it means
    requests are about to queue, and past it the peer holds more than its plan allowed. Without a
    known limit (0), the KV the plan sized for batch x context. 0: the peer holds no stage."""
    try:
        return coord.kv_room(next(s["memory"] for s in json.loads(proposal.plan_json)["stages"]
                                  if s["peer"] == peer_id))
    except (ValueError, KeyError, TypeError, StopIteration):
        return 0
