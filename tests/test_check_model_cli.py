"""`p2pllm check-model` on each kind of corrupt model file: one line naming the file and the
problem, exit 2, no traceback (the loader's own checks are in test_loader.py)."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli
from test_loader import _canonical, _spec_fields, _spm_tokenizer
from p2pllm.model.writer import write_gguf


def _gguf_wrong_magic(good: Path, bad: Path) -> None:
    bad.write_bytes(b"GGML" + good.read_bytes()[4:])


def _gguf_bad_version(good: Path, bad: Path) -> None:
    data = bytearray(good.read_bytes())
    data[4:8] = struct.pack("<I", 99)
    bad.write_bytes(data)


def _gguf_truncated_header(good: Path, bad: Path) -> None:
    bad.write_bytes(good.read_bytes()[:2000])


def _gguf_truncated_data(good: Path, bad: Path) -> None:
    bad.write_bytes(good.read_bytes()[:-1000])


def _gguf_offset_out_of_bounds(good: Path, bad: Path) -> None:
    t = gguf.GGUFReader(str(good)).tensors[3]
    at = t.field.offset + 8 + len(t.name.encode()) + 4 + 8 * len(t.shape) + 4  # the u64 data offset
    data = bytearray(good.read_bytes())
    data[at: at + 8] = struct.pack("<Q", 1 << 40)
    bad.write_bytes(data)


def _gguf_misaligned_offset(good: Path, bad: Path) -> None:
    t = gguf.GGUFReader(str(good)).tensors[3]
    at = t.field.offset + 8 + len(t.name.encode()) + 4 + 8 * len(t.shape) + 4  # the u64 data offset
    data = bytearray(good.read_bytes())
    offset = struct.unpack("<Q", data[at: at + 8])[0]
    data[at: at + 8] = struct.pack("<Q", offset + 4)  # inside the file, but not where ggml can read it
    bad.write_bytes(data)


def _gguf_overlapping_tensors(good: Path, bad: Path) -> None:
    """Tensor 3's data moved onto tensor 2's: both in bounds and aligned, each would read the other's bytes."""
    tensors = gguf.GGUFReader(str(good)).tensors
    data = bytearray(good.read_bytes())

    def offset_at(t):
        return t.field.offset + 8 + len(t.name.encode()) + 4 + 8 * len(t.shape) + 4  # the u64 data offset

    data[offset_at(tensors[3]): offset_at(tensors[3]) + 8] = data[offset_at(tensors[2]): offset_at(tensors[2]) + 8]
    bad.write_bytes(data)


def _gguf_shape_disagrees(good: Path, bad: Path) -> None:
    fields = _spec_fields()
    write_gguf(bad, {**fields, "ffn": 128}, _canonical(fields), _spm_tokenizer(fields["vocab"]))


def _gguf_token_a_merge_names_is_changed(good: Path, bad: Path) -> None:
    data = good.read_bytes()
    at = data.index("Ġ29".encode())  # in the vocabulary (the merges, later, still name "Ġ2 9" and "Ġ29")
    bad.write_bytes(data[:at] + "Ġ2^".encode() + data[at + len("Ġ29".encode()):])


GGUF_CASES = [
    (_gguf_token_a_merge_names_is_changed, ["its tokenizer cannot be built", "out of vocabulary"]),
    (_gguf_wrong_magic, ["magic"]),
    (_gguf_bad_version, ["version 99"]),
    (_gguf_truncated_header, ["truncated or corrupt GGUF header"]),
    (_gguf_truncated_data, ["past the end of the file"]),
    (_gguf_offset_out_of_bounds, ["past the end of the file"]),
    (_gguf_misaligned_offset, ["data offset", "is not a multiple of the file's alignment (32)"]),
    (_gguf_shape_disagrees, ["shape [", "but the metadata says ["]),
    (_gguf_overlapping_tensors, ["corrupt GGUF header: tensor", "data overlaps tensor"]),
]


@pytest.mark.parametrize("corrupt, needles", GGUF_CASES, ids=[c.__name__[1:] for c, _ in GGUF_CASES])
def test_check_model_on_a_corrupt_gguf_is_one_line_exit_2(demo_tiny_gguf, tmp_path, corrupt, needles):
    bad = tmp_path / "bad.gguf"
    corrupt(demo_tiny_gguf, bad)
    assert_one_line_error(run_cli("check-model", bad), 2, str(bad), *needles)
    if corrupt is _gguf_token_a_merge_names_is_changed:  # and run: no "internal error" from `tokenizers`
        assert_one_line_error(run_cli("run", "--model", bad, "--prompt", "hi", "--max-tokens", "2"), 2, str(bad),
                              *needles)


def _st_corrupt_header(st: Path) -> None:
    data = bytearray(st.read_bytes())
    data[8:12] = b"\xff{{["
    st.write_bytes(data)


def _st_truncated(st: Path) -> None:
    st.write_bytes(st.read_bytes()[:-500])


def _st_absurd_header_length(st: Path) -> None:
    data = bytearray(st.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 62)
    st.write_bytes(data)


def _st_header_nested_too_deep(st: Path) -> None:
    """Valid JSON nested beyond the parser's recursion limit: was "internal error: RecursionError"."""
    header = b"[" * 50_000 + b"]" * 50_000
    st.write_bytes(struct.pack("<Q", len(header)) + header)


def _st_shape_wraps_int64(st: Path) -> None:
    """An extra tensor whose element count wraps to 0 in int64: its 0 bytes passed, and check-model's
    decoding failed in torch ("internal error: RuntimeError: Storage size calculation overflowed")."""
    import json

    data = st.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["evil"] = {"dtype": "F32", "shape": [1 << 32, 1 << 32], "data_offsets": [0, 0]}
    raw = json.dumps(header).encode()
    st.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _st_integer_norm(st: Path) -> None:
    """A norm weight declared I32 (same byte size as its F32): the torch loader cast the integers."""
    import json

    data = st.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["model.layers.0.input_layernorm.weight"]["dtype"] = "I32"
    raw = json.dumps(header).encode()
    st.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


HF_CASES = [
    (_st_corrupt_header, ["corrupt safetensors header"]),
    (_st_integer_norm, ["tensor model.layers.0.input_layernorm.weight: I32 is not a type weights are stored in"]),
    (_st_truncated, ["past the end of the file"]),
    (_st_absurd_header_length, ["claims"]),
    (_st_header_nested_too_deep, ["corrupt safetensors header: not JSON"]),
    (_st_shape_wraps_int64, ["tensor evil: 0 bytes for shape [4294967296, 4294967296] F32"]),
]


@pytest.mark.parametrize("corrupt, needles", HF_CASES, ids=[c.__name__[1:] for c, _ in HF_CASES])
def test_check_model_on_a_corrupt_safetensors_folder_is_one_line_exit_2(demo_tiny_hf, tmp_path, corrupt, needles):
    folder = tmp_path / "model"
    shutil.copytree(demo_tiny_hf, folder)
    shards = sorted(folder.glob("*.safetensors"))
    corrupt(shards[0])
    assert_one_line_error(run_cli("check-model", folder), 2, str(folder), *needles)


def test_check_model_on_a_good_model_says_ok(demo_tiny_gguf):
    proc = run_cli("check-model", demo_tiny_gguf)
    assert proc.returncode == 0 and ": ok (" in proc.stdout, proc.stderr


@pytest.mark.parametrize("temperature", ["0", "1"])
def test_run_on_a_model_that_computes_nan_fails_in_one_line(tmp_path, temperature):
    """One NaN weight makes every logit NaN: greedy then chose token 0 every step and `run` exited 0
    with empty text; sampling failed inside torch.multinomial."""
    fields = _spec_fields()
    weights = _canonical(fields)
    weights["layers.1.w_up"][3, 5] = float("nan")
    path = tmp_path / "nan.gguf"
    write_gguf(path, fields, weights, _spm_tokenizer(fields["vocab"]))
    proc = run_cli("run", "--model", path, "--prompt", "hello", "--max-tokens", "3", "--temperature", temperature,
                   "--json")
    assert proc.returncode != 0 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "NaN or infinite logits" in last and "check-model" in last, last


CONFIG_CASES = [  # a config.json edit -> what the one line names
    ({"max_position_embeddings": "big"}, "field max_position_embeddings is 'big', expected a whole number"),
    ({"num_hidden_layers": "six"}, "field num_hidden_layers is 'six', expected a whole number"),
    ({"num_attention_heads": 0}, "n_heads = 0 must be positive"),
    ({"hidden_size": [128]}, "field hidden_size is [128], expected a whole number"),
    ({"rope_theta": "x"}, "field rope_theta is 'x', expected a number"),
    ({"rms_norm_eps": "x"}, "field rms_norm_eps is 'x', expected a number"),
    ({"rope_scaling": {"rope_type": "linear"}}, "missing field rope_scaling.factor"),
    ({"rope_scaling": "yes"}, "field rope_scaling is 'yes', expected an object"),
    ({"model_type": ["llama"]}, "unsupported architecture ['llama']"),
    ({"vocab_size": None}, "missing field vocab_size"),
    ({"num_hidden_layers": 10**9}, "n_layers = 1000000000 is beyond any model's (at most 4096 here)"),  # plan: OOM
    # these ran: to NaN logits (epsilon; the ggml backend aborts on it), to another model than
    # transformers' (a zero rope base; GELU computed as SiLU)
    ({"rms_norm_eps": -1e-5}, "norm_eps = -1e-05 must not be negative"),
    ({"rope_theta": 0}, "rope_theta = 0.0 must be positive"),
    ({"hidden_act": "gelu"}, "unsupported architecture variant: hidden_act='gelu'"),
]


@pytest.mark.parametrize("edit, needle", CONFIG_CASES, ids=[next(iter(e)) + "=" + repr(e[next(iter(e))])
                                                             for e, _ in CONFIG_CASES])
def test_a_malformed_config_field_is_named_in_one_line(demo_tiny_hf, tmp_path, edit, needle):
    """Each of these was "internal error: ValueError/KeyError/ZeroDivisionError/..." (exit 1)."""
    import json

    from p2pllm.errors import ModelFileError
    from p2pllm.model.spec import read_spec

    folder = tmp_path / "bad"
    shutil.copytree(demo_tiny_hf, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ModelFileError) as e:
        read_spec(folder)
    assert needle in str(e.value) and str(folder) in str(e.value), str(e.value)


def test_a_gguf_metadata_number_stored_as_text_is_one_line_exit_2(tmp_path):
    fields = _spec_fields()
    path = tmp_path / "text-context.gguf"
    write_gguf(path, fields, _canonical(fields), _spm_tokenizer(fields["vocab"]))
    # the same file, its context length written as a string
    _gguf_with_metadata(path, tmp_path / "bad.gguf", {"llama.context_length": ("long", gguf.GGUFValueType.STRING)})
    assert_one_line_error(run_cli("check-model", tmp_path / "bad.gguf"), 2,
                          "metadata llama.context_length is 'long', expected a whole number")


def test_a_dangling_safetensors_link_is_named_as_such_not_as_a_shard_of_an_absent_index(demo_tiny_hf, tmp_path):
    """What an interrupted Hugging Face download leaves; it was blamed on model.safetensors.index.json."""
    folder = tmp_path / "cut"
    shutil.copytree(demo_tiny_hf, folder)
    st = next(folder.glob("*.safetensors"))
    st.unlink()
    st.symlink_to(tmp_path / "blobs" / "never-downloaded")
    assert_one_line_error(run_cli("check-model", folder), 2, f"{st}: a link to a missing file")


def test_the_wrong_kind_of_path_says_which_path_to_pass(demo_tiny_hf, demo_tiny_gguf, tmp_path):
    """A safetensors file was read as GGUF ("wrong magic ... not a GGUF file"); a folder of GGUF
    files as a Hugging Face folder ("config.json: missing")."""
    st = next(demo_tiny_hf.glob("*.safetensors"))
    assert_one_line_error(run_cli("check-model", st), 2, f"a Hugging Face model is its folder: pass {st.parent}")
    folder = tmp_path / "downloads"
    folder.mkdir()
    (folder / "a-vocab.gguf").write_bytes(demo_tiny_gguf.read_bytes()[:4096])  # a vocab-only file sorts first
    shutil.copy(demo_tiny_gguf, folder / "tiny.gguf")
    # (no "--model": check-model takes the path itself)
    line = assert_one_line_error(run_cli("check-model", folder), 2, "pass the GGUF file itself",
                                 f"e.g. {folder / 'tiny.gguf'}")
    assert "--model" not in line


def _gguf_with_metadata(src: Path, dst: Path, edits: dict) -> Path:
    """src rewritten with metadata `edits` (key -> (value, GGUFValueType)); a None value drops the key."""
    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), arch=reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in edits:
            continue
        writer.add_key_value(key, field.contents(), field.types[0],
                             sub_type=field.types[1] if len(field.types) > 1 else None)
    for key, edit in edits.items():
        if edit is not None:
            writer.add_key_value(key, *edit)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


V = gguf.GGUFValueType
METADATA_CASES = [  # GGUF metadata -> what the one line names. Each was accepted: llama.cpp refuses the first
    # three (n_rot, n_embd_head_v, "wrong number of tensors") where we computed another model than the file's
    # (rope over all dims, block_count=1 running 1 of 3 layers); a negative epsilon aborted the process in
    # ggml's rms_norm (exit 134); a zero rope base ran to "NaN logits" in the first step
    ({"llama.rope.dimension_count": (8, V.UINT32)}, "unsupported partial rotary embedding"),
    ({"llama.attention.value_length": (8, V.UINT32)}, "llama.attention.value_length is 8, the key length 16"),
    ({"llama.block_count": (1, V.UINT32)}, "tensor blk.1.attn_norm.weight is of layer 1, but the metadata says 1 layers"),
    ({"llama.attention.layer_norm_rms_epsilon": (-1.0, V.FLOAT32)}, "norm_eps = -1.0 must not be negative"),
    ({"llama.rope.freq_base": (0.0, V.FLOAT32)}, "rope_theta = 0.0 must be positive"),
]


@pytest.mark.parametrize("edits, needle", METADATA_CASES, ids=[next(iter(e)) for e, _ in METADATA_CASES])
def test_gguf_metadata_we_would_compute_wrongly_or_crash_on_is_one_line_exit_2(tmp_path, edits, needle):
    fields = _spec_fields()
    good = tmp_path / "good.gguf"
    write_gguf(good, fields, _canonical(fields), _spm_tokenizer(fields["vocab"]))
    bad = _gguf_with_metadata(good, tmp_path / "bad.gguf", edits)
    assert_one_line_error(run_cli("check-model", bad), 2, str(bad), needle)
    assert_one_line_error(run_cli("run", "--model", bad, "--prompt", "hi", "--max-tokens", "2"), 2, str(bad), needle)


def _with_kv_bytes(good: Path, bad: Path, kv: bytes) -> None:
    """good with one more metadata entry (raw bytes, a multiple of the 32-byte alignment long, so the
    data section moves by exactly that much) first in its metadata."""
    assert len(kv) % 32 == 0
    data = good.read_bytes()
    n_kv = struct.unpack("<Q", data[16:24])[0]
    bad.write_bytes(data[:16] + struct.pack("<Q", n_kv + 1) + kv + data[24:])


def _key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


def test_gguf_hostile_metadata_structures_are_one_line_exit_2(demo_tiny_gguf, tmp_path):
    """Arrays of arrays 10**5 deep overflowed the parser's stack ("internal error: RecursionError",
    exit 1); a key given twice silently took its second value; arrays were read whatever their size."""
    nested = _key("evil.arr") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 100_000 + struct.pack("<IQ", 4, 0)
    twice = _key("general.name") + struct.pack("<I", 8) + struct.pack("<Q", 0)  # an empty name, given again below
    # a hostile 100 MB array of bytes took 1.2 GB as a Python list (amplified 12x, and file sizes are GBs)
    huge = _key("evil.big") + struct.pack("<IIQ", 9, 0, (1 << 23) + 32) + bytes((1 << 23) + 32)
    for name, kv, needle in (("nested", nested, "'evil.arr' is an array of arrays"),
                             ("twice", twice, "metadata key 'general.name' appears twice"),
                             ("huge", huge, "metadata arrays of more than 8388608 items in all (at 'evil.big')")):
        bad = tmp_path / f"{name}.gguf"
        _with_kv_bytes(demo_tiny_gguf, bad, kv)
        assert_one_line_error(run_cli("check-model", bad), 2, str(bad), "corrupt GGUF header", needle)


def test_a_config_nested_too_deep_is_one_line_exit_2(demo_tiny_hf, tmp_path):
    """Was "internal error: RecursionError" (exit 1)."""
    folder = tmp_path / "deep"
    shutil.copytree(demo_tiny_hf, folder)
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert_one_line_error(run_cli("check-model", folder), 2, str(folder / "config.json"), "not valid JSON")


def test_a_qwen2_gguf_with_llama3_rope_factors_is_refused_as_llama_cpp_refuses_it(demo_tiny_gguf, tmp_path):
    """llama.cpp's qwen2 loads no rope_freqs.weight (it refuses the file); we applied the factors."""
    reader = gguf.GGUFReader(str(demo_tiny_gguf))
    bad = tmp_path / "qwen2-rope-freqs.gguf"
    writer = gguf.GGUFWriter(str(bad), arch="qwen2")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        writer.add_key_value(key.replace("llama.", "qwen2.", 1), field.contents(), field.types[0],
                             sub_type=field.types[1] if len(field.types) > 1 else None)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    head_dim = reader.fields["llama.embedding_length"].contents() // reader.fields["llama.attention.head_count"].contents()
    writer.add_tensor("rope_freqs.weight", np.ones(head_dim // 2, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_one_line_error(run_cli("check-model", bad), 2, str(bad), "rope_freqs.weight in a qwen2 model")
