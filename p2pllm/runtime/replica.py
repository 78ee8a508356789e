"""KV replicas and moving KV when the plan changes.

Each stage streams the KV entries it adds at every step to its ring successor, which keeps them
in host memory (ReplicaStore). When the plan changes, a stage taking layers [a, b) rebuilds the
KV of every carried-over sequence from, in order: its own previous cache, the replicas it holds,
and the previous owner of those layers (or that owner's replica holder) over FetchKV. A sequence
whose KV cannot be rebuilt completely is replayed by the head instead (a prefill).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..model.kvcache import KVCache, KVEntries
from ..model.spec import ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerKV:
    """KV of layers [first_layer, first_layer + n) of one sequence, positions [start, start + length)."""

    seq_id: int
    first_layer: int
    start: int
    data: torch.Tensor  # [n_layers, 2, n_kv_heads, length, head_dim]

    @property
    def end_layer(self) -> int:
        return self.first_layer + int(self.data.shape[0])

    @property
    def length(self) -> int:
        return int(self.data.shape[3])

    def layers(self, a: int, b: int) -> "LayerKV":
        return LayerKV(self.seq_id, a, self.start, self.data[a - self.first_layer: b - self.first_layer])

    def positions(self, n: int) -> "LayerKV":
        return LayerKV(self.seq_id, self.first_layer, self.start, self.data[:, :, :, :n])


class ReplicaStore:
    """The KV replicas this peer holds for its ring predecessor, by (first layer, layer count)."""

    def __init__(self, spec: ModelSpec, context: int):
        self.spec = spec
        self.context = context
        self._caches: dict[tuple[int, int], KVCache] = {}

    def add(self, kv: LayerKV) -> None:
        key = (kv.first_layer, int(kv.data.shape[0]))
        cache = self._caches.get(key)
        if cache is None:
            cache = self._caches[key] = KVCache(key[1], self.spec.n_kv_heads, self.spec.head_dim, self.context,
                                                kv.data.dtype)
        if kv.seq_id in cache:
            if kv.start > cache.length(kv.seq_id):
                log.debug("replica of sequence %d has a gap; dropped", kv.seq_id)
                cache.free(kv.seq_id)
                return
            cache.truncate(kv.seq_id, kv.start)  # a replayed step overwrites what follows
        elif kv.start != 0:
            return  # the beginning is missing: useless as a replica
        cache.import_entries(KVEntries(kv.seq_id, kv.start, kv.data))

    def pieces(self, seq_id: int, a: int, b: int, positions: int, at_most: bool = False) -> list[LayerKV]:
        """What is held of layers [a, b), positions [0, positions), of a sequence."""
        found = (from_cache(cache, first, seq_id, a, b, positions, at_most) for (first, _), cache in self._caches.items())
        return [kv for kv in found if kv is not None]

    def free(self, seq_id: int) -> None:
        for cache in self._caches.values():
            cache.free(seq_id)

    def retain(self, seq_ids: set[int]) -> None:
        for cache in self._caches.values():
            for s in cache.sequences():
                if s not in seq_ids:
                    cache.free(s)

    def clear(self) -> None:
        self._caches.clear()

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self._caches.values())


def from_cache(cache: KVCache, first_layer: int, seq_id: int, a: int, b: int, positions: int,
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
    data = cache.export(seq_id, 0, positions).data
    return LayerKV(seq_id, first_layer, 0, data).layers(lo, hi)


def assemble(pieces: list[LayerKV], a: int, b: int, positions: int) -> torch.Tensor | None:
    """Stack pieces into layers [a, b) x positions [0, positions), or None if any layer is missing."""
    by_layer: dict[int, torch.Tensor] = {}
    for p in pieces:
        if p.start != 0 or p.length < positions:
            continue
        for layer in range(max(a, p.first_layer), min(b, p.end_layer)):
            by_layer.setdefault(layer, p.data[layer - p.first_layer, :, :, :positions])
    if any(layer not in by_layer for layer in range(a, b)):
        return None
    return torch.stack([by_layer[layer] for layer in range(a, b)])
