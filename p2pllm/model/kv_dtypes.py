"""The KV cache's element types and their sizes, without torch (the planner and the CLI use them)."""

from __future__ import annotations

from ..errors import UsageError

# bytes of one KV row of `n` elements, per element type (q8_0: blocks of 32 values + an f16 scale)
KV_DTYPES = ("f16", "q8_0", "f32", "bf16")


def kv_row_bytes(dtype: str, n: int) -> int:
    if dtype == "q8_0":
        if n % 32:
            raise UsageError(f"a q8_0 KV cache needs rows that are a multiple of 32 values, not {n}")
        return n // 32 * 34
    return n * {"f32": 4, "f16": 2, "bf16": 2}[dtype]


def kv_bytes_per_value(dtype: str) -> float:
    return 34 / 32 if dtype == "q8_0" else {"f32": 4.0, "f16": 2.0, "bf16": 2.0}[dtype]


def check_kv_dtype(dtype: str, head_dim: int) -> str:
    if dtype not in KV_DTYPES:
        raise UsageError(f"--kv-dtype must be one of {', '.join(KV_DTYPES[:3])}, got {dtype!r}")
    if dtype == "q8_0" and head_dim % 32:
        raise UsageError(f"--kv-dtype q8_0 needs a head size that is a multiple of 32; this model's is {head_dim}")
    return dtype
