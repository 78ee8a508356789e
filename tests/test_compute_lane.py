"""Where a peer's stage computes (runtime/compute_lane.py, runtime/ring_stage.py): one thread for
everything queued, the event loop itself for a small step when nothing is queued. Real stages,
real frames; the ring's links hand the results to this test instead of a network."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from p2pllm.model.backends import open_stage
from p2pllm.model.sampling import SamplingParams
from p2pllm.model.spec import read_spec
from p2pllm.proto import p2pllm_pb2 as pb
from p2pllm.runtime import ring_stage
from p2pllm.runtime.compute_lane import ComputeLane
from p2pllm.runtime.frames import Chunk, MicroBatch, SeqStart
from p2pllm.runtime.ring_stage import Binding, RingStage
from p2pllm.runtime.stage import Stage
from p2pllm.transport import frames
from p2pllm.transport.ring import LinkPool
from p2pllm.transport.security import Security

HEAD = "head.test:7700"


def test_the_lane_runs_jobs_in_order_on_one_thread_and_says_when_it_is_idle():
    async def main():
        lane = ComputeLane()
        gate, ran = threading.Event(), []
        assert lane.idle()
        first = asyncio.ensure_future(lane.run(lambda: (gate.wait(5), ran.append(threading.current_thread().name))))
        second = asyncio.ensure_future(lane.run(lambda: ran.append("second")))
        await asyncio.sleep(0.05)
        assert not lane.idle()  # one job blocked, one queued behind it
        gate.set()
        await asyncio.gather(first, second)
        assert ran[0].startswith("compute") and ran[0] != threading.current_thread().name
        assert ran[1] == "second" and lane.idle()
        lane.shutdown()

    asyncio.run(main())


def test_a_failed_or_cancelled_job_leaves_the_lane_idle():
    async def main():
        lane = ComputeLane()
        with pytest.raises(ZeroDivisionError):
            await lane.run(lambda: 1 / 0)
        assert lane.idle()
        gate = threading.Event()
        blocked = asyncio.ensure_future(lane.run(gate.wait, 5))
        queued = asyncio.ensure_future(lane.run(lambda: None))
        await asyncio.sleep(0.05)
        lane.shutdown()  # cancels the queued job; the running one finishes
        gate.set()
        await blocked
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert lane.idle()

    asyncio.run(main())


class _Head:
    """The frames a whole-model stage answers with (its results go to the head)."""

    def __init__(self):
        self.results: list[pb.Frame] = []

    async def __call__(self, frame: pb.Frame) -> pb.FrameAck:
        self.results.append(frame)
        return pb.FrameAck(micro_batch=frame.micro_batch)


def _whole(path, threads: int = 1):
    """A stage of every layer: its answers go to the head."""
    return open_stage(path, 0, read_spec(path).n_layers, max_context=64, threads=threads)


def _where_steps_run(stage: Stage) -> list[tuple[int, str]]:
    """(tokens, thread) of every step the stage computes."""
    seen: list[tuple[int, str]] = []
    process = stage.process

    def recorded(mb, hidden=None):
        seen.append((mb.n_tokens, threading.current_thread().name))
        return process(mb, hidden)

    stage.process = recorded
    return seen


def test_a_small_step_runs_on_the_event_loop_and_a_prefill_on_the_compute_thread(demo_tiny_gguf):
    """With a core to spare (the stage computes with fewer threads than there are cores)."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("a 1-core machine has no core to spare: every step runs on the compute thread")
    backend = _whole(demo_tiny_gguf)
    stage = Stage(backend)
    seen = _where_steps_run(stage)
    head = _Head()
    prompt = list(range(1, 1 + ring_stage.INLINE_MAX_TOKENS + 4))  # more tokens than a step run inline

    async def main():
        lane = ComputeLane(inline=True)
        links = LinkPool(Security.insecure(), local=(HEAD, head))
        rs = RingStage(backend.spec, links, lane)
        rs.bind(Binding(epoch=1, stage=stage, next_address=None, head_address=HEAD, context=64))
        start = SeqStart(1, 64, SamplingParams())
        prefill = MicroBatch(1, 1, [Chunk(1, 0, len(prompt), True)], prompt, [start])
        assert await rs.handle(frames.encode(prefill)) == ""
        token = head.results[-1].sampled[0]
        for i in range(3):
            step = MicroBatch(1, 2 + i, [Chunk(1, len(prompt) + i, 1, True)], [token])
            assert await rs.handle(frames.encode(step)) == ""
            token = head.results[-1].sampled[0]
        # something queued on the compute thread: the next step waits its turn there
        gate = threading.Event()
        blocked = asyncio.ensure_future(lane.run(gate.wait, 5))
        await asyncio.sleep(0.05)
        step = MicroBatch(1, 9, [Chunk(1, len(prompt) + 3, 1, True)], [token])
        handled = asyncio.ensure_future(rs.handle(frames.encode(step)))
        await asyncio.sleep(0.05)
        assert not handled.done()
        gate.set()
        assert await handled == "" and await blocked
        lane.shutdown()
        return threading.current_thread().name

    loop_thread = asyncio.run(main())
    assert [n for n, _ in seen] == [len(prompt), 1, 1, 1, 1]
    assert seen[0][1].startswith("compute")  # the prefill
    assert [t for _, t in seen[1:4]] == [loop_thread] * 3  # decode steps on the loop
    assert seen[4][1].startswith("compute")  # queued behind another job
    assert all(not r.error for r in head.results) and len(head.results) == 5
    stage.close()


def test_without_a_core_to_spare_every_step_runs_on_the_compute_thread(demo_tiny_gguf):
    cores = os.cpu_count() or 1
    assert ComputeLane.for_threads(cores).inline is False
    assert ComputeLane.for_threads(cores - 1).inline is (cores > 1)
    stage, head = Stage(_whole(demo_tiny_gguf, threads=cores)), _Head()
    seen = _where_steps_run(stage)

    async def main():
        lane = ComputeLane(inline=True)  # the stage bound to it takes every core: the lane follows it
        rs = RingStage(stage.backend.spec, LinkPool(Security.insecure(), local=(HEAD, head)), lane)
        rs.bind(Binding(epoch=1, stage=stage, next_address=None, head_address=HEAD, context=64))
        mb = MicroBatch(1, 1, [Chunk(1, 0, 3, True)], [5, 6, 7], [SeqStart(1, 64, SamplingParams())])
        assert await rs.handle(frames.encode(mb)) == ""
        mb = MicroBatch(1, 2, [Chunk(1, 3, 1, True)], [head.results[-1].sampled[0]])
        assert await rs.handle(frames.encode(mb)) == ""
        lane.shutdown()

    asyncio.run(main())
    assert [n for n, _ in seen] == [3, 1] and all(t.startswith("compute") for _, t in seen)
    stage.close()


def test_the_same_tokens_whichever_lane_computes_them(demo_tiny_gguf, monkeypatch):
    """Greedy tokens of a prompt, with every step inline and with none inline."""

    def tokens(inline_tokens: int) -> list[int]:
        monkeypatch.setattr(ring_stage, "INLINE_MAX_TOKENS", inline_tokens)
        backend = _whole(demo_tiny_gguf)
        stage, head = Stage(backend), _Head()

        async def main():
            lane = ComputeLane(inline=True)
            rs = RingStage(backend.spec, LinkPool(Security.insecure(), local=(HEAD, head)), lane)
            rs.bind(Binding(epoch=1, stage=stage, next_address=None, head_address=HEAD, context=64))
            prompt = [5, 6, 7]
            mb = MicroBatch(1, 1, [Chunk(1, 0, 3, True)], prompt, [SeqStart(1, 64, SamplingParams())])
            out = []
            for i in range(8):
                assert await rs.handle(frames.encode(mb)) == ""
                out.append(head.results[-1].sampled[0])
                mb = MicroBatch(1, 2 + i, [Chunk(1, 3 + i, 1, True)], [out[-1]])
            lane.shutdown()
            return out

        try:
            return asyncio.run(main())
        finally:
            stage.close()

    assert tokens(0) == tokens(64)


def test_a_stage_of_the_whole_model_takes_every_core_and_a_ring_stage_leaves_one(demo_tiny_gguf):
    """daemon/loading.py: a GGUF stage holding every layer computes with every core (nothing of a
    ring waits on this machine's loop); a stage of a longer ring keeps cores - 1; --threads decides
    alone. Loaded as a daemon loads them, on its compute lane."""
    from p2pllm.daemon.loading import StageLoader
    from p2pllm.model.tokenizer import load_tokenizer

    spec, cores = read_spec(demo_tiny_gguf), os.cpu_count() or 1
    tokenizer = load_tokenizer(demo_tiny_gguf)

    def threads(rng, explicit: bool) -> int:
        async def main():
            lane = ComputeLane.for_threads(max(1, cores - 1))
            loader = StageLoader(demo_tiny_gguf, spec, "auto", "cpu", "f16", 64, max(1, cores - 1), tokenizer,
                                 lane, explicit_threads=explicit)
            stage = await loader.load(rng)
            try:
                return stage.backend.threads
            finally:
                stage.close()
                lane.shutdown()

        return asyncio.run(main())

    assert threads((0, spec.n_layers), explicit=False) == cores
    assert threads((0, spec.n_layers - 1), explicit=False) == max(1, cores - 1)
    assert threads((1, spec.n_layers), explicit=False) == max(1, cores - 1)
    assert threads((0, spec.n_layers), explicit=True) == max(1, cores - 1)
