"""Membership, election and plan agreement decisions, without a network."""

from __future__ import annotations

import pytest

from p2pllm import PROTOCOL_VERSION
from p2pllm.cluster import coordinator as coord
from p2pllm.cluster.membership import Membership
from p2pllm.cluster.planner import PeerCaps, PlanOptions, plan
from p2pllm.model.spec import builtin_spec
from p2pllm.proto import p2pllm_pb2 as pb

GiB = 1 << 30


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def info(pid: str, *, fp="fp", cluster="c", protocol=PROTOCOL_VERSION, mem=64 * GiB, flops=1e12, bw=100e9,
         address: str | None = None):
    return pb.PeerInfo(id=pid, name=f"n-{pid}", cluster=cluster, protocol=protocol, address=address or f"{pid}.test:7700",
                       model_fingerprint=fp, caps=pb.Capabilities(mem_bytes=mem, flops=flops, mem_bw=bw, net_bw=1e9))


@pytest.fixture
def table():
    clock = Clock()
    m = Membership(info("b"), peer_timeout=3.0, clock=clock)
    return m, clock


def test_incompatible_peers_are_listed_with_the_reason(table):
    m, _ = table
    assert m.upsert(info("c", fp="other")).reason.startswith("another model")
    assert "cluster" in m.upsert(info("d", cluster="x")).reason
    assert "protocol" in m.upsert(info("e", protocol=PROTOCOL_VERSION + 1)).reason
    assert [x.info.id for x in m.live_compatible()] == ["b"]


def test_silence_past_the_timeout_or_refused_connections_lose_a_peer(table):
    m, clock = table
    m.upsert(info("c"))
    m.upsert(info("d"))
    clock.t += 2.0
    m.heard_from("c")
    clock.t += 2.0
    assert m.expire() == ["d"]  # d: silent 4 s; c: 2 s
    m.refused("c")
    assert m.is_live("c")  # one refusal could be a restart
    m.refused("c")
    assert not m.is_live("c") and m.expire() == ["c"]


def test_a_process_that_did_not_run_does_not_hold_its_own_pause_against_its_peers(table, caplog):
    m, clock = table  # (peer timeout 3 s)
    m.upsert(info("c"))
    m.touch_self()  # the health loop runs, every half second
    clock.t += 0.5
    m.touch_self()
    clock.t += 30.0  # kill -STOP for 30 s: no health check ran, no reply was read
    assert m.is_live("c") and m.expire() == []  # before the health loop runs again
    m.touch_self()  # it runs: the pause is said and moved past
    assert "did not run for 30.0s" in caplog.text
    assert m.is_live("c") and m.expire() == []
    for _ in range(7):  # running again, on time: now c's silence counts
        clock.t += 0.5
        m.touch_self()
    assert m.expire() == ["c"]


def test_a_restarted_daemon_replaces_its_ghost_and_lost_peers_are_forgotten_in_time(table):
    m, clock = table
    m.upsert(info("c", address="10.0.0.3:7700"))
    m.upsert(info("d"))
    m.upsert(info("e", fp="other"))  # incompatible: listed, never "lost"
    clock.t += 4.0
    assert sorted(m.expire()) == ["c", "d"]
    m.upsert(info("f", address="10.0.0.3:7700"))  # c's host, restarted: a new id at the same address
    assert "c" not in m.members and m.members["f"].info.address == "10.0.0.3:7700"
    clock.t += m.forget_after - 2
    m.expire()
    assert "d" in m.members and "e" not in m.members  # d lost forget_after - 2 s ago; e silent for longer
    clock.t += 3
    m.expire()
    assert set(m.members) == {"b", "f"} and m.forget_after >= 4 * m.peer_timeout
    m.upsert(info("d"))  # a forgotten peer that answers again is simply a member again
    assert m.is_live("d")


def test_election_is_the_smallest_live_id_unless_an_incumbent_lives(table):
    m, clock = table
    m.upsert(info("a"))
    m.upsert(info("c"))
    assert coord.elect(m, 0, "") == "a"
    m.members["c"].epoch, m.members["c"].coordinator = 3, "c"
    assert coord.elect(m, 0, "") == "c"  # the coordinator of the newest committed plan stays
    clock.t += 10
    m.heard_from("a")
    assert coord.elect(m, 0, "") == "a"  # ... while it lives


def _proposal(epoch=5, coordinator="b", stages=((0, 40), (40, 80)), fp="fp"):
    return pb.PlanProposal(epoch=epoch, coordinator=coordinator, model_fingerprint=fp,
                           stages=[pb.StageAssignment(peer_id=f"p{i}", start=a, end=b)
                                   for i, (a, b) in enumerate(stages)])


@pytest.mark.parametrize("proposal,committed,why", [
    (_proposal(epoch=4), 4, "not newer"),
    (_proposal(fp="x"), 0, "another model"),
    (_proposal(coordinator="z"), 0, "not the coordinator"),
    (_proposal(stages=((0, 40), (41, 80))), 0, "contiguously"),
    (_proposal(stages=((0, 40),)), 0, "cover 40 of 80"),
])
def test_proposals_that_do_not_match_are_refused(proposal, committed, why):
    spec = builtin_spec("llama-3-70b")
    assert why in coord.validate_proposal(proposal, spec, "fp", committed, "b")


def test_a_good_proposal_is_accepted():
    assert coord.validate_proposal(_proposal(), builtin_spec("llama-3-70b"), "fp", 4, "b") == ""


def test_a_joining_peer_replans_only_when_the_gain_passes_the_margin(table):
    m, _ = table
    spec = builtin_spec("llama-3-8b")
    opts = PlanOptions(context=2048, objective="latency")
    current = plan(spec, [coord.peer_caps(m.members["b"])], options=opts)
    running = coord.to_proposal(current, 1, "b", m, "fp")
    # a peer that is barely faster: not worth a switch
    m.upsert(info("c", bw=105e9))
    same = coord.candidate_plan(spec, m, opts)
    assert coord.needs_new_plan(running, current, same, m, 0.10) == ""
    # a much faster one: switch
    m.upsert(info("d", bw=400e9))
    better = coord.candidate_plan(spec, m, opts)
    assert coord.needs_new_plan(running, current, better, m, 0.10) == "a better plan is available"


EVEN = PlanOptions(context=2048, strategy="even")


def even_plan(m: Membership, epoch: int = 1) -> tuple[object, pb.PlanProposal]:
    """The even plan of llama-3-8b over m's live peers, and that plan as coordinator b commits it."""
    p = coord.candidate_plan(builtin_spec("llama-3-8b"), m, EVEN)
    return p, coord.to_proposal(p, epoch, "b", m, "fp")


def test_a_lost_or_leaving_stage_peer_breaks_the_plan(table):
    m, clock = table
    m.upsert(info("c"))
    spec, opts = builtin_spec("llama-3-8b"), EVEN
    _, running = even_plan(m)
    assert coord.broken_reason(running, m) == ""
    m.members["c"].state = "leaving"
    assert "leaving" in coord.broken_reason(running, m)
    assert {s.peer for s in coord.candidate_plan(spec, m, opts).stages} == {"b"}  # planned without it
    m.members["c"].state = "serving"
    clock.t += 5
    assert "lost" in coord.broken_reason(running, m)


def test_a_plan_that_does_not_serve_is_proposed_again_even_unchanged(table):
    # the ring paused when survivors could not hold the model, or a stage never took the commit:
    # once a feasible plan exists it goes out as a new epoch even if it is the committed one
    # (CI: a rejoined peer missed epoch 2's round and the cluster answered 503 for good)
    m, _ = table
    m.upsert(info("c"))
    spec, opts = builtin_spec("llama-3-8b"), EVEN
    current, running = even_plan(m, 2)
    same = coord.candidate_plan(spec, m, opts, running=running)
    assert coord.needs_new_plan(running, current, same, m, 0.10) == ""
    assert coord.needs_new_plan(running, current, same, m, 0.10, "n-c did not take the commit") == \
        "n-c did not take the commit"
    m.members["c"].state = "leaving"  # a broken stage is the reason given first
    alone = coord.candidate_plan(spec, m, opts)
    assert coord.needs_new_plan(running, current, alone, m, 0.10, "paused") == "peer n-c is leaving"


def test_a_proposal_goes_to_every_stage_peer_even_one_that_missed_a_health_check(table):
    m, clock = table
    for pid in ("c", "d"):
        m.upsert(info(pid))
    _, proposal = even_plan(m, 3)
    clock.t += 4.0
    m.heard_from("d")
    m.touch_self()  # c is silent right now, but the plan names it: it must take part or fail the round
    targets, unknown = coord.proposal_targets(proposal, m)
    assert sorted(t.info.id for t in targets) == ["b", "c", "d"] and unknown == []
    m.upsert(info("e"))  # live, not in the plan: told all the same
    targets, _ = coord.proposal_targets(proposal, m)
    assert sorted(t.info.id for t in targets) == ["b", "c", "d", "e"]
    m.forget("c")
    targets, unknown = coord.proposal_targets(proposal, m)
    assert unknown == ["c"] and "c" not in {t.info.id for t in targets}


def test_a_drained_peer_gets_no_layers_until_admitted_and_can_be_left_out_of_a_what_if(table):
    m, _ = table
    m.upsert(info("c"))
    spec, opts = builtin_spec("llama-3-8b"), EVEN
    _, running = even_plan(m)
    m.members["c"].state = "drained"  # from its health reply (cluster/management.py)
    assert coord.broken_reason(running, m) == "peer n-c is drained"
    assert {s.peer for s in coord.candidate_plan(spec, m, opts).stages} == {"b"}
    m.members["c"].state = "serving"  # admitted
    assert {s.peer for s in coord.candidate_plan(spec, m, opts).stages} == {"b", "c"}
    assert {s.peer for s in coord.candidate_plan(spec, m, opts, exclude={"b"}).stages} == {"c"}


def test_when_every_live_peer_is_drained_every_peer_says_so_not_that_it_is_electing(table):
    m, clock = table
    m.upsert(info("c"))
    m.upsert(info("d"))
    assert coord.nobody_to_plan(m) == ""
    m.members["b"].state = "drained"
    m.members["c"].state = "drained"
    assert coord.nobody_to_plan(m) == ""  # d can still hold layers
    clock.t += 4.0
    m.heard_from("b")
    m.heard_from("c")
    m.expire()  # d, the serving one, is lost
    why = coord.nobody_to_plan(m)
    assert why.startswith("every live peer is drained") and "`p2pllm peers admit n-b`" in why, why


def test_a_late_peer_outside_the_unchanged_plan_is_sent_it_with_why_it_holds_no_layers(table):
    # repro: a peer joined after epoch 1 and the plan with it was the same: no proposal reached it,
    # its gateway answered 503 for good and its status showed epoch 0
    m, _ = table
    spec, opts = builtin_spec("llama-3-8b"), PlanOptions(context=2048, objective="latency")
    current = plan(spec, [coord.peer_caps(m.members["b"])], options=opts)
    running = coord.to_proposal(current, 1, "b", m, "fp")
    running.resume.add(seq_id=7, positions=3)
    m.upsert(info("c", bw=105e9))
    m.upsert(info("d", mem=GiB // 1024))
    same = coord.candidate_plan(spec, m, opts, running=running)
    assert coord.needs_new_plan(running, current, same, m, 0.10) == ""
    assert [x.info.id for x in coord.missing_the_plan(running, m, {})] == ["c", "d"]
    assert coord.missing_the_plan(running, m, {"c": 1, "d": 1}) == []  # committed to them already
    m.members["c"].epoch = 1  # its health reply says it has the plan
    assert [x.info.id for x in coord.missing_the_plan(running, m, {})] == ["d"]

    why = coord.why_no_layers(same, m.members["d"], 0.10)
    assert why.startswith("not enough memory for one layer")
    sent = coord.for_unused_peer(running, "d", why)
    assert sent.epoch == 1 and list(sent.stages) == list(running.stages) and not sent.resume
    assert coord.unused_reason(sent, "d") == why and coord.unused_reason(running, "d") == ""
    m.members["c"].state = "drained"
    assert coord.why_no_layers(same, m.members["c"], 0.10) == "it is drained"


def test_plan_sources_point_at_owners_and_their_ring_successors():
    from p2pllm.runtime.recovery import plan_sources

    running = pb.PlanProposal(stages=[pb.StageAssignment(peer_id="x", address="A", start=0, end=3),
                                      pb.StageAssignment(peer_id="y", address="B", start=3, end=8)])
    got = [(s.start, s.end, s.owner_address, s.replica_address) for s in plan_sources(running, True)]
    assert got == [(0, 3, "A", "B"), (3, 8, "B", "A")]
    assert all(s.replica_address == "" for s in plan_sources(running, False))
    # a peer the coordinator found lost is no source: asking it would wait out a timeout
    got = [(s.owner_address, s.replica_address) for s in plan_sources(running, True, lambda peer: peer != "y")]
    assert got == [("A", ""), ("", "A")]


def test_peer_caps_come_from_the_advertised_capabilities(table):
    m, _ = table
    caps = coord.peer_caps(m.members["b"])
    assert isinstance(caps, PeerCaps) and caps.mem_bytes == 64 * GiB and caps.net_bw == 1e9


def test_an_excluded_peer_that_refuses_us_is_forgotten_with_the_true_reason(table, caplog):
    """It was forgotten at once with "lost for over 120 s", 25 s after it joined."""
    import logging

    m, _ = table
    m.upsert(info("c", fp="other"))
    m.refused("c", why="connections refused")
    m.refused("c", why="connections refused")  # two in a row: nobody listens there
    with caplog.at_level(logging.INFO, logger="p2pllm"):
        m.expire()
    assert "c" not in m.members
    assert "forgetting excluded peer n-c (c): connections refused" in caplog.text and "lost for over" not in caplog.text


def test_an_older_epoch_is_never_committed_or_accepted_after_a_newer_one(table):
    """A coordinator frozen and resumed proposes from what it saw before: its epoch 16 finished
    loading after epoch 17 had committed, was committed on top of it and split the ring."""
    import asyncio

    from p2pllm.daemon.agreement import Agreement

    m, _ = table
    spec = builtin_spec("llama-3-8b")
    agreement = Agreement("b", spec, EVEN, m, None, None, None, None, 1, lambda address: None, "http://x")
    _, running = even_plan(m)
    agreement.epoch, agreement.committed, agreement.highest_epoch = 17, running, 17
    agreement.pending[16] = (running, None)
    reply = asyncio.run(agreement.on_commit(pb.CommitRequest(epoch=16, coordinator="b")))
    assert not reply.ok and "not newer than the committed epoch 17" in reply.reason
    assert agreement.epoch == 17 and 16 not in agreement.pending
    assert agreement._superseded(16) == "epoch 16 was superseded by epoch 17 while it loaded"
    agreement.highest_epoch = 18  # proposed, not committed yet
    assert agreement._superseded(17) and not agreement._superseded(18)


def test_every_peer_checks_requests_against_the_context_of_the_committed_plan(table):
    """A peer started with another --context than the coordinator's: its gateway's /v1/models and
    its checks said its own (8192) while the coordinator's scheduler enforced 128."""
    from p2pllm.runtime.cluster_engine import ClusterEngine

    m, _ = table
    plan = coord.candidate_plan(builtin_spec("llama-3-8b"), m, PlanOptions(context=128, strategy="even"))
    committed = coord.to_proposal(plan, 1, "b", m, "fp")
    assert coord.plan_context(committed) == 128 and coord.plan_context(None) is None
    held: list = [None]
    engine = ClusterEngine(model_name="m", context=8192, tokenizer=None, clients=None, local=lambda: None,
                           coordinator_address=lambda: None, not_ready=lambda: "", stats=lambda: None,
                           cluster_context=lambda: coord.plan_context(held[0]))
    assert engine.context == 8192  # no plan yet: its own
    held[0] = committed
    assert engine.context == 128


def test_a_peer_that_said_it_was_leaving_is_logged_as_left_not_as_a_failure(table, caplog):
    m, clock = table
    m.upsert(info("c"))
    m.upsert(info("d"))
    m.members["c"].state = "leaving"  # its health replies said so (SIGTERM: it drains, then stops)
    clock.t += 4.0
    with caplog.at_level("INFO", logger="p2pllm.cluster.membership"):
        assert sorted(m.expire()) == ["c", "d"]
    assert "peer n-c (c) left (it was stopping)" in caplog.text and "n-c (c) lost" not in caplog.text
    assert "peer n-d (d) lost: silent for 3.0s" in caplog.text
    # `status` listed a peer that left cleanly as LOST for two minutes: it is no member any more
    assert "c" not in m.members and m.members["d"].state == "lost"
