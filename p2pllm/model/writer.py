"""Writing models: the inverse of `loader`, for `p2pllm make-demo-model` and for tests.

Both writers take weights under canonical flat names (`embed`, `norm`, `head` (omitted when
tied), `rope_freqs` (GGUF only), `layers.{i}.{attn_norm,wq,...,bv}`) in the canonical layout of
`loader.LayerWeights`: torch orientation [out, in], Q/K rows in rotate-half rope layout.
They write exactly what they are given, so tests can also build deliberately broken files.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .loader import BIAS_FIELDS, GGUF_NAMES, HF_NAMES, LAYER_FIELDS, hf_to_gguf_rope

_GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # ggml runs Mistral as llama
_QTYPES = ("f32", "f16", "q8_0", "q4_0")
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(\w+)$")
_TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _file_name(names: dict[str, str], key: str) -> str:
    m = _LAYER_KEY.match(key)
    if m and m.group(2) in LAYER_FIELDS + BIAS_FIELDS:
        return names[m.group(2)].format(i=int(m.group(1)))
    if key in names and "{i}" not in names[key]:
        return names[key]
    raise ValueError(f"unknown canonical weight name {key!r}")


# --------------------------------------------------------------------------- GGUF


def write_gguf(
    path: str | os.PathLike,
    spec_fields: dict,
    weights: dict[str, Tensor],
    tokenizer_fields: dict[str, object],
    *,
    qtype: str = "f32",
    name: str = "p2pllm-demo",
    tensor_dtypes: dict[str, np.dtype] | None = None,
) -> None:
    """Write a GGUF file llama.cpp can load.

    spec_fields: arch ("llama" | "mistral" | "qwen2"), n_layers, hidden, ffn, n_heads, and
    optionally n_kv_heads, head_dim, vocab, context, rope_theta, norm_eps.
    qtype: "f32" | "f16" | "q8_0" | "q4_0" for the 2-D matrices (the embedding included; norms,
    biases and rope factors stay f32; a matrix whose rows are not a whole number of 32-blocks
    stays f32). tokenizer_fields: GGUF keys ("tokenizer.ggml.tokens", ...) to values.
    tensor_dtypes: canonical key -> numpy float dtype written instead (tests of odd files).
    """
    import gguf

    if qtype not in _QTYPES:
        raise ValueError(f"qtype {qtype!r} is not one of {', '.join(_QTYPES)}")
    arch = _GGUF_ARCH.get(spec_fields["arch"])
    if arch is None:
        raise ValueError(f"cannot write GGUF for architecture {spec_fields['arch']!r}")
    n_heads = int(spec_fields["n_heads"])
    n_kv = int(spec_fields.get("n_kv_heads", n_heads))
    hidden = int(spec_fields["hidden"])
    head_dim = int(spec_fields.get("head_dim") or hidden // n_heads)
    vocab = int(spec_fields.get("vocab") or weights["embed"].shape[0])
    ggml_type = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
        "q4_0": gguf.GGMLQuantizationType.Q4_0,
    }[qtype]
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[qtype]

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(int(spec_fields["n_layers"]))
    w.add_context_length(int(spec_fields.get("context", 2048)))
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(int(spec_fields["ffn"]))
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(spec_fields.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(spec_fields.get("norm_eps", 1e-5)))
    w.add_vocab_size(vocab)
    w.add_file_type(int(file_type))
    if qtype in ("q8_0", "q4_0"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in tokenizer_fields.items():
        _add_field(w, key, value)

    def encode(key: str, t: Tensor) -> tuple[np.ndarray, object]:
        """(the array written for canonical `key`, its GGML type or None for a plain float array)."""
        t = t.detach().to("cpu", torch.float32).contiguous()
        if arch == "llama":
            field = key.rsplit(".", 1)[-1]
            if field in ("wq", "bq"):
                t = hf_to_gguf_rope(t, n_heads)
            elif field in ("wk", "bk"):
                t = hf_to_gguf_rope(t, n_kv)
        arr = t.numpy()
        if tensor_dtypes and key in tensor_dtypes:
            return arr.astype(tensor_dtypes[key]), None
        if arr.ndim == 2 and qtype in ("q8_0", "q4_0") and arr.shape[1] % 32 == 0:
            return gguf.quants.quantize(arr, ggml_type), ggml_type
        if arr.ndim == 2 and qtype == "f16":
            return arr.astype(np.float16), None
        return arr, None

    for key in _gguf_order(weights):
        tensor_name = _file_name(GGUF_NAMES, key)
        value = weights[key]
        if callable(value) and not isinstance(value, Tensor):  # made when written (make-demo-model)
            arr = _LazyArray(key, tuple(value.shape), value, encode, qtype, tensor_dtypes)
            raw = ggml_type if arr.quantized else None
        else:
            arr, raw = encode(key, value)
        if raw is not None:
            w.add_tensor(tensor_name, arr, raw_dtype=raw)
        else:
            w.add_tensor(tensor_name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


class _LazyArray:
    """Stands in for a numpy array in GGUFWriter (which uses only shape, dtype, nbytes and tofile):
    the tensor is made, encoded and written when the writer reaches it, then dropped."""

    def __init__(self, key: str, shape: tuple, make, encode, qtype: str, tensor_dtypes) -> None:
        import gguf

        self.key, self.make, self.encode = key, make, encode
        if tensor_dtypes and key in tensor_dtypes:
            dtype, self.quantized = np.dtype(tensor_dtypes[key]), False
        elif len(shape) == 2 and qtype in ("q8_0", "q4_0") and shape[1] % 32 == 0:
            dtype, self.quantized = np.dtype(np.uint8), True
            qt = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[qtype]
            shape = tuple(gguf.quants.quant_shape_to_byte_shape(shape, qt))
        else:
            dtype, self.quantized = np.dtype(np.float16 if len(shape) == 2 and qtype == "f16" else np.float32), False
        self.shape, self.dtype = shape, dtype
        self.nbytes = int(np.prod(shape)) * dtype.itemsize

    def tofile(self, fout) -> None:
        arr, _ = self.encode(self.key, self.make())
        if arr.nbytes != self.nbytes or arr.dtype != self.dtype:
            raise AssertionError(f"{self.key}: made {arr.dtype} {arr.nbytes} bytes, planned {self.dtype} {self.nbytes}")
        arr.tofile(fout)


def _gguf_order(weights: dict[str, Tensor]) -> list[str]:
    """llama.cpp's usual order: embedding, rope factors, output, then block by block."""
    for key in weights:
        _file_name(GGUF_NAMES, key)  # reject unknown names before writing anything

    def rank(key: str) -> tuple[int, int, int]:
        top = {"embed": 0, "rope_freqs": 1, "norm": 2, "head": 3}
        if key in top:
            return (0, top[key], 0)
        m = _LAYER_KEY.match(key)
        fields = LAYER_FIELDS + BIAS_FIELDS
        return (1, int(m.group(1)), fields.index(m.group(2)))

    return sorted(weights, key=rank)


def _add_field(w, key: str, value: object) -> None:
    from gguf import GGUFValueType as V

    if isinstance(value, bool):
        w.add_key_value(key, value, V.BOOL)
    elif isinstance(value, int):
        w.add_key_value(key, value, V.UINT32)
    elif isinstance(value, float):
        w.add_key_value(key, value, V.FLOAT32)
    elif isinstance(value, str):
        w.add_key_value(key, value, V.STRING)
    elif isinstance(value, (list, tuple)) and value:
        first = value[0]
        if isinstance(first, (str, bytes)):
            sub = V.STRING
        elif isinstance(first, bool):
            sub = V.BOOL
        elif isinstance(first, int):
            sub = V.INT32  # token_type is an int32 array in llama.cpp
        elif isinstance(first, float):
            sub = V.FLOAT32
        else:
            raise ValueError(f"tokenizer field {key}: unsupported element type {type(first).__name__}")
        w.add_key_value(key, list(value), V.ARRAY, sub_type=sub)
    else:
        raise ValueError(f"tokenizer field {key}: unsupported value {type(value).__name__} (or empty list)")


# --------------------------------------------------------------------------- Hugging Face


def write_hf(
    folder: str | os.PathLike,
    config: dict,
    weights: dict[str, Tensor],
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int | None = None,
) -> None:
    """Write config.json and model.safetensors (or shards and model.safetensors.index.json when
    max_shard_bytes is set), as transformers' save_pretrained does."""
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(config)
    if not cfg.get("torch_dtype") and not cfg.get("dtype"):
        cfg.pop("dtype", None)
        cfg["torch_dtype"] = _TORCH_DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    tensors = {_file_name(HF_NAMES, k): weights[k].detach().to("cpu", dtype).contiguous() for k in _hf_order(weights)}
    metadata = {"format": "pt"}
    if max_shard_bytes is None:
        save_file(tensors, str(out / "model.safetensors"), metadata=metadata)
        return
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        file = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata=metadata)
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _hf_order(weights: dict[str, Tensor]) -> list[str]:
    for key in weights:
        if key == "rope_freqs":
            raise ValueError("rope_freqs is a GGUF tensor; Hugging Face configs carry rope_scaling instead")
        _file_name(HF_NAMES, key)

    def rank(key: str) -> tuple[int, int, int]:
        top = {"embed": 0, "norm": 2, "head": 3}
        if key in top:
            return (0 if key == "embed" else 2, top[key], 0)
        m = _LAYER_KEY.match(key)
        return (1, int(m.group(1)), (LAYER_FIELDS + BIAS_FIELDS).index(m.group(2)))

    return sorted(weights, key=rank)
