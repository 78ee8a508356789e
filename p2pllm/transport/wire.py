"""The one place tensors become bytes and bytes become tensors.

A tensor travels as (dtype name, shape, raw little-endian bytes): never pickle. Decoding checks
the dtype against an allow-list, the shape against what the receiver expects, and the byte
length against elements x itemsize before any tensor is built.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import msgpack
import numpy as np
import torch

from ..errors import P2PError

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,  # raw rows of an encoding torch has no dtype for (q8_0 KV)
}
_NAMES = {v: k for k, v in WIRE_DTYPES.items()}
MAX_TENSOR_BYTES = 1 << 30
# the wire dtypes numpy reads straight from the bytes (bfloat16 it cannot)
_NUMPY = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "uint8": np.uint8}

if sys.byteorder != "little":  # pragma: no cover - every platform we run on is little-endian
    raise ImportError("p2pllm's wire format assumes a little-endian host")


class WireError(P2PError):
    """A tensor message that does not match what the receiver expects."""


@dataclass(frozen=True)
class TensorBlob:
    dtype: str
    shape: tuple[int, ...]
    data: bytes


def tensor_to_blob(t: torch.Tensor, wire_dtype: str | None = None) -> TensorBlob:
    """Encode a tensor, optionally cast (activations travel as f16/bf16 to halve the bytes)."""
    if wire_dtype is None and t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() \
            and not t.requires_grad:  # an activation as a stage returns it: its bytes as they are
        return TensorBlob("float32", tuple(t.shape), t.numpy().tobytes())
    if wire_dtype is not None:
        t = t.to(WIRE_DTYPES[wire_dtype])
    name = _NAMES.get(t.dtype)
    if name is None:
        raise WireError(f"dtype {t.dtype} cannot travel on the wire")
    t = t.detach().to("cpu").contiguous()
    # view as bytes without a numpy round trip (numpy has no bfloat16)
    data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return TensorBlob(name, tuple(t.shape), data)


def blob_to_tensor(
    blob: TensorBlob,
    *,
    expect_shape: tuple[int | None, ...] | None = None,
    allowed: tuple[str, ...] | None = None,
    device: str | torch.device = "cpu",
    out_dtype: torch.dtype | None = None,
    finite: bool = False,
) -> torch.Tensor:
    """Decode and validate. `None` in expect_shape matches any size on that axis; `finite`: refuse
    NaN and infinity."""
    if blob.dtype not in WIRE_DTYPES or (allowed is not None and blob.dtype not in allowed):
        raise WireError(f"dtype {blob.dtype!r} not allowed here")
    shape = tuple(blob.shape)
    if any(not isinstance(d, int) or d < 0 for d in shape) or len(shape) > 8:
        raise WireError(f"bad shape {list(shape)}")
    if expect_shape is not None:
        if len(shape) != len(expect_shape) or any(e is not None and e != d for d, e in zip(shape, expect_shape)):
            raise WireError(f"shape {list(shape)} does not match the expected {list(expect_shape)}")
    dtype = WIRE_DTYPES[blob.dtype]
    n = 1
    for d in shape:
        n *= d
    nbytes = n * dtype.itemsize
    if nbytes > MAX_TENSOR_BYTES:
        raise WireError(f"tensor of {nbytes} bytes exceeds the {MAX_TENSOR_BYTES}-byte limit")
    if len(blob.data) != nbytes:
        raise WireError(f"{len(blob.data)} bytes for shape {list(shape)} {blob.dtype} (expected {nbytes})")
    if n == 0:
        t = torch.empty(shape, dtype=dtype)
    elif blob.dtype in _NUMPY:  # checked and shaped in numpy: one torch call (a ring stage decodes
        # an activation per token, after a pause, where each torch call costs ~0.1 ms: split_floor.py)
        a = np.frombuffer(bytearray(blob.data), dtype=_NUMPY[blob.dtype]).reshape(shape)
        if finite and a.dtype.kind == "f" and not np.isfinite(a).all():
            raise WireError("NaN or infinity among the values")
        t = torch.from_numpy(a)
    else:
        t = torch.frombuffer(bytearray(blob.data), dtype=dtype).reshape(shape)
        if finite and not torch.isfinite(t).all():
            raise WireError("NaN or infinity among the values")
    if out_dtype is not None and t.dtype != out_dtype:
        t = t.to(out_dtype)
    return t if str(device) == "cpu" else t.to(device)


def pack_blob(blob: TensorBlob) -> bytes:
    """A blob as one msgpack message (used where no protobuf frame carries it)."""
    return msgpack.packb({"dtype": blob.dtype, "shape": list(blob.shape), "data": blob.data}, use_bin_type=True)


def unpack_blob(data: bytes) -> TensorBlob:
    try:
        obj = msgpack.unpackb(data, raw=False, max_bin_len=MAX_TENSOR_BYTES, max_array_len=16, max_map_len=8)
        return TensorBlob(str(obj["dtype"]), tuple(obj["shape"]), bytes(obj["data"]))
    except (msgpack.UnpackException, ValueError, KeyError, TypeError) as e:
        raise WireError(f"malformed tensor message ({type(e).__name__})") from None
