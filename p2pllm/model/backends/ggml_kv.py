"""The GGUF stage's KV cache: one pool of cells shared by every sequence (llama.cpp's design).

Each cell holds one position of one sequence for every layer of the stage: a K row and a V row
of n_kv_heads x head_dim values in the cache's element type (f16 by default, q8_0 or f32). A
sequence owns the cells of its positions 0..length-1, wherever they are in the pool. A step
writes its tokens' K/V into free cells (`place`) and attends through a mask that lets a token
see exactly the cells of its own sequence at positions up to its own (`mask`); ggml's CPU flash
attention skips masked cells, so mixing sequences costs almost nothing. Because the graph sees
only "the first n_kv cells" and a mask, one compiled graph serves every step of the same size.

Memory. The head admits sequences against a KV budget counted in reserved positions (prompt +
max_tokens of every running sequence, scheduler.kv_budget), so the pool is sized by exactly
those reservations (rounded up to WINDOW), never more: it grows (rarely: when sequences reserve
more than it holds) to what they reserve, by reallocating; `generation` changes then, which tells
the stage to rebuild its graphs. Its memory is a private anonymous mapping, which the OS commits page by
page as cells are first written: a reservation that is never used costs address space, not RAM.
Growing copies only the cells below the highest one in use, layer by layer, handing each copied
part of the old mapping back at once, so it never holds both pools; and when sequences end, the
cells above the highest one still in use are handed back (all of them once the pool is idle).
A step never copies the pool: it only writes its tokens' cells.
"""

from __future__ import annotations

import ctypes
import mmap

import numpy as np
import torch

from ..kvcache import KVCacheError, KVEntries, KVFormat, check_entries
from . import ggml_lib as gl

WINDOW = 256  # attention spans the first n_kv cells, n_kv rounded up to this (few distinct graphs)


class CellPool:
    def __init__(self, backend, n_layers: int, kv_dim: int, fmt: KVFormat, max_context: int,
                 initial_cells: int = WINDOW):
        self.backend = backend
        self.n_layers = n_layers
        self.kv_dim = kv_dim
        self.format = fmt
        self.max_context = max_context
        self.type_name = gl.KV_TYPES[fmt.dtype]
        self.row_bytes = gl.row_bytes(self.type_name, kv_dim)
        self.generation = 0
        self._seq_cells: dict[int, list[int]] = {}  # sequence -> cell of each position
        self._reserved: dict[int, int] = {}  # sequence -> positions it asked room for
        self.n_cells = 0
        self._touched = 0  # cells [0, _touched) may have been written since the memory was last handed back
        self._ctx = self._buf = self._mem = self.pool = None
        self._grow(max(WINDOW, _round_up(initial_cells, WINDOW)))

    # ---- memory
    def _grow(self, n_cells: int) -> None:
        """Move to a pool of n_cells (every cell in use must lie below it)."""
        size = n_cells * self.row_bytes * 2 * self.n_layers
        mem = _anonymous(size)
        address = ctypes.addressof(ctypes.c_char.from_buffer(mem))  # (the temporary export ends here)
        ctx = gl.Context(1)
        pool = ctx.tensor(self.type_name, (self.kv_dim, n_cells, 2, self.n_layers))
        buf = gl.Buffer.wrapping(address, size, mem)
        buf.place(pool, address)
        rows = gl.view(pool, np.uint8, (self.n_layers, 2, n_cells, self.row_bytes))
        cell_seq = np.full(n_cells, -1, dtype=np.int64)
        cell_pos = np.zeros(n_cells, dtype=np.int64)
        if self.pool is not None:
            keep = self._top()
            if keep > n_cells:
                raise KVCacheError(f"cannot shrink the KV pool to {n_cells} cells: cell {keep - 1} is in use")
            seg = self.n_cells * self.row_bytes
            for layer in range(self.n_layers):  # one (layer, K|V) row block at a time, then its old copy goes
                for kind in range(2):
                    rows[layer, kind, :keep] = self.rows[layer, kind, :keep]
                    _release(self._mem, 0, (layer * 2 + kind + 1) * seg)
            cell_seq[:keep], cell_pos[:keep] = self.cell_seq[:keep], self.cell_pos[:keep]
            self.close()
            self._touched = keep
        self._ctx, self._buf, self._mem, self.pool, self.rows = ctx, buf, mem, pool, rows
        self.cell_seq, self.cell_pos = cell_seq, cell_pos
        self.n_cells = n_cells
        self.generation += 1

    def _need(self, extra: int = 0) -> int:
        """Cells every reservation may fill (and `extra` more cells right now)."""
        need = sum(max(r, len(self._seq_cells.get(s, ()))) for s, r in self._reserved.items())
        return max(need, int((self.cell_seq >= 0).sum()) + extra)

    def _ensure(self, extra: int = 0) -> None:
        """Room for every reservation (and `extra` more cells right now): exactly that, no more,
        since admission counts reservations against the memory the stages have."""
        need = self._need(extra)
        if need > self.n_cells:
            self._grow(_round_up(need, WINDOW))

    def _top(self) -> int:
        """One past the highest cell in use (0: none)."""
        used = np.flatnonzero(self.cell_seq >= 0)
        return int(used[-1]) + 1 if used.size else 0

    def _trim(self) -> None:
        """Hand back the memory of the cells above the highest one in use, once that is at least
        half of what was written (every bit of it when the pool is idle); cheap: no copy."""
        keep = _round_up(self._top(), WINDOW)
        if self._touched <= WINDOW or keep > self._touched // 2:
            return
        seg = self.n_cells * self.row_bytes
        for block in range(self.n_layers * 2):
            _release(self._mem, block * seg + keep * self.row_bytes, block * seg + self._touched * self.row_bytes)
        self._touched = keep

    def nbytes(self) -> int:
        """Bytes the pool may hold in memory: the cells written since its memory was last handed
        back (at most capacity_bytes(), which reservations bound)."""
        return min(self._touched, self.n_cells) * self.row_bytes * 2 * self.n_layers

    def capacity_bytes(self) -> int:
        """Bytes of the pool's cells (address space: the cells written are what memory holds)."""
        return self.n_cells * self.row_bytes * 2 * self.n_layers

    def close(self) -> None:
        if self._buf is not None:
            self.rows = None  # (views of the mapping must go before it)
            self._buf.free()
            self._ctx.free()
            self._mem.close()
            self._buf = self._ctx = self._mem = self.pool = None
            self._touched = 0

    # ---- sequences
    def allocate(self, seq_id: int, capacity: int) -> None:
        if seq_id in self._seq_cells:
            raise KVCacheError(f"sequence {seq_id} already has a KV cache")
        self._seq_cells[seq_id] = []
        self._reserved[seq_id] = max(1, min(capacity, self.max_context))
        self._ensure()

    def free(self, seq_id: int) -> None:
        cells = self._seq_cells.pop(seq_id, None)
        self._reserved.pop(seq_id, None)
        if cells:
            self.cell_seq[cells] = -1
            self._trim()

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._seq_cells

    def sequences(self) -> list[int]:
        return list(self._seq_cells)

    def length(self, seq_id: int) -> int:
        return len(self._seq_cells[seq_id])

    def truncate(self, seq_id: int, length: int) -> None:
        """Forget positions from `length` on: their cells go back to the pool."""
        cells = self._seq_cells[seq_id]
        if length < len(cells):
            self.cell_seq[cells[length:]] = -1
            del cells[length:]

    # ---- a step
    def place(self, seq_ids: list[int], starts: list[int], lengths: list[int]) -> np.ndarray:
        """Cells for every token of a micro-batch (chunk after chunk); each chunk continues its sequence."""
        total = sum(lengths)
        free = np.flatnonzero(self.cell_seq < 0)
        if free.size < total:  # the pool grows only when a step would not fit (reservations grow it at allocate)
            self._ensure(total)
            free = np.flatnonzero(self.cell_seq < 0)
        free = free[:total]
        if total:
            self._touched = max(self._touched, int(free[-1]) + 1)  # (free is sorted)
        at = 0
        for seq_id, start, n in zip(seq_ids, starts, lengths):
            cells = self._seq_cells[seq_id]
            if start != len(cells):
                raise KVCacheError(f"sequence {seq_id}: a chunk at {start} after {len(cells)} cached positions")
            if start + n > self.max_context:
                raise KVCacheError(f"sequence {seq_id}: position {start + n} is past the context of {self.max_context}")
            new = free[at:at + n]
            self.cell_seq[new] = seq_id
            self.cell_pos[new] = np.arange(start, start + n)
            cells.extend(new.tolist())
            at += n
        return free

    def window(self) -> int:
        """n_kv: the cells attention spans this step (every used cell lies below it)."""
        used = np.flatnonzero(self.cell_seq >= 0)
        top = int(used[-1]) + 1 if used.size else 1
        return min(self.n_cells, _round_up(top, WINDOW))

    def fill_mask(self, out: np.ndarray, tok_seq: np.ndarray, tok_pos: np.ndarray) -> None:
        """out [T, n_kv] f16: 0 where token t may attend to cell c, -inf elsewhere."""
        n_kv = out.shape[1]
        visible = (self.cell_seq[None, :n_kv] == tok_seq[:, None]) & (self.cell_pos[None, :n_kv] <= tok_pos[:, None])
        out[:] = np.where(visible, np.float16(0), np.float16(-np.inf))

    def layer_view(self, g, ctx, layer: int, kind: int):
        """The K (kind 0) or V (kind 1) rows of one layer: [kv_dim, n_cells]."""
        offset = (layer * 2 + kind) * self.n_cells * self.row_bytes
        return g.ggml_view_2d(ctx, self.pool, self.kv_dim, self.n_cells, self.row_bytes, offset)

    # ---- moving KV between peers
    def export(self, seq_id: int, start: int, end: int) -> KVEntries:
        if seq_id not in self._seq_cells:
            raise KVCacheError(f"unknown sequence {seq_id}")
        cells = self._seq_cells[seq_id]
        if not 0 <= start <= end <= len(cells):
            raise KVCacheError(f"sequence {seq_id}: cannot export [{start}, {end}) of {len(cells)} positions")
        data = self.rows[:, :, cells[start:end]]  # fancy indexing: a copy
        return KVEntries(seq_id, start, torch.from_numpy(data), self.format)

    def import_entries(self, entries: KVEntries) -> None:
        """Write entries (allocating the sequence if new). Gaps are refused: they would corrupt it."""
        check_entries(entries, self.format, self.n_layers, self.kv_dim)
        seq_id, start, n = entries.seq_id, entries.start, entries.length
        if seq_id not in self._seq_cells:
            self.allocate(seq_id, start + n)
        have = len(self._seq_cells[seq_id])
        if start > have:
            raise KVCacheError(f"sequence {seq_id}: entries start at {start} but only {have} known")
        held = min(n, have - start)  # positions already held are overwritten in place, the rest get cells
        if held < n:
            self.place([seq_id], [have], [n - held])
        cells = self._seq_cells[seq_id][start:start + n]
        self.rows[:, :, cells] = entries.data.numpy()


def _anonymous(size: int) -> mmap.mmap:
    """Zero-filled memory the OS commits page by page as it is written. Private: a page handed back
    (`_release`) is freed. Python's default for an anonymous map is a shared one, whose pages live
    on in the kernel's shared memory (charged to the process's cgroup) after MADV_DONTNEED and read
    back their old bytes: the pool would never give its memory back."""
    if hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS"):
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return mmap.mmap(-1, size)  # (Windows: no flags; _release cannot hand pages back there)


def _release(mem: mmap.mmap, start: int, end: int) -> None:
    """Give the pages wholly inside [start, end) of an anonymous mapping back to the OS; they read
    as zeros after (where the platform cannot, they stay until the mapping is closed)."""
    page = mmap.PAGESIZE
    start, end = _round_up(start, page), end // page * page
    if end > start and hasattr(mem, "madvise"):
        mem.madvise(mmap.MADV_DONTNEED, start, end - start)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k
