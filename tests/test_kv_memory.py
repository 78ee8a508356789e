"""The ggml KV pool's memory stays within what admission counts: many concurrent sequences on a
real engine never make the pool hold more than the KV budget, a growing pool never holds two
copies of itself, and the memory comes back once the sequences end."""

from __future__ import annotations

import asyncio
import gc
import sys

import numpy as np
import psutil
import pytest

from p2pllm.model.backends import ggml_lib
from p2pllm.model.backends.ggml_kv import WINDOW, CellPool
from p2pllm.model.kvcache import KVFormat
from p2pllm.model.sampling import SamplingParams
from p2pllm.runtime.api import GenerationRequest

MiB = 1 << 20


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def test_many_concurrent_sequences_never_grow_the_pool_past_the_kv_budget(demo_tiny_gguf):
    from p2pllm.runtime.local import LocalPipeline

    pipe = LocalPipeline(str(demo_tiny_gguf), [3], backend="ggml")
    pools = [st.kv for st in pipe.stages]
    assert all(isinstance(p, CellPool) for p in pools)
    prompt = list(range(5, 15))
    max_tokens = 150
    per_seq = len(prompt) + max_tokens
    budget = 3 * per_seq + 7  # room for three sequences at a time (of 12)

    async def run():
        engine = pipe.engine()
        await engine.start()
        engine.kv_budget = budget
        peak = [0] * len(pools)
        done = asyncio.Event()

        async def watch():  # the pool between micro-batches, as the metrics see it
            while not done.is_set():
                for i, p in enumerate(pools):
                    peak[i] = max(peak[i], p.nbytes())
                await asyncio.sleep(0)

        async def one(i: int) -> int:
            req = GenerationRequest(f"r{i}", prompt, max_tokens, SamplingParams(temperature=1.0, seed=i),
                                    ignore_eos=True)
            tokens = 0
            async for e in await engine.generate(req):
                tokens += e.token_id is not None
            return tokens

        watcher = asyncio.create_task(watch())
        try:
            counts = await asyncio.gather(*(one(i) for i in range(12)))
            for _ in range(500):  # the last frees go in the micro-batch after the last tokens
                if not any(p.sequences() for p in pools):
                    break
                await asyncio.sleep(0.01)
        finally:
            done.set()
            await watcher
            await engine.stop()
        return counts, peak

    counts, peak = asyncio.run(run())
    assert counts == [max_tokens] * 12
    for p, most in zip(pools, peak):
        cell = p.row_bytes * 2 * p.n_layers
        assert most > 0
        assert most <= _round_up(budget, WINDOW) * cell, (most // cell, budget)  # never past the budget
        assert p.n_cells <= _round_up(budget, WINDOW)  # nor even its address space
        assert not p.sequences() and p.nbytes() <= WINDOW * cell  # and idle, the memory is handed back
    pipe.ring.close()


@pytest.mark.parametrize("budget_in_sequences", [3, 9])  # a whole request (4 choices) fits alone / two at once
def test_requests_with_several_choices_all_finish_under_a_tight_kv_budget(demo_tiny_gguf, budget_in_sequences):
    """Each first choice was admitted alone; with the budget full of first choices, each waiting for
    its siblings to copy its prompt, and the siblings never admitted, every request hung."""
    from p2pllm.runtime.local import LocalPipeline

    pipe = LocalPipeline(str(demo_tiny_gguf), [3], backend="ggml")
    prompt, max_tokens, n = list(range(5, 15)), 12, 4

    async def run():
        engine = pipe.engine()
        await engine.start()
        engine.kv_budget = budget_in_sequences * (len(prompt) + max_tokens)

        async def one(i: int) -> list[int]:
            req = GenerationRequest(f"r{i}", prompt, max_tokens, SamplingParams(temperature=1.0, seed=i),
                                    ignore_eos=True, n=n)
            per_choice = [0] * n
            async for e in await engine.generate(req):
                per_choice[e.index] += e.token_id is not None
            return per_choice

        try:
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(4))), timeout=120)
        finally:
            await engine.stop()

    assert asyncio.run(run()) == [[max_tokens] * n] * 4
    pipe.ring.close()


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident size
        return True
    except OSError:
        return False


def _proc_bytes(path: str, field: str) -> int:
    """A "Field:   N kB" line of a /proc file, in bytes."""
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in {path}")


def _shmem() -> int:
    """The machine's shared memory (tmpfs, shared anonymous mappings)."""
    return _proc_bytes("/proc/meminfo", "Shmem")


def _peak() -> int:
    return _proc_bytes("/proc/self/status", "VmHWM")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the peak resident size")
def test_growing_never_holds_both_pools_and_freeing_hands_the_memory_back():
    if not _reset_peak():
        pytest.skip("this kernel cannot reset the peak resident size")
    shmem_before = _shmem()
    pool = CellPool(ggml_lib.cpu_backend(1), 8, 512, KVFormat("f32", "pairs"), 1 << 20)
    cell = pool.row_bytes * 2 * pool.n_layers  # 32 KiB
    used = 4096  # 128 MiB written
    pool.allocate(1, used)
    cells = pool.place([1], [0], [used])
    pool.rows[:, :, cells] = 7
    mark = pool.rows[:, :, cells[-1]].copy()
    gc.collect()
    before = _rss()
    assert _reset_peak()
    for seq in range(2, 6):  # reservations for 4 x 4096 more positions, never written: 512 MiB of address space
        pool.allocate(seq, used)
    assert pool.n_cells == _round_up(5 * used, WINDOW)  # exactly the reservations, no more
    grown = _peak() - before
    # one pool's written cells at a time, plus one layer's block in flight (not 2 x, not the reservations)
    assert grown <= used * cell // 8 + 32 * MiB, grown // MiB
    assert np.array_equal(pool.rows[:, :, pool._seq_cells[1][-1]], mark)  # what it held moved intact
    assert pool.nbytes() == used * cell
    for seq in range(1, 6):
        pool.free(seq)
    assert pool.nbytes() == 0
    assert _rss() <= before - used * cell // 2, (before // MiB, _rss() // MiB)  # handed back to the OS
    # truly: a page handed back of a shared mapping would only leave the process's page table and
    # stay in the kernel's shared memory (charged to the cgroup), and read back its old bytes
    assert _shmem() < shmem_before + used * cell // 4, (shmem_before // MiB, _shmem() // MiB)
    assert not pool.rows.any()  # (what was handed back reads as zeros)
    pool.close()
