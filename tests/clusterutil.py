"""Starting daemons on namespace hosts and waiting for them to agree (shared by cluster tests)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from netns import Hosts

AGREE_WITHIN = 15.0
TEST_SECRET = "test-cluster-secret-0123456789abcdef"  # cluster tests run secure, like users do
CLIENT = Path(__file__).with_name("cluster_client.py")


def join(h: Hosts, i: int, model, *extra: str):
    """`p2pllm join` on host i, with the test cluster's secret unless `extra` says --secret/--insecure."""
    auth = [] if {"--secret", "--insecure"} & set(extra) else ["--secret", TEST_SECRET]
    # no response or prefix cache: these tests repeat requests to watch the ring compute them and
    # compare greedy texts (a reused prefix may round differently: docs/architecture.md, "Prefix cache")
    return h.popen(i, [sys.executable, "-m", "p2pllm", "join", "--model", str(model), "--name", f"host{i}",
                       "--strategy", "even", "--response-cache", "off", "--prefix-cache", "0", *auth, *extra])


def status(h: Hosts, i: int, *auth: str) -> dict | None:
    auth = auth or ("--secret", TEST_SECRET)
    proc = h.run(i, [sys.executable, "-m", "p2pllm", "status", "--json", "--host", f"{h.addr(i)}:7700", *auth],
                 timeout=30)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def wait_for_agreement(h: Hosts, members: list[int], n_layers: int, timeout: float = 2 * AGREE_WITHIN) -> list[dict]:
    """Poll every member's status until all agree on coordinator, epoch and layers."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        with ThreadPoolExecutor(len(members)) as pool:
            seen = list(pool.map(lambda i: status(h, i), members))
        if all(s is not None and s["epoch"] > 0 for s in seen):
            views = {(s["coordinator"], s["epoch"], _layers(s)) for s in seen}
            if len(views) == 1 and _covers(seen[0], n_layers, len(members)):
                return seen
        time.sleep(0.5)
    pytest.fail(f"no agreement within {timeout}s: {json.dumps(seen)[:2000]}\n{h.logs()[-6000:]}")


def _layers(s: dict) -> tuple:
    return tuple(sorted((p["id"], tuple(p["layers"])) for p in s["peers"] if p["layers"]))


def _covers(s: dict, n_layers: int, n_peers: int) -> bool:
    spans = sorted(tuple(p["layers"]) for p in s["peers"] if p["layers"])
    bounds = [0] + [end for _, end in spans]
    return len(spans) == n_peers and all(a == b for (a, _), b in zip(spans, bounds)) and bounds[-1] == n_layers


def client(h: Hosts, i: int, job: dict, timeout: float = 120) -> dict:
    """Run tests/cluster_client.py inside host i against its own gateway; its JSON answer."""
    try:
        proc = h.run(i, [sys.executable, str(CLIENT)], timeout=timeout, input=json.dumps(job))
    except subprocess.TimeoutExpired:  # say which gateway hung, with the daemons' logs to see why
        pytest.fail(f"host {i}'s gateway gave no answer to {job.get('kind')} within {timeout}s\n{h.logs(12000)}")
    assert proc.returncode == 0, f"client failed: {proc.stderr[-3000:]}\n{h.logs()[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])  # the answer is the last line


def coordinator_host(h: Hosts, members: list[int], view: dict) -> int:
    by_id = {p["id"]: p["address"].split(":")[0] for p in view["peers"]}
    addr = by_id[view["coordinator"]]
    return next(i for i in members if h.addr(i) == addr)
