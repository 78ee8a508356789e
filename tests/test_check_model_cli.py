"""`p2pllm check-model` on each kind of corrupt model file: one line naming the file and the
problem, exit 2, no traceback (the loader's own checks are in test_loader.py)."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import gguf
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


def _gguf_shape_disagrees(good: Path, bad: Path) -> None:
    fields = _spec_fields()
    write_gguf(bad, {**fields, "ffn": 128}, _canonical(fields), _spm_tokenizer(fields["vocab"]))


GGUF_CASES = [
    (_gguf_wrong_magic, ["magic"]),
    (_gguf_bad_version, ["version 99"]),
    (_gguf_truncated_header, ["truncated GGUF header"]),
    (_gguf_truncated_data, ["past the end of the file"]),
    (_gguf_offset_out_of_bounds, ["past the end of the file"]),
    (_gguf_shape_disagrees, ["shape [", "but the metadata says ["]),
]


@pytest.mark.parametrize("corrupt, needles", GGUF_CASES, ids=[c.__name__[1:] for c, _ in GGUF_CASES])
def test_check_model_on_a_corrupt_gguf_is_one_line_exit_2(demo_tiny_gguf, tmp_path, corrupt, needles):
    bad = tmp_path / "bad.gguf"
    corrupt(demo_tiny_gguf, bad)
    assert_one_line_error(run_cli("check-model", bad), 2, str(bad), *needles)


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
