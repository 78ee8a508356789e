"""The ggml backend: every encoding it computes with against gguf's own dequantization, whole
models against the torch backend and llama.cpp's quantizer, clean refusals, and memory that
matches what the planner predicts."""

from __future__ import annotations

import ctypes
import gc
import re

import numpy as np
import psutil
import pytest
import torch

from p2pllm.model.backends import ggml_lib as gl
from p2pllm.model.backends import open_stage
from p2pllm.model.batch import BatchMeta, SeqChunk
from p2pllm.model.spec import read_spec

from conftest import assert_one_line_error, run_cli, shared_model

SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"


# --------------------------------------------------------------------------- kernels vs gguf


def _ggml_rows_and_gemv(type_name: str, data: bytes, n_rows: int, n_in: int, x: np.ndarray):
    """ggml's own decoding (get_rows) and product (mul_mat) of one quantized matrix."""
    g = gl.ggml()
    backend = gl.cpu_backend(1)
    weights = gl.Context(2)
    w = weights.tensor(type_name, (n_in, n_rows))
    wbuf = gl.Buffer.for_context(weights, backend)
    gl.view(w, np.uint8, (len(data),))[:] = np.frombuffer(data, dtype=np.uint8)
    ctx = gl.Context(16, 16)
    ids, xt = ctx.tensor("I32", (n_rows,)), ctx.tensor("F32", (n_in, 1))
    rows, prod = g.ggml_get_rows(ctx.ptr, w, ids), g.ggml_mul_mat(ctx.ptr, w, xt)
    gf = g.ggml_new_graph_custom(ctx.ptr, 16, False)
    g.ggml_build_forward_expand(gf, rows)
    g.ggml_build_forward_expand(gf, prod)
    alloc = g.ggml_gallocr_new(g.ggml_backend_cpu_buffer_type())
    assert g.ggml_gallocr_alloc_graph(alloc, gf)
    gl.view(ids, np.int32, (n_rows,))[:] = np.arange(n_rows)
    gl.view(xt, np.float32, (n_in,))[:] = x
    g.ggml_backend_graph_compute(backend, gf)
    out = gl.view(rows, np.float32, (n_rows, n_in)).copy(), gl.view(prod, np.float32, (n_rows,)).copy()
    g.ggml_gallocr_free(alloc)
    ctx.free()
    wbuf.free()
    weights.free()
    g.ggml_backend_free(backend)
    return out


def _quantize(type_name: str, w: np.ndarray) -> bytes:
    """Quantize with ggml's own quantizer (the one llama.cpp's tools use)."""
    g = gl.ggml()
    n_rows, n_in = w.shape
    out = (ctypes.c_uint8 * (gl.row_bytes(type_name, n_in) * n_rows))()
    src = np.ascontiguousarray(w, dtype=np.float32)
    if type_name in ("F32", "F16", "BF16"):
        import gguf

        return gguf.quants.quantize(src, gguf.GGMLQuantizationType[type_name]).tobytes()
    # the 1-2 bit types need an importance matrix; uniform importance is a valid one
    imatrix = np.ones(n_in, dtype=np.float32)
    f32p = ctypes.POINTER(ctypes.c_float)
    size = g.ggml_quantize_chunk(gl.type_id(type_name), src.ctypes.data_as(f32p), out, 0, n_rows, n_in,
                                 imatrix.ctypes.data_as(f32p))
    return bytes(out)[:size]


@pytest.mark.parametrize("type_name", gl.COMPUTE_TYPES)
def test_every_weight_encoding_decodes_like_gguf_and_multiplies_like_its_floats(type_name):
    import gguf

    rng = np.random.default_rng(0)
    n_rows, n_in = 8, 512
    w = rng.standard_normal((n_rows, n_in)).astype(np.float32)
    data = _quantize(type_name, w)
    ref = gguf.quants.dequantize(np.frombuffer(data, dtype=np.uint8).reshape(n_rows, -1),
                                 gguf.GGMLQuantizationType[type_name])
    x = rng.standard_normal(n_in).astype(np.float32)
    rows, prod = _ggml_rows_and_gemv(type_name, data, n_rows, n_in, x)
    np.testing.assert_allclose(rows, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    exact = ref.astype(np.float64) @ x.astype(np.float64)
    # activations are quantized too (to q8 for quantized weights, f16 for f16): a small relative error
    assert np.abs(prod - exact).max() <= 0.02 * np.abs(exact).max(), (prod, exact)
    if type_name not in ("F32", "F16", "BF16"):  # and the encoding really is lossy: we compared real work
        assert not np.array_equal(ref, w)


# --------------------------------------------------------------------------- whole models


@pytest.fixture(scope="module")
def f32_model(tmp_path_factory):
    """A random Llama whose rows suit every block size (256), written F32 by our writer."""
    from p2pllm.model.demo import DemoShape, demo_weights, spec_fields
    from p2pllm.model.demo_tokenizer import demo_tokenizer_gguf_fields
    from p2pllm.model.writer import write_gguf

    shape = DemoShape(n_layers=3, hidden=256, n_heads=4, n_kv_heads=2, ffn=512, vocab=512, context=256)
    path = tmp_path_factory.mktemp("quant") / "f32.gguf"
    write_gguf(path, spec_fields(shape), demo_weights(shape, seed=3), demo_tokenizer_gguf_fields(512), qtype="f32")
    return path


# llama.cpp's file types (llama_ftype) and the tensor type each must put in the file
LLAMA_FTYPES = {"F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K": 11,
                "Q4_K": 15, "Q5_K": 17, "Q6_K": 18, "IQ4_NL": 25, "IQ4_XS": 30, "BF16": 32}


@pytest.mark.parametrize("type_name", list(LLAMA_FTYPES))
def test_llama_cpp_quantized_models_match_the_torch_backends_dequantized_run(llama_cpp, f32_model, tmp_path, type_name):
    """A file quantized by llama.cpp itself: the ggml stage (on the encodings) and the torch stage
    (gguf's dequantization, f32 compute) give the same logits up to activation quantization."""
    path = tmp_path / f"{type_name}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[type_name]
    assert llama_cpp.llama_model_quantize(str(f32_model).encode(), str(path).encode(), params) == 0
    spec = read_spec(path)
    from p2pllm.model.formats import open_model_file

    assert type_name in {t.dtype for t in open_model_file(path).tensors.values()}
    ids = [1] + list(range(40, 71))
    got = {}
    for backend in ("ggml", "torch"):
        stage = open_stage(path, 0, spec.n_layers, spec=spec, backend=backend, kv_dtype="f32")
        stage.kv.allocate(0, 64)
        got[backend] = stage.forward(torch.tensor(ids), BatchMeta.build([SeqChunk(0, 0, len(ids))]).all_rows())
    scale = got["torch"].abs().max().item()
    assert (got["ggml"] - got["torch"]).abs().max().item() <= 0.05 * scale
    assert (got["ggml"].argmax(-1) == got["torch"].argmax(-1)).float().mean() >= 0.9


def _run_ids(path, *args: str) -> list[int]:
    import json

    proc = run_cli("run", "--model", path, "--prompt", "Hello there, how are you?", "--max-tokens", "16", "--json", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["ids"]


# metadata variants, each as llama.cpp runs it. A linear rope factor without rope.scaling.type (or under
# its older name rope.scale_linear, as older conversions of long-context Llamas carry it) is applied by
# llama.cpp; we ignored it and generated other tokens
ROPE_VARIANTS = {
    "scaling.factor without a type": ("llama", False, {"llama.rope.scaling.factor": 4.0}),
    "legacy rope.scale_linear": ("llama", False, {"llama.rope.scale_linear": 4.0}),
    "qwen2, tied, qkv biases": ("qwen2", True, {}),
}


@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
def test_gguf_metadata_variants_give_llama_cpps_tokens_whole_and_split(llama_cpp, tmp_path, variant):
    from conftest import llama_cpp_greedy
    from p2pllm.model.demo import DemoShape, demo_weights, spec_fields
    from p2pllm.model.demo_tokenizer import demo_tokenizer_gguf_fields
    from p2pllm.model.writer import write_gguf

    arch, tied, extra = ROPE_VARIANTS[variant]
    shape = DemoShape(n_layers=3, hidden=128, n_heads=4, n_kv_heads=2, ffn=256, vocab=512, context=256)
    weights = demo_weights(shape, seed=3, tied=tied)
    if arch == "qwen2":
        g = torch.Generator().manual_seed(7)
        for i in range(shape.n_layers):
            for key, n in (("bq", 128), ("bk", 64), ("bv", 64)):
                weights[f"layers.{i}.{key}"] = torch.randn(n, generator=g) * 0.5
    path = tmp_path / "m.gguf"
    write_gguf(path, {**spec_fields(shape), "arch": arch}, weights, {**demo_tokenizer_gguf_fields(512), **extra})
    # llama.cpp's defaults, as ours: f16 KV cache, flash attention
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False,
                          type_k=1, type_v=1, flash_attn=True)
    whole, split = _run_ids(path), _run_ids(path, "--split", "1,2")
    want = llama_cpp_greedy(llm, llm.tokenize(b"Hello there, how are you?", add_bos=True), 16)
    assert len(whole) >= 8 and whole == want[:len(whole)], (whole, want)  # (we also stop at end-of-turn tokens)
    assert split == whole


def test_an_encoding_ggml_cannot_compute_is_one_line_naming_the_tensor(tmp_path):
    from p2pllm.model.demo import DemoShape, demo_weights, spec_fields
    from p2pllm.model.demo_tokenizer import demo_tokenizer_gguf_fields
    from p2pllm.model.writer import write_gguf

    shape = DemoShape(n_layers=2, hidden=64, n_heads=2, n_kv_heads=1, ffn=128, vocab=512, context=64)
    weights = demo_weights(shape)
    path = tmp_path / "f64.gguf"
    write_gguf(path, spec_fields(shape), weights, demo_tokenizer_gguf_fields(512), qtype="f32",
               tensor_dtypes={"layers.1.wq": np.float64})
    proc = run_cli("run", "--model", path, "--prompt", "hi", "--max-tokens", "2")
    line = assert_one_line_error(proc, 2, "blk.1.attn_q.weight", "F64")
    assert "cannot compute" in line


def test_bad_backend_and_kv_flags_are_one_line_errors(stories_gguf, demo_tiny_hf):
    cases = [
        (("--model", stories_gguf, "--kv-dtype", "q8_0"), "multiple of 32"),  # stories260K's heads are 8 wide
        (("--model", stories_gguf, "--backend", "ggml", "--dtype", "f16"), "--dtype applies to the torch backend"),
        (("--model", demo_tiny_hf, "--backend", "ggml"), "Hugging Face folder"),
        (("--model", demo_tiny_hf, "--kv-dtype", "q8_0"), "needs the ggml backend"),
    ]
    for args, needle in cases:
        assert_one_line_error(run_cli("run", *args, "--prompt", "hi", "--max-tokens", "2"), 2, needle)


# --------------------------------------------------------------------------- a replan's stage


def _hidden_out(stage, h: torch.Tensor) -> torch.Tensor:
    stage.kv.allocate(0, 64)
    out = stage.forward(h, BatchMeta.build([SeqChunk(0, 0, h.shape[0])]).all_rows())
    stage.kv.free(0)
    return out


@pytest.mark.parametrize("weights", ["mapped", "repacked"])
def test_a_replans_stage_takes_the_layers_the_old_one_holds(llama_cpp, f32_model, tmp_path, weights):
    """A survivor's new range [1, 3) beside its old [0, 2): layer 1 is taken (the same memory), only
    layer 2 is read; it computes exactly what a stage loaded from scratch does, and goes on doing so
    once the old stage is closed, which frees layer 0 but not layer 1."""
    import weakref

    from p2pllm.model.backends import layers_to_share

    path = tmp_path / "q.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES["Q4_0" if weights == "repacked" else "Q8_0"]  # Q4_0: repacked for AVX2
    assert llama_cpp.llama_model_quantize(str(f32_model).encode(), str(path).encode(), params) == 0
    spec = read_spec(path)
    assert spec.n_layers == 3
    old = open_stage(path, 0, 2, spec=spec)
    new = open_stage(path, 1, 3, spec=spec, shared=layers_to_share(old, 1, 3))
    fresh = open_stage(path, 1, 3, spec=spec)
    assert new.kept_layers == [1]
    assert new.loaded_bytes == spec.weight_bytes(2, 3) + (new.weight_bytes - spec.weight_bytes(1, 3))
    assert new.w["layers.1.wq"].contents.data == old.w["layers.1.wq"].contents.data  # not a copy
    assert new.w["layers.2.wq"].contents.data != fresh.w["layers.2.wq"].contents.data
    if weights == "repacked" and gl.repacks("Q4_0", spec.hidden):
        assert old._res.weights.groups[1].kinds["blk.1.attn_q.weight"] == "repacked"
    h = torch.randn(6, spec.hidden)
    want = _hidden_out(fresh, h)
    assert torch.equal(_hidden_out(new, h), want)
    layer0, layer1 = (weakref.ref(old._res.weights.groups[i]) for i in (0, 1))
    old.close()
    assert layer0() is None and layer1() is not None  # freed with the old stage / held by the new one
    assert torch.equal(_hidden_out(new, h), want)
    other = open_stage(path, 1, 3, spec=spec, backend="torch", shared=layers_to_share(new, 1, 3))
    assert other.loaded_bytes == other.weight_bytes  # another backend's weights are never taken
    new.close()
    fresh.close()


def test_a_torch_stage_takes_the_layers_the_old_one_holds(demo_tiny_hf):
    from p2pllm.model.backends import layers_to_share

    spec = read_spec(demo_tiny_hf)
    old = open_stage(demo_tiny_hf, 0, 4, spec=spec)
    new = open_stage(demo_tiny_hf, 2, 6, spec=spec, shared=layers_to_share(old, 2, 6))
    fresh = open_stage(demo_tiny_hf, 2, 6, spec=spec)
    assert new.layers[:2] == old.layers[2:] and new.layers[2] is not fresh.layers[2]
    assert 0 < new.loaded_bytes < new.weight_bytes
    h = torch.randn(5, spec.hidden)
    assert torch.equal(_hidden_out(new, h), _hidden_out(fresh, h))


# --------------------------------------------------------------------------- memory


def _file_rss(path) -> int:
    """Resident bytes of every mapping of `path` in this process."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


def test_a_middle_stage_reads_only_its_own_layers_bytes():
    path = shared_model(SMOL).resolve()
    spec = read_spec(path)
    # an earlier test's stage of this file, left to the garbage collector, was unmapped by a
    # collection while this one loaded and took its pages out of the sum (a CI failure): collect
    # first, and not in between
    gc.collect()
    gc.disable()
    try:
        before = _file_rss(path)
        stage = open_stage(path, 10, 20, spec=spec)
        grown = _file_rss(path) - before
    finally:
        gc.enable()
    mine = spec.weight_bytes(10, 20)
    assert stage.weight_bytes == mine
    assert mine <= grown <= mine * 1.05 + (1 << 20), (grown, mine)  # its layers, and nothing else
    assert grown < 0.4 * path.stat().st_size
    stage.close()


@pytest.mark.parametrize("rng", [(0, 30), (12, 30)])
def test_resident_growth_matches_the_planner_prediction(rng):
    """Load a stage, fill its KV for the planned batch x context and run the largest step: the
    process grows by what `stage_memory` predicts (weights + KV + workspace), within 10% + 100 MB."""
    from p2pllm.cluster.planner import PlanOptions, stage_memory

    path = shared_model(SMOL)
    spec = read_spec(path)
    options = PlanOptions(context=1024, batch=2, prefill_chunk=512, backend="ggml")
    proc = psutil.Process()
    gc.collect()  # an earlier test's stage freed while this one grows would hide part of its growth
    before = proc.memory_info().rss
    stage = open_stage(path, *rng, spec=spec, max_context=options.context)
    for seq in range(options.batch):
        stage.kv.allocate(seq, options.context)
    for start in range(0, options.context, options.prefill_chunk):
        for seq in range(options.batch):
            chunk = [SeqChunk(seq, start, options.prefill_chunk)]
            x = (torch.randint(0, spec.vocab, (options.prefill_chunk,)) if stage.is_first
                 else torch.randn(options.prefill_chunk, spec.hidden))
            stage.forward(x, BatchMeta.build(chunk))
    grown = proc.memory_info().rss - before
    m = stage_memory(spec, *rng, options)
    predicted = m.weights + m.kv + m.workspace - options.margin_bytes  # the margin is the interpreter's
    assert abs(grown - predicted) <= 0.10 * predicted + (100 << 20), (grown, m)
    assert stage.kv.nbytes() >= m.kv  # the cache really holds batch x context
    stage.close()
