"""KV replicas and moving KV when the plan changes.

Each stage streams the KV entries it adds at every step to its ring successor (riding on its
next frame there: RingStage._hold), which keeps them in host memory (ReplicaStore), as raw rows
in the stage's KV format (f16, q8_0 or f32; see model/kvcache.py): a q8_0 cache replicates at
about half the bytes of f16. A sequence's first delta in an epoch carries its KV from position 0
(RingStage._deltas), so KV no step computed there (a copy of the prefix cache or of another
choice's prompt, KV rebuilt at a plan change) reaches the replica too; the holder keeps only
replicas complete from position 0. When the plan changes, a stage taking layers [a, b) rebuilds
the KV of every carried-over sequence from, in order: its own previous cache, the replicas it
holds, and the previous owner of those layers (or that owner's replica holder) over FetchKV. What
cannot be rebuilt is recomputed by the head: the last step where a replica lags one step, the
whole history (a replay, a prefill) where none is left.
"""

from __future__ import annotations

import logging

import torch

from ..model.backends import KVStore
from ..model.spec import ModelSpec
from ..proto import p2pllm_pb2 as pb
from ..transport import frames
from .frames import LayerKV

log = logging.getLogger(__name__)


class ReplicaStore:
    """The KV replicas this peer holds for its ring predecessor, by (epoch, first layer, layer count).

    Deltas are kept as they arrived (raw bytes, headers checked) and decoded — dtype, shape and
    size checked — only when a plan change needs them: replication stays off the hot path.
    """

    def __init__(self, spec: ModelSpec, context: int):
        self.spec = spec
        self.context = context
        # (epoch, first layer, n layers) -> sequence -> [(start, usable length, delta)], contiguous from 0
        self._held: dict[tuple[int, int, int], dict[int, list[tuple[int, int, pb.KVDelta]]]] = {}
        self._bytes = 0

    def add(self, delta: pb.KVDelta) -> None:
        shape = list(delta.data.shape)
        if len(shape) != 4 or shape[0] < 1 or shape[2] < 1:
            raise frames.FrameError(f"KV delta of shape {shape}")
        n, length = int(shape[0]), int(shape[2])
        if delta.first_layer + n > self.spec.n_layers or delta.start + length > self.context:
            raise frames.FrameError("KV delta outside the model's layers or context")
        seqs = self._held.setdefault((delta.epoch, delta.first_layer, n), {})
        chunks = seqs.get(delta.seq_id)
        if chunks is None:
            if delta.start != 0:  # the beginning is missing: useless as a replica
                log.debug("replica of sequence %d starts at position %d; dropped", delta.seq_id, delta.start)
                return
            chunks = seqs[delta.seq_id] = []
        held = sum(c[1] for c in chunks)
        if delta.start > held:
            log.debug("replica of sequence %d has a gap; dropped", delta.seq_id)
            self._drop(seqs, delta.seq_id)
            return
        while chunks and chunks[-1][0] >= delta.start:  # a replayed step overwrites what follows
            self._bytes -= chunks.pop()[2].data.ByteSize()
        if chunks and chunks[-1][0] + chunks[-1][1] > delta.start:
            first, _, d = chunks[-1]
            chunks[-1] = (first, delta.start - first, d)
        chunks.append((delta.start, length, delta))
        self._bytes += delta.data.ByteSize()

    def pieces(self, seq_id: int, a: int, b: int, positions: int, at_most: bool = False) -> list[LayerKV]:
        """What is held of layers [a, b), positions [0, positions), of a sequence."""
        out = []
        for (_, first, n), seqs in self._held.items():
            lo, hi = max(a, first), min(b, first + n)
            chunks = seqs.get(seq_id)
            if lo >= hi or not chunks:
                continue
            held = sum(c[1] for c in chunks)
            if held < positions and not at_most:
                continue
            try:
                decoded = [frames.decode_kv(d, self.spec, self.context) for _, _, d in chunks]
            except frames.FrameError as e:
                log.warning("replica of sequence %d is corrupt: %s", seq_id, e)
                continue
            if len({kv.format for kv in decoded}) != 1:
                log.warning("replica of sequence %d mixes KV formats; dropped", seq_id)
                continue
            data = torch.cat([kv.data[:, :, :usable] for kv, (_, usable, _) in zip(decoded, chunks)], dim=2)
            out.append(LayerKV(seq_id, first, 0, data[:, :, :positions], decoded[0].format).layers(lo, hi))
        return out

    def free(self, seq_id: int) -> None:
        for seqs in self._held.values():
            self._drop(seqs, seq_id)

    def keep_from(self, epoch: int) -> None:
        """Drop the replicas of epochs before `epoch` (this peer committed it: the old ones' owners
        have moved on). Deltas of `epoch` that arrived before this peer committed it are kept: its
        predecessor may commit and step first, and its first delta of a sequence, from position 0,
        is the only one the replica can begin with."""
        for key in [k for k in self._held if k[0] < epoch]:
            for seq_id in list(self._held[key]):
                self._drop(self._held[key], seq_id)
            del self._held[key]

    def nbytes(self) -> int:
        return self._bytes

    def _drop(self, seqs: dict, seq_id: int) -> None:
        for _, _, d in seqs.pop(seq_id, []):
            self._bytes -= d.data.ByteSize()


def exported(cache: KVStore, first_layer: int, seq_id: int, a: int, b: int) -> LayerKV:
    """Positions [a, b) of a sequence from a stage's KV store whose first layer is `first_layer`."""
    entries = cache.export(seq_id, a, b)
    return LayerKV(seq_id, first_layer, a, entries.data, entries.format)


def from_cache(cache: KVStore, first_layer: int, seq_id: int, a: int, b: int, positions: int,
               at_most: bool = False) -> LayerKV | None:
    """Layers [a, b), positions [0, positions), of a stage cache that starts at `first_layer`.

    None where it does not hold that many positions; with `at_most`, as many as it holds.
    """
    if seq_id not in cache:
        return None
    if cache.length(seq_id) < positions:
        if not at_most or cache.length(seq_id) == 0:
            return None
        positions = cache.length(seq_id)
    lo, hi = max(a, first_layer), min(b, first_layer + cache.n_layers)
    if lo >= hi:
        return None
    return exported(cache, first_layer, seq_id, 0, positions).layers(lo, hi)


def assemble(pieces: list[LayerKV], a: int, b: int, positions: int) -> torch.Tensor | None:
    """Stack pieces (of one format) into layers [a, b) x positions [0, positions), or None if any
    layer is missing."""
    by_layer: dict[int, torch.Tensor] = {}
    for p in pieces:
        if p.start != 0 or p.length < positions:
            continue
        for layer in range(max(a, p.first_layer), min(b, p.end_layer)):
            by_layer.setdefault(layer, p.data[layer - p.first_layer, :, :positions])
    if any(layer not in by_layer for layer in range(a, b)):
        return None
    return torch.stack([by_layer[layer] for layer in range(a, b)])
