"""A GGUF stage computed by ggml on the file's own encodings (a Q4_K tensor stays Q4_K).

Weights: the file is memory-mapped and each tensor of the stage's layer range is handed to ggml
where it lies in the map; only those pages are read (prefaulted at load, with progress), so a
stage holds its share of the file and nothing else. `ggml_mul_mat` picks the SIMD kernel for
each encoding, exactly as llama.cpp does.

A step is one ggml graph over all tokens of a micro-batch (llama.cpp's `llm_build_llama`, layer
range [start, end) instead of all layers): norm, q/k/v on the quantized weights, rope as the file
expects it, K/V written into the cell pool (ggml_kv.py), flash attention through a mask, output
projection, SwiGLU FFN. Building a graph costs milliseconds in Python, so graphs are kept per
(tokens, attention window, outputs) and reused: a decode step only writes its inputs and computes.
All graphs share one compute buffer (ggml's graph allocator), sized by the largest step.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import weakref
from collections import OrderedDict
from typing import Callable

import numpy as np
import torch

from ...errors import ModelFileError, UsageError
from ..batch import BatchMeta, LastOutputs
from ..kvcache import KVFormat
from ..loader import StoredTensor, stored_slice
from ..spec import ModelSpec
from . import ggml_lib as gl
from .ggml_kv import CellPool

log = logging.getLogger(__name__)

MAX_GRAPHS = 8  # graphs kept for reuse (descriptions only: they share one compute buffer)
_PAGE = mmap.PAGESIZE


class GGMLStage:
    name = "ggml"

    def __init__(self, path: str | os.PathLike, start: int, end: int, *, spec: ModelSpec | None = None,
                 kv_dtype: str = "f16", max_context: int | None = None, threads: int | None = None,
                 progress: Callable[[int, int], None] | None = None):
        self.g = g = gl.ggml()
        self.spec, stored = stored_slice(path, start, end, spec=spec)
        spec = self.spec
        self.start, self.end = start, end
        self.is_first, self.is_last = start == 0, end == spec.n_layers
        self.device = torch.device("cpu")
        self.activation_dtype = torch.float32
        self.context = min(max_context or spec.context, spec.context)
        self.threads = threads or os.cpu_count() or 1
        self._res = _Resources()  # everything ggml owns, freed once (close() or garbage collection)
        self._finalizer = weakref.finalize(self, self._res.free)
        self.backend = gl.cpu_backend(self.threads)
        self._res.backends.append(self.backend)
        self.w = self._map_weights(path, stored, progress)
        self.rope_mode = g.GGML_ROPE_TYPE_NEOX if spec.arch == "qwen2" else g.GGML_ROPE_TYPE_NORMAL
        fmt = KVFormat(kv_dtype, "half" if self.rope_mode == g.GGML_ROPE_TYPE_NEOX else "pairs")
        self.kv = CellPool(self.backend, end - start, spec.n_kv_heads * spec.head_dim, fmt, self.context)
        self._res.pools.append(self.kv)
        self._graphs: OrderedDict[tuple, _Graph] = self._res.graphs
        self._alloc = g.ggml_gallocr_new(g.ggml_backend_cpu_buffer_type())
        self._res.allocators.append(self._alloc)
        self._allocated: _Graph | None = None  # the graph whose tensors the compute buffer holds now

    @property
    def n_layers(self) -> int:
        return self.end - self.start

    # ------------------------------------------------------------------ weights
    def _map_weights(self, path, stored: list[StoredTensor], progress) -> dict:
        """ggml tensors over the file map, pages prefaulted. Copied instead: matrices ggml repacks
        for its SIMD kernels (as llama.cpp does), misaligned tensors, and non-f32 vectors."""
        for t in stored:
            if t.info.dtype not in gl.COMPUTE_TYPES:
                raise ModelFileError(path, f"tensor {t.info.name} is {t.info.dtype}, which the ggml backend cannot "
                                           f"compute with (supported: {', '.join(gl.COMPUTE_TYPES)})")
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._res.maps.append(mm)
        file = np.frombuffer(mm, dtype=np.uint8)
        unique = {t.info.name: t.info for t in stored}
        looked_up = {t.info.name for t in stored if t.key == "embed"}  # get_rows reads it: never repacked
        to_f32 = {n for n, i in unique.items() if len(i.shape) == 1 and i.dtype != "F32"}
        repacked = {n for n, i in unique.items()
                    if len(i.shape) == 2 and n not in looked_up and gl.repacks(i.dtype, i.shape[0])}
        copied = to_f32 | {n for n, i in unique.items() if i.offset % gl.TENSOR_ALIGNMENT and n not in repacked}
        tensors = self._place(file, unique, to_f32, copied, repacked)
        total, done = sum(i.nbytes for i in unique.values()), 0
        with open(path, "rb", buffering=0) as f:
            for name, info in unique.items():
                if name in repacked:  # read, not mapped: the page cache keeps the file, we keep the repacked copy
                    data = np.empty(info.nbytes, dtype=np.uint8)
                    f.seek(info.offset)
                    f.readinto(memoryview(data))
                    self.g.ggml_backend_tensor_set(tensors[name], data.ctypes.data, 0, info.nbytes)
                elif name in copied:
                    data = _dequantize(path, file, info) if name in to_f32 else file[info.offset:info.offset + info.nbytes]
                    gl.view(tensors[name], np.uint8, (data.nbytes,))[:] = data.view(np.uint8).ravel()
                else:
                    _prefault(mm, file, info.offset, info.nbytes)
                done += info.nbytes
                if progress is not None:
                    progress(done, total)
        self.weight_bytes = total
        self.repacked = len(repacked)
        return {t.key: tensors[t.info.name] for t in stored}

    def _place(self, file: np.ndarray, unique: dict, to_f32: set, copied: set, repacked: set) -> dict:
        """A ggml tensor per file tensor, given its memory: the map where it lies, or a buffer of
        our own (copied; f32 for vectors stored otherwise), or ggml's repacking buffer."""
        in_map, own, packed = gl.Context(len(unique) + 1), gl.Context(len(copied) + 1), gl.Context(len(repacked) + 1)
        self._res.contexts += [in_map, own, packed]
        tensors = {}
        for name, info in unique.items():
            ctx = packed if name in repacked else own if name in copied else in_map
            tensors[name] = ctx.tensor("F32" if name in to_f32 else info.dtype, tuple(reversed(info.shape)))
        mapped = gl.Buffer.wrapping(file.ctypes.data, file.size, owner=file)
        self._res.buffers.append(mapped)
        for name, info in unique.items():
            if name not in copied and name not in repacked:
                mapped.place(tensors[name], file.ctypes.data + info.offset)
        if copied:
            self._res.buffers.append(gl.Buffer.for_context(own, self.backend))
        if repacked:
            self._res.buffers.append(gl.Buffer.for_context_in(packed, gl.repack_buffer_type()))
        return tensors

    # ------------------------------------------------------------------ a step
    def forward(self, x: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
        """x: token ids [T] on the first stage, hidden states [T, hidden] otherwise.

        Returns hidden states [T, hidden], or on the last stage logits [n_out, vocab] for the rows
        meta.last_rows asks for."""
        out = self._step(x, meta)
        return out.logits if self.is_last else out

    def forward_last(self, x: torch.Tensor, meta: BatchMeta) -> LastOutputs:
        """The last stage's outputs: logits for meta.last_rows and final-normed hidden states for
        meta.normed_rows (embeddings; the output head never runs on them)."""
        if not self.is_last:
            raise ValueError("forward_last runs on the last stage only")
        return self._step(x, meta)

    def _step(self, x: torch.Tensor, meta: BatchMeta) -> torch.Tensor | LastOutputs:
        chunks = meta.chunks
        cells = self.kv.place([c.seq_id for c in chunks], [c.start for c in chunks], [c.length for c in chunks])
        try:
            return self._compute(x, meta, cells)
        except BaseException:  # nothing was written: the sequences end where they did
            for c in chunks:
                self.kv.truncate(c.seq_id, c.start)
            raise

    def _compute(self, x: torch.Tensor, meta: BatchMeta, cells: np.ndarray) -> torch.Tensor | LastOutputs:
        chunks = meta.chunks
        T = meta.n_tokens
        n_logits = int(meta.last_rows.shape[0]) if self.is_last else 0
        n_normed = int(meta.normed_rows.shape[0]) if self.is_last else 0
        graph = self._graph(T, self.kv.window(), n_logits, n_normed)
        if self._allocated is not graph:  # another shape than the last step: lay it out in the shared buffer
            graph.unplace()
            if not self.g.ggml_gallocr_alloc_graph(self._alloc, graph.gf):
                raise MemoryError(f"ggml could not allocate the compute buffer of a {T}-token step")
            graph.bind()
            self._allocated = graph
        pos = meta.positions.numpy()
        tok_seq = np.repeat(np.array([c.seq_id for c in chunks], dtype=np.int64), [c.length for c in chunks])
        if self.is_first:
            graph.tokens[:] = x.numpy()
        else:
            graph.hidden[:] = x.to(torch.float32).numpy()
        graph.pos[:] = pos
        graph.cells[:] = cells
        self.kv.fill_mask(graph.mask, tok_seq, pos)
        if self.is_last:
            graph.out_rows[:n_logits] = meta.last_rows.numpy()
            graph.out_rows[n_logits:] = meta.normed_rows.numpy()
        self.g.ggml_backend_graph_compute(self.backend, graph.gf)
        if not self.is_last:
            return torch.from_numpy(graph.output.copy())
        logits = torch.from_numpy(graph.logits.copy()) if n_logits else torch.empty(0, self.spec.vocab)
        normed = torch.from_numpy(graph.normed.copy()) if n_normed else torch.empty(0, self.spec.hidden)
        return LastOutputs(logits, normed)

    def _graph(self, n_tokens: int, n_kv: int, n_logits: int, n_normed: int) -> "_Graph":
        key = (n_tokens, n_kv, n_logits, n_normed, self.kv.generation)
        graph = self._graphs.get(key)
        if graph is None:
            graph = _Graph(self, n_tokens, n_kv, n_logits, n_normed)
            self._graphs[key] = graph
            while len(self._graphs) > MAX_GRAPHS or any(k[-1] != self.kv.generation for k in self._graphs):
                _, old = self._graphs.popitem(last=False)
                if old is self._allocated:
                    self._allocated = None
                old.free()
        else:
            self._graphs.move_to_end(key)
        return graph

    def compute_buffer_bytes(self) -> int:
        return int(self.g.ggml_gallocr_get_buffer_size(self._alloc, 0))

    def close(self) -> None:
        self._finalizer()


class _Graph:
    """One step's ggml graph and its inputs; laid out in the stage's compute buffer before it runs."""

    def __init__(self, st: GGMLStage, T: int, n_kv: int, n_logits: int, n_normed: int):
        g, spec, w = st.g, st.spec, st.w
        n_out = n_logits + n_normed  # rows the last stage keeps: logits rows first, then normed rows
        nodes = 40 * st.n_layers + 64
        self.ctx = ctx = gl.Context(nodes, nodes)
        c = ctx.ptr
        hd, nh, nkv = spec.head_dim, spec.n_heads, spec.n_kv_heads
        eps = spec.norm_eps
        f32, i32, i64 = "F32", "I32", "I64"
        inp = ctx.tensor(i32, (T,)) if st.is_first else ctx.tensor(f32, (spec.hidden, T))
        pos, cells, mask = ctx.tensor(i32, (T,)), ctx.tensor(i64, (T,)), ctx.tensor("F16", (n_kv, T))
        out_rows = ctx.tensor(i32, (n_out,)) if st.is_last else None
        for t in (inp, pos, cells, mask, *([out_rows] if out_rows is not None else [])):
            g.ggml_set_input(t)
        x = g.ggml_get_rows(c, w["embed"], inp) if st.is_first else inp
        freq_base, freq_scale = spec.rope_theta, _freq_scale(spec)
        factors = w.get("rope_freqs")
        kv_rb, head_rb = st.kv.row_bytes, gl.row_bytes(st.kv.type_name, hd)
        scale = 1.0 / math.sqrt(hd)

        def rope(t, heads):
            return g.ggml_rope_ext(c, g.ggml_reshape_3d(c, t, hd, heads, T), pos, factors, hd, st.rope_mode,
                                   spec.context, freq_base, freq_scale, 0.0, 1.0, 32.0, 1.0)

        def linear(key, t, bias=None):
            y = g.ggml_mul_mat(c, w[key], t)
            return g.ggml_add(c, y, w[bias]) if bias and bias in w else y

        for il in range(st.n_layers):
            p = f"layers.{st.start + il}."
            h = g.ggml_mul(c, g.ggml_rms_norm(c, x, eps), w[p + "attn_norm"])
            q = rope(linear(p + "wq", h, p + "bq"), nh)
            k = rope(linear(p + "wk", h, p + "bk"), nkv)
            v = linear(p + "wv", h, p + "bv")
            k_all = g.ggml_set_rows(c, st.kv.layer_view(g, c, il, 0), g.ggml_reshape_2d(c, k, nkv * hd, T), cells)
            v_all = g.ggml_set_rows(c, st.kv.layer_view(g, c, il, 1), g.ggml_reshape_2d(c, v, nkv * hd, T), cells)
            k_win = g.ggml_view_3d(c, k_all, hd, n_kv, nkv, kv_rb, head_rb, 0)
            v_win = g.ggml_view_3d(c, v_all, hd, n_kv, nkv, kv_rb, head_rb, 0)
            o = g.ggml_flash_attn_ext(c, g.ggml_permute(c, q, 0, 2, 1, 3), k_win, v_win, mask, scale, 0.0, 0.0)
            attn = g.ggml_mul_mat(c, w[p + "wo"], g.ggml_reshape_2d(c, o, hd * nh, T))
            if st.is_last and il == st.n_layers - 1:  # only the rows anyone samples go on (llama.cpp's inp_out_ids)
                attn, x = g.ggml_get_rows(c, attn, out_rows), g.ggml_get_rows(c, x, out_rows)
            x = g.ggml_add(c, x, attn)
            h = g.ggml_mul(c, g.ggml_rms_norm(c, x, eps), w[p + "ffn_norm"])
            ffn = g.ggml_swiglu_split(c, g.ggml_mul_mat(c, w[p + "w_gate"], h), g.ggml_mul_mat(c, w[p + "w_up"], h))
            x = g.ggml_add(c, x, g.ggml_mul_mat(c, w[p + "w_down"], ffn))
        normed = logits = None
        if st.is_last:
            x = normed = g.ggml_mul(c, g.ggml_rms_norm(c, x, eps), w["norm"])
            if n_logits:  # the output head runs on the logits rows only (embedding rows skip it)
                rows = normed
                if n_normed:
                    rows = g.ggml_view_2d(c, normed, spec.hidden, n_logits, normed.contents.nb[1], 0)
                x = logits = g.ggml_mul_mat(c, w["head"], rows)
            if n_normed:
                g.ggml_set_output(normed)
        g.ggml_set_output(x)
        self.gf = g.ggml_new_graph_custom(c, nodes, False)
        g.ggml_build_forward_expand(self.gf, x)
        if normed is not None and x is not normed:
            g.ggml_build_forward_expand(self.gf, normed)
        self._tensors = (inp, pos, cells, mask, out_rows, x, normed, logits)
        self.shape = (st.is_first, st.is_last, T, n_kv, n_logits, n_normed, spec.hidden, spec.vocab)

    def unplace(self) -> None:
        """Forget where the allocator put this graph's tensors (another graph has used the buffer
        since, which may even have been reallocated): the allocator only places unplaced tensors."""
        g = gl.ggml()
        t = g.ggml_get_first_tensor(self.ctx.ptr)
        while t:
            t.contents.data = None
            t.contents.buffer = None
            t = g.ggml_get_next_tensor(self.ctx.ptr, t)

    def bind(self) -> None:
        """numpy views of the inputs and the output where the allocator just placed them."""
        inp, pos, cells, mask, out_rows, x, normed, logits = self._tensors
        first, last, T, n_kv, n_logits, n_normed, hidden, vocab = self.shape
        if first:
            self.tokens = gl.view(inp, np.int32, (T,))
        else:
            self.hidden = gl.view(inp, np.float32, (T, hidden))
        self.pos = gl.view(pos, np.int32, (T,))
        self.cells = gl.view(cells, np.int64, (T,))
        self.mask = gl.view(mask, np.float16, (T, n_kv))
        if last:
            self.out_rows = gl.view(out_rows, np.int32, (n_logits + n_normed,))
            # the normed rows follow the logits rows (only kept as an output when some are asked for)
            self.normed = gl.view(normed, np.float32, (n_logits + n_normed, hidden))[n_logits:] if n_normed else None
            self.logits = gl.view(logits, np.float32, (n_logits, vocab)) if n_logits else None
        else:
            self.output = gl.view(x, np.float32, (T, hidden))

    def free(self) -> None:
        if self.ctx is not None:
            self.ctx.free()
            self.ctx = None


class _Resources:
    """What a stage owns in ggml, freed exactly once, in an order that keeps ggml consistent."""

    def __init__(self):
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.allocators: list = []
        self.pools: list[CellPool] = []
        self.buffers: list[gl.Buffer] = []
        self.contexts: list[gl.Context] = []
        self.backends: list = []
        self.maps: list[mmap.mmap] = []

    def free(self) -> None:
        for graph in self.graphs.values():
            graph.free()
        for alloc in self.allocators:
            gl.ggml().ggml_gallocr_free(alloc)
        for pool in self.pools:
            pool.close()
        for buf in self.buffers:
            buf.free()
        for ctx in self.contexts:
            ctx.free()
        for backend in self.backends:
            gl.ggml().ggml_backend_free(backend)
        for mm in self.maps:
            try:
                mm.close()
            except BufferError:  # a numpy view still points into it; the map goes with the view
                pass
        self.__init__()


def _dequantize(path, file: np.ndarray, info) -> np.ndarray:
    import gguf

    raw = file[info.offset:info.offset + info.nbytes]
    try:
        return np.ascontiguousarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[info.dtype]),
                                    dtype=np.float32)
    except Exception as e:
        raise ModelFileError(path, f"tensor {info.name}: cannot decode {info.dtype} data ({e})") from None


def _prefault(mm: mmap.mmap, file: np.ndarray, offset: int, nbytes: int) -> None:
    """Read a tensor's pages in now (at load, with progress) rather than on the first token."""
    lo = offset - offset % _PAGE
    try:
        mm.madvise(mmap.MADV_WILLNEED, lo, offset + nbytes - lo)
    except (AttributeError, OSError, ValueError):  # not every platform has it; touching still works
        pass
    int(file[offset:offset + nbytes:_PAGE].sum())


def _freq_scale(spec: ModelSpec) -> float:
    sc = spec.rope_scaling
    if sc is not None and sc.kind == "linear":
        return 1.0 / sc.factor
    if sc is not None and sc.kind == "llama3":  # only HF configs carry it this way: GGUF has rope_freqs
        raise UsageError("llama3 rope scaling from a config is computed by the torch backend")
    return 1.0
