"""`make-demo-model` writes GGUF one tensor at a time (the 3b size would need 13 GB of f32 at once):
the file must be byte for byte what writing the whole `demo_weights` dict gives."""

from __future__ import annotations

import pytest

from p2pllm.model.demo import (
    DEMO_SHAPES,
    demo_weights,
    demo_weights_lazy,
    make_demo_model,
    spec_fields,
)
from p2pllm.model.demo_tokenizer import demo_tokenizer_gguf_fields
from p2pllm.model.writer import write_gguf


@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0", "q4_0"])
def test_streamed_file_equals_the_eager_one(tmp_path, qtype):
    shape = DEMO_SHAPES["tiny"]
    eager, streamed = tmp_path / "eager.gguf", tmp_path / "streamed.gguf"
    write_gguf(eager, spec_fields(shape), demo_weights(shape, 7), demo_tokenizer_gguf_fields(shape.vocab), qtype=qtype,
               name="p2pllm-demo-tiny")
    make_demo_model(streamed, "gguf", "tiny", seed=7, qtype=qtype)
    assert streamed.read_bytes() == eager.read_bytes()


def test_lazy_tensors_are_the_eager_ones():
    shape = DEMO_SHAPES["small"]
    eager, lazy = demo_weights(shape, 3), demo_weights_lazy(shape, 3)
    assert list(eager) == list(lazy)
    for key, t in eager.items():
        assert tuple(t.shape) == lazy[key].shape
        assert lazy[key]().equal(t), key


def test_the_3b_size_has_llama_3_2_3b_parameter_count():
    s = DEMO_SHAPES["3b"]
    per_layer = 2 * s.hidden * s.n_heads * s.head_dim + 2 * s.hidden * s.n_kv_heads * s.head_dim + 3 * s.hidden * s.ffn
    params = s.n_layers * per_layer + 2 * s.vocab * s.hidden
    assert 3.1e9 < params < 3.3e9
    assert s.hidden % 256 == 0 and s.ffn % 256 == 0  # whole K-quant super-blocks: llama.cpp can make Q4_K_M
