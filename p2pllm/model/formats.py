"""The one place that reads model files: GGUF and safetensors (single file or sharded folder).

Opening a file reads only headers and checks them (magic, version, offsets within the file,
byte sizes that match dtype x shape). Tensor data is read on demand, memory-mapped.
Shapes are reported in torch order ([out, in] for a matrix), whatever the file's own order.
"""

from __future__ import annotations

import abc
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ModelFileError

if TYPE_CHECKING:
    import torch

# safetensors dtype name -> (torch dtype name, bytes per element). torch is imported only where
# tensors are read, so header-only users (`p2pllm plan`, `status`) start fast.
_ST_DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
_MAX_HEADER = 100 * 1024 * 1024
# items in all of a GGUF's metadata arrays: a vocabulary's tokens, scores, types and merges are ~10**6
# even at 262k tokens. Read as Python lists, a hostile 100 MB array of bytes took 1.2 GB
_MAX_ARRAY_ITEMS = 1 << 23


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # file dtype name: "F32", "F16", "BF16", "Q8_0", "Q4_K", ...
    shape: tuple[int, ...]  # torch order
    nbytes: int  # bytes in the file
    offset: int = 0  # where the data starts in the file (GGUF)


class ModelFile(abc.ABC):
    """Common face of the formats: metadata, tensor infos, and reading one tensor."""

    path: Path
    format: str
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]

    @abc.abstractmethod
    def read(self, name: str) -> torch.Tensor:
        """The named tensor in torch order."""

    def require(self, name: str) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise ModelFileError(self.path, f"missing tensor {name}")
        return info

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- GGUF


class GGUFModelFile(ModelFile):
    """A GGUF file: header parsed here (bounds-checked, fast even for 200k-token vocabularies),
    tensor data memory-mapped and read on demand."""

    format = "gguf"

    def __init__(self, path: Path):
        import gguf

        self.path = Path(path)
        size = _file_size(self.path)
        if size < 24:
            raise ModelFileError(self.path, f"file is too short to be GGUF ({size} bytes)")
        with open(self.path, "rb") as f:
            head = f.read(8)
        if head[:4] != b"GGUF":
            raise ModelFileError(self.path, f"wrong magic {head[:4]!r}: not a GGUF file")
        version = struct.unpack("<I", head[4:8])[0]
        if version not in (2, 3):
            raise ModelFileError(self.path, f"unsupported GGUF version {version} (expected 2 or 3)")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.metadata, infos, data_start = _parse_gguf_header(self.path, self._map)
        self.tensors = {}
        for name, dims, ttype, offset in infos:
            try:
                qtype = gguf.GGMLQuantizationType(ttype)
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise ModelFileError(self.path, f"tensor {name}: unknown GGUF tensor type {ttype}") from None
            shape = tuple(reversed(dims))
            n = int(np.prod(shape, dtype=object)) if shape else 1
            if shape and shape[-1] % block:
                raise ModelFileError(
                    self.path, f"tensor {name}: row of {shape[-1]} is not a multiple of {qtype.name} blocks"
                )
            nbytes = n // block * type_size
            start = data_start + offset
            if start + nbytes > size:
                raise ModelFileError(
                    self.path,
                    f"tensor {name}: data ends at byte {start + nbytes}, past the end of the file ({size} bytes; truncated?)",
                )
            if name in self.tensors:
                raise ModelFileError(self.path, f"tensor {name} appears twice")
            self.tensors[name] = TensorInfo(name, qtype.name, shape, nbytes, start)
        _check_no_overlap(self.path, self.tensors.values())

    def raw(self, name: str) -> tuple[str, np.ndarray]:
        """The undecoded bytes of a tensor, one row per output row: uint8 [rows, row bytes]."""
        info = self.require(name)
        data = np.asarray(self._map[info.offset:info.offset + info.nbytes])
        rows = int(np.prod(info.shape[:-1], dtype=object)) if len(info.shape) > 1 else 1
        return info.dtype, data.reshape(rows, -1) if info.nbytes else data

    def read(self, name: str) -> torch.Tensor:
        """The tensor in torch order; quantized types are dequantized to float32 by `gguf`."""
        import gguf
        import torch

        info = self.require(name)
        _, data = self.raw(name)
        try:
            if info.dtype in ("F32", "F16"):
                arr = data.view(np.float32 if info.dtype == "F32" else np.float16).reshape(info.shape).copy()
            else:
                arr = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[info.dtype]).reshape(info.shape)
        except Exception as e:
            raise ModelFileError(self.path, f"tensor {name}: cannot decode {info.dtype} data ({_short(e)})") from None
        return torch.from_numpy(np.ascontiguousarray(arr))

    def close(self) -> None:
        self._map = None


def _check_no_overlap(path: Path, tensors) -> None:
    """Tensors whose data overlap (every one at offset 0, say) would each read another's bytes as
    their own: llama.cpp's reader refuses them too (it wants each at the aligned end of the last)."""
    end, last = 0, None
    for info in sorted((t for t in tensors if t.nbytes), key=lambda t: t.offset):
        if info.offset < end:
            raise ModelFileError(path, f"corrupt GGUF header: tensor {info.name}'s data overlaps tensor {last}'s")
        end, last = info.offset + info.nbytes, info.name


# GGUF metadata value types: fixed-size scalars as numpy dtypes; 8 = string, 9 = array
_GGUF_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
                 12: "<f8"}
_STRUCTS = {dt: struct.Struct(code) for dt, code in
            {"<u1": "<B", "<i1": "<b", "<u2": "<H", "<i2": "<h", "<u4": "<I", "<i4": "<i", "<f4": "<f", "?": "<?",
             "<u8": "<Q", "<i8": "<q", "<f8": "<d"}.items()}


class _Short(Exception):
    """The header runs past the end of the file."""


def _parse_gguf_header(path: Path, buf: np.ndarray) -> tuple[dict[str, Any], list[tuple[str, list[int], int, int]], int]:
    """(metadata, [(tensor name, dims in ggml order, type, offset within the data section)], data start).

    Every read is bounds-checked against the file, so a truncated or corrupt header is reported
    in words (which section, after which key) instead of as a parser's exception."""
    size = len(buf)
    pos = 8
    items = 0  # array items so far (_MAX_ARRAY_ITEMS)
    raw = memoryview(buf)  # plain slices: a vocabulary is ~100k strings (numpy slicing made it 0.6 s)

    def take(n: int) -> int:
        nonlocal pos
        if n < 0 or pos + n > size:
            raise _Short
        pos += n
        return pos - n

    def number(dtype: str):
        st = _STRUCTS[dtype]
        return st.unpack_from(raw, take(st.size))[0]

    def string() -> str:
        n = number("<u8")
        at = take(n)
        return str(raw[at:at + n], "utf-8")

    def value(vtype: int):
        nonlocal items
        if vtype in _GGUF_SCALARS:
            return number(_GGUF_SCALARS[vtype])
        if vtype == 8:
            return string()
        if vtype == 9:
            sub, count = number("<u4"), number("<u8")
            if sub == 9:  # as llama.cpp's reader: no arrays of arrays (nested 10**5 deep, they overflowed the stack)
                raise ValueError(f"metadata {key!r} is an array of arrays")
            if count > size:  # every item takes at least one byte
                raise _Short
            items += count
            if items > _MAX_ARRAY_ITEMS:
                raise ValueError(f"metadata arrays of more than {_MAX_ARRAY_ITEMS} items in all (at {key!r}); "
                                 f"a vocabulary's are ~10**6")
            if sub in _GGUF_SCALARS:
                dt = np.dtype(_GGUF_SCALARS[sub])
                return np.frombuffer(buf, dt, count, take(count * dt.itemsize)).tolist()
            return [value(sub) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {vtype}")

    section, key = "metadata", ""
    metadata: dict[str, Any] = {}
    infos = []
    try:
        n_tensors, n_kv = number("<u8"), number("<u8")
        for _ in range(n_kv):
            key = string()
            if key in metadata:  # llama.cpp refuses this; the later value silently won here
                raise ValueError(f"metadata key {key!r} appears twice")
            metadata[key] = value(number("<u4"))
        section = "tensor table"
        for _ in range(n_tensors):
            name = string()
            n_dims = number("<u4")
            if n_dims > 4:
                raise ValueError(f"tensor {name} has {n_dims} dimensions")
            dims = [number("<u8") for _ in range(n_dims)]
            infos.append((name, dims, number("<u4"), number("<u8")))
    except _Short:
        where = f"the {section}" + (f" at key {key!r}" if key and section == "metadata" else "")
        raise ModelFileError(path, f"truncated or corrupt GGUF header: {where} runs past the end of the file "
                                   f"(byte {size})") from None
    except UnicodeDecodeError:
        raise ModelFileError(path, f"corrupt GGUF header: a string in the {section} after {key!r} is not UTF-8") from None
    except (ValueError, OverflowError) as e:
        raise ModelFileError(path, f"corrupt GGUF header: {e}") from None
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0:
        raise ModelFileError(path, f"corrupt GGUF header: alignment {alignment}")
    for name, _, _, offset in infos:  # as llama.cpp's gguf reader refuses them: ggml reads aligned data
        if offset % alignment:
            raise ModelFileError(path, f"corrupt GGUF header: tensor {name}'s data offset {offset} is not a "
                                       f"multiple of the file's alignment ({alignment})")
    return metadata, infos, -(-pos // alignment) * alignment


# --------------------------------------------------------------------------- safetensors


class SafetensorsModelFile(ModelFile):
    """A Hugging Face folder: config.json + model.safetensors or model.safetensors.index.json shards."""

    format = "hf"

    def __init__(self, folder: Path):
        self.path = Path(folder)
        config_path = self.path / "config.json"
        self.metadata = _read_json(config_path)
        index_path = self.path / "model.safetensors.index.json"
        if index_path.exists():
            index = _read_json(index_path)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict):
                raise ModelFileError(index_path, "no weight_map object")
            shards = sorted(set(weight_map.values()))
        else:
            shards = sorted(p.name for p in self.path.glob("*.safetensors"))
            weight_map = None
            if not shards:
                raise ModelFileError(self.path, "no *.safetensors files (and no model.safetensors.index.json)")
        self.tensors = {}
        self._where: dict[str, tuple[Path, int]] = {}
        for shard in shards:
            shard_path = self.path / shard
            # by name, not resolve(): the Hugging Face cache's snapshot files are symlinks into its blobs/
            if not Path(os.path.normpath(shard_path)).is_relative_to(os.path.normpath(self.path)):
                raise ModelFileError(index_path, f"shard {shard} lies outside the model folder")
            if not shard_path.is_file():
                if weight_map is not None:
                    raise ModelFileError(shard_path, f"missing shard (listed in {index_path.name})")
                what = ("a link to a missing file (an interrupted download?)" if shard_path.is_symlink()
                        else "not a file")
                raise ModelFileError(shard_path, what)
            for info, data_start in _read_safetensors_header(shard_path):
                if info.name in self.tensors:
                    raise ModelFileError(shard_path, f"tensor {info.name} appears in two shards")
                self.tensors[info.name] = info
                self._where[info.name] = (shard_path, data_start)
        if weight_map is not None:
            for name, shard in weight_map.items():
                if name not in self.tensors:
                    raise ModelFileError(self.path / shard, f"missing tensor {name} (listed in the index)")
        self._maps: dict[Path, np.memmap] = {}

    def read(self, name: str) -> torch.Tensor:
        import torch

        info = self.require(name)
        shard_path, data_start = self._where[name]
        mm = self._maps.get(shard_path)
        if mm is None:
            mm = self._maps[shard_path] = np.memmap(shard_path, dtype=np.uint8, mode="r")
        raw = mm[data_start : data_start + info.nbytes]
        dtype = getattr(torch, _ST_DTYPES[info.dtype][0])
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(info.shape)

    def close(self) -> None:
        self._maps.clear()


def _read_safetensors_header(path: Path) -> list[tuple[TensorInfo, int]]:
    size = _file_size(path)
    if size < 8:
        raise ModelFileError(path, f"file is too short to be safetensors ({size} bytes)")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(size - 8, _MAX_HEADER):
            raise ModelFileError(path, f"corrupt safetensors header: claims {header_len} bytes")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # (or nested too deep)
            raise ModelFileError(path, f"corrupt safetensors header: not JSON ({_short(e)})") from None
    if not isinstance(header, dict):
        raise ModelFileError(path, "corrupt safetensors header: not a JSON object")
    data_start = 8 + header_len
    data_len = size - data_start
    out = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(path, f"tensor {name}: malformed header entry") from None
        if dtype not in _ST_DTYPES:
            raise ModelFileError(path, f"tensor {name}: unsupported dtype {dtype}")
        if any(d < 0 for d in shape):
            raise ModelFileError(path, f"tensor {name}: negative dimension in shape {list(shape)}")
        nbytes = int(np.prod(shape, dtype=object)) * _ST_DTYPES[dtype][1]  # exact: int64 wrapped [2**32, 2**32] to 0
        if not 0 <= begin <= end or end - begin != nbytes:
            raise ModelFileError(path, f"tensor {name}: {end - begin} bytes for shape {list(shape)} {dtype}")
        if end > data_len:
            raise ModelFileError(path, f"tensor {name}: data runs past the end of the file (truncated?)")
        out.append((TensorInfo(name, dtype, shape, nbytes), data_start + begin))
    return out


# --------------------------------------------------------------------------- helpers


def open_model_file(path: str | os.PathLike) -> ModelFile:
    """Open a .gguf file or a Hugging Face folder, checking its headers."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError(p, "no such file or folder")
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if ggufs and not (p / "config.json").exists():  # a folder of GGUF files is no Hugging Face folder
            biggest = max(ggufs, key=lambda g: g.stat().st_size)  # a model, not a vocab-only file beside it
            raise ModelFileError(p, f"no config.json: not a Hugging Face folder; pass the GGUF file itself, "
                                    f"e.g. {biggest}")
        return SafetensorsModelFile(p)
    if p.name == "config.json":
        return SafetensorsModelFile(p.parent)
    if p.suffix == ".safetensors" or p.name == "model.safetensors.index.json":
        raise ModelFileError(p, f"a Hugging Face model is its folder: pass {p.parent}")
    return GGUFModelFile(p)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        raise ModelFileError(path, f"cannot read ({e.strerror})") from None


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ModelFileError(path, "missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # (or nested too deep)
        raise ModelFileError(path, f"not valid JSON ({_short(e)})") from None
    if not isinstance(data, dict):
        raise ModelFileError(path, "not a JSON object")
    return data


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
