"""The daemons' timeline (P2PLLM_TIMELINE, p2pllm/runtime/timeline.py): every token's frame, stage
by stage, on one clock, as benchmarks/ring.py reads it to say where a token's time goes."""

from __future__ import annotations

import sys
import time

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from ring import timeline_breakdown  # noqa: E402


def test_the_timeline_follows_each_token_around_the_ring(smol_cluster):
    client = smol_cluster.client()
    t0 = time.perf_counter()
    client.completions.create(model=smol_cluster.model, prompt="Once upon a time", max_tokens=16, temperature=0,
                              extra_body={"ignore_eos": True})
    t1 = time.perf_counter()
    time.sleep(1.2)  # a daemon writes what it holds at its first event a second after its last write
    client.completions.create(model=smol_cluster.model, prompt="Hi", max_tokens=1, temperature=0)

    tl = timeline_breakdown(smol_cluster.timeline, [(t0, t1)])
    assert tl is not None and tl["tokens"] >= 12  # 16 launches: the prefill's, then 15 decode steps'
    assert len(tl["stages_ms"]) == 2 and tl["head_stage"] in (0, 1)
    assert len(tl["messages_ms"]) == 3  # head -> stage 1 -> stage 2 -> head
    parts = [x for s in tl["stages_ms"] for x in s.values()] + tl["messages_ms"] + list(tl["head_ms"].values())
    assert all(x > 0 for x in parts), tl
    assert all(s["layers"] > s["decode"] + s["encode"] for s in tl["stages_ms"]), tl  # the layers dominate a stage
    assert 0.7 * tl["cycle_ms"] < sum(parts) < 1.3 * tl["cycle_ms"], tl


def test_frames_a_peer_sends_itself_are_handed_over_in_the_process():
    """The head's own stage (and the last stage's answers to its own head) skip gRPC: no server is
    listening at the address, yet the frame arrives. (Timed in benchmarks/ring.py, not here.)"""
    import asyncio

    from p2pllm.proto import p2pllm_pb2 as pb
    from p2pllm.transport.ring import LinkPool, LocalLink
    from p2pllm.transport.security import Security

    got = []

    async def handler(frame):
        got.append(frame.micro_batch)
        return pb.FrameAck(micro_batch=frame.micro_batch)

    async def go():
        pool = LinkPool(Security.insecure(), local=("127.0.0.1:1", handler))
        link = pool.get("127.0.0.1:1")
        await link.send(pb.Frame(epoch=1, micro_batch=7))
        return link, pool.bytes_sent()

    link, sent = asyncio.run(go())
    assert isinstance(link, LocalLink) and got == [7] and sent == 0
