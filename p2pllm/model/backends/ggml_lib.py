"""ggml, the library llama.cpp computes with, through its Python binding (ggml-python).

Only this module imports the binding. It fixes the few declarations the binding gets wrong
(pointer results declared as Python ints, which ctypes would truncate to 32 bits), keeps ggml
from spawning a debugger when an internal assertion fails, and offers the handful of helpers
the GGUF stage needs: contexts, CPU buffers, numpy views of tensor data.

ggml aborts the process on a failed assertion, so everything handed to it here is checked by
the caller first (shapes against the model's metadata, positions against the context).
"""

from __future__ import annotations

import ctypes
import logging
import os
from functools import lru_cache

import numpy as np

from ...errors import UsageError

TENSOR_ALIGNMENT = 32  # ggml's CPU buffers need tensor data aligned like this

# weight encodings the CPU backend multiplies with (vec_dot kernels), by GGUF type name
COMPUTE_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS",
    "TQ1_0", "TQ2_0", "MXFP4",
)
KV_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}

log = logging.getLogger("p2pllm.ggml")
_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}  # ggml's INFO is chatter


@lru_cache(maxsize=1)
def ggml():
    """The binding, loaded once, with its pointer-returning declarations fixed."""
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")  # an abort must not attach gdb to a daemon
    try:
        import ggml as g
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise UsageError(f"the ggml backend needs the ggml-python package ({e}); "
                         "install it with `pip install ggml-python`, or use --backend torch") from None
    for f in (g.ggml_backend_alloc_buffer, g.ggml_backend_cpu_buffer_from_ptr, g.ggml_backend_cpu_buffer_type):
        f.restype = ctypes.c_void_p
    g.ggml_log_set(_log_callback(g), None)  # ggml's messages go to our log, not straight to stderr
    g.ggml_cpu_init()
    return g


@lru_cache(maxsize=1)
def version() -> str:
    """The ggml build the stages compute with, e.g. "0.25.3 (0c1e570)" (scripts/ggml_from_llama_cpp.py)."""
    g = ggml()
    return f"{g.ggml_version().decode()} ({g.ggml_commit().decode()})"


@lru_cache(maxsize=1)
def _log_callback(g):
    def forward(level: int, text: bytes, _user) -> None:
        message = (text or b"").decode("utf-8", "replace").rstrip()
        if message:
            log.log(_LEVELS.get(level, logging.DEBUG), "%s", message)

    return g.ggml_log_callback(forward)  # cached: ggml keeps the pointer for the process's life


def type_id(name: str) -> int:
    return int(getattr(ggml(), f"GGML_TYPE_{name}"))


def row_bytes(type_name: str, n: int) -> int:
    return int(ggml().ggml_row_size(type_id(type_name), n))


class Context:
    """A ggml context holding tensor descriptions only (data lives in backend buffers)."""

    def __init__(self, n_tensors: int, graph_nodes: int = 0):
        g = ggml()
        size = g.ggml_tensor_overhead() * n_tensors
        if graph_nodes:
            size += g.ggml_graph_overhead_custom(graph_nodes, False)
        self.ptr = g.ggml_init(g.ggml_init_params(mem_size=size, mem_buffer=None, no_alloc=True))
        if not self.ptr:
            raise MemoryError("ggml_init failed")

    def tensor(self, type_name: str, ne: tuple[int, ...]):
        arr = (ctypes.c_int64 * len(ne))(*ne)
        return ggml().ggml_new_tensor(self.ptr, type_id(type_name), len(ne), arr)

    def free(self) -> None:
        if self.ptr:
            ggml().ggml_free(self.ptr)
            self.ptr = None


class Buffer:
    """A CPU backend buffer: owned (allocated by ggml) or wrapping memory we keep alive (a file map)."""

    def __init__(self, ptr: int, owner=None):
        if not ptr:
            raise MemoryError("ggml could not allocate a buffer")
        self.ptr = ptr
        self.owner = owner  # what the memory belongs to, kept alive as long as the buffer

    @classmethod
    def for_context(cls, ctx: Context, backend: int) -> "Buffer":
        """Memory for every tensor of `ctx`, zeroed."""
        g = ggml()
        ptr = g.ggml_backend_alloc_ctx_tensors(ctx.ptr, backend)
        buf = cls(ptr)
        g.ggml_backend_buffer_clear(ptr, 0)
        return buf

    @classmethod
    def for_context_in(cls, ctx: Context, buffer_type: int) -> "Buffer":
        """Memory for every tensor of `ctx` in a given buffer type (the repacking one, say)."""
        return cls(ggml().ggml_backend_alloc_ctx_tensors_from_buft(ctx.ptr, buffer_type))

    @classmethod
    def wrapping(cls, address: int, size: int, owner) -> "Buffer":
        return cls(ggml().ggml_backend_cpu_buffer_from_ptr(address, size), owner)

    def place(self, tensor, address: int) -> None:
        ggml().ggml_backend_tensor_alloc(self.ptr, tensor, address)

    def free(self) -> None:
        if self.ptr:
            ggml().ggml_backend_buffer_free(self.ptr)
            self.ptr = None
            self.owner = None


def view(tensor, dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A numpy view of a (contiguous) tensor's data."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = (ctypes.c_char * n).from_address(tensor.contents.data)
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


@lru_cache(maxsize=1)
def repack_buffer_type() -> int | None:
    """ggml's CPU_REPACK buffer type: weights put there are interleaved for its SIMD GEMV/GEMM
    kernels (what llama.cpp does by default on the CPU), or None where this build has none."""
    g = ggml()
    fn = g.ggml_backend_reg_get_proc_address(g.ggml_backend_cpu_reg(), b"ggml_backend_dev_get_extra_bufts")
    if not fn:
        return None
    get = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(fn)
    bufts = get(g.ggml_backend_dev_by_type(g.GGML_BACKEND_DEVICE_TYPE_CPU))
    i = 0
    while bufts and bufts[i]:
        if g.ggml_backend_buft_name(bufts[i]) == b"CPU_REPACK":
            return bufts[i]
        i += 1
    return None


def repacks(type_name: str, rows: int) -> bool:
    """Whether CPU_REPACK interleaves a matrix of this encoding with this many rows. The rules of
    ggml's repack.cpp for x86 (AVX2; AVX-512 adds Q2_K); elsewhere (ARM) weights stay as mapped."""
    g = ggml()
    if not g.ggml_cpu_has_avx2() or repack_buffer_type() is None:
        return False
    types = {"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"} | ({"Q2_K"} if g.ggml_cpu_has_avx512() else set())
    return type_name in types and rows % 8 == 0


def cpu_backend(threads: int):
    g = ggml()
    backend = g.ggml_backend_cpu_init()
    if not backend:
        raise MemoryError("ggml_backend_cpu_init failed")
    g.ggml_backend_cpu_set_n_threads(backend, int(threads))
    return backend
