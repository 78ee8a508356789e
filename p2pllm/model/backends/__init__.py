"""One stage interface, two implementations; `open_stage` picks the backend for a model and device.

- ggml (ggml_stage.py): GGUF files on the CPU, computed on the file's own encodings (Q4_K, Q8_0,
  ...) with llama.cpp's kernels; KV in a shared cell pool (f16 by default, q8_0, f32).
- torch (torch_stage.py): Hugging Face folders, GPUs (cuda/mps), and any model with an explicit
  --dtype; weights in f32/f16/bf16.

What the runtime (stage, scheduler, ring, replicas, recovery) relies on, whatever the backend:
`start`, `end`, `is_first`, `is_last`, `spec`, `device`, `activation_dtype` (hidden states in and
out), `weight_bytes`, `forward(x, meta)`, on the last stage `forward_last(x, meta)` (logits and,
for embeddings, final-normed hidden states) and `kv` (allocate/free/length/truncate/sequences,
`export`/`import_entries` of KVEntries in its `format`, `nbytes`), `close()`, and
`share(start, end)`: the layers of its range a new stage of [start, end) may take instead of
loading them (`open_stage(..., shared=layers_to_share(old, start, end))`, on a replan).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Protocol

import torch

from ...errors import UsageError
from ..batch import BatchMeta, LastOutputs
from ..kvcache import KVEntries, KVFormat, check_kv_dtype
from ..spec import ModelSpec, read_spec

log = logging.getLogger(__name__)

BACKENDS = ("auto", "ggml", "torch")
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


class KVStore(Protocol):
    n_layers: int
    format: KVFormat

    def allocate(self, seq_id: int, capacity: int) -> None: ...
    def free(self, seq_id: int) -> None: ...
    def __contains__(self, seq_id: int) -> bool: ...
    def sequences(self) -> list[int]: ...
    def length(self, seq_id: int) -> int: ...
    def truncate(self, seq_id: int, length: int) -> None: ...
    def nbytes(self) -> int: ...
    def export(self, seq_id: int, start: int, end: int) -> KVEntries: ...
    def import_entries(self, entries: KVEntries) -> None: ...


class StageBackend(Protocol):
    name: str
    spec: ModelSpec
    start: int
    end: int
    is_first: bool
    is_last: bool
    device: torch.device
    activation_dtype: torch.dtype
    weight_bytes: int
    kv: KVStore

    def forward(self, x: torch.Tensor, meta: BatchMeta) -> torch.Tensor: ...
    def forward_last(self, x: torch.Tensor, meta: BatchMeta) -> LastOutputs: ...
    def share(self, start: int, end: int) -> dict: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class SharedLayers:
    """Weights one stage hands to the next stage on the same peer (a replan): the layers both
    ranges hold are taken, not loaded again. They stay valid after the old stage is closed."""

    source: tuple  # (file, fingerprint, backend, dtype, device): taken only by a stage of the same
    parts: dict  # the backend's own per-layer (and non-layer) pieces
    layers: tuple[int, ...]


def layers_to_share(stage: StageBackend, start: int, end: int) -> SharedLayers | None:
    """What a stage of [start, end) opened like `stage` may take from it (None: nothing)."""
    source = getattr(stage, "source", None)
    keep = [i for i in range(max(start, stage.start), min(end, stage.end))]
    if source is None or not keep:
        return None
    return SharedLayers(source, stage.share(start, end), tuple(keep))


def choose_backend(spec: ModelSpec, backend: str = "auto", device: str = "cpu", dtype: str | None = None) -> str:
    """ggml for a GGUF file on the CPU (unless a float --dtype is asked for); torch otherwise."""
    if backend not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "ggml" if spec.format == "gguf" and device == "cpu" and dtype is None else "torch"
    if backend == "ggml":
        if spec.format != "gguf":
            raise UsageError("--backend ggml computes GGUF files; this model is a Hugging Face folder (use torch)")
        if device != "cpu":
            raise UsageError(f"--backend ggml runs on the CPU here; --device {device} needs --backend torch")
        if dtype is not None:
            raise UsageError("--dtype applies to the torch backend: a ggml stage keeps the file's own encodings")
    return backend


def stage_kv_dtype(spec: ModelSpec, backend: str, device: str, kv_dtype: str | None) -> str:
    """The KV precision a stage keeps: as asked, else f16 on ggml (llama.cpp's default), else the compute dtype."""
    if kv_dtype is not None:
        check_kv_dtype(kv_dtype, spec.head_dim)
        if backend == "torch" and kv_dtype not in DTYPES:
            raise UsageError(f"--kv-dtype {kv_dtype} needs the ggml backend (a GGUF file on the CPU)")
        return kv_dtype
    if backend == "ggml":
        return "f16"
    return {v: k for k, v in DTYPES.items()}[torch_dtype(spec, device)]


def held_dtype(spec: ModelSpec, backend: str, device: str, dtype: str | None = None) -> str | None:
    """The dtype a stage holds its weights in, for the planner: None = as the file stores them."""
    if backend == "ggml":
        return None
    held = dtype or {v: k for k, v in DTYPES.items()}[torch_dtype(spec, device)]
    return None if held == spec.file_dtype else held


def open_stage(path: str | os.PathLike, start: int, end: int, *, spec: ModelSpec | None = None,
               backend: str = "auto", device: str = "cpu", dtype: str | None = None, kv_dtype: str | None = None,
               max_context: int | None = None, threads: int | None = None,
               progress: Callable[[int, int], None] | None = None,
               shared: SharedLayers | None = None) -> StageBackend:
    """Layers [start, end) of the model at `path`, ready to run micro-batches; `shared`: layers
    another stage of the same model hands over (see layers_to_share)."""
    spec = spec or read_spec(path)
    chosen = choose_backend(spec, backend, device, dtype)
    compute = None if chosen == "ggml" else DTYPES[dtype] if dtype else torch_dtype(spec, device)
    source = (os.path.realpath(path), spec.fingerprint, chosen, str(compute), str(device))
    parts = shared.parts if shared is not None and shared.source == source else None
    if chosen == "ggml":
        from .ggml_stage import GGMLStage

        stage = GGMLStage(path, start, end, spec=spec, kv_dtype=check_kv_dtype(kv_dtype or "f16", spec.head_dim),
                          max_context=max_context, threads=threads, progress=progress, shared=parts)
    else:
        from ..loader import load_slice
        from .torch_stage import TorchStage

        kv = DTYPES[stage_kv_dtype(spec, "torch", device, kv_dtype)] if kv_dtype else None
        held = {i: layer for i, layer in (parts or {}).items() if start <= i < end}
        weights = load_slice(path, start, end, spec=spec, dtype=compute, device=device, progress=progress,
                             skip_layers=frozenset(held))
        stage = TorchStage(weights, dtype=compute, device=device, kv_dtype=kv, max_context=max_context, shared=held)
    stage.source = source
    return stage


def torch_dtype(spec: ModelSpec, device: str) -> torch.dtype:
    """The torch backend's default: a bf16/f16 checkpoint stays in its dtype where the device
    computes it well (GPUs; CPUs whose half-precision GEMV beats f32's), f32 otherwise."""
    half = {"bf16": torch.bfloat16, "f16": torch.float16}.get(spec.file_dtype) if spec.format == "hf" else None
    if half is None:
        return torch.float32
    if device != "cpu" or cpu_computes_well(spec.file_dtype):
        return half
    return torch.float32


@lru_cache(maxsize=None)
def cpu_computes_well(dtype: str) -> bool:
    """Does a GEMV over `dtype` weights beat f32 here? (~50 ms, once per process.)"""
    import time

    n = 2048
    timings = {}
    for name, dt in (("f32", torch.float32), (dtype, DTYPES[dtype])):
        a, x = torch.ones(n, n, dtype=dt), torch.ones(1, n, dtype=dt)
        best = float("inf")
        for _ in range(8):
            t0 = time.perf_counter()
            torch.mm(x, a)
            best = min(best, time.perf_counter() - t0)
        timings[name] = best
    good = timings[dtype] <= timings["f32"]
    log.debug("%s GEMV %.3f ms vs f32 %.3f ms: %s weights %s", dtype, timings[dtype] * 1e3, timings["f32"] * 1e3,
              dtype, "kept" if good else "widened to f32")
    return good
