"""A ggml stage's weights: the file's tensors where they lie in its memory map, or in buffers of
our own where ggml needs them elsewhere, grouped by layer so that a replan loads only what is new.

Most tensors are handed to ggml where they lie in the map (pages prefaulted at load, with
progress): a stage holds its share of the file and nothing else. Copied instead: matrices ggml
repacks for its SIMD kernels (as llama.cpp does), misaligned tensors, and non-f32 vectors.

Each layer's tensors (and each non-layer tensor) are one `WeightGroup` with its own ggml memory.
A stage built while another stage of the same file still exists takes the groups of the layers
both hold instead of loading them again (`shared`); a group's memory is freed with the last stage
holding it. The survivors of a lost peer thus keep their layers and load only the ones that are
new to them, and for a moment hold the new layers beside the old, not the whole range twice.
"""

from __future__ import annotations

import mmap
import weakref
from typing import Callable

import numpy as np

from ...errors import ModelFileError
from ..loader import StoredTensor, layer_of_key
from . import ggml_lib as gl

_PAGE = mmap.PAGESIZE

MAPPED, COPIED, WIDENED, REPACKED = "mapped", "copied", "f32", "repacked"  # where a tensor's data lives
_MEMORY = {MAPPED: "map", COPIED: "own", WIDENED: "own", REPACKED: "packed"}  # and whose memory that is


class WeightGroup:
    """One layer's tensors (or one non-layer tensor) and the ggml memory they live in."""

    def __init__(self, kinds: dict[str, str]):
        self.kinds = kinds  # file tensor name -> where its data lives (a group is shared only as placed)
        self.tensors: dict[str, object] = {}
        self.nbytes = 0  # bytes as the file stores them
        self._contexts: list[gl.Context] = []
        self._buffers: list[gl.Buffer] = []
        self._mapped: list[tuple[mmap.mmap, int, int]] = []  # (map, offset, bytes) of its mapped tensors
        weakref.finalize(self, _free, self._buffers, self._contexts, self._mapped)  # with the last stage holding it


def _free(buffers: list, contexts: list, mapped: list) -> None:
    for mm, offset, nbytes in mapped:  # out of our resident set (the map lives on while other groups use it;
        lo = offset - offset % _PAGE    # a page they share with this group is read in again from the page cache)
        try:
            mm.madvise(mmap.MADV_DONTNEED, lo, offset + nbytes - lo)
        except (AttributeError, OSError, ValueError):
            pass
    for buf in buffers:
        buf.free()
    for ctx in contexts:
        ctx.free()


def group_of(t: StoredTensor) -> int | str:
    """A layer's tensors share a group; every other tensor (embeddings, head, norm) is its own."""
    layer = layer_of_key(t.key)
    return t.info.name if layer is None else layer


class StageWeights:
    """The groups of one stage's layer range and the ggml tensors it computes with, by key."""

    def __init__(self, path, stored: list[StoredTensor], backend, *, shared: dict | None = None,
                 progress: Callable[[int, int], None] | None = None):
        for t in stored:
            if t.info.dtype not in gl.COMPUTE_TYPES:
                raise ModelFileError(path, f"tensor {t.info.name} is {t.info.dtype}, which the ggml backend cannot "
                                           f"compute with (supported: {', '.join(gl.COMPUTE_TYPES)})")
        kinds = _placements(stored)
        wanted: dict[int | str, dict[str, str]] = {}
        for t in stored:
            wanted.setdefault(group_of(t), {})[t.info.name] = kinds[t.info.name]
        self.groups: dict[int | str, WeightGroup] = {}
        for key, want in wanted.items():
            old = (shared or {}).get(key)  # (open_stage hands over only groups of the same file)
            if old is not None and old.kinds == want:
                self.groups[key] = old
        self.kept = [k for k in self.groups if isinstance(k, int)]  # layers taken from another stage
        infos = {t.info.name: t.info for t in stored}
        new = {key: want for key, want in wanted.items() if key not in self.groups}
        if new:
            self._load(path, infos, new, backend, progress)
        tensors = {name: t for group in self.groups.values() for name, t in group.tensors.items()}
        self.by_key = {t.key: tensors[t.info.name] for t in stored}
        self.nbytes = sum(g.nbytes for g in self.groups.values())
        self.loaded_bytes = sum(self.groups[k].nbytes for k in new)

    def share(self, start: int, end: int) -> dict:
        """The groups another stage of layers [start, end) may take: its layers and the rest."""
        return {k: g for k, g in self.groups.items() if not isinstance(k, int) or start <= k < end}

    def _load(self, path, infos: dict, new: dict, backend, progress) -> None:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        file = np.frombuffer(mm, dtype=np.uint8)  # the groups' mapped tensors keep the map alive
        for key, kinds in new.items():
            self.groups[key] = _place(mm, file, {n: infos[n] for n in kinds}, kinds, backend)
        total = sum(self.groups[k].nbytes for k in new)
        done = 0
        with open(path, "rb", buffering=0) as f:
            for key, kinds in new.items():
                tensors = self.groups[key].tensors
                for name, kind in kinds.items():
                    info = infos[name]
                    if kind == REPACKED:  # read, not mapped: the page cache keeps the file, we keep the repacked copy
                        data = np.empty(info.nbytes, dtype=np.uint8)
                        f.seek(info.offset)
                        f.readinto(memoryview(data))
                        gl.ggml().ggml_backend_tensor_set(tensors[name], data.ctypes.data, 0, info.nbytes)
                    elif kind in (COPIED, WIDENED):
                        data = _dequantize(path, file, info) if kind == WIDENED else file[info.offset:info.offset + info.nbytes]
                        gl.view(tensors[name], np.uint8, (data.nbytes,))[:] = data.view(np.uint8).ravel()
                    else:
                        _prefault(mm, file, info.offset, info.nbytes)
                    done += info.nbytes
                    if progress is not None:
                        progress(done, total)


def _placements(stored: list[StoredTensor]) -> dict[str, str]:
    """Where each file tensor's data lives (see the module's docstring)."""
    looked_up = {t.info.name for t in stored if t.key == "embed"}  # get_rows reads it: never repacked
    kinds = {}
    for t in stored:
        i = t.info
        if len(i.shape) == 1 and i.dtype != "F32":
            kinds[i.name] = WIDENED
        elif len(i.shape) == 2 and i.name not in looked_up and gl.repacks(i.dtype, i.shape[0]):
            kinds[i.name] = REPACKED
        elif i.offset % gl.TENSOR_ALIGNMENT:
            kinds[i.name] = COPIED
        else:
            kinds[i.name] = MAPPED
    return kinds


def _place(mm: mmap.mmap, file: np.ndarray, infos: dict, kinds: dict[str, str], backend) -> WeightGroup:
    """A group's ggml tensors, given their memory: the map where they lie, or a buffer of our own
    (copied; f32 for vectors stored otherwise), or ggml's repacking buffer."""
    group = WeightGroup(kinds)
    memory = {name: _MEMORY[kind] for name, kind in kinds.items()}
    contexts = {m: gl.Context(list(memory.values()).count(m) + 1) for m in set(memory.values())}
    group._contexts.extend(contexts.values())
    for name, kind in kinds.items():
        group.tensors[name] = contexts[memory[name]].tensor("F32" if kind == WIDENED else infos[name].dtype,
                                                            tuple(reversed(infos[name].shape)))
    group.nbytes = sum(i.nbytes for i in infos.values())
    if "map" in contexts:
        mapped = gl.Buffer.wrapping(file.ctypes.data, file.size, owner=file)
        group._buffers.append(mapped)
        for name, kind in kinds.items():
            if kind == MAPPED:
                mapped.place(group.tensors[name], file.ctypes.data + infos[name].offset)
                group._mapped.append((mm, infos[name].offset, infos[name].nbytes))
    if "own" in contexts:
        group._buffers.append(gl.Buffer.for_context(contexts["own"], backend))
    if "packed" in contexts:
        group._buffers.append(gl.Buffer.for_context_in(contexts["packed"], gl.repack_buffer_type()))
    return group


def _dequantize(path, file: np.ndarray, info) -> np.ndarray:
    import gguf

    raw = file[info.offset:info.offset + info.nbytes]
    try:
        return np.ascontiguousarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[info.dtype]),
                                    dtype=np.float32)
    except Exception as e:
        raise ModelFileError(path, f"tensor {info.name}: cannot decode {info.dtype} data ({e})") from None


def _prefault(mm: mmap.mmap, file: np.ndarray, offset: int, nbytes: int) -> None:
    """Read a tensor's pages in now (at load, with progress) rather than on the first token."""
    lo = offset - offset % _PAGE
    try:
        mm.madvise(mmap.MADV_WILLNEED, lo, offset + nbytes - lo)
    except (AttributeError, OSError, ValueError):  # not every platform has it; touching still works
        pass
    int(file[offset:offset + nbytes:_PAGE].sum())
