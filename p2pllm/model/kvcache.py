"""KV cache: the formats KV travels in, and the torch backend's per-sequence cache.

Both stage backends keep KV in their own memory layout but export and import it in one form,
`KVEntries`: raw rows, one per position, [n_layers, 2 (k, v), length, row_bytes], in the store's
`KVFormat` (element type and rope layout). That is what replicas, FetchKV and failover move
between peers; a receiver whose format differs refuses the entries (the head then replays).

The torch cache gives each sequence one buffer [n_layers, 2, n_kv_heads, capacity, head_dim],
allocated once when the sequence arrives (capacity = the longest it may grow) and dropped when it
finishes: no allocation on the decode hot path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import P2PError
from .kv_dtypes import KV_DTYPES, check_kv_dtype, kv_bytes_per_value, kv_row_bytes  # noqa: F401  (re-exported)

_TORCH_KV = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
ROPE_LAYOUTS = ("half", "pairs")  # rotate-half (HF, ggml NEOX) | adjacent pairs (ggml "normal", GGUF llama)


class KVCacheError(P2PError):
    """A request to the cache that would corrupt a sequence (unknown id, a gap, past capacity)."""


@dataclass(frozen=True)
class KVFormat:
    """How a store encodes KV rows: element type and the rope layout of K's rows."""

    dtype: str
    rope: str = "half"

    def __post_init__(self):
        if self.dtype not in KV_DTYPES or self.rope not in ROPE_LAYOUTS:
            raise KVCacheError(f"unknown KV format {self.dtype}/{self.rope}")

    @property
    def name(self) -> str:
        return f"{self.dtype}/{self.rope}"

    @classmethod
    def parse(cls, text: str) -> "KVFormat":
        dtype, _, rope = str(text).partition("/")
        return cls(dtype, rope or "half")

    def row_bytes(self, kv_dim: int) -> int:
        return kv_row_bytes(self.dtype, kv_dim)


@dataclass(frozen=True)
class KVEntries:
    """KV of positions [start, start + length) of one sequence, all layers of a store."""

    seq_id: int
    start: int
    data: torch.Tensor  # uint8 [n_layers, 2, length, row_bytes]
    format: KVFormat

    @property
    def length(self) -> int:
        return int(self.data.shape[2])


class KVCache:
    """The torch backend's cache: one preallocated buffer per sequence."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_context: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.n_layers = n_layers
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.max_context = max_context
        self.dtype = dtype
        self.device = torch.device(device)
        self.format = KVFormat({v: k for k, v in _TORCH_KV.items()}[dtype], "half")
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
        rows = self._buf[seq_id][:, :, :, start:end].permute(0, 1, 3, 2, 4).to("cpu").contiguous()
        data = rows.view(torch.uint8).reshape(self.n_layers, 2, end - start, -1)
        return KVEntries(seq_id, start, data, self.format)

    def import_entries(self, entries: KVEntries) -> None:
        """Write entries (allocating the sequence if new). Gaps are refused: they would corrupt it."""
        check_entries(entries, self.format, self.n_layers, self.n_kv_heads * self.head_dim)
        if entries.seq_id not in self._buf:
            self.allocate(entries.seq_id, entries.start + entries.length)
        have = self._len[entries.seq_id]
        if entries.start > have:
            raise KVCacheError(f"sequence {entries.seq_id}: entries start at {entries.start} but only {have} known")
        end = entries.start + entries.length
        self.reserve(entries.seq_id, end)
        rows = entries.data.contiguous().view(self.dtype).reshape(
            self.n_layers, 2, entries.length, self.n_kv_heads, self.head_dim)
        self._buf[entries.seq_id][:, :, :, entries.start:end] = rows.permute(0, 1, 3, 2, 4).to(self.device)
        self._len[entries.seq_id] = max(have, end)


def check_entries(entries: KVEntries, fmt: KVFormat, n_layers: int, kv_dim: int) -> None:
    """Entries must be in this store's format and shape, exactly."""
    if entries.format != fmt:
        raise KVCacheError(f"KV entries in format {entries.format.name}, this cache holds {fmt.name}")
    expect = (n_layers, 2, entries.length, fmt.row_bytes(kv_dim))
    if entries.data.dtype != torch.uint8 or tuple(entries.data.shape) != expect:
        raise KVCacheError(f"KV entries of shape {list(entries.data.shape)}, expected {list(expect)}")
