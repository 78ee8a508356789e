"""ModelSpec: a model's architecture and per-layer sizes, read from headers without loading weights.

Sources: GGUF metadata, a Hugging Face config.json (+ safetensors headers for the real dtypes),
or a built-in shape by name (for `p2pllm plan` dry runs of models nobody here has on disk).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..errors import ModelFileError, UnsupportedModelError, UsageError
from .formats import ModelFile, open_model_file

# bytes per parameter of the dtypes a plan may assume (GGUF block types include their scales)
DTYPE_BYTES = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q4_0": 18 / 32,
    "q4_k": 144 / 256,
    "q6_k": 210 / 256,
}

HF_ARCHS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2"}


@dataclass(frozen=True)
class RopeScaling:
    kind: str  # "llama3" | "linear" | "freq_factors" (GGUF carries llama3 factors as a tensor)
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192


@dataclass(frozen=True)
class ModelSpec:
    arch: str  # "llama" | "mistral" | "qwen2"
    name: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    context: int
    rope_theta: float
    rope_scaling: RopeScaling | None
    norm_eps: float
    tied_embeddings: bool
    qkv_bias: bool
    # sizes in the file's own dtypes (bytes)
    layer_bytes: int
    embedding_bytes: int
    head_bytes: int  # the output projection; the embedding's size again when tied
    norm_bytes: int
    file_dtype: str  # the dtype most of the weight bytes are in, lower case ("f32", "q4_0", ...)
    format: str  # "gguf" | "hf" | "builtin"
    path: str | None = None
    fingerprint: str = ""
    layer_sizes: tuple[int, ...] = ()  # each layer's bytes as stored (files); layer_bytes is their maximum

    # ---- parameter counts (dtype-free), used to size plans for another dtype
    @property
    def layer_params(self) -> int:
        h, hd = self.hidden, self.head_dim
        q, kv = self.n_heads * hd, self.n_kv_heads * hd
        p = h * q + 2 * h * kv + q * h + 3 * h * self.ffn + 2 * h
        if self.qkv_bias:
            p += q + 2 * kv
        return p

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def weight_bytes(self, start: int, end: int, dtype: str | None = None, exact: bool = True) -> int:
        """Bytes of the weights a stage owning layers [start, end) holds: as stored (dtype None),
        layer by layer where the file says (`exact`), else every layer as large as the largest.
        A tied output head on a stage that also embeds is the same tensor: counted once."""
        first, last = start == 0, end == self.n_layers
        shared_head = first and last and self.tied_embeddings
        if dtype is None:
            if exact and len(self.layer_sizes) == self.n_layers:
                total = sum(self.layer_sizes[start:end])
            else:
                total = (end - start) * self.layer_bytes
            total += self.embedding_bytes if first else 0
            total += ((0 if shared_head else self.head_bytes) + self.norm_bytes) if last else 0
            return total
        per = DTYPE_BYTES[dtype]
        params = (end - start) * self.layer_params
        params += self.embedding_params if first else 0
        params += ((0 if shared_head else self.embedding_params) + self.hidden) if last else 0
        return int(params * per)

    def kv_bytes_per_token(self, n_layers: int, dtype_bytes: int = 2) -> int:
        """KV-cache bytes one token of context costs on a stage with n_layers layers."""
        return 2 * n_layers * self.n_kv_heads * self.head_dim * dtype_bytes

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- reading


def read_spec(path: str | os.PathLike, model_file: ModelFile | None = None) -> ModelSpec:
    """ModelSpec of a .gguf file, a Hugging Face folder, or its config.json (no weights loaded)."""
    p = Path(path)
    # a config alone: any .json but a folder's own config.json beside its weights (that is the folder)
    if p.suffix == ".json" and p.is_file() and not (p.name == "config.json" and any(p.parent.glob("*.safetensors"))):
        return _spec_from_hf_config(p, _load_config(p), None)
    mf = model_file or open_model_file(p)
    if mf.format == "gguf":
        return _spec_from_gguf(mf)
    return _spec_from_hf_config(mf.path / "config.json", mf.metadata, mf)


def resolve_spec(model: str) -> ModelSpec:
    """A path to a model or config.json, or the name of a built-in shape."""
    if model in BUILTIN_SHAPES:
        return builtin_spec(model)
    if not Path(model).exists():
        known = ", ".join(sorted(BUILTIN_SHAPES))
        raise UsageError(f"{model}: no such file, folder or built-in shape (built-in: {known})")
    return read_spec(model)


def _number(path, where: str, key: str, value, kind: type):
    """value as an int or a finite float, or one line naming the field: a config.json or GGUF
    header written by hand or by a broken converter holds anything ("big", null, a list)."""
    try:
        if isinstance(value, (bool, list, dict)) or value is None:
            raise TypeError
        number = kind(value)
        if kind is float and not number == number or number in (float("inf"), float("-inf")):
            raise ValueError
        return number
    except (TypeError, ValueError, OverflowError):
        expected = "a whole number" if kind is int else "a number"
        raise ModelFileError(path, f"{where} {key} is {value!r}, expected {expected}") from None


def _gguf_get(mf: ModelFile, key: str, default=None, required: bool = False):
    if key in mf.metadata:
        return mf.metadata[key]
    if required:
        raise ModelFileError(mf.path, f"missing metadata {key}")
    return default


def _gguf_number(mf: ModelFile, key: str, kind: type, default=None, required: bool = False):
    value = _gguf_get(mf, key, default, required)
    return value if value is None else _number(mf.path, "metadata", key, value, kind)


def _cfg_number(path: Path, cfg: dict, key: str, kind: type, default=None):
    """A config.json field; absent or null reads as the default (as transformers does)."""
    value = cfg.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ModelFileError(path, f"missing field {key}")
        return default
    return _number(path, "field", key, value, kind)


_REQUIRED = object()


def _spec_from_gguf(mf: ModelFile) -> ModelSpec:
    arch_name = _gguf_get(mf, "general.architecture", required=True)
    if arch_name not in GGUF_ARCHS:
        raise UnsupportedModelError(mf.path, f"unsupported architecture {arch_name} (supported: llama, qwen2)")
    a = arch_name
    n_layers = _gguf_number(mf, f"{a}.block_count", int, required=True)
    hidden = _gguf_number(mf, f"{a}.embedding_length", int, required=True)
    n_heads = _gguf_number(mf, f"{a}.attention.head_count", int, required=True)
    n_kv = _gguf_number(mf, f"{a}.attention.head_count_kv", int, n_heads)
    head_dim = _gguf_number(mf, f"{a}.attention.key_length", int, hidden // max(n_heads, 1))
    ffn = _gguf_number(mf, f"{a}.feed_forward_length", int, required=True)
    embd = mf.tensors.get("token_embd.weight")
    vocab = _gguf_number(mf, f"{a}.vocab_size", int)
    if vocab is None:
        if embd is not None:
            vocab = embd.shape[0]
        else:
            vocab = len(_gguf_get(mf, "tokenizer.ggml.tokens", required=True))
    # llama.cpp ropes head_dim dimensions of each llama head and refuses another rope.dimension_count;
    # we rope them all, and attend with values as wide as keys: refuse what we would silently ignore
    n_rot = _gguf_number(mf, f"{a}.rope.dimension_count", int)
    if n_rot is not None and n_rot != head_dim:
        raise UnsupportedModelError(mf.path, f"unsupported partial rotary embedding: {a}.rope.dimension_count is "
                                             f"{n_rot}, the head dim {head_dim}")
    value_dim = _gguf_number(mf, f"{a}.attention.value_length", int)
    if value_dim is not None and value_dim != head_dim:
        raise UnsupportedModelError(mf.path, f"unsupported architecture variant: {a}.attention.value_length is "
                                             f"{value_dim}, the key length {head_dim}")
    rope_scaling = None
    kind = _gguf_get(mf, f"{a}.rope.scaling.type")
    # as llama.cpp reads it: the factor (or its older name rope.scale_linear; 0 = none) scales linearly
    # when no type is given too
    factor = _gguf_number(mf, f"{a}.rope.scaling.factor", float)
    if factor is None:
        factor = _gguf_number(mf, f"{a}.rope.scale_linear", float)
    if factor is not None and factor < 0:
        raise ModelFileError(mf.path, f"metadata {a}.rope.scaling.factor = {factor} must not be negative")
    scaled = factor not in (None, 0.0, 1.0)
    if kind not in (None, "none", "linear"):
        raise UnsupportedModelError(mf.path, f"unsupported rope scaling {kind}")
    if "rope_freqs.weight" in mf.tensors:
        if a != "llama":  # llama.cpp's qwen2 has no such tensor and refuses the file ("wrong number of tensors")
            raise UnsupportedModelError(mf.path, f"unsupported architecture variant: rope_freqs.weight in a {a} model")
        if scaled and kind != "none":  # llama.cpp would apply both; we apply one
            raise UnsupportedModelError(mf.path, "unsupported rope scaling: rope_freqs.weight and a linear factor")
        rope_scaling = RopeScaling("freq_factors")
    elif kind == "linear":
        rope_scaling = RopeScaling("linear", factor or 1.0)
    elif kind is None and scaled:
        rope_scaling = RopeScaling("linear", factor)
    tied = "output.weight" not in mf.tensors
    spec = ModelSpec(
        arch=a,
        name=str(_gguf_get(mf, "general.name", mf.path.stem)),
        n_layers=n_layers,
        hidden=hidden,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        ffn=ffn,
        vocab=int(vocab),
        context=_gguf_number(mf, f"{a}.context_length", int, 2048),
        rope_theta=_gguf_number(mf, f"{a}.rope.freq_base", float, 10000.0),
        rope_scaling=rope_scaling,
        norm_eps=_gguf_number(mf, f"{a}.attention.layer_norm_rms_epsilon", float, 1e-5),
        tied_embeddings=tied,
        qkv_bias=a == "qwen2" or "blk.0.attn_q.bias" in mf.tensors,
        layer_bytes=0,
        embedding_bytes=0,
        head_bytes=0,
        norm_bytes=0,
        file_dtype="f32",
        format="gguf",
        path=str(mf.path),
    )
    _check_dims(mf.path, spec)
    if not mf.tensors:  # a header-only GGUF (a vocabulary file, say): size it as f16, for dry runs
        return _with_param_sizes(replace(spec, file_dtype="f16"))
    return _with_sizes(spec, mf, r"blk\.(\d+)\.", "token_embd.weight", "output.weight", "output_norm.weight")


def _load_config(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # (nested too deep)
        raise ModelFileError(path, f"not a readable JSON config ({e})") from None
    if not isinstance(data, dict):
        raise ModelFileError(path, "not a JSON object")
    return data


def _hf_rope(path: Path, cfg: dict) -> tuple[float, RopeScaling | None]:
    params, scaling = cfg.get("rope_parameters") or {}, cfg.get("rope_scaling") or {}
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(value, dict):
            raise ModelFileError(path, f"field {key} is {value!r}, expected an object")
    theta = _cfg_number(path, params if "rope_theta" in params else cfg, "rope_theta", float, 10000.0)
    key, src = ("rope_parameters", params) if params.get("rope_type", "default") != "default" else ("rope_scaling", scaling)
    kind = src.get("rope_type", src.get("type", "default")) if src else "default"
    if kind in (None, "default"):
        return theta, None

    def field(name: str, kind: type, default=_REQUIRED):
        return _cfg_number(path, {f"{key}.{name}": src.get(name)}, f"{key}.{name}", kind, default)

    if kind == "llama3":
        return theta, RopeScaling(
            "llama3",
            field("factor", float),
            field("low_freq_factor", float, 1.0),
            field("high_freq_factor", float, 4.0),
            field("original_max_position_embeddings", int, 8192),
        )
    if kind == "linear":
        return theta, RopeScaling("linear", field("factor", float))
    raise UnsupportedModelError(path, f"unsupported rope scaling {kind}")


def _spec_from_hf_config(path: Path, cfg: dict, mf: ModelFile | None) -> ModelSpec:
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or model_type not in HF_ARCHS:
        raise UnsupportedModelError(
            path, f"unsupported architecture {model_type} (supported: {', '.join(sorted(HF_ARCHS))})"
        )
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError(path, "unsupported architecture variant: mlp_bias=true")
    act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
    if act not in ("silu", "swish"):  # transformers would compute another activation than our SwiGLU's
        raise UnsupportedModelError(path, f"unsupported architecture variant: hidden_act={act!r} (supported: 'silu')")
    hidden = _cfg_number(path, cfg, "hidden_size", int, _REQUIRED)
    n_heads = _cfg_number(path, cfg, "num_attention_heads", int, _REQUIRED)
    n_kv = _cfg_number(path, cfg, "num_key_value_heads", int, n_heads) or n_heads
    head_dim = _cfg_number(path, cfg, "head_dim", int, 0) or (hidden // n_heads if n_heads > 0 else 0)
    n_layers = _cfg_number(path, cfg, "num_hidden_layers", int, _REQUIRED)
    ffn = _cfg_number(path, cfg, "intermediate_size", int, _REQUIRED)
    vocab = _cfg_number(path, cfg, "vocab_size", int, _REQUIRED)
    theta, scaling = _hf_rope(path, cfg)
    context = _cfg_number(path, cfg, "max_position_embeddings", int, 2048)
    window = _cfg_number(path, cfg, "sliding_window", int, 0)
    if window and (model_type == "mistral" or cfg.get("use_sliding_window")):
        context = min(context, window)  # we attend to the full context; cap it at the window
    tied = bool(cfg.get("tie_word_embeddings", model_type == "qwen2" and False))
    if mf is not None and "lm_head.weight" not in mf.tensors:
        tied = True
    spec = ModelSpec(
        arch=model_type,
        name=str(cfg.get("_name_or_path") or path.parent.name),
        n_layers=n_layers,
        hidden=hidden,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        ffn=ffn,
        vocab=vocab,
        context=context,
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=_cfg_number(path, cfg, "rms_norm_eps", float, 1e-6),
        tied_embeddings=tied,
        qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias")),
        layer_bytes=0,
        embedding_bytes=0,
        head_bytes=0,
        norm_bytes=0,
        file_dtype=_hf_dtype(cfg),
        format="hf" if mf is not None else "builtin",
        path=str(path.parent),
    )
    _check_dims(path, spec)
    if mf is None:  # config only: sizes from parameter counts in the config's dtype
        return _with_param_sizes(spec)
    return _with_sizes(
        spec, mf, r"model\.layers\.(\d+)\.", "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"
    )


def _hf_dtype(cfg: dict) -> str:
    name = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    return {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}.get(name, "bf16")


# far beyond any published model (405B: 126 layers, hidden 16384; contexts of 10M tokens), and small
# enough that what is sized by them (the planner's per-layer tables) fits in memory: a corrupt or
# hostile file claiming 10**9 layers got the planner OOM-killed
MAX_DIMS = {"n_layers": 4096, "hidden": 1 << 18, "n_heads": 4096, "n_kv_heads": 4096, "head_dim": 4096,
            "ffn": 1 << 20, "vocab": 1 << 24, "context": 1 << 24}


def _check_dims(path, spec: ModelSpec) -> None:
    for field in ("n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "ffn", "vocab", "context"):
        if getattr(spec, field) <= 0:
            raise ModelFileError(path, f"metadata {field} = {getattr(spec, field)} must be positive")
        if getattr(spec, field) > MAX_DIMS[field]:
            raise ModelFileError(path, f"metadata {field} = {getattr(spec, field)} is beyond any model's "
                                       f"(at most {MAX_DIMS[field]} here)")
    if spec.n_heads % spec.n_kv_heads:
        raise ModelFileError(path, f"{spec.n_heads} heads is not a multiple of {spec.n_kv_heads} kv heads")
    if spec.head_dim % 2:
        raise ModelFileError(path, f"head dim {spec.head_dim} must be even for rotary embeddings")
    # ggml aborts the process on a negative epsilon (and a zero or negative rope base computes NaN):
    # refuse them here, in words
    if not spec.norm_eps >= 0:
        raise ModelFileError(path, f"metadata norm_eps = {spec.norm_eps} must not be negative")
    if not spec.rope_theta > 0:
        raise ModelFileError(path, f"metadata rope_theta = {spec.rope_theta} must be positive")


def _with_sizes(spec: ModelSpec, mf: ModelFile, layer_re: str, embed: str, head: str, norm: str) -> ModelSpec:
    pattern = re.compile(layer_re)
    per_layer = [0] * spec.n_layers
    by_dtype: dict[str, int] = {}
    for info in mf.tensors.values():
        by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + info.nbytes
        m = pattern.match(info.name)
        if m and int(m.group(1)) >= spec.n_layers:  # llama.cpp refuses such a file too ("wrong number of tensors")
            raise ModelFileError(mf.path, f"tensor {info.name} is of layer {int(m.group(1))}, but the metadata says "
                                          f"{spec.n_layers} layers")
        if m:
            per_layer[int(m.group(1))] += info.nbytes
    embed_bytes = mf.require(embed).nbytes
    head_bytes = mf.tensors[head].nbytes if head in mf.tensors else embed_bytes
    norm_bytes = mf.tensors[norm].nbytes if norm in mf.tensors else 0
    dominant = max(by_dtype, key=by_dtype.get).lower() if by_dtype else "f32"
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in asdict(spec).items() if k not in ("path", "name")}, sort_keys=True).encode())
    for info in sorted(mf.tensors.values(), key=lambda i: i.name):
        h.update(f"{info.name}:{info.dtype}:{info.shape}:{info.nbytes};".encode())
    return replace(
        spec,
        layer_bytes=max(per_layer),
        layer_sizes=tuple(per_layer),
        embedding_bytes=embed_bytes,
        head_bytes=head_bytes,
        norm_bytes=norm_bytes,
        file_dtype=dominant,
        fingerprint=h.hexdigest()[:16],
    )


def _with_param_sizes(spec: ModelSpec) -> ModelSpec:
    per = DTYPE_BYTES.get(spec.file_dtype, 2.0)
    emb = int(spec.embedding_params * per)
    h = hashlib.sha256(json.dumps({k: v for k, v in asdict(spec).items() if k != "path"}, sort_keys=True).encode())
    return replace(
        spec,
        layer_bytes=int(spec.layer_params * per),
        embedding_bytes=emb,
        head_bytes=emb,
        norm_bytes=int(spec.hidden * per),
        fingerprint=h.hexdigest()[:16],
    )


# --------------------------------------------------------------------------- built-in shapes

# name: (arch, layers, hidden, heads, kv heads, ffn, vocab, context, rope theta, tied, qkv bias)
_SHAPES = {
    "llama-2-7b": ("llama", 32, 4096, 32, 32, 11008, 32000, 4096, 10000.0, False, False),
    "llama-3-8b": ("llama", 32, 4096, 32, 8, 14336, 128256, 8192, 500000.0, False, False),
    "llama-3-70b": ("llama", 80, 8192, 64, 8, 28672, 128256, 8192, 500000.0, False, False),
    "llama-3.1-405b": ("llama", 126, 16384, 128, 8, 53248, 128256, 131072, 500000.0, False, False),
    "mistral-7b": ("mistral", 32, 4096, 32, 8, 14336, 32768, 32768, 1000000.0, False, False),
    "qwen2.5-7b": ("qwen2", 28, 3584, 28, 4, 18944, 152064, 32768, 1000000.0, False, True),
    "qwen2.5-72b": ("qwen2", 80, 8192, 64, 8, 29568, 152064, 32768, 1000000.0, False, True),
}
BUILTIN_SHAPES = tuple(_SHAPES)


def builtin_spec(name: str) -> ModelSpec:
    """A well-known model's shape, sized at bf16 (plans may assume another dtype)."""
    try:
        arch, n_layers, hidden, heads, kv, ffn, vocab, ctx, theta, tied, bias = _SHAPES[name]
    except KeyError:
        raise UsageError(f"unknown built-in shape {name} (known: {', '.join(BUILTIN_SHAPES)})") from None
    spec = ModelSpec(
        arch=arch,
        name=name,
        n_layers=n_layers,
        hidden=hidden,
        n_heads=heads,
        n_kv_heads=kv,
        head_dim=hidden // heads,
        ffn=ffn,
        vocab=vocab,
        context=ctx,
        rope_theta=theta,
        rope_scaling=None,
        norm_eps=1e-5,
        tied_embeddings=tied,
        qkv_bias=bias,
        layer_bytes=0,
        embedding_bytes=0,
        head_bytes=0,
        norm_bytes=0,
        file_dtype="bf16",
        format="builtin",
    )
    return _with_param_sizes(spec)
