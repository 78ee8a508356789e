"""Tensors for a layer range, in one canonical layout, from GGUF or Hugging Face safetensors.

Every difference between the formats is resolved here, once, at load time:

- names: HF `model.layers.{i}.self_attn.q_proj.weight` and GGUF `blk.{i}.attn_q.weight` both
  become `LayerWeights.wq`;
- orientation: every matrix is in torch Linear order [out, in] (`formats` already reports GGUF
  shapes reversed to torch order);
- rotary layout: Q/K rows are in Hugging Face's "rotate-half" layout (the first half of each head
  pairs with the second half). GGUF `llama` files store Q/K permuted for ggml's "normal" rope
  (adjacent pairs); we undo llama.cpp's `convert_hf_to_gguf.py` permutation. GGUF `qwen2` uses
  NEOX rope in ggml, which is rotate-half already, so it is not permuted.

Each tensor's shape is checked against what the spec says before it is used.
"""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ModelFileError, UnsupportedModelError, UsageError
from .formats import ModelFile, TensorInfo, open_model_file
from .spec import ModelSpec, read_spec

log = logging.getLogger(__name__)

LAYER_FIELDS = ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down")
BIAS_FIELDS = ("bq", "bk", "bv")

# canonical name -> file name, per format ({i} is the layer index)
HF_NAMES = {
    "embed": "model.embed_tokens.weight",
    "norm": "model.norm.weight",
    "head": "lm_head.weight",
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "wq": "model.layers.{i}.self_attn.q_proj.weight",
    "wk": "model.layers.{i}.self_attn.k_proj.weight",
    "wv": "model.layers.{i}.self_attn.v_proj.weight",
    "wo": "model.layers.{i}.self_attn.o_proj.weight",
    "ffn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "w_gate": "model.layers.{i}.mlp.gate_proj.weight",
    "w_up": "model.layers.{i}.mlp.up_proj.weight",
    "w_down": "model.layers.{i}.mlp.down_proj.weight",
    "bq": "model.layers.{i}.self_attn.q_proj.bias",
    "bk": "model.layers.{i}.self_attn.k_proj.bias",
    "bv": "model.layers.{i}.self_attn.v_proj.bias",
}
GGUF_NAMES = {
    "embed": "token_embd.weight",
    "norm": "output_norm.weight",
    "head": "output.weight",
    "rope_freqs": "rope_freqs.weight",
    "attn_norm": "blk.{i}.attn_norm.weight",
    "wq": "blk.{i}.attn_q.weight",
    "wk": "blk.{i}.attn_k.weight",
    "wv": "blk.{i}.attn_v.weight",
    "wo": "blk.{i}.attn_output.weight",
    "ffn_norm": "blk.{i}.ffn_norm.weight",
    "w_gate": "blk.{i}.ffn_gate.weight",
    "w_up": "blk.{i}.ffn_up.weight",
    "w_down": "blk.{i}.ffn_down.weight",
    "bq": "blk.{i}.attn_q.bias",
    "bk": "blk.{i}.attn_k.bias",
    "bv": "blk.{i}.attn_v.bias",
}
# tensors we would silently ignore, changing the model's output: refuse them instead
_HF_UNSUPPORTED = ("model.layers.{i}.self_attn.o_proj.bias", "model.layers.{i}.mlp.gate_proj.bias")
_GGUF_UNSUPPORTED = ("blk.{i}.attn_output.bias", "blk.{i}.ffn_gate.bias")


@dataclass
class LayerWeights:
    """One decoder layer, canonical layout, torch Linear orientation [out, in]."""

    attn_norm: Tensor  # [hidden]
    wq: Tensor  # [n_heads*head_dim, hidden], rows in rotate-half rope layout
    wk: Tensor  # [n_kv_heads*head_dim, hidden], rows in rotate-half rope layout
    wv: Tensor  # [n_kv_heads*head_dim, hidden]
    wo: Tensor  # [hidden, n_heads*head_dim]
    ffn_norm: Tensor  # [hidden]
    w_gate: Tensor  # [ffn, hidden]
    w_up: Tensor  # [ffn, hidden]
    w_down: Tensor  # [hidden, ffn]
    bq: Tensor | None = None  # qkv biases (Qwen2), same rope layout as wq/wk
    bk: Tensor | None = None
    bv: Tensor | None = None


@dataclass
class SliceWeights:
    """What a stage owning layers [start, end) needs, and nothing more."""

    spec: ModelSpec
    start: int
    end: int
    embed: Tensor | None  # [vocab, hidden] iff start == 0
    layers: list[LayerWeights | None]  # layers start..end-1 (None: skipped, held already)
    norm: Tensor | None  # [hidden] iff end == n_layers
    head: Tensor | None  # [vocab, hidden] iff end == n_layers (the embedding when tied)
    rope_freq_factors: Tensor | None = None  # GGUF 'rope_freqs.weight' [head_dim/2] (llama3 scaling)


# --------------------------------------------------------------------------- rope layout


def gguf_to_hf_rope(w: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's `permute(w, n_head, n_head_kv)`: adjacent-pair rows -> rotate-half rows.

    llama.cpp writes `w.reshape(n, 2, hd/2, *rest).swapaxes(1, 2)`; this is its inverse.
    Works for a weight [n*hd, in] and for a bias [n*hd].
    """
    rest = w.shape[1:]
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def hf_to_gguf_rope(w: Tensor, n_heads: int) -> Tensor:
    """llama.cpp's `permute(w, n_head, n_head_kv)` (used when writing GGUF `llama` files)."""
    rest = w.shape[1:]
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, *rest).transpose(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------- expected tensors


def layer_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Canonical field -> shape of one layer's tensors, as the spec says they must be."""
    h, f = spec.hidden, spec.ffn
    q, kv = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    shapes = {
        "attn_norm": (h,),
        "wq": (q, h),
        "wk": (kv, h),
        "wv": (kv, h),
        "wo": (h, q),
        "ffn_norm": (h,),
        "w_gate": (f, h),
        "w_up": (f, h),
        "w_down": (h, f),
    }
    if spec.qkv_bias:
        shapes.update(bq=(q,), bk=(kv,), bv=(kv,))
    return shapes


def _names(mf: ModelFile) -> dict[str, str]:
    return GGUF_NAMES if mf.format == "gguf" else HF_NAMES


def _plan(spec: ModelSpec, mf: ModelFile, start: int, end: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(canonical key, file tensor name, expected shape) for everything a slice needs."""
    names = _names(mf)
    out: list[tuple[str, str, tuple[int, ...]]] = []
    vh = (spec.vocab, spec.hidden)
    if start == 0:
        out.append(("embed", names["embed"], vh))
    if mf.format == "gguf" and names["rope_freqs"] in mf.tensors:
        out.append(("rope_freqs", names["rope_freqs"], (spec.head_dim // 2,)))
    shapes = layer_shapes(spec)
    unsupported = _GGUF_UNSUPPORTED if mf.format == "gguf" else _HF_UNSUPPORTED
    for i in range(start, end):
        for bad in unsupported:
            if bad.format(i=i) in mf.tensors:
                raise UnsupportedModelError(
                    mf.path, f"unsupported architecture variant: tensor {bad.format(i=i)} (a bias we do not apply)"
                )
        for key, shape in shapes.items():
            out.append((f"layers.{i}.{key}", names[key].format(i=i), shape))
    if end == spec.n_layers:
        out.append(("norm", names["norm"], (spec.hidden,)))
        head = names["embed"] if spec.tied_embeddings else names["head"]
        out.append(("head", head, vh))
    return out


_INTEGER_DTYPES = ("I64", "I32", "I16", "I8", "U8", "BOOL")


def _check_shape(mf: ModelFile, name: str, shape: tuple[int, ...]) -> None:
    info = mf.require(name)
    if info.dtype in _INTEGER_DTYPES:  # the torch loader cast such a tensor's integers to weights
        raise ModelFileError(mf.path, f"tensor {name}: {info.dtype} is not a type weights are stored in")
    if tuple(info.shape) != tuple(shape):
        raise ModelFileError(
            mf.path, f"tensor {name}: shape {list(info.shape)} but the metadata says {list(shape)}"
        )


def _read(mf: ModelFile, spec: ModelSpec, key: str, name: str) -> Tensor:
    t = mf.read(name)
    if mf.format == "gguf" and spec.arch == "llama":
        field = key.rsplit(".", 1)[-1]
        if field in ("wq", "bq"):
            t = gguf_to_hf_rope(t, spec.n_heads)
        elif field in ("wk", "bk"):
            t = gguf_to_hf_rope(t, spec.n_kv_heads)
    return t


def _checked_plan(path, mf: ModelFile, spec: ModelSpec | None, start, end):
    """(spec, plan) of a slice, the range and every tensor's shape checked before any data is read."""
    spec = spec or read_spec(path, mf)
    integral = all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in (start, end))
    if not (integral and 0 <= start < end <= spec.n_layers):
        raise UsageError(
            f"layer range [{start}, {end}) is not a non-empty range within the model's "
            f"{spec.n_layers} layers (0 <= start < end <= {spec.n_layers})"
        )
    plan = _plan(spec, mf, start, end)
    for _key, name, shape in plan:  # fail fast on a bad file
        _check_shape(mf, name, shape)
    return spec, plan


# --------------------------------------------------------------------------- public


def layer_of_key(key: str) -> int | None:
    """The layer index of a canonical key ("layers.3.wq" -> 3), None for the rest."""
    return int(key.split(".")[1]) if key.startswith("layers.") else None


@dataclass(frozen=True)
class StoredTensor:
    """A tensor a stage computes with, as the file stores it (nothing decoded)."""

    key: str  # canonical key: "embed", "head", "norm", "rope_freqs", "layers.{i}.wq", ...
    info: TensorInfo  # file name, GGUF type, torch-order shape, bytes, file offset


def stored_slice(path: str | os.PathLike, start: int, end: int, *,
                 spec: ModelSpec | None = None) -> tuple[ModelSpec, list[StoredTensor]]:
    """Where the tensors of a GGUF stage owning layers [start, end) lie in the file, shapes checked
    against the metadata. Q/K keep the file's rope layout (the ggml backend ropes them as stored)."""
    mf = open_model_file(path)
    try:
        if mf.format != "gguf":
            raise UsageError(f"{path}: the ggml backend reads GGUF files; use the torch backend for this model")
        spec, plan = _checked_plan(path, mf, spec, start, end)
        return spec, [StoredTensor(key, mf.tensors[name]) for key, name, _shape in plan]
    finally:
        mf.close()


def load_slice(
    path: str | os.PathLike,
    start: int,
    end: int,
    *,
    spec: ModelSpec | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
    skip_layers: frozenset[int] = frozenset(),
) -> SliceWeights:
    """The weights of layers [start, end), plus the embedding if start == 0 and the final norm
    and output head if end == n_layers; cast to `dtype` on `device`. Layers in `skip_layers`
    (held already, by a stage handing them over) are not read: None in `layers`."""
    mf = open_model_file(path)
    try:
        spec, plan = _checked_plan(path, mf, spec, start, end)
        plan = [p for p in plan if layer_of_key(p[0]) not in skip_layers]
        loaded: dict[str, Tensor] = {}
        cache: dict[str, Tensor] = {}  # a tied head is the embedding we already read
        for done, (key, name, _shape) in enumerate(plan, 1):
            t = cache.get(name)
            if t is None:
                t = _read(mf, spec, key, name).to(device=device, dtype=dtype)
                cache[name] = t
            loaded[key] = t
            if progress is not None:
                progress(done, len(plan))
    finally:
        mf.close()
    layers: list[LayerWeights | None] = []
    for i in range(start, end):
        if i in skip_layers:
            layers.append(None)
            continue
        fields = {f: loaded[f"layers.{i}.{f}"] for f in LAYER_FIELDS}
        if spec.qkv_bias:
            fields.update({f: loaded[f"layers.{i}.{f}"] for f in BIAS_FIELDS})
        layers.append(LayerWeights(**fields))
    log.debug("loaded layers [%d, %d) of %s (%d tensors)", start, end, path, len(plan))
    return SliceWeights(
        spec=spec,
        start=start,
        end=end,
        embed=loaded.get("embed"),
        layers=layers,
        norm=loaded.get("norm"),
        head=loaded.get("head"),
        rope_freq_factors=loaded.get("rope_freqs"),
    )


def check_model(path: str | os.PathLike, *, decode: bool = True) -> ModelSpec:
    """Every check we can make: headers, metadata, each expected tensor present with the shape the
    metadata implies, and (decode=True) every tensor decodes to finite numbers."""
    mf = open_model_file(path)
    try:
        spec = read_spec(path, mf)
        for _key, name, shape in _plan(spec, mf, 0, spec.n_layers):
            _check_shape(mf, name, shape)
        if decode:
            for name in sorted(mf.tensors):
                t = mf.read(name)
                if t.is_floating_point():
                    bad = int((~torch.isfinite(t)).sum())
                    if bad:
                        raise ModelFileError(
                            mf.path, f"tensor {name}: {bad} of {t.numel()} values are NaN or infinite"
                        )
    finally:
        mf.close()
    return spec
