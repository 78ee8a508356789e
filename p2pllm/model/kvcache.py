"""Per-sequence KV cache for the layers one slice owns.

Each sequence gets one buffer [n_layers, 2, n_kv_heads, capacity, head_dim], allocated once when
the sequence arrives (capacity = the longest it may grow) and dropped when it finishes: no
allocation on the decode hot path. Entries of positions [a, b) can be exported and imported, which
is how KV moves between peers (replicas, rebalancing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import P2PError


class KVCacheError(P2PError):
    """A request to the cache that would corrupt a sequence (unknown id, a gap, past capacity)."""


@dataclass(frozen=True)
class KVEntries:
    """KV of positions [start, start + length) of one sequence, all layers of a slice."""

    seq_id: int
    start: int
    data: torch.Tensor  # [n_layers, 2, n_kv_heads, length, head_dim]

    @property
    def length(self) -> int:
        return int(self.data.shape[3])


class KVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_context: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.n_layers = n_layers
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.max_context = max_context
        self.dtype = dtype
        self.device = torch.device(device)
        self._buf: dict[int, torch.Tensor] = {}
        self._len: dict[int, int] = {}

    # ---- lifecycle
    def allocate(self, seq_id: int, capacity: int) -> None:
        """Reserve room for `capacity` positions (clamped to the context)."""
        if seq_id in self._buf:
            raise KVCacheError(f"sequence {seq_id} already has a KV cache")
        capacity = max(1, min(capacity, self.max_context))
        self._buf[seq_id] = torch.zeros(
            (self.n_layers, 2, self.n_kv_heads, capacity, self.head_dim), dtype=self.dtype, device=self.device
        )
        self._len[seq_id] = 0

    def free(self, seq_id: int) -> None:
        self._buf.pop(seq_id, None)
        self._len.pop(seq_id, None)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._buf

    def sequences(self) -> list[int]:
        return list(self._buf)

    def length(self, seq_id: int) -> int:
        return self._len[seq_id]

    def capacity(self, seq_id: int) -> int:
        return int(self._buf[seq_id].shape[3])

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buf.values())

    def reserve(self, seq_id: int, end: int) -> None:
        """Make sure positions up to `end` fit; grows (rarely) by doubling, never past the context."""
        if seq_id not in self._buf:
            raise KVCacheError(f"unknown sequence {seq_id}")
        if end > self.max_context:
            raise KVCacheError(f"sequence {seq_id}: position {end} is past the context of {self.max_context}")
        buf = self._buf[seq_id]
        if end <= buf.shape[3]:
            return
        new_cap = min(self.max_context, max(end, 2 * buf.shape[3]))
        grown = torch.zeros((*buf.shape[:3], new_cap, buf.shape[4]), dtype=buf.dtype, device=buf.device)
        grown[:, :, :, : buf.shape[3]] = buf
        self._buf[seq_id] = grown

    # ---- the hot path
    def update(self, layer: int, seq_id: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [n_kv, L, hd] at positions [start, start+L); return views of [0, start+L)."""
        buf = self._buf[seq_id]
        end = start + k.shape[1]
        buf[layer, 0, :, start:end] = k
        buf[layer, 1, :, start:end] = v
        if layer == self.n_layers - 1:
            self._len[seq_id] = max(self._len[seq_id], end)
        return buf[layer, 0, :, :end], buf[layer, 1, :, :end]

    def truncate(self, seq_id: int, length: int) -> None:
        """Forget positions from `length` on (a replayed step overwrites them)."""
        self._len[seq_id] = min(self._len[seq_id], length)

    # ---- moving KV between peers
    def export(self, seq_id: int, start: int, end: int) -> KVEntries:
        if seq_id not in self._buf:
            raise KVCacheError(f"unknown sequence {seq_id}")
        if not 0 <= start <= end <= self._len[seq_id]:
            raise KVCacheError(f"sequence {seq_id}: cannot export [{start}, {end}) of {self._len[seq_id]} positions")
        return KVEntries(seq_id, start, self._buf[seq_id][:, :, :, start:end].clone())

    def import_entries(self, entries: KVEntries) -> None:
        """Append entries (allocating the sequence if new). Gaps are refused: they would corrupt it."""
        expect = (self.n_layers, 2, self.n_kv_heads, entries.length, self.head_dim)
        if tuple(entries.data.shape) != expect:
            raise KVCacheError(f"KV entries of shape {list(entries.data.shape)}, expected {list(expect)}")
        if entries.seq_id not in self._buf:
            self.allocate(entries.seq_id, entries.start + entries.length)
        have = self._len[entries.seq_id]
        if entries.start > have:
            raise KVCacheError(f"sequence {entries.seq_id}: entries start at {entries.start} but only {have} known")
        end = entries.start + entries.length
        self.reserve(entries.seq_id, end)
        self._buf[entries.seq_id][:, :, :, entries.start:end] = entries.data.to(self.dtype)
        self._len[entries.seq_id] = max(have, end)
