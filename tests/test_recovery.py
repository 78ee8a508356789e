"""Keep serving through churn: a lost peer, a cut cable, a lost coordinator, a leaving peer, a
joining peer, and survivors too small — real daemons on namespace hosts, real streams."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time

import pytest

from clusterutil import CLIENT, client, join, status, wait_for_agreement
from netns import Hosts, hosts  # noqa: F401  (a fixture)

PROMPTS = ["Hello there", "The robot said", "A story about", "Mira went to"]
TOKENS = 300  # the fault lands after 10 tokens of every stream
STALL_BOUND = 20.0  # generous for CI; the real figure is printed and measured in benchmarks/recovery.py


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    from p2pllm.model.demo import make_demo_model

    return make_demo_model(tmp_path_factory.mktemp("recovery") / "small.gguf", "gguf", "small")


def start(h: Hosts, model, n: int, *extra: str) -> dict:
    for i in range(1, n + 1):
        join(h, i, model, "--threads", "1", *extra)
    return wait_for_agreement(h, list(range(1, n + 1)), n_layers=8)[0]


def host_of(h: Hosts, view: dict, peer_id: str) -> int:
    addr = next(p["address"] for p in view["peers"] if p["id"] == peer_id).split(":")[0]
    return next(i for i in h.indices if h.addr(i) == addr)


def middle_host(h: Hosts, view: dict) -> int:
    """A peer that holds neither the first layers nor the head."""
    for p in view["peers"]:
        if p["layers"] and p["layers"][0] != 0 and p["id"] != view["coordinator"]:
            return host_of(h, view, p["id"])
    raise AssertionError(f"no middle peer in {view}")


def daemon_of(h: Hosts, i: int):
    """The first process started on host i: its `p2pllm join`."""
    return next(p for p in h._procs if p.args[3] == h.ns(i))


def streams_job(**kw) -> dict:
    """Four greedy streams, with logprobs: a replay, or streams regrouped into fewer micro-batches
    in flight after a replan, may part from the no-fault run at a near-tie (check_identical)."""
    return {"kind": "streams", "model": "small.gguf", "prompts": PROMPTS, "max_tokens": TOKENS, "logprobs": True,
            **kw}


def start_streams(h: Hosts, i: int, timeout: float = 60):
    """Four streams from host i; returns once every one of them has its first tokens."""
    proc = h.popen(i, [sys.executable, str(CLIENT), json.dumps(streams_job())], stderr=open(os.devnull, "w"))
    deadline = time.monotonic() + timeout
    while '"streaming"' not in open(proc.log_path).read():
        assert proc.poll() is None and time.monotonic() < deadline, open(proc.log_path).read()[-2000:]
        time.sleep(0.05)
    return proc


def finish_streams(proc, timeout: float = 180) -> list[dict]:
    proc.wait(timeout=timeout)
    out = open(proc.log_path).read().strip().splitlines()
    assert proc.returncode == 0 and out, out
    return json.loads(out[-1])


def wait_serving(h: Hosts, i: int, expect_epoch_above: int, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = status(h, i)
        if s and s["epoch"] > expect_epoch_above and s["plan"]:
            return s
        time.sleep(0.5)
    pytest.fail(f"no new plan within {timeout}s\n{h.logs()[-5000:]}")


NEAR_TIE = 0.05  # logprob lead of the greedy token under which a replay may pick the runner-up


def check_identical(baseline: list[dict], faulted: list[dict], what: str) -> float:
    """Same texts; where the streams carry logprobs (a replay or a regrouping, docs/cluster.md), a
    text may part from the baseline only at a token the baseline chose by less than NEAR_TIE."""
    assert [r["error"] for r in faulted] == [None] * 4, faulted
    assert [r["finish_reason"] for r in faulted] == ["length"] * 4
    for base, got in zip(baseline, faulted):
        if "margins" in base:
            assert len(base["tokens"]) == len(base["margins"]) == len(got["tokens"]) == TOKENS
        if "margins" in base and got["text"] != base["text"]:
            at = next(i for i, (a, b) in enumerate(zip(base["tokens"], got["tokens"])) if a != b)
            print(f"{what}: parted at token {at} of {base['tokens'][at - 3:at + 1]}, lead {base['margins'][at]:.4f}")
            assert base["margins"][at] < NEAR_TIE, (at, base["tokens"][at - 3:at + 2], got["tokens"][at - 3:at + 2])
        else:
            assert got["text"] == base["text"], (base["text"], got["text"])
    stall = max(r["max_gap"] for r in faulted)
    print(f"{what}: longest stall {stall:.2f}s (no-fault run: {max(r['max_gap'] for r in baseline):.2f}s)")
    assert stall < STALL_BOUND
    return stall


@pytest.mark.parametrize("replicas,kv", [("1", "f16"), ("0", "f16"), ("1", "q8_0")])
def test_kill_the_middle_peer_mid_stream_keeps_tokens_identical(hosts, small_model, replicas, kv):
    view = start(hosts, small_model, 3, "--kv-replicas", replicas, "--kv-dtype", kv)
    head = host_of(hosts, view, view["coordinator"])
    baseline = client(hosts, head, streams_job())
    proc = start_streams(hosts, head)
    hosts.kill(daemon_of(hosts, middle_host(hosts, view)))
    faulted = finish_streams(proc)
    check_identical(baseline, faulted, f"kill -9, kv-replicas {replicas}, kv {kv}")
    log = hosts.logs(tail=None)
    assert "carrying 4 sequences over" in log  # the fault hit the streams mid-way
    # found by its dropped connection at once, not after the silence timeout
    assert "lost: its connection dropped and it is unreachable" in log, log[-3000:]
    rebuilt = [line for line in log.splitlines() if "KV for layers" in line and "carried over" in line]
    assert rebuilt, log[-3000:]
    # both survivors keep the layers they hold and read only the lost peer's share
    kept = re.findall(r"loading layers \[(\d+), (\d+)\) of 8 \(keeping layers \[(\d+), (\d+)\) it holds\)", log)
    plans = [line for line in log.splitlines() if "proposing plan" in line or "loading layers" in line]
    assert len(kept) == 2 and all(int(b) - int(a) < int(d) - int(c) for c, d, a, b in kept), (kept, plans)
    if replicas == "1":  # warm: KV rebuilt from caches and replicas, no history replayed
        assert all(line.endswith(", 0 to replay") for line in rebuilt), rebuilt
    else:  # no replica of the lost layers: the head replays those histories
        assert any(re.search(r"0 sequences carried over, 0 partly .*, 4 to replay$", line) for line in rebuilt), rebuilt


def test_cut_cable_is_detected_and_streams_finish(hosts, small_model):
    view = start(hosts, small_model, 3)
    head = host_of(hosts, view, view["coordinator"])
    baseline = client(hosts, head, streams_job())
    proc = start_streams(hosts, head)
    hosts.link_down(middle_host(hosts, view))
    faulted = finish_streams(proc)
    check_identical(baseline, faulted, "link down")
    log = hosts.logs(tail=None)
    assert "lost: silent for" in log and "carrying 4 sequences over" in log


def test_coordinator_loss_elects_a_new_one_and_new_requests_succeed(hosts, small_model):
    view = start(hosts, small_model, 3)
    head = host_of(hosts, view, view["coordinator"])
    hosts.kill(daemon_of(hosts, head))
    other = next(i for i in (1, 2, 3) if i != head)
    deadline = time.monotonic() + 10
    new = None
    while time.monotonic() < deadline:
        s = status(hosts, other)
        if s and s["coordinator"] != view["coordinator"] and s["epoch"] > view["epoch"]:
            new = s
            break
        time.sleep(0.3)
    assert new is not None, hosts.logs()[-4000:]
    got = client(hosts, other, {"kind": "complete", "model": "small.gguf", "prompts": ["Hello"], "max_tokens": 8})
    assert got[0]["usage"]["completion_tokens"] > 0


def test_a_coordinator_frozen_and_resumed_leaves_one_plan_that_every_gateway_serves(hosts, small_model):
    """kill -STOP, then -CONT: the survivors elect another coordinator meanwhile; the resumed one
    must not count its own pause as its peers' silence, nor commit its older epoch after theirs
    (it did: two plans at once, and two of three gateways hung)."""
    view = start(hosts, small_model, 3)
    head = host_of(hosts, view, view["coordinator"])
    other = next(i for i in (1, 2, 3) if i != head)
    proc = daemon_of(hosts, head)
    streams = start_streams(hosts, other)  # through a gateway that forwards to the coordinator
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        # well past the peer timeout: the others replan without it, and the forwarded streams end
        # as soon as the coordinator is lost (they hung for the whole freeze: a frozen host resets
        # no connection)
        deadline = time.monotonic() + 8
        while streams.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        ended_while_frozen = streams.poll() is not None
        time.sleep(max(0.0, deadline - time.monotonic()))
    finally:
        os.killpg(proc.pid, signal.SIGCONT)
    assert ended_while_frozen, "the streams through another peer's gateway waited for the frozen coordinator"
    results = finish_streams(streams)
    assert all(r["error"] and "lost the coordinator" in r["error"] for r in results), results
    agreed = wait_for_agreement(hosts, [1, 2, 3], n_layers=8, timeout=40)
    assert agreed[0]["epoch"] > view["epoch"], agreed[0]
    for i in (1, 2, 3):
        got = client(hosts, i, {"kind": "complete", "model": "small.gguf", "prompts": ["Hello"], "max_tokens": 4},
                     timeout=60)
        assert got[0]["usage"]["completion_tokens"] > 0
    log = hosts.logs(tail=None)
    assert "did not run for" in log and "is not newer than the committed epoch" not in log, log[-4000:]


def test_sigterm_drains_a_peer_without_failing_requests(hosts, small_model):
    # one micro-batch per stream: every step computes one sequence, whatever the number of stages.
    # With the default (one per stage) the drain (3 stages to 2) regroups the 4 streams while the
    # leaver still answers, ggml rounds a step of two sequences differently from a step of one, and
    # a near-tie of this random-weight model flipped a greedy token no fault caused (2 of 3 CI runs)
    view = start(hosts, small_model, 3, "--micro-batches", str(len(PROMPTS)))
    head = host_of(hosts, view, view["coordinator"])
    baseline = client(hosts, head, streams_job())
    proc = start_streams(hosts, head)
    leaver = middle_host(hosts, view)
    daemon = daemon_of(hosts, leaver)
    os.killpg(daemon.pid, signal.SIGTERM)
    faulted = finish_streams(proc)
    check_identical(baseline, faulted, "SIGTERM drain")
    log = hosts.logs(tail=None)
    assert "is leaving" in log and "carrying 4 sequences over" in log
    daemon.wait(timeout=30)
    left = open(daemon.log_path).read()
    assert "no longer needs this peer's layers" in left
    after_signal = left[left.index("leaving: waiting"):]  # on its way out it said "ready ... no layers"
    assert "left the plan: epoch" in after_signal and "ready: epoch" not in after_signal


def test_a_joining_peer_replans_only_when_it_helps(hosts, small_model):
    # strategy even: a fourth compatible peer changes the set of peers, so the cluster replans
    view = start(hosts, small_model, 3)
    i = hosts.add_host()
    join(hosts, i, small_model, "--threads", "1")
    s = wait_serving(hosts, 1, view["epoch"])
    assert len([p for p in s["peers"] if p["layers"]]) == 4


def test_survivors_too_small_answer_503_then_service_resumes(hosts, small_model):
    from p2pllm.cluster.planner import PeerCaps, PlanOptions, plan
    from p2pllm.model.spec import read_spec

    spec = read_spec(small_model)
    opts = PlanOptions(context=spec.context, batch=8, strategy="even")

    def fits(n, mem):
        peers = [PeerCaps(str(k), str(k), mem, 1e11, 1e10, 1e9) for k in range(n)]
        return plan(spec, peers, options=opts).feasible

    lo, hi = 1, 64 << 30  # the least memory with which three peers fit
    while hi - lo > (1 << 20):
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(3, mid) else (mid, hi)
    assert fits(3, hi) and not fits(2, hi)
    cap = f"{hi // (1 << 20) + 1}MiB"
    view = start(hosts, small_model, 3, "--max-memory", cap)
    head = host_of(hosts, view, view["coordinator"])
    victim = middle_host(hosts, view)
    hosts.kill(daemon_of(hosts, victim))
    got = wait_status(hosts, head, 503, timeout=15)
    assert "GiB" in got["json"]["error"]["message"], got
    join(hosts, victim, small_model, "--threads", "1", "--max-memory", cap)
    got = wait_status(hosts, head, 200, timeout=30)
    assert got["status"] == 200, (got, hosts.logs())
    assert got["json"]["usage"]["completion_tokens"] == 4


def wait_status(h: Hosts, i: int, code: int, timeout: float) -> dict:
    """POST a small completion on host i's gateway until it answers `code`."""
    deadline = time.monotonic() + timeout
    while True:
        got = client(h, i, {"kind": "raw", "method": "POST", "path": "/completions",
                            "body": '{"prompt": "Hello", "max_tokens": 4, "temperature": 0}',
                            "headers": {"content-type": "application/json"}})
        if got["status"] == code or time.monotonic() > deadline:
            return got
        time.sleep(0.5)
