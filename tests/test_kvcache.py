"""KV caches of both backends: entries move between caches exactly, in their own format; bad
imports are refused; the ggml cell pool masks, reuses and grows correctly."""

import numpy as np
import pytest
import torch

from p2pllm.model.backends import ggml_lib
from p2pllm.model.backends.ggml_kv import CellPool
from p2pllm.model.kvcache import KVCache, KVCacheError, KVEntries, KVFormat

N_LAYERS, N_KV, HD = 3, 2, 32  # q8_0 rows need head sizes that are multiples of 32


class TorchStore:
    def __init__(self, dtype="f32", n_layers=N_LAYERS):
        self.kv = KVCache(n_layers, N_KV, HD, 64, {"f32": torch.float32, "f16": torch.float16}[dtype])

    def fill(self, seq, start, length, seed):
        g = torch.Generator().manual_seed(seed)
        if seq not in self.kv:
            self.kv.allocate(seq, 16)
        self.kv.reserve(seq, start + length)
        for layer in range(self.kv.n_layers):
            k, v = torch.randn(2, N_KV, length, HD, generator=g)
            self.kv.update(layer, seq, start, k, v)


class PoolStore:
    backend = None

    def __init__(self, dtype="f16", n_layers=N_LAYERS, rope="pairs"):
        if PoolStore.backend is None:
            PoolStore.backend = ggml_lib.cpu_backend(1)
        self.kv = CellPool(PoolStore.backend, n_layers, N_KV * HD, KVFormat(dtype, rope), 64)

    def fill(self, seq, start, length, seed):
        if seq not in self.kv:
            self.kv.allocate(seq, 16)
        self.kv.truncate(seq, start)
        cells = self.kv.place([seq], [start], [length])
        rng = np.random.default_rng(seed)
        self.kv.rows[:, :, cells] = rng.integers(0, 256, self.kv.rows[:, :, cells].shape, dtype=np.uint8)


STORES = [(TorchStore, "f32"), (TorchStore, "f16"), (PoolStore, "f16"), (PoolStore, "q8_0"), (PoolStore, "f32")]


@pytest.fixture(params=STORES, ids=lambda p: f"{p[0].__name__}-{p[1]}")
def make(request):
    cls, dtype = request.param
    return lambda **kw: cls(dtype, **kw)


def test_export_import_moves_exact_entries_between_caches(make):
    src, dst = make(), make()
    src.fill(4, 0, 10, seed=1)
    src.fill(4, 10, 3, seed=2)
    assert src.kv.length(4) == 13
    dst.kv.import_entries(src.kv.export(4, 0, 10))
    dst.kv.import_entries(src.kv.export(4, 10, 13))
    assert dst.kv.length(4) == 13
    exported = src.kv.export(4, 0, 13)
    assert exported.data.dtype == torch.uint8 and exported.data.shape[:3] == (N_LAYERS, 2, 13)
    assert exported.data.shape[3] == src.kv.format.row_bytes(N_KV * HD)
    assert torch.equal(dst.kv.export(4, 0, 13).data, exported.data)


def test_import_with_a_gap_a_wrong_shape_or_another_format_is_refused(make):
    src, dst = make(), make()
    src.fill(1, 0, 8, seed=3)
    with pytest.raises(KVCacheError, match="only 0 known"):
        dst.kv.import_entries(src.kv.export(1, 4, 8))
    with pytest.raises(KVCacheError, match="shape"):
        make(n_layers=2).kv.import_entries(src.kv.export(1, 0, 8))
    entries = src.kv.export(1, 0, 8)
    other = KVFormat("f32" if entries.format.dtype != "f32" else "f16", entries.format.rope)
    with pytest.raises(KVCacheError, match="format"):
        dst.kv.import_entries(KVEntries(1, 0, entries.data, other))


def test_export_beyond_known_positions_is_refused(make):
    c = make()
    c.fill(1, 0, 2, seed=4)
    with pytest.raises(KVCacheError, match="cannot export"):
        c.kv.export(1, 0, 3)


def test_truncate_then_rewrite_replaces_the_tail(make):
    c = make()
    c.fill(2, 0, 6, seed=5)
    head = c.kv.export(2, 0, 4).data
    c.kv.truncate(2, 4)
    assert c.kv.length(2) == 4
    c.fill(2, 4, 3, seed=6)
    assert c.kv.length(2) == 7 and torch.equal(c.kv.export(2, 0, 4).data, head)


def test_torch_capacity_grows_only_up_to_the_context_and_free_releases_memory():
    c = TorchStore().kv
    c.allocate(1, 4)
    c.reserve(1, 40)
    assert 40 <= c.capacity(1) <= 64
    with pytest.raises(KVCacheError, match="past the context"):
        c.reserve(1, 65)
    assert c.nbytes() > 0
    c.free(1)
    assert 1 not in c and c.nbytes() == 0


def test_pool_masks_let_a_token_see_only_its_own_sequence_up_to_its_position():
    s = PoolStore()
    s.fill(1, 0, 3, seed=7)
    s.fill(2, 0, 2, seed=8)
    s.fill(1, 3, 1, seed=9)  # sequence 1's fourth position lands after sequence 2's cells
    n_kv = s.kv.window()
    mask = np.empty((3, n_kv), dtype=np.float16)
    s.kv.fill_mask(mask, np.array([1, 1, 2]), np.array([1, 3, 1]))
    visible = [set(np.flatnonzero(row == 0).tolist()) for row in mask]
    assert visible == [{0, 1}, {0, 1, 2, 5}, {3, 4}]
    assert np.isneginf(mask[mask != 0].astype(np.float32)).all()


def test_pool_reuses_freed_cells_and_grows_keeping_what_it_holds():
    s = PoolStore()
    n0, gen0 = s.kv.n_cells, s.kv.generation
    for seq in range(20):  # sequences come and go: the same cells serve them all
        s.fill(seq, 0, 60, seed=seq)
        s.kv.free(seq)
    assert s.kv.n_cells == n0 and s.kv.generation == gen0
    s.fill(1, 0, 60, seed=1)
    before = s.kv.export(1, 0, 60).data
    for seq in range(2, 7):  # reservations beyond the pool: it grows, keeping sequence 1 intact
        s.kv.allocate(seq, 64)
    assert s.kv.n_cells >= 60 + 5 * 64 and s.kv.generation > gen0
    assert torch.equal(s.kv.export(1, 0, 60).data, before)
