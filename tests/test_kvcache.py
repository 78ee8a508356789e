"""KV cache: preallocated per sequence, freed on finish, entries exported and imported exactly."""

import pytest
import torch

from p2pllm.model.kvcache import KVCache, KVCacheError


def _cache():
    return KVCache(n_layers=3, n_kv_heads=2, head_dim=4, max_context=64)


def _fill(cache, seq, start, length):
    for layer in range(cache.n_layers):
        k = torch.full((2, length, 4), float(seq * 100 + layer))
        k += torch.arange(start, start + length).view(1, -1, 1)
        cache.update(layer, seq, start, k, -k)


def test_update_returns_all_positions_so_far_and_tracks_length():
    c = _cache()
    c.allocate(1, 16)
    _fill(c, 1, 0, 5)
    k, v = c.update(0, 1, 5, torch.ones(2, 1, 4), torch.ones(2, 1, 4))
    assert k.shape == (2, 6, 4) and c.length(1) == 5  # length moves after the last layer
    _fill(c, 1, 5, 1)
    assert c.length(1) == 6


def test_export_import_moves_exact_entries_between_caches():
    src, dst = _cache(), _cache()
    src.allocate(4, 32)
    _fill(src, 4, 0, 10)
    _fill(src, 4, 10, 3)
    first = src.export(4, 0, 10)
    later = src.export(4, 10, 13)
    dst.import_entries(first)
    dst.import_entries(later)
    assert dst.length(4) == 13
    assert torch.equal(dst.export(4, 0, 13).data, src.export(4, 0, 13).data)


def test_import_with_a_gap_or_wrong_shape_is_refused():
    src, dst = _cache(), _cache()
    src.allocate(1, 32)
    _fill(src, 1, 0, 8)
    with pytest.raises(KVCacheError, match="only 0 known"):
        dst.import_entries(src.export(1, 4, 8))
    other = KVCache(n_layers=2, n_kv_heads=2, head_dim=4, max_context=64)
    with pytest.raises(KVCacheError, match="shape"):
        other.import_entries(src.export(1, 0, 8))


def test_capacity_grows_only_up_to_the_context_and_free_releases_memory():
    c = _cache()
    c.allocate(1, 4)
    c.reserve(1, 40)
    assert 40 <= c.capacity(1) <= 64
    with pytest.raises(KVCacheError, match="past the context"):
        c.reserve(1, 65)
    assert c.nbytes() > 0
    c.free(1)
    assert 1 not in c and c.nbytes() == 0


def test_export_beyond_known_positions_is_refused():
    c = _cache()
    c.allocate(1, 8)
    _fill(c, 1, 0, 2)
    with pytest.raises(KVCacheError, match="cannot export"):
        c.export(1, 0, 3)
