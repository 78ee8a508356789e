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
    (_gguf_truncated_header, ["truncated GGUF header"]),
    (_gguf_truncated_data, ["past the end of the file"]),
    (_gguf_offset_out_of_bounds, ["past the end of the file"]),
    (_gguf_misaligned_offset, ["data offset", "is not a multiple of the file's alignment (32)"]),
    (_gguf_shape_disagrees, ["shape [", "but the metadata says ["]),
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


HF_CASES = [
    (_st_corrupt_header, ["corrupt safetensors header"]),
    (_st_truncated, ["past the end of the file"]),
    (_st_absurd_header_length, ["claims"]),
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
    reader = gguf.GGUFReader(str(path))
    writer = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), arch="llama")
    for key, field in reader.fields.items():  # the same file, its context length written as a string
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        if key == "llama.context_length":
            value, vtype = "long", gguf.GGUFValueType.STRING
        writer.add_key_value(key, value, vtype, sub_type=field.types[1] if len(field.types) > 1 else None)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
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
