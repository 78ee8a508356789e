"""The partition planner: correctness against brute force, baselines, hysteresis, CLI."""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import re
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pllm.cluster import planner as P
from p2pllm.cluster.planner import PeerCaps
from p2pllm.cluster.plan_cli import add_plan_parser, cmd_plan, parse_device
from p2pllm.errors import P2PError, UsageError
from p2pllm.model.spec import ModelSpec, resolve_spec

GiB = P.GiB


def tiny_spec(n_layers: int, hidden: int = 64, vocab: int = 256) -> ModelSpec:
    spec = ModelSpec(
        arch="llama", name="tiny", n_layers=n_layers, hidden=hidden, n_heads=4, n_kv_heads=2,
        head_dim=hidden // 4, ffn=2 * hidden, vocab=vocab, context=512, rope_theta=10000.0,
        rope_scaling=None, norm_eps=1e-5, tied_embeddings=False, qkv_bias=False,
        layer_bytes=0, embedding_bytes=0, head_bytes=0, norm_bytes=0, file_dtype="f16", format="builtin",
    )
    emb = spec.embedding_params * 2
    return ModelSpec(**{**spec.to_dict(), "layer_bytes": spec.layer_params * 2, "embedding_bytes": emb,
                        "head_bytes": emb, "norm_bytes": hidden * 2})


def brute_force(spec, peers, links, options):
    """Best objective over every subset, order and split, priced by planner.evaluate."""
    L = spec.n_layers
    best = math.inf
    for k in range(1, min(len(peers), L) + 1):
        for order in itertools.permutations(peers, k):
            for cuts in itertools.combinations(range(1, L), k - 1):
                bounds = (0, *cuts, L)
                assignment = [(p.id, bounds[i], bounds[i + 1]) for i, p in enumerate(order)]
                pl = P.evaluate(spec, peers, assignment, links, options)
                if pl.feasible:
                    best = min(best, pl.objective_ms)
    return best


@st.composite
def instances(draw, max_peers=4, max_layers=8):
    L = draw(st.integers(1, max_layers))
    spec = tiny_spec(L)
    options = P.PlanOptions(
        context=draw(st.sampled_from([16, 64, 256])),
        batch=draw(st.integers(1, 3)),
        prefill_chunk=draw(st.sampled_from([8, 32])),
        margin_bytes=draw(st.sampled_from([0, 4096])),
        objective=draw(st.sampled_from(P.OBJECTIVES)),
    )
    unit = P.stage_memory(spec, 0, 1, options).total
    n = draw(st.integers(1, max_peers))
    peers = []
    for i in range(n):
        peers.append(P.PeerCaps(
            id=f"p{i}", name=f"peer{i}",
            mem_bytes=int(unit * draw(st.floats(0.5, L + 1.5))),
            flops=draw(st.floats(1e8, 1e11)),
            mem_bw=draw(st.floats(1e8, 1e10)),
            net_bw=draw(st.floats(1e5, 1e9)),
            rtt_s=draw(st.sampled_from([0.0, 1e-5, 1e-3])),
        ))
    links = P.Links()
    for a, b in itertools.combinations(peers, 2):
        if draw(st.booleans()):
            links.set(a.id, b.id, draw(st.floats(1e5, 1e9)), draw(st.floats(0, 2e-3)))
    return spec, peers, links, options


def assert_valid(spec, pl):
    expect = 0
    for s in pl.stages:
        assert s.start == expect and s.end > s.start
        assert s.memory.total <= s.memory.limit
        assert s.memory.total == s.memory.weights + s.memory.kv + s.memory.workspace
        expect = s.end
    assert expect == spec.n_layers
    assert len({s.peer for s in pl.stages}) == len(pl.stages)


# --------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances())
def test_optimal_equals_brute_force_and_is_valid(inst):
    spec, peers, links, options = inst
    pl = P.plan(spec, peers, links, options)
    best = brute_force(spec, peers, links, options)
    if math.isinf(best):
        assert not pl.feasible
        assert re.search(r"needs \d+\.\d\d GiB more memory", pl.reason)
        return
    assert pl.feasible, pl.reason
    assert_valid(spec, pl)
    assert pl.objective_ms == pytest.approx(best, rel=1e-9)
    used = {s.peer for s in pl.stages}
    assert {p for p, _ in pl.excluded} == {p.id for p in peers} - used


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances())
def test_optimal_beats_or_matches_baselines(inst):
    spec, peers, links, options = inst
    best = P.plan(spec, peers, links, options)
    for strategy in ("proportional", "even"):
        base = P.plan(spec, peers, links, P.PlanOptions(**{**options.__dict__, "strategy": strategy}))
        assert base.strategy == strategy
        if base.feasible:
            assert best.feasible
            assert best.objective_ms <= base.objective_ms * (1 + 1e-9)
            assert_valid(spec, base)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(max_peers=4, max_layers=8))
def test_heuristic_plans_are_valid_and_never_beat_exact(inst):
    spec, peers, links, options = inst
    exact = P.plan(spec, peers, links, options)
    heur = P.plan(spec, peers, links, P.PlanOptions(**{**options.__dict__, "exhaustive_limit": 0}))
    assert heur.feasible == exact.feasible
    if heur.feasible:
        assert_valid(spec, heur)
        assert heur.objective_ms >= exact.objective_ms * (1 - 1e-9)


def test_large_cluster_uses_heuristic_quickly():
    import random
    import time

    rng = random.Random(7)
    spec = resolve_spec("llama-3-70b")
    peers = [P.PeerCaps(f"n{i}", f"n{i}", rng.choice([8, 16, 32]) * GiB, rng.uniform(0.5, 20) * 1e12,
                        rng.uniform(50, 400) * 1e9, rng.choice([12.5e6, 125e6, 1.25e9]), 1e-3) for i in range(10)]
    t = time.perf_counter()
    pl = P.plan(spec, peers, options=P.PlanOptions(dtype="q4_0", objective="throughput"))
    assert time.perf_counter() - t < 10
    assert pl.feasible
    assert_valid(spec, pl)


# --------------------------------------------------------------------------- examples


def laptop(name, mem_gib, tflops, bw_gbs, net_bps=1e9, rtt=5e-4):
    return P.PeerCaps(name, name, int(mem_gib * GiB), tflops * 1e12, bw_gbs * 1e9, net_bps / 8, rtt)


def test_fast_peer_alone_when_it_fits_and_slow_peer_listed_unused():
    spec = resolve_spec("llama-3-8b")
    peers = [laptop("fast", 32, 10, 200), laptop("slow", 16, 1, 30, net_bps=100e6, rtt=4e-3)]
    pl = P.plan(spec, peers, options=P.PlanOptions(dtype="q4_0"))
    assert pl.assignment == [("fast", 0, 32)]
    assert dict(pl.excluded)["slow"].startswith("not used")
    assert pl.to_json()["unused_peers"] == [{"peer": "slow", "reason": dict(pl.excluded)["slow"]}]


def test_split_when_no_peer_holds_the_model():
    spec = resolve_spec("llama-3-70b")
    peers = [laptop("a", 32, 8, 200), laptop("b", 24, 4, 100), laptop("c", 16, 2, 60)]
    pl = P.plan(spec, peers, options=P.PlanOptions(dtype="q4_0"))
    assert pl.feasible and len(pl.stages) >= 2
    assert_valid(spec, pl)
    assert pl.ms_per_token == pytest.approx(sum(s.ms_per_token for s in pl.stages) + sum(h.ms for h in pl.hops))
    assert pl.hops[-1].payload == "token" and pl.hops[-1].dst == pl.stages[0].peer


def test_infeasible_reason_says_how_many_gib():
    spec = resolve_spec("llama-3-70b")
    peers = [laptop("a", 16, 8, 200), laptop("b", 8, 4, 100)]
    pl = P.plan(spec, peers, options=P.PlanOptions(dtype="f16"))
    assert not pl.feasible and pl.stages == ()
    m = re.search(r"needs (\d+\.\d\d) GiB more memory on peer \w+ \((\d+\.\d\d) GiB -> (\d+\.\d\d) GiB\), "
                  r"or one machine with (\d+\.\d\d) GiB .*peers have (\d+\.\d\d) GiB in all", pl.reason)
    assert m, pl.reason
    extra, before, after, need, have = map(float, m.groups())
    assert have == pytest.approx(24.0) and need > 130 and extra >= need - have
    assert after == pytest.approx(before + extra, abs=0.011)  # the numbers in the message add up
    assert "its own KV and buffers" in pl.reason  # and it says why the split needs more than need - have
    # the shortfall is enough: giving that much to the named peer makes it fit
    who = re.search(r"on peer (\w+)", pl.reason).group(1)
    bigger = [P.PeerCaps(**{**p.__dict__, "mem_bytes": p.mem_bytes + int(extra * GiB)}) if p.id == who else p for p in peers]
    assert P.plan(spec, bigger, options=P.PlanOptions(dtype="f16")).feasible
    assert not P.plan(spec, [], options=P.PlanOptions()).feasible


def test_a_reason_names_a_daemon_by_its_name_and_adds_its_id_only_where_names_repeat():
    """Daemons' ids are 32 hex digits: a 503 said "more memory on peer 7c3a2e8a9f0b...". """
    spec = resolve_spec("llama-3-70b")
    ids = ["7c3a2e8a" + "0" * 24, "b816cfbe" + "1" * 24]
    peers = [P.PeerCaps(ids[0], "host1", 16 * GiB, 8e12, 200e9, 1e9), P.PeerCaps(ids[1], "host2", 8 * GiB, 4e12, 100e9, 1e9)]
    reason = P.plan(spec, peers, options=P.PlanOptions(dtype="f16")).reason
    assert re.search(r"more memory on peer host[12] \(", reason) and "0000" not in reason and "1111" not in reason, reason
    twins = [P.PeerCaps(**{**p.__dict__, "name": "laptop"}) for p in peers]
    reason = P.plan(spec, twins, options=P.PlanOptions(dtype="f16")).reason
    assert re.search(r"more memory on peer laptop \[(7c3a2e8a|b816cfbe)\] \(", reason), reason


def test_proportional_is_exo_memory_weighted_ring():
    spec = tiny_spec(10)
    big = P.stage_memory(spec, 0, 10, P.PlanOptions()).total * 4
    peers = [P.PeerCaps("a", "a", big, 1e12, 1e11, 1e9), P.PeerCaps("b", "b", 3 * big, 1e12, 1e11, 1e9)]
    pl = P.plan(spec, peers, options=P.PlanOptions(strategy="proportional"))
    # largest memory first, 3:1 -> 7.5 : 2.5 -> largest remainder (tie to the first) gives 8 : 2
    assert pl.assignment == [("b", 0, 8), ("a", 8, 10)]
    even = P.plan(spec, peers, options=P.PlanOptions(strategy="even"))
    assert even.assignment == [("b", 0, 5), ("a", 5, 10)]


def test_baseline_over_its_limit_is_infeasible_with_gib():
    spec = resolve_spec("llama-3-8b")
    peers = [laptop("a", 12, 8, 200), laptop("tiny", 2, 4, 100)]
    pl = P.plan(spec, peers, options=P.PlanOptions(dtype="f16", strategy="even"))
    assert not pl.feasible
    assert re.search(r"needs \d+\.\d\d GiB more memory: peer tiny", pl.reason)


def test_throughput_objective_balances_stages():
    spec = resolve_spec("llama-3-70b")
    peers = [laptop(n, 48, 10, 200, net_bps=10e9) for n in "abcd"]
    lat = P.plan(spec, peers, options=P.PlanOptions(dtype="q4_0"))
    thr = P.plan(spec, peers, options=P.PlanOptions(dtype="q4_0", objective="throughput"))
    assert len(lat.stages) == 1  # one 48 GiB laptop holds 70B q4: hops only add latency
    assert len(thr.stages) == 4 and thr.tokens_per_s_pipelined > 3 * lat.tokens_per_s_pipelined
    assert thr.micro_batches >= 4


def test_memory_accounting_counts_kv_for_context_and_batch():
    spec = resolve_spec("llama-3-8b")
    a = P.stage_memory(spec, 0, 16, P.PlanOptions(context=1024))
    b = P.stage_memory(spec, 0, 16, P.PlanOptions(context=4096, batch=2))
    assert b.kv == 8 * a.kv == 8 * 1024 * spec.kv_bytes_per_token(16, 2)
    assert a.weights == spec.weight_bytes(0, 16)
    last = P.stage_memory(spec, 16, 32, P.PlanOptions(context=1024))
    assert last.workspace > a.workspace  # logits buffers


# --------------------------------------------------------------------------- hysteresis


def _plan_with(ms, objective="latency", feasible=True):
    return P.Plan(feasible, "", "optimal", objective, ms_per_token=ms, bottleneck_ms=ms)


def test_hysteresis():
    cur = _plan_with(100.0)
    assert not P.should_replace(cur, _plan_with(95.0), 0.10)
    assert P.should_replace(cur, _plan_with(100 / 1.1), 0.10)
    assert P.should_replace(cur, _plan_with(50.0), 0.10)
    assert not P.should_replace(cur, _plan_with(100 / 1.2), 0.25)
    assert P.should_replace(_plan_with(1.0, feasible=False), _plan_with(500.0), 0.10)
    assert P.should_replace(None, _plan_with(500.0), 0.10)
    assert not P.should_replace(cur, _plan_with(1.0, feasible=False), 0.10)
    assert P.should_replace(_plan_with(100.0, "throughput"), _plan_with(80.0, "throughput"), 0.10)


# --------------------------------------------------------------------------- JSON


def test_json_shape_exact():
    spec = resolve_spec("llama-3-70b")
    pl = P.plan(spec, [laptop("a", 32, 8, 200), laptop("b", 32, 4, 100)], options=P.PlanOptions(dtype="q4_0"))
    j = json.loads(json.dumps(pl.to_json()))
    assert {"feasible", "reason", "strategy", "stages", "predicted", "bottleneck"} <= set(j)
    assert j["feasible"] is True and isinstance(j["reason"], str) and j["strategy"] == "optimal"
    assert set(j["predicted"]) == {"ms_per_token", "tokens_per_s_single", "tokens_per_s_pipelined", "batch"}
    assert j["bottleneck"] in {s["peer"] for s in j["stages"]} or "->" in j["bottleneck"]
    prev = 0
    for s in j["stages"]:
        assert {"peer", "layers", "memory", "ms_per_token"} <= set(s)
        assert set(s["memory"]) == {"weights", "kv", "workspace", "total", "limit"}
        assert all(type(v) is int for v in s["memory"].values())
        assert s["layers"][0] == prev and s["layers"][1] > prev
        prev = s["layers"][1]
    assert prev == 80
    bad = P.plan(spec, [laptop("a", 8, 8, 200)], options=P.PlanOptions(dtype="f16")).to_json()
    assert bad["feasible"] is False and bad["stages"] == [] and bad["predicted"]["ms_per_token"] is None


# --------------------------------------------------------------------------- CLI


def run_cli(*argv):
    parser = argparse.ArgumentParser(prog="p2pllm")
    add_plan_parser(parser.add_subparsers(dest="command"))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            args = parser.parse_args(["plan", *argv])
            assert args.func is cmd_plan
            code = args.func(args)
        except P2PError as e:
            err.write(f"p2pllm: error: {e}\n")
            code = e.exit_code
        except SystemExit as e:  # argparse's own usage errors
            code = e.code
    return code, out.getvalue(), err.getvalue()


DEV_A = "name=a,mem=32GiB,tflops=8,bw=200GBps,net=1Gbps"
DEV_B = "name=b,mem=24GiB,tflops=4,bw=100GBps,net=100Mbps,rtt=4ms"


def test_cli_table_feasible():
    code, out, _ = run_cli("--model", "llama-3-70b", "--device", DEV_A, "--device", DEV_B, "--dtype", "q4_0")
    assert code == 0
    assert "bottleneck" in out and "ms/step" in out and re.search(r"\ba\b", out) and "tokens/s" in out
    code, out, _ = run_cli("--model", "llama-3-8b", "--device", DEV_A, "--dtype", "q4_0", "--batch", "4")
    m = re.search(r"predicted: (\d+\.\d\d) ms per decode step of a batch of 4 sequences = (\d+\.\d) tokens/s per "
                  r"sequence, (\d+\.\d) tokens/s for the batch", out)
    assert code == 0 and m, out  # the batch a throughput is for is named, and the numbers agree
    ms, per_seq, per_batch = map(float, m.groups())
    assert per_seq == pytest.approx(1000 / ms, rel=0.01) and per_batch == pytest.approx(4 * per_seq, rel=0.01)


def test_cli_json_matches_planner():
    code, out, _ = run_cli("--model", "llama-3-8b", "--device", DEV_A, "--json", "--context", "4096",
                           "--objective", "throughput", "--strategy", "even", "--device", DEV_B)
    assert code == 0
    j = json.loads(out)
    assert j["strategy"] == "even" and [s["layers"] for s in j["stages"]] == [[0, 16], [16, 32]]


def test_cli_infeasible_exits_3_with_gib():
    code, out, _ = run_cli("--model", "llama-3.1-405b", "--device", DEV_A, "--dtype", "f16")
    assert code == 3 and re.search(r"needs \d+\.\d\d GiB more memory", out)
    code, out, _ = run_cli("--model", "llama-3.1-405b", "--device", DEV_A, "--dtype", "f16", "--json")
    assert code == 3 and json.loads(out)["feasible"] is False


@pytest.mark.parametrize(
    "argv",
    [
        ["--model", "llama-3-8b"],  # no peers
        ["--model", "no-such-model", "--device", DEV_A],
        ["--model", "llama-3-8b", "--device", "name=a,mem=lots,tflops=1,bw=1GBps"],
        ["--model", "llama-3-8b", "--device", "name=a,tflops=1,bw=1GBps"],
        ["--model", "llama-3-8b", "--device", "name=a,mem=8GiB,tflops=1,bw=1GBps,colour=red"],
        ["--model", "llama-3-8b", "--device", DEV_A, "--device", DEV_A],
        ["--model", "llama-3-8b", "--device", DEV_A, "--context", "0"],
        ["--model", "llama-3-8b", "--device", DEV_A, "--dtype", "q3"],
    ],
)
def test_cli_usage_errors_exit_2(argv):
    code, out, err = run_cli(*argv)
    assert code == 2 and out == ""
    assert err.strip()


def test_a_config_file_of_any_name_is_read_as_a_config(demo_tiny_hf, tmp_path):
    # CONFIG.json, as the flag's metavar says: it was read as a GGUF unless named config.json
    saved = tmp_path / "tiny-llama.json"
    saved.write_text((demo_tiny_hf / "config.json").read_text())
    code, out, err = run_cli("--model", str(saved), "--device", DEV_A, "--json")
    assert code == 0 and json.loads(out)["feasible"], err


def test_parse_device():
    p = parse_device("name=x,mem=16GiB,tflops=4,bw=60GBps,net=1Gbps", 0, 32)
    assert (p.id, p.mem_bytes, p.flops, p.mem_bw, p.net_bw) == ("x", 16 * GiB, 4e12, 60e9, 1e9 / 8)
    assert parse_device("mem=8GB,flops=2TFLOPS,bw=50GB/s", 3, 32).id == "peer3"
    for bad in ("mem=8GB,tflops=-1,bw=50GBps", "mem=8GB,tflops=inf,bw=50GBps", "mem=8GB,tflops=1e400,bw=50GBps"):
        with pytest.raises(UsageError):
            parse_device(bad, 0, 32)


def test_cli_discover_plans_for_this_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    code, out, err = run_cli("--model", "llama-3-8b", "--discover", "--dtype", "q4_0", "--json")
    assert code in (0, 3)
    j = json.loads(out)
    found = re.search(r"planned for this machine and (\d+) peer\(s\) announced on", err)
    assert found, err  # what it browsed and found is said (the namespace test checks found peers are used)
    if j["feasible"]:
        assert len(j["stages"]) + len(j["unused_peers"]) == 1 + int(found[1])


def test_plan_from_a_header_only_gguf_sizes_the_model_from_its_metadata():
    """The shared Llama-2 vocabulary GGUF carries 7B hparams and no tensors: a dry run still works."""
    from conftest import run_cli, shared_model

    path = shared_model("vocab/ggml-vocab-llama-spm.gguf")
    proc = run_cli("plan", "--model", path, "--device", "name=a,mem=16GiB,tflops=4,bw=100GBps", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["feasible"] and out["stages"][0]["layers"] == [0, 32]
    assert 12 << 30 < out["stages"][0]["memory"]["weights"] < 14 << 30  # 6.7B parameters in f16


@pytest.mark.parametrize("strategy", P.STRATEGIES)
@pytest.mark.parametrize("head", [None, "a", "b"])
def test_a_replan_keeps_each_survivor_on_the_layers_it_has_loaded(strategy, head):
    spec = tiny_spec(12, hidden=2048, vocab=32000)  # 1.1 GB of weights: no one peer holds it all
    # the peer serving [4, 8) was lost; b serves [0, 4) and a [8, 12). Alike peers, so any order
    # costs the same: the one that keeps what each has loaded is taken
    a = PeerCaps("a", "a", GiB, 1e11, 1e10, 1e8, serving=(8, 12))
    b = PeerCaps("b", "b", GiB, 1e11, 1e10, 1e8, serving=(0, 4))
    options = P.PlanOptions(strategy=strategy, context=64)
    fresh = P.plan(spec, [replace(a, serving=None), replace(b, serving=None)], options=options, head=head)
    assert [peer for peer, _, _ in fresh.assignment] == ["a", "b"]  # what it would take knowing nothing
    replan = P.plan(spec, [a, b], options=options, head=head)
    assert [peer for peer, _, _ in replan.assignment] == ["b", "a"]
    assert replan.objective_ms == pytest.approx(fresh.objective_ms)
