"""Node management on a live 3-peer cluster: `p2pllm peers test|add|drain|admit` and the
dashboard's JSON (/v1/cluster, /v1/cluster/events, /v1/peers)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time

import httpx
import pytest

from p2pllm.transport.client import fetch_status
from p2pllm.transport.security import Security

from conftest import REPO, assert_one_line_error, live_smol_cluster, run_cli, shared_model, stop_daemon

GRPC = (7861, 7862, 7863)
GATEWAYS = (8861, 8862, 8863)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("peers-cluster")
    for c in live_smol_cluster(logs, "peers", GRPC + GATEWAYS, "--response-cache", "off", "--prefix-cache", "0"):
        c.logs = logs
        yield c


def peers(cluster, *args: str) -> subprocess.CompletedProcess:
    return run_cli("peers", *args, "--host", f"127.0.0.1:{GRPC[0]}", "--secret", cluster.secret, timeout=180)


def status(cluster, grpc: int = GRPC[1]) -> dict:
    """What `p2pllm status --json` prints (in process: the CLI's start-up is seconds)."""
    return asyncio.run(fetch_status(f"127.0.0.1:{grpc}", Security.from_secret(cluster.secret)))


def layers(s: dict) -> dict[str, list | None]:
    return {p["name"]: p["layers"] for p in s["peers"]}


def answer(cluster) -> str:
    reply = cluster.client().chat.completions.create(model=cluster.model, messages=QUESTION, max_tokens=16,
                                                     temperature=0)
    return reply.choices[0].message.content


def test_a_drained_peer_leaves_the_plan_stays_listed_and_comes_back_when_admitted(cluster):
    before = status(cluster)
    assert all(layers(before).values())
    first = answer(cluster)

    drained = peers(cluster, "drain", "peers-2")
    assert drained.returncode == 0, drained.stderr
    assert drained.stdout.startswith("drained peers-2: the cluster serves plan epoch")
    s = status(cluster)
    row = next(p for p in s["peers"] if p["name"] == "peers-2")
    assert row["layers"] is None and row["state"] == "drained" and row["drained"] and row["healthy"]
    assert s["epoch"] == before["epoch"] + 1  # one plan change
    assert sorted(tuple(v) for v in layers(s).values() if v)[-1][1] == 30  # the others hold all 30 layers
    assert answer(cluster) == first  # the same greedy text over the new partition
    # its own log says why it holds nothing (it said "ready ... no layers", like a broken peer)
    assert re.search(r"this peer holds no layers \(drained\)", (cluster.logs / "peer-2.log").read_text())
    again = peers(cluster, "drain", "peers-2")
    assert again.returncode == 0 and "already drained" in again.stdout

    admitted = peers(cluster, "admit", "peers-2")
    assert admitted.returncode == 0, admitted.stderr
    assert "admitted peers-2: plan epoch" in admitted.stdout and "gives it layers" in admitted.stdout
    s = status(cluster)
    assert s["epoch"] == before["epoch"] + 2 and all(layers(s).values())
    assert not any(p["drained"] for p in s["peers"])
    assert answer(cluster) == first


def test_the_last_peer_with_layers_cannot_be_drained_and_names_must_match(cluster):
    for name in ("peers-1", "peers-3"):  # peers-1 is asked and drains itself; peers-3 may coordinate
        assert peers(cluster, "drain", name).returncode == 0
    try:
        s = status(cluster)
        assert [n for n, v in layers(s).items() if v] == ["peers-2"]
        refused = peers(cluster, "drain", "peers-2")
        assert_one_line_error(refused, 1, "draining peers-2 would leave no feasible plan")
        assert status(cluster)["epoch"] == s["epoch"]  # nothing changed
        assert answer(cluster)  # still serving
    finally:
        for name in ("peers-1", "peers-3"):
            assert peers(cluster, "admit", name).returncode == 0
    assert all(layers(status(cluster)).values())
    assert_one_line_error(peers(cluster, "drain", "nobody"), 2, "no peer named 'nobody'", "peers-1, peers-2, peers-3")
    assert_one_line_error(peers(cluster, "add", "not-an-address"), 2, "expected HOST:PORT")


def test_a_peer_is_tested_by_address_and_an_unreachable_one_is_not_added(cluster):
    tested = peers(cluster, "test", f"127.0.0.1:{GRPC[2]}", "--json")
    report = json.loads(tested.stdout)
    assert tested.returncode == 0 and report["reachable"] and report["compatible"] and report["name"] == "peers-3"
    assert 0 < report["rtt_ms"] < 1000 and report["cluster"] == "peers-test"
    nobody = peers(cluster, "test", "127.0.0.1:9")
    assert nobody.returncode == 1 and "no p2pllm peer answers" in nobody.stdout
    assert_one_line_error(peers(cluster, "add", "127.0.0.1:9"), 1, "not added", "no p2pllm peer answers")
    # the asked peer under another of its names: it was dialled as a peer of its own
    assert_one_line_error(peers(cluster, "add", f"localhost:{GRPC[0]}"), 2, f"localhost:{GRPC[0]} is this peer")


def test_a_grpc_server_that_is_no_p2pllm_peer_is_called_that_not_an_older_p2pllm(cluster, loop):
    import grpc

    async def bare():  # the cluster's TLS, no p2pllm service: every call is UNIMPLEMENTED
        server = grpc.aio.server()
        Security.from_secret(cluster.secret).add_port(server, "127.0.0.1:7869")
        await server.start()
        return server

    server = loop.run(bare())
    try:
        tested = peers(cluster, "test", "127.0.0.1:7869")
        assert tested.returncode == 1 and "a gRPC server that is not a p2pllm peer answers there" in tested.stdout, \
            tested.stdout
    finally:
        loop.run(server.stop(None))


def test_the_dashboards_json_matches_status_and_streams_every_second(cluster):
    gateway = f"http://127.0.0.1:{GATEWAYS[1]}"
    snap = httpx.get(f"{gateway}/v1/cluster", timeout=10).json()
    s = status(cluster, GRPC[1])
    assert snap["object"] == "cluster" and snap["status"]["epoch"] == s["epoch"]
    assert layers(snap["status"]) == layers(s)
    row = snap["status"]["peers"][0]
    assert row["mem_used"] > 0 and row["mem_limit"] > 0 and row["device"].startswith("cpu")
    assert sum(p["coordinator"] for p in snap["status"]["peers"]) == 1
    answer(cluster)
    snap = httpx.get(f"{gateway}/v1/cluster", timeout=10).json()
    assert snap["status"]["ring"]["tokens_generated"] >= 1  # the head's count, relayed to every peer
    assert snap["metrics"]["requests_total"] >= 1

    times = []
    with httpx.stream("GET", f"{gateway}/v1/cluster/events", timeout=10) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                times.append(json.loads(line[6:])["time"])
            if len(times) == 3:
                break
    assert 0.5 < times[1] - times[0] < 2 and 0.5 < times[2] - times[1] < 2

    tested = httpx.post(f"{gateway}/v1/peers", json={"address": f"127.0.0.1:{GRPC[0]}", "test": True}, timeout=30)
    assert tested.status_code == 200 and tested.json()["compatible"] and tested.json()["name"] == "peers-1"
    for path, body, code in (("/v1/peers/nobody/drain", None, 404), ("/v1/peers/peers-1/reboot", None, 404),
                             ("/v1/peers", {"address": "nope"}, 400), ("/v1/peers", {"test": True}, 400),
                             ("/v1/peers", {"address": "[::1", "test": True}, 400)):  # was a 200 "unreachable"
        r = httpx.post(gateway + path, json=body, timeout=30)
        assert r.status_code == code and r.json()["error"]["message"], (path, r.text)
    wrong_flag = httpx.post(f"{gateway}/v1/peers", json={"address": "127.0.0.1:7700", "test": "yes"}, timeout=30)
    assert wrong_flag.status_code == 400 and wrong_flag.json()["error"]["param"] == "test", wrong_flag.text


def test_a_peer_added_by_address_joins_the_cluster_and_gets_layers(cluster, tmp_path):
    """A fourth peer that knows nobody (no mDNS, no --peer) is added by address through peers-1."""
    env = dict(os.environ, P2PLLM_SECRET=cluster.secret, HOME=str(cluster.logs))
    argv = [sys.executable, "-m", "p2pllm", "join", "--model", str(shared_model("SmolLM2-135M-Instruct.Q4_1.gguf")),
            "--name", "peers-4", "--port", "7864", "--gateway-port", "8864", "--interface", "127.0.0.1",
            "--no-mdns", "--strategy", "even", "--cluster", "peers-test", "--response-cache", "off"]
    log = tmp_path / "peer-4.log"
    proc = subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=REPO, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "peer traffic" not in log.read_text():
            time.sleep(0.3)
        added = peers(cluster, "add", "127.0.0.1:7864")
        assert added.returncode == 0, added.stderr + log.read_text()[-2000:]
        assert "(peers-4): reachable" in added.stdout and "compatible; added" in added.stdout
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not layers(status(cluster)).get("peers-4"):
            time.sleep(0.5)
        assert layers(status(cluster)).get("peers-4"), log.read_text()[-2000:]  # even: every peer gets layers
        assert answer(cluster)
    finally:
        stop_daemon(proc)
