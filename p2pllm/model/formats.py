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


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # file dtype name: "F32", "F16", "BF16", "Q8_0", "Q4_K", ...
    shape: tuple[int, ...]  # torch order
    nbytes: int  # bytes in the file


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
        try:
            self._reader = gguf.GGUFReader(str(self.path), "r")
        except Exception as e:  # the gguf package raises many kinds on corrupt headers
            problem = _diagnose_gguf(self.path, size) or f"corrupt or truncated GGUF header ({_short(e)})"
            raise ModelFileError(self.path, problem) from None
        self.metadata = {}
        for key, field in self._reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                self.metadata[key] = field.contents()
            except Exception as e:
                raise ModelFileError(self.path, f"unreadable metadata {key} ({_short(e)})") from None
        self.tensors = {}
        self._raw = {}
        for t in self._reader.tensors:
            qtype = gguf.GGMLQuantizationType(t.tensor_type)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            shape = tuple(int(d) for d in reversed(t.shape))
            n = int(np.prod(shape)) if shape else 1
            if shape and shape[-1] % block:
                raise ModelFileError(
                    self.path, f"tensor {t.name}: row of {shape[-1]} is not a multiple of {qtype.name} blocks"
                )
            expected = n // block * type_size
            end = int(t.data_offset) + expected
            if end > size:
                raise ModelFileError(
                    self.path, f"tensor {t.name}: data ends at byte {end}, past the end of the file ({size} bytes)"
                )
            if int(t.n_bytes) != expected:
                raise ModelFileError(self.path, f"tensor {t.name}: {t.n_bytes} bytes, expected {expected}")
            self.tensors[t.name] = TensorInfo(t.name, qtype.name, shape, expected)
            self._raw[t.name] = t

    def read(self, name: str) -> torch.Tensor:
        """The tensor in torch order; quantized types are dequantized to float32 by `gguf`."""
        import gguf
        import torch

        info = self.require(name)
        t = self._raw[name]
        qtype = gguf.GGMLQuantizationType(t.tensor_type)
        try:
            if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                arr = np.array(t.data).reshape(info.shape)  # a copy: the map is read-only
            else:
                arr = gguf.quants.dequantize(np.asarray(t.data), qtype).reshape(info.shape)
        except Exception as e:
            raise ModelFileError(self.path, f"tensor {name}: cannot decode {qtype.name} data ({_short(e)})") from None
        return torch.from_numpy(np.ascontiguousarray(arr))

    def raw(self, name: str) -> tuple[str, np.ndarray]:
        """The undecoded bytes of a tensor (for tests comparing with `gguf`'s own dequantize)."""
        self.require(name)
        t = self._raw[name]
        return self.tensors[name].dtype, np.asarray(t.data)


# GGUF metadata value type -> byte size of the fixed-size types (8 = string, 9 = array)
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _diagnose_gguf(path: Path, size: int) -> str | None:
    """Why `gguf.GGUFReader` refused a file, in words: walks the header itself, bounds-checked.

    Returns None where it finds nothing wrong (the caller then reports the reader's own error).
    """
    import gguf

    with open(path, "rb") as f:
        buf = f.read(min(size, _MAX_HEADER))
    pos = 8

    class Short(Exception):
        pass

    def take(n: int) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(buf):
            raise Short
        pos += n
        return buf[pos - n : pos]

    def u32() -> int:
        return struct.unpack("<I", take(4))[0]

    def u64() -> int:
        return struct.unpack("<Q", take(8))[0]

    def string() -> bytes:
        return take(u64())

    def skip_value(vtype: int) -> None:
        if vtype in _GGUF_SCALAR_SIZES:
            take(_GGUF_SCALAR_SIZES[vtype])
        elif vtype == 8:
            string()
        elif vtype == 9:
            sub, count = u32(), u64()
            if sub in _GGUF_SCALAR_SIZES:
                take(count * _GGUF_SCALAR_SIZES[sub])
            else:
                for _ in range(count):
                    skip_value(sub)
        else:
            raise ValueError(f"unknown metadata value type {vtype}")

    section = "metadata"
    try:
        n_tensors, n_kv = u64(), u64()
        alignment = 32
        for _ in range(n_kv):
            key = string()
            vtype = u32()
            if key == b"general.alignment" and vtype == 4:
                alignment = u32()
            else:
                skip_value(vtype)
        section = "tensor table"
        infos = []
        for _ in range(n_tensors):
            name = string().decode("utf-8", "replace")
            dims = [u64() for _ in range(u32())]
            infos.append((name, dims, u32(), u64()))
    except Short:
        return f"truncated GGUF header: the file ends at byte {size}, inside the {section}"
    except ValueError as e:
        return f"corrupt GGUF header: {e}"
    if alignment <= 0:
        return f"corrupt GGUF header: alignment {alignment}"
    data_start = -(-pos // alignment) * alignment
    for name, dims, ttype, offset in infos:
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            return f"tensor {name}: unknown GGUF tensor type {ttype}"
        n = int(np.prod(dims, dtype=object)) if dims else 1
        end = data_start + offset + n // block * type_size
        if end > size:
            return f"tensor {name}: data ends at byte {end}, past the end of the file ({size} bytes; truncated?)"
    return None


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
            if not shard_path.resolve().is_relative_to(self.path.resolve()):
                raise ModelFileError(index_path, f"shard {shard} lies outside the model folder")
            if not shard_path.is_file():
                raise ModelFileError(shard_path, f"missing shard (listed in {index_path.name})")
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
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
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
        nbytes = int(np.prod(shape, dtype=np.int64)) * _ST_DTYPES[dtype][1]
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
        return SafetensorsModelFile(p)
    if p.name == "config.json":
        return SafetensorsModelFile(p.parent)
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
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(path, f"not valid JSON ({_short(e)})") from None
    if not isinstance(data, dict):
        raise ModelFileError(path, "not a JSON object")
    return data


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
