"""Resuming in-flight sequences after a plan change.

The head parks its sequences at the last position every stage confirmed and lists them in the
proposal of the new epoch (`resume`). Each peer then rebuilds, for the layers it will own, the KV
of those sequences up to that position — from its own cache, the replicas it holds, or over
FetchKV from the previous owner or that owner's replica holder — and reports the sequences it
could not rebuild. The head replays those (a prefill of their token history): greedy results are
identical either way, only the time to the next token differs.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

import grpc

from ..model.kvcache import KVEntries
from ..model.spec import ModelSpec
from ..proto import p2pllm_pb2 as pb
from ..transport import frames
from .replica import LayerKV, ReplicaStore, assemble, from_cache
from .stage import Stage

log = logging.getLogger(__name__)

# (address, request) -> the KV deltas that peer answered with
Fetch = Callable[[str, pb.FetchKVRequest], Awaitable[list[pb.KVDelta]]]


def plan_sources(proposal: pb.PlanProposal | None, replicas: bool) -> list[pb.KVSource]:
    """Where each layer range's KV lives under the (currently committed) plan."""
    if proposal is None:
        return []
    stages = list(proposal.stages)
    out = []
    for i, s in enumerate(stages):
        successor = stages[(i + 1) % len(stages)].address if replicas and len(stages) > 1 else ""
        out.append(pb.KVSource(start=s.start, end=s.end, owner_address=s.address, replica_address=successor))
    return out


async def restore_kv(stage: Stage, previous: Stage | None, replicas: ReplicaStore, resume: list[pb.ResumeSeq],
                     sources: list[pb.KVSource], fetch: Fetch, spec: ModelSpec, context: int,
                     my_address: str) -> set[int]:
    """Rebuild `stage`'s KV for the resumed sequences; the ids it could not rebuild."""
    keep = {r.seq_id: r.positions for r in resume}
    for seq_id in stage.kv.sequences():  # everything not carried over is dropped
        if seq_id not in keep:
            stage.free(seq_id)
    a, b = stage.start, stage.end
    pieces: dict[int, list[LayerKV]] = {s: [] for s in keep}
    missing: list[int] = []
    for seq_id, n in keep.items():
        if n == 0:
            continue
        if seq_id in stage.kv and stage.kv.length(seq_id) >= n:
            stage.kv.truncate(seq_id, n)
            continue
        local = [p for p in (from_cache(previous.kv, previous.start, seq_id, a, b, n) if previous else None,
                             *replicas.pieces(seq_id, a, b, n)) if p is not None]
        pieces[seq_id] = local
        if assemble(local, a, b, n) is None:
            missing.append(seq_id)
    if missing:
        await _fetch_missing(missing, keep, pieces, a, b, sources, fetch, spec, context, my_address)
    not_restored = set()
    for seq_id, n in keep.items():
        if n == 0 or (seq_id in stage.kv and stage.kv.length(seq_id) >= n):
            continue
        data = assemble(pieces[seq_id], a, b, n)
        if data is None:
            not_restored.add(seq_id)
            stage.free(seq_id)
            continue
        stage.free(seq_id)
        stage.kv.allocate(seq_id, n + 256)
        stage.kv.import_entries(KVEntries(seq_id, 0, data.to(stage.decoder.dtype)))
    if keep:
        log.info("KV for layers [%d, %d): %d sequences carried over, %d to replay", a, b,
                 len(keep) - len(not_restored), len(not_restored))
    return not_restored


async def _fetch_missing(missing, keep, pieces, a, b, sources, fetch: Fetch, spec, context, my_address) -> None:
    for src in sources:
        lo, hi = max(a, src.start), min(b, src.end)
        if lo >= hi:
            continue
        want = [s for s in missing if assemble(pieces[s], lo, hi, keep[s]) is None]
        if not want:
            continue
        positions = max(keep[s] for s in want)
        for address, from_replica in ((src.owner_address, False), (src.replica_address, True)):
            if not address or address == my_address:
                continue
            req = pb.FetchKVRequest(seq_ids=want, positions=positions, start=lo, end=hi, from_replica=from_replica)
            try:
                deltas = await fetch(address, req)
            except grpc.aio.AioRpcError as e:
                log.info("KV for layers [%d, %d) not available from %s (%s)", lo, hi, address, e.code().name.lower())
                continue
            for d in deltas:
                try:
                    kv = frames.decode_kv(d, spec, context)
                except frames.FrameError as e:
                    log.warning("bad KV from %s: %s", address, e)
                    continue
                if kv.seq_id in pieces:
                    pieces[kv.seq_id].append(kv)
            want = [s for s in want if assemble(pieces[s], lo, hi, keep[s]) is None]
            if not want:
                break


def serve_fetch(req: pb.FetchKVRequest, stage: Stage | None, replicas: ReplicaStore) -> list[pb.KVDelta]:
    """Answer FetchKV from this peer's stage cache or its replica store: what it holds of each
    sequence, up to `positions` (the asker checks that it is enough)."""
    out = []
    for seq_id in list(req.seq_ids)[:4096]:
        kv = None
        if req.from_replica:
            got = replicas.pieces(seq_id, req.start, req.end, req.positions, at_most=True)
            kv = got[0] if got else None
        elif stage is not None:
            kv = from_cache(stage.kv, stage.start, seq_id, req.start, req.end, req.positions, at_most=True)
        if kv is not None:
            out.append(frames.encode_kv(kv))
    return out
