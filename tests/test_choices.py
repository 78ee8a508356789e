"""n > 1: several choices from one prompt, whose KV is computed once and copied to each choice on
every stage; each choice samples on its own; OpenAI's shapes, streamed or not."""

from __future__ import annotations

import httpx
import pytest

from p2pllm.model.sampling import SamplingParams
from p2pllm.runtime.api import GenerationRequest
from p2pllm.runtime.local import build_local_engine
from test_gateway import STORIES, LoopThread, Served, _error, _serve


@pytest.fixture(scope="module")
def split():
    """stories260K as two in-process stages (KV copies happen on both) behind a real gateway."""
    if not STORIES.exists():
        pytest.skip(f"{STORIES} is absent (the shared test models live beside the checkout)")
    loop = LoopThread()
    engine = loop.run(build_local_engine(str(STORIES), [2]))
    server = _serve(loop, engine)
    yield Served(loop, engine, server)
    loop.run(server.stop())
    loop.run(engine.stop())
    loop.close()


def _choice_ids(served, req: GenerationRequest, through=None) -> dict[int, list[int]]:
    """Each choice's token ids; `through(run)` wraps the ring's run for this request (to count or
    refuse micro-batches). Every event must end well."""
    ring = served.engine.ring
    run = ring.run

    async def go():
        ring.run = through(run) if through else run
        try:
            ids: dict[int, list[int]] = {}
            async for e in await served.engine.generate(req):
                assert e.finish_reason in (None, "stop", "length"), e
                if e.token_id is not None:
                    ids.setdefault(e.index, []).append(e.token_id)
            return ids
        finally:
            ring.run = run

    return served.loop.run(go())


def _tokens_computed(served, req: GenerationRequest) -> tuple[dict[int, list[int]], int]:
    """Each choice's token ids, and how many positions the ring computed for the request."""
    counted = []

    def counting(run):
        async def counted_run(mb):
            counted.append(mb.n_tokens)
            return await run(mb)
        return counted_run

    return _choice_ids(served, req, counting), sum(counted)


def test_the_prompt_is_computed_once_for_all_choices(split):
    prompt = split.engine.tokenizer.encode("Once upon a time, there was a little girl named Lily")
    n, m = 4, 6
    req = GenerationRequest("n", prompt, m, SamplingParams(temperature=1.0, seed=11), ignore_eos=True, n=n)
    ids, computed = _tokens_computed(split, req)
    assert sorted(ids) == list(range(n)) and all(len(v) == m for v in ids.values())
    # the prompt but its last position once, then per choice: that position and m - 1 decodes
    assert computed == len(prompt) - 1 + n * m < n * (len(prompt) + m - 1)
    assert len({tuple(v) for v in ids.values()}) > 1  # sampled on their own
    again, _ = _tokens_computed(split, req)
    assert again == ids  # and reproducible with the seed


def test_choices_whole_and_streamed_through_the_openai_client(split):
    client = split.client()
    kw = dict(model="stories260K.gguf", prompt="Once upon a time", max_tokens=12, temperature=0.8, seed=5, n=3,
              extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw)
    assert [c.index for c in whole.choices] == [0, 1, 2] and {c.finish_reason for c in whole.choices} == {"length"}
    assert whole.usage.completion_tokens == 3 * 12 and len({c.text for c in whole.choices}) > 1
    texts = {i: "" for i in range(3)}
    finishes = {}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert finishes == {c.index: c.finish_reason for c in whole.choices}
    greedy = client.chat.completions.create(model="stories260K.gguf", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=8, temperature=0, n=2)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    assert greedy.usage.completion_tokens == 2 * 8 or greedy.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("n", [0, 129, "2", 1.5])
def test_bad_n_is_a_400(split, n):
    with httpx.Client(base_url=split.url, timeout=30) as http:
        _error(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "n": n}), 400, param="n")


def test_a_micro_batch_refused_by_a_stage_still_switching_plans_is_retried(split):
    """A stage that commits a new epoch a moment after the head refuses its first frames; the head
    hears of it (not only the sender) and sends the work again, instead of waiting for a timeout."""
    from p2pllm.runtime.scheduler import RingRetry

    prompt = split.engine.tokenizer.encode("Once upon a time")
    req = GenerationRequest("retry", prompt, 8, SamplingParams(), n=2)
    expected = _choice_ids(split, req)
    refusals = [3]

    def refusing(run):
        async def refused_run(mb):
            if refusals[0]:
                refusals[0] -= 1
                raise RingRetry("this peer is switching plans (frame of epoch 1 refused)")
            return await run(mb)
        return refused_run

    assert _choice_ids(split, req, refusing) == expected and refusals == [0]
