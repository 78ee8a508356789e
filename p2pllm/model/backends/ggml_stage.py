"""A GGUF stage computed by ggml on the file's own encodings (a Q4_K tensor stays Q4_K).

Weights (ggml_weights.py): the file is memory-mapped and each tensor of the stage's layer range is
handed to ggml where it lies in the map (repacked for the SIMD kernels where ggml does that), so a
stage holds its share of the file and nothing else; a stage built beside another of the same
file shares the layers both hold. `ggml_mul_mat` picks the SIMD kernel for each encoding,
exactly as llama.cpp does.

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
import os
import weakref
from collections import OrderedDict
from typing import Callable

import numpy as np
import torch

from ...errors import UsageError
from ..batch import BatchMeta, LastOutputs
from ..kvcache import KVFormat
from ..loader import stored_slice
from ..spec import ModelSpec
from . import ggml_lib as gl
from .ggml_kv import CellPool
from .ggml_weights import StageWeights

log = logging.getLogger(__name__)

MAX_GRAPHS = 8  # graphs kept for reuse (descriptions only: they share one compute buffer)


class GGMLStage:
    name = "ggml"

    def __init__(self, path: str | os.PathLike, start: int, end: int, *, spec: ModelSpec | None = None,
                 kv_dtype: str = "f16", max_context: int | None = None, threads: int | None = None,
                 progress: Callable[[int, int], None] | None = None, shared: dict | None = None):
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
        weights = self._res.weights = StageWeights(path, stored, self.backend, shared=shared, progress=progress)
        self.w = weights.by_key
        self.weight_bytes, self.loaded_bytes, self.kept_layers = weights.nbytes, weights.loaded_bytes, weights.kept
        self.rope_mode = g.GGML_ROPE_TYPE_NEOX if spec.arch == "qwen2" else g.GGML_ROPE_TYPE_NORMAL
        fmt = KVFormat(kv_dtype, "half" if self.rope_mode == g.GGML_ROPE_TYPE_NEOX else "pairs")
        self.kv = CellPool(self.backend, end - start, spec.n_kv_heads * spec.head_dim, fmt, self.context)
        self._res.pools.append(self.kv)
        self._graphs: OrderedDict[tuple, _Graph] = self._res.graphs
        self._alloc = g.ggml_gallocr_new(g.ggml_backend_cpu_buffer_type())
        self._res.allocators.append(self._alloc)
        self._allocated: _Graph | None = None  # the graph whose tensors the compute buffer holds now
        self._no_normed = torch.empty(0, spec.hidden)  # a step's normed rows when it pools none (never written)

    @property
    def n_layers(self) -> int:
        return self.end - self.start

    # ------------------------------------------------------------------ weights
    def share(self, start: int, end: int) -> dict:
        """What a stage of layers [start, end) built from the same file may take from this one
        (`shared=`) instead of loading it: the layers both hold. It stays valid after close()."""
        return self._res.weights.share(start, end)

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
            graph.hidden[:] = (x if x.dtype == torch.float32 else x.to(torch.float32)).numpy()
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
        normed = torch.from_numpy(graph.normed.copy()) if n_normed else self._no_normed
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
        self.weights: StageWeights | None = None  # its groups go with the last stage holding them
        self.backends: list = []

    def free(self) -> None:
        for graph in self.graphs.values():
            graph.free()
        for alloc in self.allocators:
            gl.ggml().ggml_gallocr_free(alloc)
        for pool in self.pools:
            pool.close()
        for backend in self.backends:
            gl.ggml().ggml_backend_free(backend)
        self.__init__()


def _freq_scale(spec: ModelSpec) -> float:
    sc = spec.rope_scaling
    if sc is not None and sc.kind == "linear":
        return 1.0 / sc.factor
    if sc is not None and sc.kind == "llama3":  # only HF configs carry it this way: GGUF has rope_freqs
        raise UsageError("llama3 rope scaling from a config is computed by the torch backend")
    return 1.0
