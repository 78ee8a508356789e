"""The daemon's parts alone (p2pllm/daemon/): status rows and health numbers from a Membership and
a plan, what a partial copy holds as health replies and status show it, the membership loops'
bookkeeping. Real objects, no daemon (one test calls a loopback port nobody listens on, over real
gRPC)."""

from __future__ import annotations

import asyncio
import json
import socket
from types import SimpleNamespace

import grpc
import pytest

from p2pllm import PROTOCOL_VERSION
from p2pllm.cluster.membership import Membership
from p2pllm.cluster.planner import PlanOptions
from p2pllm.daemon.peers import PeerLoops
from p2pllm.daemon.pieces import PeerPieces, holding
from p2pllm.daemon.status import fetch_json, head_load, health_stats, holding_json, peer_rows, ring_load
from p2pllm.model.demo import make_demo_model
from p2pllm.model.pieces import PartialModel, pieces_of
from p2pllm.model.spec import read_spec
from p2pllm.proto import p2pllm_pb2 as pb
from p2pllm.transport.client import ClientPool
from p2pllm.transport.security import Security
from p2pllm.transport.server import RpcRefused

GiB = 1 << 30


def clocked(me: pb.PeerInfo) -> tuple[Membership, SimpleNamespace]:
    """A Membership on a clock the test moves (`clock.t += 4`)."""
    clock = SimpleNamespace(t=100.0)
    return Membership(me, peer_timeout=3.0, clock=lambda: clock.t), clock


def info(pid: str, *, fp="fp", mem=8 * GiB) -> pb.PeerInfo:
    return pb.PeerInfo(id=pid, name=f"n-{pid}", cluster="c", protocol=PROTOCOL_VERSION, address=f"{pid}.test:7700",
                       model_fingerprint=fp, caps=pb.Capabilities(mem_bytes=mem, device="cpu:test"))


@pytest.fixture
def cluster():
    """This peer "a", a live "b" (the coordinator, with head load), a lost "c", an excluded "x";
    a committed plan a[0, 3) -> b[3, 6)."""
    m, clock = clocked(info("a"))
    for pid in ("b", "c"):
        m.upsert(info(pid))
    m.upsert(info("x", fp="other"))
    clock.t += 4.0
    m.heard_from("b")
    m.touch_self()
    assert m.expire() == ["c"]
    m.members["b"].state, m.members["b"].epoch, m.members["b"].mem_used = "serving", 7, 123
    m.members["b"].head = pb.HeadLoad(queued=2, running=3, tokens_generated=40)
    memory = {"limit": 4 * GiB, "weights": GiB, "workspace": GiB // 2, "kv": GiB // 4, "total": 0}
    plan = {"stages": [{"peer": "a", "memory": memory}, {"peer": "b", "memory": memory}]}
    committed = pb.PlanProposal(epoch=7, coordinator="b", plan_json=json.dumps(plan), stages=[
        pb.StageAssignment(peer_id="a", address="a.test:7700", start=0, end=3),
        pb.StageAssignment(peer_id="b", address="b.test:7700", start=3, end=6)])
    return m, committed


def test_status_rows_show_each_peer_as_this_one_sees_it(cluster):
    m, committed = cluster
    mine = pb.Holding(layers=[2, 0, 1, 4], embed=True, head=False)
    fetch = pb.FetchProgress(start=4, end=6, done=10_000_000, total=30_000_000, rate=5e6)
    m.members["c"].fetch = fetch  # its last health reply before it was lost: no fetch runs there now
    rows = {r["id"]: r for r in peer_rows(m, "a", committed, "b", 7, {"b": (0.0025, 1e8)}, "fetching", mine, fetch)}
    assert list(rows) == ["a", "b", "c", "x"]
    a, b, c, x = rows["a"], rows["b"], rows["c"], rows["x"]
    assert (a["state"], a["layers"], a["epoch"], a["coordinator"]) == ("fetching", [0, 3], 7, False)
    assert a["mem_used"] > 0 and a["mem_limit"] == 8 * GiB and a["rtt_ms"] is None
    assert a["holds"] == {"layers": [[0, 3], [4, 5]], "embed": True, "head": False}
    assert a["fetch"] == {"layers": [4, 6], "done": 10_000_000, "total": 30_000_000, "mb_s": 5.0, "eta_s": 4.0}
    assert (b["state"], b["layers"], b["coordinator"], b["mem_used"], b["rtt_ms"]) == ("serving", [3, 6], True, 123, 2.5)
    assert b["holds"] is None and b["fetch"] is None  # the whole file, no fetch running
    assert (c["state"], c["healthy"], c["layers"], c["mem_used"], c["fetch"]) == ("lost", False, None, None, None)
    assert x["excluded_reason"].startswith("another model") and not x["drained"]


def test_health_numbers_count_the_table_and_the_room_the_plan_left_this_stage(cluster):
    m, committed = cluster
    stage = SimpleNamespace(kv_memory=lambda: (1000, 4096))  # what runtime.stage.Stage reports
    stats = health_stats(m, committed, stage, "a", serving=True, mem_limit=8 * GiB)
    assert {k: stats[k] for k in ("peers_known", "peers_live", "peers_lost", "peers_excluded")} == \
        {"peers_known": 4, "peers_live": 2, "peers_lost": 1, "peers_excluded": 1}
    assert (stats["plan_committed"], stats["serving"], stats["kv_bytes"], stats["kv_allocated_bytes"]) == (1, 1, 1000, 4096)
    assert stats["kv_capacity_bytes"] == 4 * GiB - GiB - GiB // 2 and stats["memory_used_bytes"] > 0
    idle = health_stats(Membership(info("a")), None, None, "a", serving=False, mem_limit=0)
    assert (idle["plan_committed"], idle["serving"], idle["kv_bytes"], idle["kv_capacity_bytes"]) == (0, 0, 0, 0)


def test_the_rings_load_is_the_heads_own_or_the_coordinators_last_health_reply(cluster):
    m, committed = cluster
    assert head_load(None) is None
    assert ring_load(None, committed, m) == {"queued": 2, "running": 3, "tokens_generated": 40}
    assert ring_load(pb.HeadLoad(queued=1), committed, m) == {"queued": 1, "running": 0, "tokens_generated": 0}
    assert ring_load(None, None, m) is None
    assert holding_json(None) is None and fetch_json(None) is None
    assert fetch_json(pb.FetchProgress(start=0, end=2, total=10))["eta_s"] is None  # no rate yet


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_demo_model(tmp_path_factory.mktemp("parts") / "tiny.gguf", "gguf", "tiny")


def _partial(tiny, root, layers: set[int], ends: bool) -> PartialModel:
    """A partial copy of the tiny model holding `layers`, and with `ends` its embedding (never its head)."""
    layout = pieces_of(tiny)
    partial = PartialModel.create(root, layout)
    head = set(layout.head_names()) - {layout.embed_name()}
    for p in layout.pieces:
        wanted = p.layer in layers if p.layer is not None else (ends and p.name not in head) or \
            p.name in {h.name for h in layout.header_pieces()}
        if wanted:
            partial.mark_held(p.name, "0" * 64)
    return partial


def test_a_partial_copy_is_advertised_as_its_whole_layers_and_ends(tiny, tmp_path):
    partial = _partial(tiny, tmp_path, {1, 2, 4}, ends=True)
    try:
        held = holding(partial, 6)
        assert (list(held.layers), held.embed, held.head) == ([1, 2, 4], True, False)
        assert holding_json(held) == {"layers": [[1, 3], [4, 5]], "embed": True, "head": False}
    finally:
        partial.close()


def test_the_pieces_part_notes_what_it_holds_in_its_own_membership_entry(tiny, tmp_path):
    me = info("a")
    m = Membership(me)
    changes = []
    part = PeerPieces(tiny, read_spec(tiny), "a", m, PlanOptions(context=256), clients=None, sources=[],
                      cache=None, on_change=lambda: changes.append(1))
    assert part.fetcher is None and not part.fetching and part.holding is None  # the whole file: nothing to fetch

    async def serve():
        with pytest.raises(RpcRefused) as refused:
            await part.on_manifest(pb.ManifestRequest())
        assert refused.value.code == grpc.StatusCode.UNIMPLEMENTED
        await part.fetch_missing((0, 6))  # the whole model is here: nothing happens
        await part.open()  # a GGUF file: served whole
        return await part.on_manifest(pb.ManifestRequest())

    manifest = asyncio.run(serve())
    assert manifest.fingerprint == read_spec(tiny).fingerprint and not changes
    part.close()

    partial = _partial(tiny, tmp_path, {0, 1}, ends=False)
    part.fetcher = SimpleNamespace(partial=partial)  # what _note_holding reads of a ModelFetcher
    try:
        part._note_holding()
        assert (list(part.holding.layers), part.holding.embed, part.holding.head) == ([0, 1], False, False)
        assert m.members["a"].holds is part.holding
    finally:
        partial.close()


def test_the_membership_loops_answer_hello_and_report_lost_peers_once():
    m, clock = clocked(info("a"))
    lost, epochs = [], []
    loops = PeerLoops(info("a"), m, clients=None, dial=["10.0.0.9:7700"], on_lost=lost.append,
                      on_epoch=epochs.append)
    m.upsert(info("c"))
    reply = asyncio.run(loops.on_hello(pb.HelloRequest(peer=info("b")), "ipv4:10.0.0.2:5000"))
    assert reply.compatible and reply.peer.id == "a" and [k.id for k in reply.known] == ["c"]
    assert m.is_live("b")
    loops.connection_dropped("c.test:7700")
    loops.connection_dropped("a.test:7700")  # this peer's own address: nothing to check
    loops.connection_dropped("nobody.test:7700")
    assert loops._dropped == {"c.test:7700"} and loops._health_now.is_set()
    clock.t += 4.0
    m.heard_from("b")
    m.touch_self()
    loops._expire()
    loops._expire()
    assert lost == [["c"]]
    loops.dial("10.0.0.8:7700")
    assert loops._dial == {"10.0.0.9:7700", "10.0.0.8:7700"}


def test_a_dropped_connection_belongs_to_the_identity_that_was_at_the_address():
    # A daemon restarted at the address of one whose connection dropped is a new identity: its
    # first failed check must not make it lost at once (CI: the cluster's old channel to that
    # address was still in reconnect backoff and the new member flapped while a plan went out).
    # Real gRPC calls to a port nobody listens on.
    async def run():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            address = f"127.0.0.1:{s.getsockname()[1]}"
        m, _ = clocked(info("a"))
        clients = ClientPool(Security.insecure())
        loops = PeerLoops(info("a"), m, clients, dial=[], on_lost=lambda ids: None, on_epoch=lambda e: None)
        old, new = info("c"), info("d")
        old.address = new.address = address
        try:
            m.upsert(old)
            loops.connection_dropped(address)
            await loops.on_hello(pb.HelloRequest(peer=new), "ipv4:127.0.0.1:5000")
            assert "c" not in m.members and address not in loops._dropped
            await loops._health_one(m.members["d"])
            assert m.is_live("d")  # one refused check could be a restart: lost after two
            loops.connection_dropped(address)  # its own connection dropped: a failing check is final
            await loops._health_one(m.members["d"])
            assert not m.is_live("d")
        finally:
            await clients.close()

    asyncio.run(run())


def test_a_peer_told_to_stop_says_leaving_in_its_health_replies_even_as_the_coordinator(caplog):
    # A draining coordinator (SIGTERM: it finishes its requests, then exits) keeps its plan state
    # "serving", but its peers must hear it is stopping: they logged its exit as "lost: its
    # connection dropped and it is unreachable" and `status` showed it serving until it vanished.
    from p2pllm.daemon import Daemon

    state = Daemon.public_state.fget
    peer = SimpleNamespace(leaving=False, drained=False, pieces=SimpleNamespace(fetching=False), state="serving")
    assert state(peer) == "serving"
    peer.drained = True
    assert state(peer) == "drained"
    peer.leaving = True  # drained or not, coordinator or stage: told to stop
    assert state(peer) == "leaving"
    m, clock = clocked(info("a"))
    m.upsert(info("b"))
    m.heard_from("b", pb.HealthReply(id="b", state=state(peer), epoch=3, coordinator="b"))
    m.refused("b", after=1, why="its connection dropped and it is unreachable")  # it exited
    with caplog.at_level("INFO", logger="p2pllm.cluster.membership"):
        assert m.expire() == ["b"]
    assert "n-b (b) left (it was stopping)" in caplog.text and "lost" not in caplog.text


def test_a_commit_closes_the_ring_links_to_peers_out_of_the_plan(caplog):
    # A link kept to a peer that left the plan broke when that peer exited: "WARNING ring link to
    # ... broke: unavailable" after every clean leave, and its channel stayed open. Real gRPC, to a
    # loopback port nobody listens on (the peer that left).
    from p2pllm.transport.ring import LinkPool

    async def run():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            gone = f"127.0.0.1:{s.getsockname()[1]}"
        broken = []
        pool = LinkPool(Security.insecure(), on_broken=broken.append)
        link = pool.get(gone)
        link.bytes_sent = 10  # as if it carried frames before
        pool.retain({"127.0.0.1:1"})  # the new plan's peers
        await asyncio.sleep(0.2)
        assert gone not in pool._links and link._closed and pool.bytes_sent() == 10
        await link.send(pb.Frame(epoch=1, micro_batch=1))  # a frame of the old epoch, late
        await asyncio.sleep(0.5)
        assert pool.get(gone) is not link  # back in a plan: a new link
        await pool.close()
        return broken

    with caplog.at_level("WARNING", logger="p2pllm.transport.ring"):
        assert asyncio.run(run()) == []
    assert "broke" not in caplog.text


def test_a_peer_told_to_stop_refuses_new_requests_and_ends_running_ones_with_an_error():
    # Ctrl-C'd, a peer stopped its gateway with the streams it forwards to the coordinator still
    # running: after uvicorn's 5 s grace they were cut, a 200 truncated with no error and a
    # traceback in the log. Now: new ones get a 503, running ones finish (_leave waits for them),
    # and a second Ctrl-C ends them with a clear error.
    from p2pllm.daemon import Daemon
    from p2pllm.runtime.api import EngineError
    from p2pllm.runtime.cluster_engine import ClusterEngine, _stream

    class Call:  # a forwarded Generate call: one token event every 10 ms
        def __init__(self):
            self.n, self.cancelled = 0, False

        async def read(self):
            await asyncio.sleep(0.01)
            self.n += 1
            return pb.GenerateEvent(has_token=True, token_id=self.n, text="x")

        def cancel(self):
            self.cancelled = True

        def done(self):
            return self.cancelled

    async def run():
        engine = ClusterEngine(model_name="m", context=64, tokenizer=None, clients=None, local=lambda: None,
                               coordinator_address=lambda: "c.test:7700", not_ready=lambda: "", stats=lambda: None)
        engine.closing = "this peer is leaving"
        with pytest.raises(EngineError) as refused:
            await engine.generate(None)
        assert refused.value.status == 503 and "leaving" in str(refused.value)
        assert not engine.ready and engine.not_ready_reason() == "this peer is leaving"  # /health says so
        call = Call()
        engine._calls.add(call)
        assert engine.forwarding() == 1
        stopped = []
        peer = SimpleNamespace(engine=engine, _stop=asyncio.Event(), stop=lambda: stopped.append(True),
                               _forwarded=engine.forwarding)  # no backends: only what it forwards to the coordinator
        leave = asyncio.create_task(Daemon._leave(peer, needed=False))
        events = []
        async for event in _stream(call, pb.GenerateEvent(has_token=True, token_id=0), "c.test:7700", 1,
                                   gone=lambda: "", stopping=lambda: engine.stopping):
            events.append(event)
            if len(events) == 3:
                assert not stopped  # its gateway's request still runs
                engine.stopping = "this peer is shutting down"
        await asyncio.wait_for(leave, 2)
        assert stopped and engine.forwarding() == 0
        return events

    events = asyncio.run(run())
    assert [e.error for e in events] == [None, None, None, "this peer is shutting down"]
