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
    # the head's own link hands the frame over in the process; the other two cross the network
    own = 0 if tl["head_stage"] == 0 else 2
    assert tl["messages_ms"][own] < min(m for i, m in enumerate(tl["messages_ms"]) if i != own), tl
    assert 0.7 * tl["cycle_ms"] < sum(parts) < 1.3 * tl["cycle_ms"], tl
