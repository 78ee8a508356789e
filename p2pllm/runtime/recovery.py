"""Resuming in-flight sequences after a plan change.

The head parks its sequences at the last position every stage confirmed and lists them in the
proposal of the new epoch (`resume`). Each peer then rebuilds, for the layers it will own, the KV
of those sequences up to that position — from its own cache, the replicas it holds, or over
FetchKV from the previous owner or that owner's replica holder — and reports the sequences it
could not rebuild. The head replays those (a prefill of their token history): rebuilt KV gives the
same greedy tokens; a replay's prefill rounds differently from the decode steps it stands for, so
it can flip a near-tied token (docs/cluster.md).
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

import grpc

from ..model.kvcache import KVEntries, KVFormat
from ..model.spec import ModelSpec
from ..proto import p2pllm_pb2 as pb
from ..transport import frames
from ..wording import counted
from .frames import LayerKV
from .replica import ReplicaStore, assemble, from_cache
from .stage import Stage

log = logging.getLogger(__name__)

# (address, request) -> the KV deltas that peer answered with
Fetch = Callable[[str, pb.FetchKVRequest], Awaitable[list[pb.KVDelta]]]


def plan_sources(proposal: pb.PlanProposal | None, replicas: bool,
                 live: Callable[[str], bool] | None = None) -> list[pb.KVSource]:
    """Where each layer range's KV lives under the (currently committed) plan. With `live` (peer id
    -> whether it answers), a lost peer's address is left out: asking it would wait for a timeout
    (a cut link resets nothing), and a replica one step short would wait for it at every failover."""
    if proposal is None:
        return []
    stages = list(proposal.stages)
    here = (lambda s: s.address if live is None or live(s.peer_id) else "")  # noqa: E731
    out = []
    for i, s in enumerate(stages):
        successor = here(stages[(i + 1) % len(stages)]) if replicas and len(stages) > 1 else ""
        out.append(pb.KVSource(start=s.start, end=s.end, owner_address=here(s), replica_address=successor))
    return out


async def restore_kv(stage: Stage, previous: Stage | None, replicas: ReplicaStore, resume: list[pb.ResumeSeq],
                     sources: list[pb.KVSource], fetch: Fetch, spec: ModelSpec, context: int,
                     my_address: str, carried: dict[int, LayerKV] | None = None) -> dict[int, int]:
    """Rebuild `stage`'s KV for the resumed sequences: per sequence, the positions rebuilt.
    `carried`: this peer's own KV of them, taken out of a previous stage freed before `stage`
    loaded (instead of `previous`).

    Fewer than asked (a replica one step behind, or none at all) means the head recomputes the
    rest: the missing tail, or the whole history at worst.
    """
    keep = {r.seq_id: r.positions for r in resume}
    for seq_id in stage.sequences():  # everything not carried over is dropped
        if seq_id not in keep:
            stage.free(seq_id)
    a, b = stage.start, stage.end
    pieces: dict[int, list[LayerKV]] = {s: [] for s in keep}
    rebuilt: dict[int, int] = {}
    missing: list[int] = []
    for seq_id, n in keep.items():
        if n == 0 or (seq_id in stage.kv and stage.kv.length(seq_id) >= n):
            rebuilt[seq_id] = n
            if n:
                stage.kv.truncate(seq_id, n)
            continue
        if carried is not None:
            held = carried.get(seq_id)
        else:
            held = from_cache(previous.kv, previous.start, seq_id, a, b, n, at_most=True) if previous else None
        pieces[seq_id] = usable([held, *replicas.pieces(seq_id, a, b, n, at_most=True)], stage.kv.format)
        if prefix(pieces[seq_id], a, b, n) < n:
            missing.append(seq_id)
    if missing:
        await _fetch_missing(missing, keep, pieces, a, b, sources, fetch, spec, context, my_address, stage.kv.format)
    for seq_id, n in keep.items():
        if seq_id in rebuilt:
            continue
        h = prefix(pieces[seq_id], a, b, n)
        stage.free(seq_id)
        rebuilt[seq_id] = h
        if h:
            stage.kv.allocate(seq_id, n + 256)
            data = assemble(pieces[seq_id], a, b, h)
            stage.kv.import_entries(KVEntries(seq_id, 0, data, stage.kv.format))
    if keep:
        full = sum(1 for s, n in keep.items() if rebuilt[s] == n)
        none = sum(1 for s, n in keep.items() if n and rebuilt[s] == 0)
        log.info("KV for layers [%d, %d): %s carried over, %d partly (the head recomputes their last "
                 "tokens), %d to replay", a, b, counted(full, "sequence"), len(keep) - full - none, none)
    return rebuilt


def usable(pieces: list[LayerKV | None], fmt: KVFormat) -> list[LayerKV]:
    """The pieces a stage of KV format `fmt` can import (another encoding or rope layout: replay)."""
    out = [p for p in pieces if p is not None and p.format == fmt]
    if len(out) < sum(p is not None for p in pieces):
        log.info("KV in another format than this stage's %s ignored (those positions are recomputed)", fmt.name)
    return out


def prefix(pieces: list[LayerKV], a: int, b: int, n: int) -> int:
    """How many positions from 0 (at most n) the pieces hold for every layer in [a, b)."""
    best = {layer: 0 for layer in range(a, b)}
    for p in pieces:
        if p.start != 0:
            continue
        for layer in range(max(a, p.first_layer), min(b, p.end_layer)):
            best[layer] = max(best[layer], min(p.length, n))
    return min(best.values()) if best else 0


async def _fetch_missing(missing, keep, pieces, a, b, sources, fetch: Fetch, spec, context, my_address,
                         fmt: KVFormat) -> None:
    for src in sources:
        lo, hi = max(a, src.start), min(b, src.end)
        if lo >= hi:
            continue
        want = [s for s in missing if prefix(pieces[s], lo, hi, keep[s]) < keep[s]]
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
                    pieces[kv.seq_id].extend(usable([kv], fmt))
            want = [s for s in want if prefix(pieces[s], lo, hi, keep[s]) < keep[s]]
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
