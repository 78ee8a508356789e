"""The loader returns one canonical layout, whatever the file, and refuses bad files in one line."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from p2pllm.errors import ModelFileError, UnsupportedModelError, UsageError
from p2pllm.model.formats import open_model_file
from p2pllm.model.loader import (
    BIAS_FIELDS,
    LAYER_FIELDS,
    check_model,
    gguf_to_hf_rope,
    hf_to_gguf_rope,
    load_slice,
)
from p2pllm.model.writer import write_gguf, write_hf

MODELS = Path(__file__).resolve().parents[2] / "shared/models"
STORIES_GGUF = MODELS / "stories260K.gguf"
STORIES_BIN = MODELS / "stories260K.bin"

HF_TO_CANON = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "wq",
    "self_attn.k_proj.weight": "wk",
    "self_attn.v_proj.weight": "wv",
    "self_attn.o_proj.weight": "wo",
    "post_attention_layernorm.weight": "ffn_norm",
    "mlp.gate_proj.weight": "w_gate",
    "mlp.up_proj.weight": "w_up",
    "mlp.down_proj.weight": "w_down",
    "self_attn.q_proj.bias": "bq",
    "self_attn.k_proj.bias": "bk",
    "self_attn.v_proj.bias": "bv",
}


# --------------------------------------------------------------------------- builders


def _spec_fields(arch="llama", n_layers=3, hidden=64, n_heads=4, n_kv_heads=2, ffn=96, vocab=320):
    return dict(
        arch=arch,
        n_layers=n_layers,
        hidden=hidden,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=hidden // n_heads,
        ffn=ffn,
        vocab=vocab,
        context=256,
        rope_theta=10000.0,
        norm_eps=1e-5,
    )


def _canonical(fields: dict, *, tied: bool = False, bias: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, f, v = fields["hidden"], fields["ffn"], fields["vocab"]
    q = fields["n_heads"] * fields["head_dim"]
    kv = fields["n_kv_heads"] * fields["head_dim"]

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    w = {"embed": r(v, h), "norm": 1 + r(h)}
    if not tied:
        w["head"] = r(v, h)
    for i in range(fields["n_layers"]):
        layer = dict(
            attn_norm=1 + r(h), wq=r(q, h), wk=r(kv, h), wv=r(kv, h), wo=r(h, q),
            ffn_norm=1 + r(h), w_gate=r(f, h), w_up=r(f, h), w_down=r(h, f),
        )  # fmt: skip
        if bias:
            layer.update(bq=r(q), bk=r(kv), bv=r(kv))
        w.update({f"layers.{i}.{k}": t for k, t in layer.items()})
    return w


def _spm_tokenizer(vocab: int) -> dict[str, object]:
    """A SentencePiece-style vocabulary llama.cpp accepts: control, byte and word pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    letters = "abcdefghijklmnopqrstuvwxyz"
    k = 0
    while len(tokens) < vocab:
        piece = "\u2581" + letters[k % 26] + (letters[k // 26 - 1] if k >= 26 else "")
        tokens.append(piece)
        types.append(1)
        k += 1
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens[:vocab],
        "tokenizer.ggml.scores": [-float(i) for i in range(vocab)],
        "tokenizer.ggml.token_type": types[:vocab],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
    }


def _gguf_model(tmp_path: Path, *, arch="llama", qtype="f32", tied=False, name="m.gguf", seed=0, **dims):
    fields = _spec_fields(arch=arch, **dims)
    weights = _canonical(fields, tied=tied, bias=arch == "qwen2", seed=seed)
    path = tmp_path / name
    write_gguf(path, fields, weights, _spm_tokenizer(fields["vocab"]), qtype=qtype)
    return path, fields, weights


def _hf_config(kind: str, *, tied: bool):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[kind]
    return cls(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
    )


def _hf_model(tmp_path: Path, kind: str, *, tied: bool, shard: str | None = None):
    """A random transformers model saved with save_pretrained; every parameter randomised."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_hf_config(kind, tied=tied))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    folder = tmp_path / f"{kind}-{'tied' if tied else 'untied'}-{shard or 'single'}"
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kwargs)
    return folder, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_slice_matches(s, canon: dict[str, torch.Tensor], n_layers: int, *, tied: bool, exact=True):
    def same(a, b, what):
        assert a is not None, what
        assert a.shape == b.shape, what
        if exact:
            assert torch.equal(a, b), what
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=what)

    if s.start == 0:
        same(s.embed, canon["embed"], "embed")
    else:
        assert s.embed is None
    if s.end == n_layers:
        same(s.norm, canon["norm"], "norm")
        same(s.head, canon["embed"] if tied else canon["head"], "head")
    else:
        assert s.norm is None and s.head is None
    assert len(s.layers) == s.end - s.start
    for layer, i in zip(s.layers, range(s.start, s.end)):
        for field in LAYER_FIELDS + BIAS_FIELDS:
            key = f"layers.{i}.{field}"
            if key in canon:
                same(getattr(layer, field), canon[key], key)
            else:
                assert getattr(layer, field) is None, key


def _ranges(n):
    return [(0, n), (0, 1), (1, 2), (n - 1, n), (1, n)]


# --------------------------------------------------------------------------- rope permutation


def test_rope_permutation_is_llama_cpps_and_its_inverse():
    # llama.cpp convert_hf_to_gguf.py: w.reshape(n_head, 2, hd//2, *rest).swapaxes(1, 2).reshape(w.shape)
    w = torch.arange(4 * 8 * 3, dtype=torch.float32).reshape(32, 3)
    ref = w.numpy().reshape(4, 2, 4, 3).swapaxes(1, 2).reshape(32, 3)
    assert np.array_equal(hf_to_gguf_rope(w, 4).numpy(), ref)
    assert torch.equal(gguf_to_hf_rope(hf_to_gguf_rope(w, 4), 4), w)
    b = torch.arange(32.0)
    assert torch.equal(gguf_to_hf_rope(hf_to_gguf_rope(b, 2), 2), b)


# --------------------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize(
    "kind,tied,shard",
    [
        ("llama", False, None),
        ("llama", True, None),
        ("mistral", False, None),
        ("qwen2", False, None),
        ("qwen2", True, None),
        ("llama", False, "40KB"),
    ],
)
def test_hf_slices_equal_the_transformers_state_dict(tmp_path, kind, tied, shard):
    folder, sd = _hf_model(tmp_path, kind, tied=tied, shard=shard)
    if shard:
        assert (folder / "model.safetensors.index.json").exists()
        assert len(list(folder.glob("*.safetensors"))) > 1
    canon = {"embed": sd["model.embed_tokens.weight"], "norm": sd["model.norm.weight"]}
    if not tied:
        canon["head"] = sd["lm_head.weight"]
    for key, t in sd.items():
        parts = key.split(".")
        if parts[:2] == ["model", "layers"]:
            canon[f"layers.{parts[2]}.{HF_TO_CANON['.'.join(parts[3:])]}"] = t
    for start, end in _ranges(3):
        s = load_slice(folder, start, end)
        assert s.spec.arch == kind and s.spec.tied_embeddings == tied
        assert s.spec.qkv_bias == (kind == "qwen2")
        _assert_slice_matches(s, canon, 3, tied=tied)
        assert s.rope_freq_factors is None


def test_hf_bf16_is_cast_to_the_requested_dtype(tmp_path):
    fields = _spec_fields()
    weights = _canonical(fields)
    config = _hf_config("llama", tied=False).to_dict()
    config.update(vocab_size=fields["vocab"], intermediate_size=fields["ffn"])
    write_hf(tmp_path / "m", config, weights, dtype=torch.bfloat16)
    s = load_slice(tmp_path / "m", 0, 3, dtype=torch.float16)
    assert s.layers[0].wq.dtype == torch.float16
    assert torch.equal(s.layers[0].wq, weights["layers.0.wq"].to(torch.bfloat16).to(torch.float16))
    assert s.spec.file_dtype == "bf16"


@pytest.mark.parametrize("shard", [None, 30_000])
def test_write_hf_loads_in_transformers(tmp_path, shard):
    from transformers import AutoModelForCausalLM

    fields = _spec_fields(arch="qwen2")
    weights = _canonical(fields, bias=True)
    config = _hf_config("qwen2", tied=False).to_dict()
    config.update(vocab_size=fields["vocab"], intermediate_size=fields["ffn"])
    write_hf(tmp_path / "m", config, weights, max_shard_bytes=shard)
    if shard:
        index = json.loads((tmp_path / "m/model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    sd = model.state_dict()
    assert torch.equal(sd["model.layers.2.self_attn.k_proj.bias"], weights["layers.2.bk"])
    assert torch.equal(sd["model.layers.1.mlp.down_proj.weight"], weights["layers.1.w_down"])
    assert torch.equal(sd["lm_head.weight"], weights["head"])
    _assert_slice_matches(load_slice(tmp_path / "m", 0, 3), weights, 3, tied=False)


# --------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", False), ("mistral", True)])
def test_gguf_f32_round_trip_is_exact(tmp_path, arch, tied):
    path, fields, weights = _gguf_model(tmp_path, arch=arch, tied=tied)
    for start, end in _ranges(3):
        s = load_slice(path, start, end)
        assert s.spec.tied_embeddings == tied
        _assert_slice_matches(s, weights, 3, tied=tied)


def test_gguf_llama_q_k_are_stored_permuted_as_transformers_expects(tmp_path):
    """transformers' own GGUF reader (LlamaTensorProcessor) un-permutes our file to our layout."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    path, fields, weights = _gguf_model(tmp_path, arch="llama")
    mf = open_model_file(path)
    raw_q = mf.read("blk.1.attn_q.weight").numpy()
    raw_k = mf.read("blk.1.attn_k.weight").numpy()
    assert not np.array_equal(raw_q, weights["layers.1.wq"].numpy())  # really permuted on disk
    proc = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    q = proc.process(weights=raw_q, name="blk.1.attn_q.weight").weights
    k = proc.process(weights=raw_k, name="blk.1.attn_k.weight").weights
    assert np.array_equal(q, weights["layers.1.wq"].numpy())
    assert np.array_equal(k, weights["layers.1.wk"].numpy())


@pytest.mark.parametrize("qtype", ["f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_quantized_equals_gguf_dequantize(tmp_path, arch, qtype):
    path, fields, weights = _gguf_model(tmp_path, arch=arch, qtype=qtype)
    ggml = {"f16": None, "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[qtype]

    def expected(key: str, t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 1:
            return t
        field = key.rsplit(".", 1)[-1]
        n = {"wq": fields["n_heads"], "wk": fields["n_kv_heads"]}.get(field)
        a = t.numpy()
        if arch == "llama" and n:  # quantization happens on the permuted rows
            a = hf_to_gguf_rope(t, n).numpy()
        if ggml is None:
            a = a.astype(np.float16).astype(np.float32)
        else:
            a = gguf.quants.dequantize(gguf.quants.quantize(a, ggml), ggml)
        out = torch.from_numpy(np.ascontiguousarray(a))
        return gguf_to_hf_rope(out, n) if arch == "llama" and n else out

    canon = {k: expected(k, t) for k, t in weights.items()}
    assert open_model_file(path).tensors["token_embd.weight"].dtype == qtype.upper()
    assert open_model_file(path).tensors["output_norm.weight"].dtype == "F32"
    for start, end in [(0, 3), (1, 2), (2, 3)]:
        _assert_slice_matches(load_slice(path, start, end), canon, 3, tied=False)


def test_gguf_rope_freqs_are_returned_to_every_stage(tmp_path):
    fields = _spec_fields()
    weights = _canonical(fields)
    weights["rope_freqs"] = torch.linspace(1.0, 8.0, fields["head_dim"] // 2)
    write_gguf(tmp_path / "r.gguf", fields, weights, _spm_tokenizer(fields["vocab"]))
    s = load_slice(tmp_path / "r.gguf", 1, 2)
    assert s.spec.rope_scaling is not None and s.spec.rope_scaling.kind == "freq_factors"
    assert torch.equal(s.rope_freq_factors, weights["rope_freqs"])


def test_dtype_progress_and_layer_range(tmp_path):
    path, fields, weights = _gguf_model(tmp_path)
    calls = []
    s = load_slice(path, 1, 3, dtype=torch.bfloat16, progress=lambda d, t: calls.append((d, t)))
    total = 2 * 9 + 2
    assert calls == [(i, total) for i in range(1, total + 1)]
    assert s.layers[0].wo.dtype == torch.bfloat16 and s.head.dtype == torch.bfloat16
    assert s.layers[0].wo.device.type == "cpu"
    for start, end in [(0, 0), (2, 1), (-1, 2), (0, 4), (3, 3)]:
        with pytest.raises(UsageError):
            load_slice(path, start, end)


# --------------------------------------------------------------------------- stories260K


def _bin_weights() -> dict[str, torch.Tensor]:
    raw = STORIES_BIN.read_bytes()
    dim, hidden, n_layers, n_heads, n_kv, vocab, _seq = struct.unpack("<7i", raw[:28])
    kv = dim * n_kv // n_heads
    data = torch.from_numpy(np.frombuffer(raw, dtype="<f4", offset=28).copy())
    out, pos = {}, 0
    for name, shape in [
        ("embed", (vocab, dim)),
        ("attn_norm", (n_layers, dim)),
        ("wq", (n_layers, dim, dim)),
        ("wk", (n_layers, kv, dim)),
        ("wv", (n_layers, kv, dim)),
        ("wo", (n_layers, dim, dim)),
        ("ffn_norm", (n_layers, dim)),
        ("w_gate", (n_layers, hidden, dim)),
        ("w_down", (n_layers, dim, hidden)),
        ("w_up", (n_layers, hidden, dim)),
        ("norm", (dim,)),
    ]:
        n = math.prod(shape)
        out[name] = data[pos : pos + n].reshape(shape)
        pos += n
    return out


def _rope_interleaved(x: torch.Tensor, pos: torch.Tensor, theta=10000.0) -> torch.Tensor:
    """Meta/llama2.c rope: rotates adjacent pairs (2i, 2i+1). x: [T, H, hd]."""
    hd = x.shape[-1]
    freqs = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = pos[:, None, None] * freqs
    xr, xi = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = xr * ang.cos() - xi * ang.sin()
    out[..., 1::2] = xr * ang.sin() + xi * ang.cos()
    return out


def _rope_half(x: torch.Tensor, pos: torch.Tensor, theta=10000.0) -> torch.Tensor:
    """Hugging Face rope: rotate_half, the first half of a head pairs with the second."""
    hd = x.shape[-1]
    freqs = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.cat([freqs, freqs])[None, None, :] * pos[:, None, None]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * ang.cos() + torch.cat([-x2, x1], dim=-1) * ang.sin()


@pytest.mark.skipif(not STORIES_GGUF.exists(), reason=f"{STORIES_GGUF} absent (shared test models)")
def test_stories260k_loads_and_spec_matches_readme():
    spec = check_model(STORIES_GGUF)
    assert (spec.n_layers, spec.hidden, spec.n_heads, spec.n_kv_heads, spec.head_dim) == (5, 64, 8, 4, 8)
    assert (spec.ffn, spec.vocab, spec.tied_embeddings) == (172, 512, False)
    s = load_slice(STORIES_GGUF, 0, 5)
    assert s.embed.shape == (512, 64) and s.head.shape == (512, 64) and len(s.layers) == 5
    assert s.layers[4].w_down.shape == (64, 172)
    # transformers' own GGUF reader un-permutes the file's Q/K to exactly what we return
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    proc = LlamaTensorProcessor(config={"num_attention_heads": 8, "num_key_value_heads": 4})
    mf = open_model_file(STORIES_GGUF)
    for i, layer in enumerate(s.layers):
        for field, name in (("wq", f"blk.{i}.attn_q.weight"), ("wk", f"blk.{i}.attn_k.weight")):
            expected = proc.process(weights=mf.read(name).numpy(), name=name).weights
            assert np.array_equal(getattr(layer, field).numpy(), expected), name


@pytest.mark.skipif(
    not (STORIES_GGUF.exists() and STORIES_BIN.exists()), reason=f"{MODELS} absent (shared test models)"
)
def test_stories260k_unpermuted_qk_give_the_attention_scores_of_llama2c():
    """llama2.c's .bin keeps Meta's layout (adjacent-pair rope, = the GGUF bytes). Attention
    scores from it with interleaved rope must equal those from our Q/K with rotate-half rope."""
    ref = _bin_weights()
    s = load_slice(STORIES_GGUF, 0, 5)
    assert torch.equal(s.embed, ref["embed"]) and torch.equal(s.norm, ref["norm"])
    H, KV, hd = 8, 4, 8
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 64, generator=g, dtype=torch.float64)
    pos = torch.arange(6, dtype=torch.float64) * 7
    for i, layer in enumerate(s.layers):
        assert torch.equal(layer.wv, ref["wv"][i]) and torch.equal(layer.w_up, ref["w_up"][i])
        assert not torch.equal(layer.wq, ref["wq"][i])  # the layouts really differ
        q_ref = _rope_interleaved((x @ ref["wq"][i].double().T).view(6, H, hd), pos)
        k_ref = _rope_interleaved((x @ ref["wk"][i].double().T).view(6, KV, hd), pos)
        q = _rope_half((x @ layer.wq.double().T).view(6, H, hd), pos)
        k = _rope_half((x @ layer.wk.double().T).view(6, KV, hd), pos)
        k_ref, k = k_ref.repeat_interleave(H // KV, dim=1), k.repeat_interleave(H // KV, dim=1)
        scores_ref = torch.einsum("thd,shd->hts", q_ref, k_ref)
        scores = torch.einsum("thd,shd->hts", q, k)
        torch.testing.assert_close(scores, scores_ref, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- llama.cpp


@pytest.mark.parametrize("qtype,atol", [("f32", 5e-3), ("f16", 1e-2), ("q8_0", 0.15), ("q4_0", 0.15)])
def test_write_gguf_runs_in_llama_cpp_like_transformers_on_our_loaded_weights(tmp_path, qtype, atol):
    """llama.cpp on our GGUF == transformers on what load_slice reads back from it (a wrong
    rope layout is off by more than 1.0 from the second position on; llama.cpp's q8 activations
    explain the looser quantized tolerance)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed")
    from transformers import AutoModelForCausalLM

    fields = _spec_fields(vocab=320)
    write_gguf(tmp_path / "m.gguf", fields, _canonical(fields), _spm_tokenizer(320), qtype=qtype)
    s = load_slice(tmp_path / "m.gguf", 0, 3)
    loaded = {"embed": s.embed, "norm": s.norm, "head": s.head}
    for i, layer in enumerate(s.layers):
        loaded.update({f"layers.{i}.{f}": getattr(layer, f) for f in LAYER_FIELDS})
    config = _hf_config("llama", tied=False).to_dict()
    config.update(vocab_size=320, intermediate_size=fields["ffn"], rms_norm_eps=1e-5, max_position_embeddings=256)
    write_hf(tmp_path / "hf", config, loaded)
    ids = [1, 300, 301, 302, 17, 40, 41, 42]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")(torch.tensor([ids])).logits[0]
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, verbose=False)
    llm.eval(ids)
    got = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)
    torch.testing.assert_close(got, ref, rtol=0, atol=atol)


# --------------------------------------------------------------------------- check_model


def test_check_model_returns_the_spec(tmp_path):
    path, fields, _ = _gguf_model(tmp_path, arch="qwen2", qtype="q8_0")
    spec = check_model(path)
    assert (spec.arch, spec.n_layers, spec.hidden, spec.qkv_bias) == ("qwen2", 3, 64, True)
    folder, _ = _hf_model(tmp_path, "mistral", tied=False)
    assert check_model(folder).arch == "mistral"


@pytest.mark.parametrize("fmt", ["gguf", "hf"])
def test_check_model_names_the_tensor_with_nan(tmp_path, fmt):
    fields = _spec_fields()
    weights = _canonical(fields)
    weights["layers.1.w_up"][3, 5] = float("nan")
    if fmt == "gguf":
        path = tmp_path / "nan.gguf"
        write_gguf(path, fields, weights, _spm_tokenizer(fields["vocab"]))
        name = "blk.1.ffn_up.weight"
    else:
        path = tmp_path / "nan"
        config = _hf_config("llama", tied=False).to_dict()
        config.update(vocab_size=fields["vocab"], intermediate_size=fields["ffn"])
        write_hf(path, config, weights)
        name = "model.layers.1.mlp.up_proj.weight"
    assert check_model(path, decode=False).n_layers == 3
    with pytest.raises(ModelFileError) as e:
        check_model(path)
    assert f"tensor {name}: 1 of" in str(e.value) and str(path) in str(e.value)


# --------------------------------------------------------------------------- corrupt files


def _one_line(e: pytest.ExceptionInfo, path: Path, *parts: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(str(path)), msg
    for part in parts:
        assert part in msg, msg
    return msg


@pytest.fixture
def good_gguf(tmp_path):
    path, _, _ = _gguf_model(tmp_path, name="good.gguf")
    return path


def test_gguf_wrong_magic(tmp_path, good_gguf):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + good_gguf.read_bytes()[4:])
    for fn in (load_slice, check_model):
        with pytest.raises(ModelFileError) as e:
            fn(bad, 0, 1) if fn is load_slice else fn(bad)
        _one_line(e, bad, "magic")


def test_gguf_bad_version(tmp_path, good_gguf):
    data = bytearray(good_gguf.read_bytes())
    data[4:8] = struct.pack("<I", 99)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    with pytest.raises(ModelFileError) as e:
        check_model(bad)
    _one_line(e, bad, "version 99")


def test_gguf_truncated_in_tensor_data_names_a_tensor(tmp_path, good_gguf):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(good_gguf.read_bytes()[:-1000])
    with pytest.raises(ModelFileError) as e:
        load_slice(bad, 0, 1)
    _one_line(e, bad, "tensor blk.2.", "past the end of the file")


def test_gguf_truncated_in_header(tmp_path, good_gguf):
    for cut in (30, 2000):
        bad = tmp_path / f"bad{cut}.gguf"
        bad.write_bytes(good_gguf.read_bytes()[:cut])
        with pytest.raises(ModelFileError) as e:
            check_model(bad)
        _one_line(e, bad, "truncated or corrupt GGUF header")


def test_gguf_tensor_offset_out_of_bounds(tmp_path, good_gguf):
    reader = gguf.GGUFReader(str(good_gguf))
    t = reader.tensors[3]
    at = t.field.offset + 8 + len(t.name.encode()) + 4 + 8 * len(t.shape) + 4  # the u64 data offset
    data = bytearray(good_gguf.read_bytes())
    data[at : at + 8] = struct.pack("<Q", 1 << 40)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    with pytest.raises(ModelFileError) as e:
        check_model(bad)
    _one_line(e, bad, f"tensor {t.name}:", "past the end of the file")


def test_gguf_shape_disagreeing_with_metadata(tmp_path):
    fields = _spec_fields()
    weights = _canonical(fields)
    path = tmp_path / "bad.gguf"
    write_gguf(path, {**fields, "ffn": 128}, weights, _spm_tokenizer(fields["vocab"]))
    for call in (lambda: load_slice(path, 2, 3), lambda: check_model(path, decode=False)):
        with pytest.raises(ModelFileError) as e:
            call()
        _one_line(e, path, "tensor blk.", "shape [", "but the metadata says [")
    write_gguf(path, {**fields, "hidden": 96, "head_dim": 24}, weights, _spm_tokenizer(fields["vocab"]))
    with pytest.raises(ModelFileError) as e:
        load_slice(path, 0, 1)
    _one_line(e, path, "tensor token_embd.weight: shape [320, 64] but the metadata says [320, 96]")


def test_gguf_missing_tensor(tmp_path):
    fields = _spec_fields()
    weights = _canonical(fields)
    del weights["layers.2.wv"]
    path = tmp_path / "bad.gguf"
    write_gguf(path, fields, weights, _spm_tokenizer(fields["vocab"]))
    load_slice(path, 0, 2)  # the slice that does not need it loads
    with pytest.raises(ModelFileError) as e:
        load_slice(path, 2, 3)
    _one_line(e, path, "missing tensor blk.2.attn_v.weight")
    with pytest.raises(ModelFileError):
        check_model(path, decode=False)


def test_gguf_unsupported_architecture(tmp_path, good_gguf):
    path = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(path), "falcon")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError) as e:
        check_model(path)
    _one_line(e, path, "unsupported architecture falcon")


def test_hf_unsupported_architecture(tmp_path):
    folder, _ = _hf_model(tmp_path, "llama", tied=False)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError) as e:
        load_slice(folder, 0, 1)
    _one_line(e, folder, "unsupported architecture gpt2")


def test_hf_output_projection_bias_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _ = _hf_model(tmp_path, "llama", tied=False)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(tensors, folder / "model.safetensors")
    load_slice(folder, 0, 1)
    with pytest.raises(UnsupportedModelError) as e:
        load_slice(folder, 1, 2)
    _one_line(e, folder, "o_proj.bias")


@pytest.fixture
def good_hf(tmp_path):
    folder, _ = _hf_model(tmp_path, "llama", tied=False)
    return folder


def test_safetensors_corrupt_json_header(good_hf):
    st = good_hf / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[8:12] = b"\xff{{["
    st.write_bytes(data)
    with pytest.raises(ModelFileError) as e:
        load_slice(good_hf, 0, 1)
    _one_line(e, st, "corrupt safetensors header")


def test_safetensors_truncated(good_hf):
    st = good_hf / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-500])
    with pytest.raises(ModelFileError) as e:
        check_model(good_hf)
    _one_line(e, st, "tensor ", "past the end of the file")


def test_safetensors_absurd_header_length(good_hf):
    st = good_hf / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 62)
    st.write_bytes(data)
    with pytest.raises(ModelFileError) as e:
        check_model(good_hf)
    _one_line(e, st, "claims")


def test_safetensors_index_pointing_to_a_missing_shard(tmp_path):
    folder, _ = _hf_model(tmp_path, "llama", tied=False, shard="40KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(ModelFileError) as e:
        load_slice(folder, 0, 1)
    _one_line(e, shards[-1], "missing")


def test_hf_missing_tensor_and_bad_shape(tmp_path):
    fields = _spec_fields()
    weights = _canonical(fields)
    config = _hf_config("llama", tied=False).to_dict()
    config.update(vocab_size=fields["vocab"], intermediate_size=fields["ffn"])
    del weights["layers.0.ffn_norm"]
    write_hf(tmp_path / "m", config, weights)
    with pytest.raises(ModelFileError) as e:
        load_slice(tmp_path / "m", 0, 1)
    _one_line(e, tmp_path / "m", "missing tensor model.layers.0.post_attention_layernorm.weight")
    shutil.rmtree(tmp_path / "m")
    write_hf(tmp_path / "m", {**config, "intermediate_size": 64}, _canonical(fields))
    with pytest.raises(ModelFileError) as e:
        check_model(tmp_path / "m")
    expected = "tensor model.layers.0.mlp.gate_proj.weight: shape [96, 64] but the metadata says [64, 64]"
    _one_line(e, tmp_path / "m", expected)
