"""A peer whose new layer range does not fit beside the one it serves frees the old stage before
loading (the ring pauses for the load) instead of holding both: when a third peer joined, both
survivors of a 2-stage plan used to load their new range beside the old one and, under a memory
limit, were OOM-killed (docs/performance.md, Mission). A stream running across the change still
finishes with the same text. Real daemons on loopback with --max-memory."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from conftest import REPO, shared_model, stop_daemon
from test_from_peers import wait_stages

from p2pllm.cluster.planner import MiB, PlanOptions, stage_memory
from p2pllm.daemon import DaemonConfig
from p2pllm.model.spec import read_spec

PORTS = [(7795, 8795), (7796, 8796), (7797, 8797)]
SECRET = "rejoin-memory-test-secret-0123456789"
PROMPT = "The three primary colors are"
TOKENS = 160  # long enough to run across the plan change


def join(tmp: Path, i: int, model: Path, cap: int) -> subprocess.Popen:
    env = dict(os.environ, P2PLLM_SECRET=SECRET, HOME=str(tmp))
    rpc, gw = PORTS[i]
    argv = [sys.executable, "-m", "p2pllm", "join", "--model", str(model), "--name", f"rejoin-{i + 1}",
            "--port", str(rpc), "--gateway-port", str(gw), "--interface", "127.0.0.1", "--no-mdns",
            "--peer", f"127.0.0.1:{PORTS[0][0]}", "--strategy", "even", "--cluster", "rejoin-test",
            "--response-cache", "off", "--prefix-cache", "0", "--max-memory", str(cap)]
    log = open(tmp / f"peer-{i + 1}.log", "w")  # noqa: SIM115 (the daemon writes it until stopped)
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO, env=env,
                            start_new_session=True)


def wait_up(gateway: int, procs: list, logs: list[Path], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [log.read_text()[-3000:] for log in logs if log.exists()]
        try:
            httpx.get(f"http://127.0.0.1:{gateway}/health", timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError(f"the gateway on port {gateway} did not come up within {timeout} s")


def complete(gateway: int, max_tokens: int, stream: bool = False) -> str:
    body = {"model": "SmolLM2-135M-Instruct.Q4_1.gguf", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if not stream:
        r = httpx.post(f"http://127.0.0.1:{gateway}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]
    text = []
    with httpx.stream("POST", f"http://127.0.0.1:{gateway}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text.append(chunk["choices"][0]["text"])
    return "".join(text)


def test_a_peer_whose_new_range_does_not_fit_beside_its_old_frees_it_first(tmp_path):
    model = shared_model("SmolLM2-135M-Instruct.Q4_1.gguf")
    spec = read_spec(model)
    L = spec.n_layers
    options = PlanOptions(context=spec.context, batch=DaemonConfig.__dataclass_fields__["batch"].default,
                          kv_dtype_bytes=2.0, backend="ggml")
    half = max(stage_memory(spec, 0, L // 2, options).total, stage_memory(spec, L // 2, L, options).total)
    third = min(stage_memory(spec, a, b, options).total for a, b in ((0, 10), (10, 20), (20, 30)))
    cap = half + 16 * MiB  # room for a half, never for a half and a third together
    assert half + third > cap

    procs = [join(tmp_path, 0, model, cap), join(tmp_path, 1, model, cap)]
    logs = [tmp_path / f"peer-{i + 1}.log" for i in range(3)]
    try:
        wait_stages(PORTS[0][1], 2, procs, logs[:2])
        got: list[str] = []
        procs.append(join(tmp_path, 2, model, cap))
        wait_up(PORTS[2][1], procs, logs)  # the third peer is up: the plan change follows within seconds
        streaming = threading.Thread(target=lambda: got.append(complete(PORTS[0][1], TOKENS, stream=True)))
        streaming.start()  # runs across the plan change the third peer causes
        wait_stages(PORTS[0][1], 3, procs, logs)
        streaming.join(120)
        want = complete(PORTS[2][1], TOKENS)  # the 3-stage ring from the start (split answers equal whole ones)
        assert got == [want], (got, want)

        head_logs = "".join(log.read_text() for log in logs[:2])  # either may coordinate
        assert re.search(r"proposing plan epoch \d+ \(the strategy is even and the set of peers changed\).*"
                         r"carrying 1 sequences? over", head_logs), head_logs[-3000:]
        freed = [log.read_text() for log in logs[:2]]
        assert all("freeing layers [" in text and "both would need" in text for text in freed), \
            [text[-3000:] for text in freed]
        assert all(p.poll() is None for p in procs)
    finally:
        for proc in procs:  # all at once: one by one, each SIGTERM drains through a replan
            proc.terminate()
        for proc in procs:
            stop_daemon(proc)
