"""The planner weighs what peers started with `join --from-peers` must fetch: a stage's missing
bytes and the seconds they take over its peer's link are part of every plan, a plan prefers
giving such peers the layers they already hold (within `fetch_tolerance` of the best cost), and
`p2pllm plan --device ...,held=A:B` shows it."""

from __future__ import annotations

import json

import pytest

from p2pllm.cluster import planner as P
from test_planner import run_cli, tiny_spec

GiB = P.GiB


def peer(name: str, held: P.Held | None = None, flops: float = 1e11, mem_bw: float = 1e10, net_bw: float = 1e8,
         mem: int = 8 * GiB) -> P.PeerCaps:
    return P.PeerCaps(id=name, name=name, mem_bytes=mem, flops=flops, mem_bw=mem_bw, net_bw=net_bw, held=held)


def held(start: int, end: int, n: int) -> P.Held:
    """What a copy fetched for a stage of [start, end) holds."""
    return P.Held(frozenset(range(start, end)), embed=start == 0, head=end == n)


def test_fetch_bytes_counts_the_missing_layers_and_the_ends_a_stage_needs():
    spec = tiny_spec(12)
    assert P.fetch_bytes(spec, None, 0, 12) == 0  # the whole file
    assert P.fetch_bytes(spec, P.Held(), 0, 12) == spec.weight_bytes(0, 12)  # an empty copy lacks all of it
    assert P.fetch_bytes(spec, P.Held(), 4, 8) == spec.weight_bytes(4, 8)
    assert P.fetch_bytes(spec, held(4, 8, 12), 4, 8) == 0
    assert P.fetch_bytes(spec, held(4, 8, 12), 6, 12) == spec.weight_bytes(8, 12)  # layers 8.. and the head
    assert P.fetch_bytes(spec, held(0, 6, 12), 0, 4) == 0
    tied = P.ModelSpec(**{**spec.to_dict(), "tied_embeddings": True})
    assert P.fetch_bytes(tied, P.Held(), 8, 12) == tied.weight_bytes(8, 12)  # the tied head: the embedding
    assert P.fetch_bytes(tied, P.Held(frozenset(range(8, 12)), embed=True), 8, 12) == tied.norm_bytes


@pytest.mark.parametrize("strategy", P.STRATEGIES)
def test_a_plan_gives_peers_the_layers_they_hold_and_a_newcomer_the_cheapest_range(strategy):
    spec = tiny_spec(12)
    owner, second, newcomer = peer("a"), peer("b", held(6, 12, 12)), peer("c", P.Held())
    options = P.PlanOptions(strategy=strategy, context=64)
    even = P.plan(spec, [owner, second, newcomer], options=P.PlanOptions(strategy="even", context=64))
    assert [(s.start, s.end) for s in even.stages] == [(0, 4), (4, 8), (8, 12)]
    # b keeps layers it holds; c, holding nothing, takes the range without the embedding or head
    assert even.assignment == [("a", 0, 4), ("c", 4, 8), ("b", 8, 12)]
    assert even.stages[1].fetch_bytes == spec.weight_bytes(4, 8) and even.stages[2].fetch_bytes == 0
    assert even.fetch_s == pytest.approx(spec.weight_bytes(4, 8) / newcomer.net_bw)
    chosen = P.plan(spec, [owner, second, newcomer], options=options)
    assert chosen.feasible and chosen.fetch_bytes <= spec.weight_bytes(4, 8)
    # once c holds its range, the same plan needs no fetch at all
    after = P.plan(spec, [owner, second, peer("c", held(4, 8, 12))], options=P.PlanOptions(strategy="even", context=64))
    assert after.assignment == even.assignment and after.fetch_bytes == 0


def test_a_much_slower_plan_is_not_taken_to_avoid_a_fetch():
    spec = tiny_spec(12)
    # memory gives a [0, 8) and b [8, 12); b holds [0, 8) but is 10x slower: swapping avoids a fetch
    # at a cost far beyond the tolerance
    a = peer("a", P.Held(), mem=16 * GiB)
    b = peer("b", held(0, 8, 12), flops=1e10, mem_bw=1e9)
    options = P.PlanOptions(strategy="proportional", context=64)
    chosen = P.plan(spec, [a, b], options=options)
    swapped = P.evaluate(spec, [a, b], [("b", 0, 8), ("a", 8, 12)], options=options)
    assert chosen.assignment == [("a", 0, 8), ("b", 8, 12)]
    assert swapped.fetch_bytes < chosen.fetch_bytes and swapped.objective_ms > 1.5 * chosen.objective_ms
    lenient = P.plan(spec, [a, b], options=P.PlanOptions(strategy="proportional", context=64, fetch_tolerance=10.0))
    assert lenient.assignment == swapped.assignment


def test_plan_json_and_text_show_what_must_be_fetched():
    code, out, err = run_cli("--model", "llama-3-8b", "--dtype", "q4_0", "--strategy", "even",
                             "--device", "name=a,mem=16GiB,tflops=4,bw=60GBps",
                             "--device", "name=b,mem=16GiB,tflops=4,bw=60GBps,net=100Mbps,held=none", "--json")
    assert code == 0, err
    plan = json.loads(out)
    b = next(s for s in plan["stages"] if s["peer"] == "b")
    assert b["fetch"]["bytes"] > 0 and b["fetch"]["seconds"] == pytest.approx(b["fetch"]["bytes"] / 12.5e6, rel=1e-3)
    assert plan["fetch"] == b["fetch"]
    code, out, err = run_cli("--model", "llama-3-8b", "--dtype", "q4_0", "--strategy", "even",
                             "--device", "name=a,mem=16GiB,tflops=4,bw=60GBps",
                             "--device", "name=b,mem=16GiB,tflops=4,bw=60GBps,net=100Mbps,held=16:end")
    assert code == 0, err
    assert "fetch before serving" not in out  # b holds [16, 32), which the even split gives it
    code, out, err = run_cli("--model", "llama-3-8b", "--dtype", "q4_0", "--strategy", "even",
                             "--device", "name=a,mem=16GiB,tflops=4,bw=60GBps",
                             "--device", "name=b,mem=16GiB,tflops=4,bw=60GBps,net=100Mbps,held=0:8")
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("fetch before serving"))
    assert line.startswith("fetch before serving: b lacks ") and "for layers [0, 16)" in line and " s at its link" in line


@pytest.mark.parametrize("value", ["8", "8:4", "0:99", "x:3", "0:4+", "-1:3"])
def test_a_bad_held_is_one_line(value):
    code, out, err = run_cli("--model", "llama-3-8b", "--device", f"name=a,mem=16GiB,tflops=4,bw=60GBps,held={value}")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "held must be none or START:END ranges" in err


@pytest.mark.parametrize("strategy", ["even", "proportional"])  # (optimal puts this tiny model on fewer peers)
def test_the_head_is_put_at_an_end_of_the_ring_unless_that_costs_more(strategy):
    """The coordinator runs the scheduler: at an end of the ring one of its two messages per token
    is a call to itself. Equal peers: the plan moves it there; a move that would make a peer fetch
    is not made."""
    spec = tiny_spec(12)
    options = P.PlanOptions(strategy=strategy, context=64)
    peers = [peer("a"), peer("b"), peer("c")]
    plain = P.plan(spec, peers, options=options)
    middle = plain.stages[1].peer
    moved = P.plan(spec, peers, options=options, head=middle)
    assert [(s.start, s.end) for s in moved.stages] == [(s.start, s.end) for s in plain.stages]
    assert middle in (moved.stages[0].peer, moved.stages[-1].peer)
    assert moved.objective_ms <= plain.objective_ms * (1 + options.fetch_tolerance)
    assert P.plan(spec, peers, options=options, head=plain.stages[0].peer).assignment == plain.assignment

    # the middle peer holds its range (and nothing else): moving it would make it fetch
    n = 12
    ranges = {"a": (0, 4), "b": (4, 8), "c": (8, 12)}
    holding = [peer("a"), peer("b", held(4, 8, n)), peer("c")]
    even = P.PlanOptions(strategy="even", context=64)
    kept = P.plan(spec, holding, options=even, head="b")
    assert kept.assignment == [(k, *v) for k, v in ranges.items()] and kept.fetch_bytes == 0
