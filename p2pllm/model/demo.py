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
    # 3.2B parameters, Llama-3.2-3B's count (benchmarks/mission.py: a model no single peer can hold;
    # ~2 GB once llama.cpp quantizes it to Q4_K_M); written one tensor at a time, so making it needs
    # about one tensor of memory, not the model's
    "3b": DemoShape(n_layers=30, hidden=3072, n_heads=24, n_kv_heads=8, ffn=8192, vocab=32000),
}


def _draws(shape: DemoShape, tied: bool = False):
    """(key, dims, scale, offset) of every tensor, in the order they are drawn from the generator:
    the tensor is `offset + randn(*dims) * scale` (scale None: 1/sqrt(fan_in))."""
    h, hd, ffn = shape.hidden, shape.head_dim, shape.ffn
    yield "embed", (shape.vocab, h), 1.0, None
    for i in range(shape.n_layers):
        p = f"layers.{i}."
        yield p + "attn_norm", (h,), 0.1, 1.0
        yield p + "wq", (shape.n_heads * hd, h), None, None
        yield p + "wk", (shape.n_kv_heads * hd, h), None, None
        yield p + "wv", (shape.n_kv_heads * hd, h), None, None
        yield p + "wo", (h, shape.n_heads * hd), None, None
        yield p + "ffn_norm", (h,), 0.1, 1.0
        yield p + "w_gate", (ffn, h), None, None
        yield p + "w_up", (ffn, h), None, None
        yield p + "w_down", (h, ffn), None, None
    yield "norm", (h,), 0.1, 1.0
    if not tied:
        yield "head", (shape.vocab, h), None, None


def _draw(g: torch.Generator, dims: tuple, scale: float | None, offset: float | None) -> torch.Tensor:
    t = torch.randn(*dims, generator=g) * (dims[-1] ** -0.5 if scale is None else scale)
    return t if offset is None else offset + t


def demo_weights(shape: DemoShape, seed: int = 0, tied: bool = False) -> dict[str, torch.Tensor]:
    """Canonical flat weights (see writer.py), drawn in a fixed order from one seeded generator.

    Matrices are scaled by 1/sqrt(fan_in) so every layer moves the residual stream and the
    logits are spread out (clear greedy choices, as in a trained model).
    """
    g = torch.Generator().manual_seed(seed)
    return {key: _draw(g, dims, scale, offset) for key, dims, scale, offset in _draws(shape, tied)}


class LazyTensor:
    """One tensor of `demo_weights`, made only when called (from the generator state saved before
    it was drawn), so a multi-GB model is written one tensor at a time."""

    def __init__(self, state: torch.Tensor, dims: tuple, scale: float | None, offset: float | None):
        self.state, self.shape, self.scale, self.offset = state, tuple(dims), scale, offset

    def __call__(self) -> torch.Tensor:
        g = torch.Generator()
        g.set_state(self.state)
        return _draw(g, self.shape, self.scale, self.offset)


def demo_weights_lazy(shape: DemoShape, seed: int = 0, tied: bool = False) -> dict[str, LazyTensor]:
    """The same tensors as `demo_weights`, bit for bit, as `LazyTensor`s. Finding each tensor's
    generator state takes one pass of drawing (each tensor is dropped at once)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, dims, scale, offset in _draws(shape, tied):
        out[key] = LazyTensor(g.get_state(), dims, scale, offset)
        torch.randn(*dims, generator=g)  # advance the generator exactly as demo_weights does
    return out


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
    if fmt == "gguf":
        if path.is_dir():
            raise UsageError(f"{path} is a folder; give a file name ending in .gguf")
        path.parent.mkdir(parents=True, exist_ok=True)
        # one tensor at a time: the same bytes as demo_weights', in the memory of one tensor
        write_gguf(path, spec_fields(shape), demo_weights_lazy(shape, seed), demo_tokenizer_gguf_fields(shape.vocab), qtype=qtype,
                   name=f"p2pllm-demo-{size}")
    elif fmt == "hf":
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UsageError(f"{path} exists and is not an empty folder")
        if qtype != "f32":
            raise UsageError("--qtype applies to GGUF only")
        path.mkdir(parents=True, exist_ok=True)
        write_hf(path, hf_config(shape), demo_weights(shape, seed))
        write_demo_tokenizer_hf(path, shape.vocab)
    else:
        raise UsageError(f"--format must be gguf or hf, got {fmt!r}")
    return path
