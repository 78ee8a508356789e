"""The torch backend: the Llama-family decoder as a runnable slice [start, end) of layers.

For Hugging Face folders and GPUs (cuda/mps), in f32/f16/bf16 (GGUF files on the CPU go to the
ggml backend instead). One micro-batch packs the tokens of several sequences, each at its own
positions (a prefill chunk of one sequence beside single decode tokens of others), into one
[T, hidden] tensor. The matmuls run once over all T tokens; attention runs per sequence against
its KV cache. Weights arrive in one canonical layout from loader.py (Q/K in rotate-half rope
order); q/k/v and gate/up are fused here, once, at construction.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..batch import BatchMeta, LastOutputs
from ..kvcache import KVCache
from ..spec import ModelSpec

if TYPE_CHECKING:
    from ..loader import SliceWeights


def rope_tables(spec: ModelSpec, freq_factors: torch.Tensor | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [context, head_dim] for rotate-half rope, in float32, with the model's scaling."""
    hd = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    sc = spec.rope_scaling
    if sc is not None and sc.kind == "llama3":
        low_wavelen = sc.original_context / sc.low_freq_factor
        high_wavelen = sc.original_context / sc.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / sc.factor, inv_freq)
        smooth = (sc.original_context / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
        smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif sc is not None and sc.kind == "linear":
        inv_freq = inv_freq / sc.factor
    elif sc is not None and sc.kind == "freq_factors" and freq_factors is not None:
        inv_freq = inv_freq / freq_factors.float().cpu()
    t = torch.arange(spec.context, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class Linear:
    """y = x W^T + b over rows x [T, in], with W stored in the layout that streams fastest.

    Decoding multiplies one row by every weight matrix, so it is bound by how fast the matrix
    streams from memory. On CPU, MKL's single-row GEMM reads a matrix with many more outputs
    than inputs much faster (1.3-1.9x on an AMD EPYC) when it is stored input-major (W^T
    contiguous) than in PyTorch's [out, in] layout; matrices with fewer outputs than inputs are
    faster as they are. The transpose happens once, here, at load time.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        out_f, in_f = weight.shape
        self.in_major = weight.device.type == "cpu" and out_f > in_f
        self.weight = weight.t().contiguous() if self.in_major else weight.contiguous()
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.in_major:
            return F.linear(x, self.weight, self.bias)
        if self.bias is None:
            return torch.mm(x, self.weight)
        return torch.addmm(self.bias, x, self.weight)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of W (an embedding lookup on a tied output head)."""
        if self.in_major:
            return self.weight.index_select(1, ids).t()
        return F.embedding(ids, self.weight)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecoderLayer:
    def __init__(self, spec: ModelSpec, w, dtype, device):
        def t(x):
            return None if x is None else x.to(device=device, dtype=dtype).contiguous()

        def lin(w, b=None):
            return Linear(w.to(device=device, dtype=dtype), t(b))

        self.n_heads, self.n_kv, self.hd = spec.n_heads, spec.n_kv_heads, spec.head_dim
        self.q_dim = self.n_heads * self.hd
        self.kv_dim = self.n_kv * self.hd
        self.eps = spec.norm_eps
        self.attn_norm = t(w.attn_norm)
        self.ffn_norm = t(w.ffn_norm)
        b_qkv = torch.cat([w.bq, w.bk, w.bv]) if w.bq is not None else None
        self.qkv = lin(torch.cat([w.wq, w.wk, w.wv], dim=0), b_qkv)
        self.wo = lin(w.wo)
        self.gate_up = lin(torch.cat([w.w_gate, w.w_up], dim=0))
        self.down = lin(w.w_down)
        self.ffn = spec.ffn

    def forward(self, x, cos, sin, meta: BatchMeta, kv: KVCache, layer: int) -> torch.Tensor:
        T = x.shape[0]
        h = rms_norm(x, self.attn_norm, self.eps)
        qkv = self.qkv(h)
        # q and k side by side in qkv: one rope over both heads' worth of rows
        qk = qkv[:, : self.q_dim + self.kv_dim].view(T, self.n_heads + self.n_kv, self.hd)
        qk = qk * cos + _rotate_half(qk) * sin
        q, k = qk[:, : self.n_heads], qk[:, self.n_heads :]
        v = qkv[:, self.q_dim + self.kv_dim :].view(T, self.n_kv, self.hd)
        outs, row = [], 0
        for c in meta.chunks:
            sl = slice(row, row + c.length)
            k_all, v_all = kv.update(layer, c.seq_id, c.start, k[sl].transpose(0, 1), v[sl].transpose(0, 1))
            if k_all.dtype != x.dtype:  # a KV cache kept in another precision than the compute
                k_all, v_all = k_all.to(x.dtype), v_all.to(x.dtype)
            qs = q[sl].transpose(0, 1).unsqueeze(0)  # [1, H, L, hd]
            mask, causal = None, False
            if c.length > 1:
                if c.start == 0:
                    causal = True
                else:  # a prefill chunk after earlier context: query i sees keys up to start + i
                    qpos = torch.arange(c.start, c.start + c.length, device=x.device).unsqueeze(1)
                    mask = torch.arange(c.start + c.length, device=x.device).unsqueeze(0) <= qpos
            o = F.scaled_dot_product_attention(
                qs, k_all.unsqueeze(0), v_all.unsqueeze(0), attn_mask=mask, is_causal=causal,
                enable_gqa=self.n_heads != self.n_kv,
            )
            outs.append(o[0].transpose(0, 1))  # [L, H, hd]
            row += c.length
        attn = outs[0] if len(outs) == 1 else torch.cat(outs)
        x = x + self.wo(attn.reshape(T, self.q_dim))
        h = rms_norm(x, self.ffn_norm, self.eps)
        gu = self.gate_up(h)
        x = x + self.down(F.silu(gu[:, : self.ffn]) * gu[:, self.ffn :])
        return x


class TorchStage:
    """Layers [start, end) of a model and the KV of every sequence passing through them; the
    first stage embeds tokens, the last one returns logits."""

    name = "torch"

    def __init__(self, weights: "SliceWeights", *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", kv_dtype: torch.dtype | None = None,
                 max_context: int | None = None, shared: dict[int, "DecoderLayer"] | None = None):
        spec = weights.spec
        self.spec = spec
        self.start, self.end = weights.start, weights.end
        self.dtype, self.device = dtype, torch.device(device)
        self.is_first = weights.start == 0
        self.is_last = weights.end == spec.n_layers
        self.norm = weights.norm.to(device=device, dtype=dtype) if self.is_last else None
        self.head = Linear(weights.head.to(device=device, dtype=dtype)) if self.is_last else None
        # a tied embedding on a slice holding both ends is not copied: rows come from the head
        self.embed_from_head = self.is_first and self.is_last and weights.embed is weights.head
        self.embed = weights.embed.to(device=device, dtype=dtype) if self.is_first and not self.embed_from_head else None
        self.layers = [DecoderLayer(spec, w, dtype, device) if w is not None else shared[i]  # handed over
                       for i, w in enumerate(weights.layers, start=self.start)]
        cos, sin = rope_tables(spec, weights.rope_freq_factors, device)
        self.cos, self.sin = cos.to(dtype), sin.to(dtype)
        self.activation_dtype = dtype
        self.weight_bytes = sum(t.numel() * t.element_size() for t in _weights(self))
        handed = [layer for layer, w in zip(self.layers, weights.layers) if w is None]
        self.loaded_bytes = self.weight_bytes - sum(t.numel() * t.element_size() for t in _layer_tensors(handed))
        context = min(max_context or spec.context, spec.context)
        self.kv = KVCache(self.n_layers, spec.n_kv_heads, spec.head_dim, context, kv_dtype or dtype, self.device)

    @property
    def n_layers(self) -> int:
        return self.end - self.start

    def share(self, start: int, end: int) -> dict[int, "DecoderLayer"]:
        """The layers a stage of [start, end) opened like this one may take (they are immutable)."""
        return {i: layer for i, layer in enumerate(self.layers, start=self.start) if start <= i < end}

    def close(self) -> None:
        pass

    def forward(self, x: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
        """x: token ids [T] on the first slice, hidden states [T, hidden] otherwise.

        Returns hidden states [T, hidden], or on the last slice logits [n_out, vocab] for the rows
        meta.last_rows asks for (the last token of each chunk: the only ones anyone samples from).
        """
        out = self._run(x, meta)
        return out.logits if self.is_last else out

    def forward_last(self, x: torch.Tensor, meta: BatchMeta) -> LastOutputs:
        """The last slice's outputs: logits for meta.last_rows and final-normed hidden states for
        meta.normed_rows (embeddings; the output head never runs on them)."""
        if not self.is_last:
            raise ValueError("forward_last runs on the last slice only")
        return self._run(x, meta)

    @torch.inference_mode()
    def _run(self, x: torch.Tensor, meta: BatchMeta) -> torch.Tensor | LastOutputs:
        kv = self.kv
        for c in meta.chunks:
            kv.reserve(c.seq_id, c.start + c.length)
        x = x.to(self.device)
        meta = meta.to(self.device)
        if self.is_first:
            x = self.head.rows(x) if self.embed_from_head else F.embedding(x, self.embed)
        cos = self.cos[meta.positions].unsqueeze(1)  # [T, 1, hd], broadcast over heads
        sin = self.sin[meta.positions].unsqueeze(1)
        for i, layer in enumerate(self.layers):
            x = layer.forward(x, cos, sin, meta, kv, i)
        if not self.is_last:
            return x
        n = int(meta.last_rows.shape[0])
        x = rms_norm(x.index_select(0, torch.cat([meta.last_rows, meta.normed_rows])), self.norm, self.spec.norm_eps)
        logits = self.head(x[:n]).float() if n else torch.empty(0, self.spec.vocab, device=self.device)
        return LastOutputs(logits, x[n:].float())


def _weights(stage: TorchStage):
    """Every distinct tensor the stage holds (its resident weight bytes)."""
    seen = {}
    for t in (stage.norm, stage.embed, stage.head.weight if stage.head else None, stage.cos, stage.sin):
        if t is not None:
            seen[id(t)] = t
    for t in _layer_tensors(stage.layers):
        seen[id(t)] = t
    return list(seen.values())


def _layer_tensors(layers: list[DecoderLayer]):
    for layer in layers:
        for t in (layer.attn_norm, layer.ffn_norm, layer.qkv.weight, layer.qkv.bias, layer.wo.weight,
                  layer.gate_up.weight, layer.down.weight):
            if t is not None:
                yield t
