"""Load without collapse: the head admits sequences against the KV its stages can hold, queues
the rest, and answers 429 with Retry-After once the queue is full (real HTTP, real engine)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from p2pllm.cluster.coordinator import kv_budget
from p2pllm.proto import p2pllm_pb2 as pb
from test_gateway import STORIES, LoopThread, Served, _error, _serve, _wait_idle

PROMPTS = ["Once upon a time", "The little dog", "Lily and Ben went to the park", "Tom had a red ball. He",
           "One day, a girl", "The sun was hot"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def served():
    from p2pllm.runtime.local import build_local_engine

    if not STORIES.exists():
        pytest.skip(f"{STORIES} is absent (the shared test models live beside the checkout)")
    loop = LoopThread()
    engine = loop.run(build_local_engine(str(STORIES)))
    server = _serve(loop, engine)
    yield Served(loop, engine, server)
    loop.run(server.stop())
    loop.run(engine.stop())
    loop.close()


def _limits(served: Served, kv: int | None, queue: int) -> None:
    async def set_():
        served.engine.kv_budget, served.engine.max_queued = kv, queue

    served.loop.run(set_())


def _complete(served: Served, prompt: str, max_tokens: int = MAX_TOKENS) -> httpx.Response:
    body = {"model": "stories260K.gguf", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(f"{served.url}/v1/completions", json=body, timeout=120)


def _capacity(served: Served, prompt: str, max_tokens: int = MAX_TOKENS) -> int:
    return len(served.engine.tokenizer.encode(prompt)) + max_tokens


def test_sequences_beyond_the_kv_budget_wait_and_every_answer_is_its_own(served):
    solo = [_complete(served, p).json()["choices"][0]["text"] for p in PROMPTS]
    budget = max(_capacity(served, p) for p in PROMPTS) * 2  # room for two sequences at a time
    _limits(served, budget, 256)
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            s = served.stats()
            seen.append((s.running, s.extra["kv_reserved_tokens"], s.queued))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            replies = list(pool.map(lambda p: _complete(served, p), PROMPTS))
    finally:
        stop.set()
        watcher.join()
        _limits(served, None, 256)
    assert [r.status_code for r in replies] == [200] * len(PROMPTS)
    # each answer is its own prompt's: it starts as that prompt's solo answer does (whole answers
    # may part after a while: ggml rounds a step of two sequences differently from a step of one)
    for reply, own in zip(replies, solo):
        text = reply.json()["choices"][0]["text"]
        assert text[:20] == own[:20], (text, own)
    assert max(reserved for _, reserved, _ in seen) <= budget
    assert max(running for running, _, _ in seen) <= 2
    assert max(queued for _, _, queued in seen) >= 1  # the rest waited their turn instead of failing
    _wait_idle(served)


def test_a_full_queue_answers_429_with_retry_after(served):
    # one sequence at a time, and room for two more in the queue: of six requests at once, some wait
    # and the rest are told to come back
    _limits(served, _capacity(served, PROMPTS[0], 200) + 1, 2)
    try:
        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(lambda p: _complete(served, PROMPTS[0], 200), range(6)))
    finally:
        _limits(served, None, 256)
    refused = [r for r in replies if r.status_code == 429]
    assert refused and len(refused) <= 6 - 3, [r.status_code for r in replies]  # at least 1 running + 2 queued
    assert all(r.status_code == 200 for r in replies if r not in refused)
    for r in refused:
        assert _error(r, 429, code="rate_limit_exceeded")["type"] == "requests"  # OpenAI's rate-limit type
        assert r.headers["retry-after"] == "1"
    _wait_idle(served)


def test_a_request_the_kv_budget_can_never_hold_is_a_400(served):
    _limits(served, 16, 256)
    try:
        reply = _complete(served, PROMPTS[0], 32)
    finally:
        _limits(served, None, 256)
    err = _error(reply, 400, code="context_length_exceeded")
    assert "KV cache holds 16 tokens" in err["message"]


def test_the_kv_budget_is_the_tightest_stage_of_the_committed_plan():
    def stage(limit, weights, kv, workspace):
        return {"memory": {"limit": limit, "weights": weights, "kv": kv, "workspace": workspace,
                           "total": weights + kv + workspace}}

    # the plan sized kv for batch 8 x context 1024 = 8192 positions: 1 byte per position on the first
    # stage, 2 on the second
    plan = {"stages": [stage(100_000, 50_000, 8192, 10_000), stage(60_000, 20_000, 16_384, 10_000)]}
    proposal = pb.PlanProposal(plan_json=json.dumps(plan))
    assert kv_budget(proposal, positions=8 * 1024, context=1024) == min(40_000 // 1, 30_000 // 2)
    assert kv_budget(pb.PlanProposal(plan_json="{}"), positions=8 * 1024, context=1024) is None
