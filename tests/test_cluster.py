"""Daemons on separate network-namespace hosts find each other and agree on one plan."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime

import pytest

from clusterutil import AGREE_WITHIN, TEST_SECRET, join, status, wait_for_agreement
from conftest import assert_one_line_error, run_cli
from netns import hosts  # noqa: F401  (a fixture)


def _last_ready(log: str) -> float:
    """Wall-clock time of the last "ready:" line in the daemons' logs."""
    stamps = [line[:23] for line in log.splitlines() if "p2pllm.daemon: ready: epoch" in line]
    return max(datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f").timestamp() for s in stamps)


def test_three_hosts_agree_on_one_plan_over_mdns(hosts, stories_gguf):
    t0 = time.time()
    for i in (1, 2, 3):
        join(hosts, i, stories_gguf)
    # polling status costs seconds on a loaded machine; the daemons' own "ready" lines time the agreement
    views = wait_for_agreement(hosts, [1, 2, 3], n_layers=5)
    elapsed = _last_ready(hosts.logs(tail=None)) - t0
    s = views[0]
    assert len(s["peers"]) == 3 and all(p["healthy"] and p["excluded_reason"] is None for p in s["peers"])
    assert s["coordinator"] in {p["id"] for p in s["peers"]}
    plan = s["plan"]
    assert plan["feasible"] and plan["strategy"] == "even"
    assert [st["layers"] for st in plan["stages"]] == sorted(p["layers"] for p in s["peers"])
    assert elapsed < AGREE_WITHIN
    log = hosts.logs(tail=None)
    assert "ready: epoch" in log and "plan epoch" in log and "joined at" in log


def test_static_peers_without_mdns_agree_through_gossip(hosts, stories_gguf):
    # host 3 knows only host 2, host 2 only host 1: the rest is learned from Hello replies
    join(hosts, 1, stories_gguf, "--no-mdns")
    join(hosts, 2, stories_gguf, "--no-mdns", "--peer", f"{hosts.addr(1)}:7700")
    join(hosts, 3, stories_gguf, "--no-mdns", "--peer", f"{hosts.addr(2)}:7700")
    views = wait_for_agreement(hosts, [1, 2, 3], n_layers=5)
    assert len(views[0]["peers"]) == 3
    assert "mDNS off" in hosts.logs(tail=None)


@pytest.mark.parametrize("hosts", [4], indirect=True)
def test_a_host_with_another_model_is_excluded_with_its_reason(hosts, stories_gguf, demo_tiny_gguf):
    for i in (1, 2, 3):
        join(hosts, i, stories_gguf)
    join(hosts, 4, demo_tiny_gguf)
    views = wait_for_agreement(hosts, [1, 2, 3], n_layers=5)
    deadline = time.monotonic() + 10
    while True:
        s = status(hosts, 1)
        outsider = [p for p in s["peers"] if p["name"] == "host4"]
        if outsider or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert outsider, json.dumps(s)
    assert outsider[0]["layers"] is None
    assert "another model" in outsider[0]["excluded_reason"]
    assert views[0]["plan"]["stages"] and all(st["peer"] != outsider[0]["id"] for st in views[0]["plan"]["stages"])


def test_status_table_and_unreachable_peer(hosts, stories_gguf):
    join(hosts, 1, stories_gguf)
    deadline = time.monotonic() + AGREE_WITHIN
    while time.monotonic() < deadline and not (status(hosts, 1) or {}).get("epoch"):
        time.sleep(0.5)
    table = hosts.run(1, [sys.executable, "-m", "p2pllm", "status", "--host", f"{hosts.addr(1)}:7700",
                          "--secret", TEST_SECRET], timeout=30)
    assert table.returncode == 0, table.stderr
    assert "epoch 1" in table.stdout and "host1" in table.stdout and "[0, 5)" in table.stdout
    nobody = hosts.run(1, [sys.executable, "-m", "p2pllm", "status", "--host", f"{hosts.addr(2)}:7700",
                           "--secret", TEST_SECRET], timeout=30)
    assert_one_line_error(nobody, 1, "no p2pllm peer answers")


def test_join_refuses_a_corrupt_model_with_one_line(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    assert_one_line_error(run_cli("join", "--model", bad, "--no-mdns"), 2, "bad.gguf", "magic")


def test_join_refuses_bad_flags(demo_tiny_gguf):  # a real model: --model is resolved as it is parsed
    proc = run_cli("join", "--model", demo_tiny_gguf, "--port", "70000")
    assert proc.returncode == 2 and "port must be between" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("join", "--model", demo_tiny_gguf, "--peer", "nohostport")
    assert proc.returncode == 2 and "HOST:PORT" in proc.stderr


def test_plan_discover_plans_over_the_peers_announced_on_the_network(hosts, stories_gguf):
    join(hosts, 1, stories_gguf)
    join(hosts, 2, stories_gguf, "--max-memory", "3GiB")
    wait_for_agreement(hosts, [1, 2], n_layers=5)
    plan = hosts.run(3, [sys.executable, "-m", "p2pllm", "plan", "--model", str(stories_gguf), "--discover", "--json",
                         "--interface", hosts.addr(3), "--max-memory", "2GiB", "--strategy", "even"], timeout=60)
    assert plan.returncode == 0, plan.stderr
    j = json.loads(plan.stdout)
    limits = {s["name"]: s["memory"]["limit"] for s in j["stages"]}
    assert len(limits) == 3 and {"host1", "host2"} <= set(limits), (j, plan.stderr)  # this machine + the two
    assert limits["host1"] > 3 * 2**30 >= limits["host2"] > 0  # each announced peer brings its advertised memory
    assert "2 peer(s) announced on" in plan.stderr
    other = hosts.run(3, [sys.executable, "-m", "p2pllm", "plan", "--model", str(stories_gguf), "--discover",
                          "--interface", hosts.addr(3), "--cluster", "someone-else"], timeout=60)
    assert other.returncode == 0 and "0 peer(s) announced" in other.stdout, other.stdout + other.stderr
    assert "host1 (cluster default)" in other.stdout


@pytest.mark.parametrize("hosts", [2], indirect=True)
def test_a_peer_restarted_at_the_same_address_replaces_its_old_identity(hosts, stories_gguf):
    join(hosts, 1, stories_gguf)
    first = join(hosts, 2, stories_gguf)
    before = wait_for_agreement(hosts, [1, 2], n_layers=5)[0]
    hosts.kill(first)  # kill -9, then the same host starts again: a new daemon id at the same address
    join(hosts, 2, stories_gguf)
    deadline = time.monotonic() + 2 * AGREE_WITHIN
    while time.monotonic() < deadline:
        s = status(hosts, 1)
        ids = {p["id"] for p in s["peers"]} if s else set()
        if s and len(ids) == 2 and ids != {p["id"] for p in before["peers"]} and all(p["healthy"] for p in s["peers"]):
            break
        time.sleep(0.5)
    assert s and len(s["peers"]) == 2 and all(p["healthy"] for p in s["peers"]), s  # no LOST ghost beside it
    assert "replaces" in hosts.logs(tail=None)
