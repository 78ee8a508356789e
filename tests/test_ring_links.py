"""Ring links: a peer's frames to itself never touch the network; a broken stream opens again."""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
import subprocess
import sys
import time

import httpx
import pytest

from conftest import REPO, stop_daemon

PORTS = (7781, 8781)  # grpc, gateway: used by no other test
SECRET = "ring-links-test-secret-0123456789"


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


@pytest.fixture
def one_peer(stories_gguf, tmp_path):
    """One `p2pllm join` on loopback: the head, and the one stage holding every layer; three
    micro-batches in flight, so its stage takes frames while earlier ones are still on their way."""
    grpc_port, gw = PORTS
    log = open(tmp_path / "peer.log", "w")
    env = dict(os.environ, PYTHONUNBUFFERED="1", HOME=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "p2pllm", "join", "--model", str(stories_gguf), "--name", "solo",
                             "--port", str(grpc_port), "--gateway-port", str(gw), "--interface", "127.0.0.1",
                             "--no-mdns", "--secret", SECRET, "--cluster", "ring-links", "--micro-batches", "3",
                             "--response-cache", "off", "--prefix-cache", "0"],  # repeated prompts must reach the stage
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{gw}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "peer.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).json().get("stages"):
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.3)
        else:
            pytest.fail("the peer never became ready:\n" + (tmp_path / "peer.log").read_text()[-3000:])
        yield url
    finally:
        stop_daemon(proc)
        log.close()


def test_a_head_that_holds_the_stage_sends_its_frames_without_the_network(one_peer):
    body = {"model": "stories260K.gguf", "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0,
            "ignore_eos": True}
    r = httpx.post(f"{one_peer}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 24
    metrics = httpx.get(f"{one_peer}/metrics", timeout=10).text
    assert _metric(metrics, "p2pllm_engine_stage_frames_total") >= 24  # the stage ran every step ...
    assert _metric(metrics, "p2pllm_engine_ring_bytes_sent_total") == 0  # ... and no frame went over gRPC


def test_overlapping_frames_to_a_peers_own_stage_keep_each_answer_its_own(one_peer):
    prompts = ["Once upon a time", "The little dog", "Lily and Ben went to the park", "Tom had a red ball. He",
               "One day, a girl", "The sun was hot"]

    def complete(prompt: str) -> str:
        body = {"model": "stories260K.gguf", "prompt": prompt, "max_tokens": 32, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{one_peer}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    solo = [complete(p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(complete, prompts))
    # each answer is its own prompt's: it starts as that prompt's solo answer does (whole answers
    # may part after a while: ggml rounds a step of several sequences differently from a step of one)
    for text, own in zip(together, solo):
        assert text[:20] == own[:20], (text, own)
