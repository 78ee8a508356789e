"""A replica reaches its holder whole, whatever made the sequence's KV: a sequence that starts as a
copy of the prefix cache (or whose KV a plan change rebuilt) has positions no step of the current
binding computed, and its ring successor keeps only replicas complete from position 0. So the
first delta of such a sequence starts at 0, later ones carry just their step, and a takeover
carries the sequence over instead of replaying it. Real stages and ring stages, real frames; the
ring's links hand frames to this test's holder (a ReplicaStore, as the daemon's data plane does)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from p2pllm.model.backends import open_stage
from p2pllm.model.batch import SeqChunk
from p2pllm.model.sampling import SamplingParams
from p2pllm.model.spec import read_spec
from p2pllm.proto import p2pllm_pb2 as pb
from p2pllm.runtime.compute_lane import ComputeLane
from p2pllm.runtime.frames import Chunk, MicroBatch, SeqStart
from p2pllm.runtime.recovery import restore_kv
from p2pllm.runtime.replica import ReplicaStore, assemble, exported
from p2pllm.runtime.ring_stage import REPLICA_HOLD_SECONDS, Binding, RingStage
from p2pllm.runtime.stage import Stage
from p2pllm.transport import frames
from p2pllm.transport.ring import LinkPool
from p2pllm.transport.security import Security

NET = "ring.test:67001"  # every stage's successor and replica holder, and the head: this test
CUT = 3  # stages [0, 3) and [3, n)
PROMPT = [1, 17, 300, 42, 99, 5, 61, 400]
FOLLOW_UP = PROMPT + [7, 8, 9]  # starts like PROMPT: the prefix cache copies PROMPT's KV
KEPT, FORKED = 1, 2


class Ring:
    """Two ring stages in a line, the second one's answers and both stages' replicas coming back
    here: replica frames go to a ReplicaStore, as on the ring successor."""

    def __init__(self, model, context: int, epoch: int = 1, lane_inline: bool = False):
        self.spec = read_spec(model)
        self.context = context
        self.first = RingStage(self.spec, LinkPool(Security.insecure(), local=(NET, self.on_frame)),
                               ComputeLane(inline=lane_inline))
        self.last = RingStage(self.spec, self.first.links, self.first.compute)
        self.replicas = ReplicaStore(self.spec, context)
        self.deltas: list[tuple[int, int, int, int]] = []  # (first layer, sequence, start, length)
        self.alone = 0  # replica frames (deltas that rode on no ring frame)
        self.delta_bytes = 0
        self.sampled: list[int] = []
        self.epoch = epoch
        self.mb_ids = iter(range(1, 10_000))

    def bind(self, epoch: int, first: Stage, last: Stage) -> None:
        self.epoch = epoch
        self.first.bind(Binding(epoch, first, NET, NET, self.context, replica_address=NET))
        self.last.bind(Binding(epoch, last, None, NET, self.context, replica_address=NET))

    async def on_frame(self, frame: pb.Frame) -> pb.FrameAck:
        for d in frame.kv:  # alone, or riding on the stage's next frame here
            self.deltas.append((d.first_layer, d.seq_id, d.start, int(d.data.shape[2])))
            self.delta_bytes += d.ByteSize()
            self.replicas.add(pb.KVDelta.FromString(d.SerializeToString()))
        if frame.replica:
            self.alone += 1
            return pb.FrameAck(micro_batch=frame.micro_batch)
        for seq_id in [*frame.finished, *frame.retained]:
            self.replicas.free(seq_id)
        if frame.to_head:
            assert not frame.error, frame.error
            self.sampled.extend(frame.sampled)
            return pb.FrameAck(micro_batch=frame.micro_batch)
        return pb.FrameAck(micro_batch=frame.micro_batch, error=await self.last.handle(frame))

    async def run(self, chunks=(), tokens=(), starts=(), retained=()) -> int | None:
        mb = MicroBatch(self.epoch, next(self.mb_ids), list(chunks), list(tokens), list(starts), [], list(retained))
        before = len(self.sampled)
        assert await self.first.handle(frames.encode(mb)) == ""
        return self.sampled[-1] if len(self.sampled) > before else None

    async def decode(self, seq_id: int, token: int, pos: int, n: int) -> tuple[int, int]:
        for _ in range(n):
            token = await self.run([Chunk(seq_id, pos, 1, True)], [token])
            pos += 1
        return token, pos

    async def quiet(self) -> None:
        """Let the ring go quiet: the last step's held deltas then go alone."""
        alone = self.alone
        await asyncio.sleep(REPLICA_HOLD_SECONDS + 0.05)
        for _ in range(10):
            await asyncio.sleep(0)
        assert self.alone == alone + 2  # each stage's


def stage(model, a: int, b: int, kv: str) -> Stage:
    return Stage(open_stage(model, a, b, kv_dtype=kv))


def held(replicas: ReplicaStore, st: Stage, seq_id: int, positions: int) -> torch.Tensor | None:
    return assemble(replicas.pieces(seq_id, st.start, st.end, positions), st.start, st.end, positions)


def continues_alike(first: Stage, original: Stage, rebuilt: Stage, seq_id: int, token: int, pos: int, n: int):
    """The rebuilt stage gives the logits the original gives, step by step (same hidden states in)."""
    for _ in range(n):
        h = first.step(torch.tensor([token]), [SeqChunk(seq_id, pos, 1)])
        want = original.step(h.clone(), [SeqChunk(seq_id, pos, 1)])
        got = rebuilt.step(h.clone(), [SeqChunk(seq_id, pos, 1)])
        assert torch.equal(got, want)
        token, pos = int(want[-1].argmax()), pos + 1


@pytest.fixture(scope="module")
def model(demo_tiny_gguf):
    return demo_tiny_gguf


def assert_whole_replicas(ring, stages, seq_id: int, positions: int) -> None:
    """Each stage's successor holds its KV of the sequence, every position from 0, byte for byte."""
    for st in stages:
        replica = held(ring.replicas, st, seq_id, positions)
        assert replica is not None, f"no replica of sequence {seq_id} for layers [{st.start}, {st.end})"
        assert torch.equal(replica, exported(st.kv, st.start, seq_id, 0, positions).data)


@pytest.mark.parametrize("kv", ["f16", "q8_0"])
def test_a_prefix_cache_fork_reaches_the_replica_whole_and_a_takeover_carries_it_over(model, kv):
    spec = read_spec(model)
    first, last = stage(model, 0, CUT, kv), stage(model, CUT, spec.n_layers, kv)
    ring = Ring(model, spec.context)
    ring.bind(1, first, last)
    greedy = SamplingParams()

    async def main() -> tuple[int, int]:
        # a finished request the prefix cache keeps ...
        token = await ring.run([Chunk(KEPT, 0, len(PROMPT), True)], PROMPT, [SeqStart(KEPT, 64, greedy)])
        await ring.decode(KEPT, token, len(PROMPT), 2)
        await ring.run(retained=[KEPT])
        assert KEPT in first.kept and KEPT in last.kept
        # ... and the next one, which starts with a copy of its prompt's KV
        ring.deltas.clear()
        start = SeqStart(FORKED, 64, greedy, fork_of=KEPT, fork_len=len(PROMPT))
        n_new = len(FOLLOW_UP) - len(PROMPT)
        token = await ring.run([Chunk(FORKED, len(PROMPT), n_new, True)], FOLLOW_UP[len(PROMPT):], [start])
        token, pos = await ring.decode(FORKED, token, len(FOLLOW_UP), 4)
        assert ring.alone == 0  # every delta so far rode on a ring frame ...
        await ring.quiet()  # ... but the last step's, which no frame took
        return token, pos

    try:
        token, pos = asyncio.run(main())
    finally:
        ring.first.compute.shutdown()
    assert_whole_replicas(ring, (first, last), FORKED, pos)
    # the stages count what they sent (kv_replica_bytes_sent): the deltas, and the two frames that went alone
    sent = ring.first.replica_bytes + ring.last.replica_bytes
    assert ring.delta_bytes <= sent <= ring.delta_bytes + 2 * 64

    # the last stage's peer dies: its successor takes the layers over from the replica it holds
    fresh = stage(model, CUT, spec.n_layers, kv)
    rebuilt = asyncio.run(restore_kv(fresh, None, ring.replicas, [pb.ResumeSeq(seq_id=FORKED, positions=pos)], [],
                                     None, spec, spec.context, "me:1"))
    assert rebuilt == {FORKED: pos}  # carried over, not replayed
    continues_alike(first, last, fresh, FORKED, token, pos, 3)

    # the first delta covers the copied prefix; decode steps still send one position each
    for layer in (0, CUT):
        assert [(s, a, n) for f, s, a, n in ring.deltas if f == layer] == \
            [(FORKED, 0, len(FOLLOW_UP))] + [(FORKED, p, 1) for p in range(len(FOLLOW_UP), pos)]


def test_kv_rebuilt_at_a_plan_change_reaches_the_new_holder_whole(model):
    """After a plan change the first step of the new epoch leaves the holder a complete replica,
    even when the holder commits the epoch after that step's delta arrived (its commit drops only
    the old epochs' replicas)."""
    spec = read_spec(model)
    first, last = stage(model, 0, CUT, "f16"), stage(model, CUT, spec.n_layers, "f16")
    ring = Ring(model, spec.context)
    ring.bind(1, first, last)

    async def before() -> tuple[int, int]:
        token = await ring.run([Chunk(KEPT, 0, len(PROMPT), True)], PROMPT, [SeqStart(KEPT, 64, SamplingParams())])
        token, pos = await ring.decode(KEPT, token, len(PROMPT), 3)
        await ring.quiet()
        return token, pos

    try:
        token, pos = asyncio.run(before())
    except BaseException:
        ring.first.compute.shutdown()
        raise
    # epoch 2: another peer takes the last stage's layers, rebuilding the KV from the replica
    moved = stage(model, CUT, spec.n_layers, "f16")
    assert asyncio.run(restore_kv(moved, None, ring.replicas, [pb.ResumeSeq(seq_id=KEPT, positions=pos)], [],
                                  None, spec, spec.context, "me:1")) == {KEPT: pos}
    ring.deltas.clear()
    ring.bind(2, first, moved)

    async def after() -> tuple[int, int]:  # the head starts its sequences again (the last stage's samplers)
        nxt = await ring.run([Chunk(KEPT, pos, 1, True)], [token], [SeqStart(KEPT, 64, SamplingParams())])
        last, end = await ring.decode(KEPT, nxt, pos + 1, 1)  # the first step's deltas ride on this one's frames
        old = ring.replicas.nbytes()
        ring.replicas.keep_from(2)  # the holder commits epoch 2 only now
        assert 0 < ring.replicas.nbytes() < old  # epoch 1's replicas gone, the first step's kept
        await ring.quiet()
        return last, end

    try:
        token, end = asyncio.run(after())
    finally:
        ring.first.compute.shutdown()
    assert_whole_replicas(ring, (first, moved), KEPT, end)
    # the first step's delta covers the rebuilt KV; the next one carries its own position
    for layer in (0, CUT):
        assert [(a, n) for f, _, a, n in ring.deltas if f == layer] == [(0, pos + 1), (pos + 1, 1)]


def test_a_takeover_while_the_last_step_waits_to_ride_rebuilds_all_but_that_step(model):
    """The last step's deltas wait for the stage's next frame: a peer dying then leaves its
    successor a replica one position short. The takeover rebuilds the rest, and the head's next
    chunk (that token again and the new one) continues with the greedy tokens the lost stage gave."""
    spec = read_spec(model)
    first, last = stage(model, 0, CUT, "f16"), stage(model, CUT, spec.n_layers, "f16")
    ring = Ring(model, spec.context)
    ring.bind(1, first, last)
    tokens = list(PROMPT)

    async def main() -> int:
        start = SeqStart(KEPT, 64, SamplingParams())
        tokens.append(await ring.run([Chunk(KEPT, 0, len(PROMPT), True)], PROMPT, [start]))
        for _ in range(4):
            tokens.append(await ring.run([Chunk(KEPT, len(tokens) - 1, 1, True)], [tokens[-1]]))
        return ring.alone

    try:
        assert asyncio.run(main()) == 0
    finally:
        ring.first.compute.shutdown()
    pos = len(tokens) - 1  # KV positions every stage holds
    fresh = stage(model, CUT, spec.n_layers, "f16")
    rebuilt = asyncio.run(restore_kv(fresh, None, ring.replicas, [pb.ResumeSeq(seq_id=KEPT, positions=pos)], [],
                                     None, spec, spec.context, "me:1"))
    assert rebuilt == {KEPT: pos - 1}  # the last step's deltas never left
    first.kv.truncate(KEPT, pos - 1)  # the head resumes every stage there
    # the recomputed token and the next one in one chunk, against the lost stage going on alone
    h = first.step(torch.tensor(tokens[-2:]), [SeqChunk(KEPT, pos - 1, 2)])
    got = fresh.step(h.clone(), [SeqChunk(KEPT, pos - 1, 2)])
    want = last.step(h[-1:].clone(), [SeqChunk(KEPT, pos, 1)])
    assert int(got[-1].argmax()) == int(want[-1].argmax())
    assert torch.allclose(got[-1], want[-1], atol=1e-2, rtol=1e-3)
