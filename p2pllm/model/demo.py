"""`p2pllm make-demo-model`: a deterministic seeded-random Llama with a real tokenizer.

No download needed, so the README demo, the tests and the benchmarks run anywhere. The weights
are random: the model speaks gibberish, but every code path (tokenizer, GGUF/HF loading, rope,
GQA, the ring) is exercised exactly as with a trained model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UsageError
from .demo_tokenizer import build_demo_tokenizer, demo_tokenizer_gguf_fields, write_demo_tokenizer_hf
from .writer import write_gguf, write_hf


@dataclass(frozen=True)
class DemoShape:
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    ffn: int
    vocab: int
    context: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads


DEMO_SHAPES = {
    "tiny": DemoShape(n_layers=6, hidden=128, n_heads=4, n_kv_heads=2, ffn=384, vocab=1024),
    "small": DemoShape(n_layers=8, hidden=256, n_heads=4, n_kv_heads=2, ffn=768, vocab=1024),
    "125m": DemoShape(n_layers=12, hidden=768, n_heads=12, n_kv_heads=4, ffn=2048, vocab=32000),
    # 1.1B parameters (benchmarks: a stage of a real size; quantize it with llama.cpp)
    "1b": DemoShape(n_layers=16, hidden=2048, n_heads=32, n_kv_heads=8, ffn=8192, vocab=32000),
}


def demo_weights(shape: DemoShape, seed: int = 0, tied: bool = False) -> dict[str, torch.Tensor]:
    """Canonical flat weights (see writer.py), drawn in a fixed order from one seeded generator.

    Matrices are scaled by 1/sqrt(fan_in) so every layer moves the residual stream and the
    logits are spread out (clear greedy choices, as in a trained model).
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*dims, scale=None):
        return torch.randn(*dims, generator=g) * (dims[-1] ** -0.5 if scale is None else scale)

    h, hd, ffn = shape.hidden, shape.head_dim, shape.ffn
    w = {"embed": randn(shape.vocab, h, scale=1.0)}
    for i in range(shape.n_layers):
        p = f"layers.{i}."
        w[p + "attn_norm"] = 1.0 + randn(h, scale=0.1)
        w[p + "wq"] = randn(shape.n_heads * hd, h)
        w[p + "wk"] = randn(shape.n_kv_heads * hd, h)
        w[p + "wv"] = randn(shape.n_kv_heads * hd, h)
        w[p + "wo"] = randn(h, shape.n_heads * hd)
        w[p + "ffn_norm"] = 1.0 + randn(h, scale=0.1)
        w[p + "w_gate"] = randn(ffn, h)
        w[p + "w_up"] = randn(ffn, h)
        w[p + "w_down"] = randn(h, ffn)
    w["norm"] = 1.0 + randn(h, scale=0.1)
    if not tied:
        w["head"] = randn(shape.vocab, h)
    return w


def spec_fields(shape: DemoShape) -> dict:
    return {
        "arch": "llama",
        "n_layers": shape.n_layers,
        "context": shape.context,
        "hidden": shape.hidden,
        "ffn": shape.ffn,
        "n_heads": shape.n_heads,
        "n_kv_heads": shape.n_kv_heads,
        "head_dim": shape.head_dim,
        "rope_theta": shape.rope_theta,
        "norm_eps": shape.norm_eps,
        "vocab": shape.vocab,
    }


def hf_config(shape: DemoShape, tied: bool = False) -> dict:
    tok = build_demo_tokenizer(shape.vocab)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.ffn,
        "num_hidden_layers": shape.n_layers,
        "num_attention_heads": shape.n_heads,
        "num_key_value_heads": shape.n_kv_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": shape.context,
        "rms_norm_eps": shape.norm_eps,
        "rope_theta": shape.rope_theta,
        "vocab_size": shape.vocab,
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": tok.token_to_id("<s>"),
        "eos_token_id": tok.token_to_id("</s>"),
        "torch_dtype": "float32",
    }


def make_demo_model(path: str | Path, fmt: str = "gguf", size: str = "tiny", seed: int = 0,
                    qtype: str = "f32") -> Path:
    if size not in DEMO_SHAPES:
        raise UsageError(f"--size must be one of {', '.join(DEMO_SHAPES)}, got {size!r}")
    shape = DEMO_SHAPES[size]
    path = Path(path)
    weights = demo_weights(shape, seed)
    if fmt == "gguf":
        if path.is_dir():
            raise UsageError(f"{path} is a folder; give a file name ending in .gguf")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_gguf(path, spec_fields(shape), weights, demo_tokenizer_gguf_fields(shape.vocab), qtype=qtype,
                   name=f"p2pllm-demo-{size}")
    elif fmt == "hf":
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UsageError(f"{path} exists and is not an empty folder")
        if qtype != "f32":
            raise UsageError("--qtype applies to GGUF only")
        path.mkdir(parents=True, exist_ok=True)
        write_hf(path, hf_config(shape), weights)
        write_demo_tokenizer_hf(path, shape.vocab)
    else:
        raise UsageError(f"--format must be gguf or hf, got {fmt!r}")
    return path
