"""The prefix cache: a prompt that starts like a finished sequence copies that KV on every stage
instead of computing it again, reports it as OpenAI's `usage.prompt_tokens_details.cached_tokens`,
and gives the same tokens as without the cache (and as llama.cpp). Its book (PrefixCache) is pure
and tested on its own; the rest runs real stages (ggml and torch, one and several), a real
gateway, and a live 2-peer cluster."""

from __future__ import annotations

import asyncio

import pytest

from p2pllm.cluster.planner import PlanOptions, stage_memory
from p2pllm.model.sampling import SamplingParams
from p2pllm.model.spec import read_spec
from p2pllm.runtime.api import GenerationRequest
from p2pllm.runtime.local import LocalPipeline
from p2pllm.runtime.prefix_cache import PrefixCache

from conftest import live_smol_cluster, llama_cpp_greedy, llama_cpp_model, run_cli, shared_model
from test_gateway import _serve

STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the sun with her "
         "dog. One day, she saw a big tree in the park.")


# --------------------------------------------------------------------------- the book


def test_the_longest_shared_start_wins_and_the_last_prompt_token_is_left_to_compute():
    cache = PrefixCache(1000, min_reuse=4)
    assert cache.add(1, list(range(10))) == []
    assert cache.add(2, list(range(5)) + [99] * 10) == []
    assert cache.match(list(range(8)) + [7, 7]) == (1, 8)
    assert cache.match(list(range(5)) + [99, 99, 1]) == (2, 7)
    assert cache.match(list(range(10))) == (1, 9)  # the whole prompt is cached: its last token runs again
    assert cache.match([5, 6, 7, 8, 9]) == (None, 0)
    assert cache.match([0, 1, 2, 50]) == (None, 0)  # 3 shared tokens: under min_reuse
    assert (cache.hits, cache.misses, cache.reused_tokens) == (3, 2, 8 + 7 + 9)


def test_an_entry_that_starts_a_newer_one_goes_and_a_duplicate_is_not_kept():
    cache = PrefixCache(1000, min_reuse=4)
    cache.add(1, list(range(20)))  # a chat's first turn ...
    assert cache.add(2, list(range(30))) == [1]  # ... is part of its second
    assert cache.add(3, list(range(25))) == [3]  # already held by entry 2
    assert len(cache) == 1 and cache.tokens == 30
    assert cache.add(4, list(range(40)), pinned={2}) == []  # a starting sequence still copies entry 2
    assert 2 in cache and cache.tokens == 70


def test_bounds_push_out_the_least_recently_used_but_never_a_pinned_entry():
    cache = PrefixCache(100, max_entries=3, min_reuse=4)
    for i in range(3):
        cache.add(i + 1, [i] * 30)
    cache.match([0] * 10)  # entry 1 is now the most recently used
    assert cache.add(4, [3] * 30, pinned={2}) == [3]  # 120 > 100: the oldest unpinned entry goes
    assert sorted(cache._entries) == [1, 2, 4] and cache.tokens == 90
    assert cache.add(5, [5] * 101) == [5]  # longer than the whole budget: never kept
    assert cache.evict(40, pinned={1}) == [2, 4]
    assert cache.tokens == 30 and cache.clear() == [1] and cache.tokens == 0


# --------------------------------------------------------------------------- real stages


async def _generate(engine, ids, n=24):
    out, cached = [], None
    async for ev in await engine.generate(GenerationRequest("t", ids, n, sampling=SamplingParams(temperature=0))):
        if ev.token_id is not None:
            out.append(ev.token_id)
        if ev.finish_reason is not None:
            cached = ev.cached_tokens
    await _settled(engine)
    return out, cached


async def _settled(engine):
    """Until the micro-batch that tells the stages what to keep and free has run."""
    for _ in range(500):
        if not (engine._to_free or engine._to_retain or engine._in_flight):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the scheduler never sent what to keep and free")


def _two_turns(loop, pipe, **engine_kw):
    """A first answer, then a second prompt made of the first prompt, its answer and more text."""

    async def run():
        engine = pipe.engine(**engine_kw)
        await engine.start()
        try:
            ids = pipe.tokenizer.encode(STORY)
            first, c1 = await _generate(engine, ids)
            second_prompt = ids + first + pipe.tokenizer.encode(" Then she", add_bos=False)
            second, c2 = await _generate(engine, second_prompt)
            return first, second, second_prompt, c1, c2, engine.stats().extra
        finally:
            await engine.stop()

    return loop.run(run())


@pytest.mark.parametrize("cuts", [None, [4]], ids=["one stage", "two stages"])
def test_a_second_turn_copies_the_first_and_answers_the_same_tokens(loop, stories_gguf, cuts):
    pipe = LocalPipeline(str(stories_gguf), cuts)
    first, second, prompt, c1, c2, stats = _two_turns(loop, pipe, prefix_cache=4096)
    kept = [(stage.kv.sequences(), sorted(stage.kept)) for stage in pipe.stages]
    f0, s0, p0, _, c0, stats0 = _two_turns(loop, LocalPipeline(str(stories_gguf), cuts), prefix_cache=0)
    assert prompt == p0 and first == f0
    assert second == s0  # the same tokens as computing the whole prompt
    n_first = len(pipe.tokenizer.encode(STORY))
    assert c1 == 0 and c0 == 0
    assert c2 >= n_first + len(first) - 1, (c2, n_first, len(first))  # the first turn's KV, all of it
    assert stats["prefix_cache_hits"] == 1 and stats["prefix_cache_reused_tokens"] == c2
    assert "prefix_cache_hits" not in stats0  # off: nothing kept
    # every stage keeps the second turn's KV, and only it (the first turn's entry started it, so it
    # went), outside the pool of running sequences
    assert kept == [([], [2])] * len(pipe.stages), kept


def test_the_cached_answer_equals_llama_cpp(loop, llama_cpp, stories_gguf):
    pipe = LocalPipeline(str(stories_gguf), [3])
    _, second, prompt, _, cached, _ = _two_turns(loop, pipe, prefix_cache=4096)
    assert cached > 0
    llm = llama_cpp_model(llama_cpp, stories_gguf, kv="f16")
    assert second[:16] == llama_cpp_greedy(llm, prompt, 24)[:16]


def test_a_torch_stage_keeps_exactly_what_a_kept_sequence_holds(loop, demo_tiny_hf):
    pipe = LocalPipeline(str(demo_tiny_hf), [1])
    assert pipe.backend == "torch"
    first, second, prompt, _, cached, _ = _two_turns(loop, pipe, prefix_cache=4096)
    for stage in pipe.stages:  # the prompt and the answer but its last token (never fed back)
        assert stage.kv.sequences() == [] and [e.length for e in stage.kept.values()] == [len(prompt) + 23]
    _, second0, _, _, _, _ = _two_turns(loop, LocalPipeline(str(demo_tiny_hf), [1]), prefix_cache=0)
    assert cached > 0 and second == second0


def test_admission_takes_room_from_the_cache_and_a_plan_change_clears_it(loop, stories_gguf):
    pipe = LocalPipeline(str(stories_gguf), [2])

    async def run():
        engine = pipe.engine(prefix_cache=4096)
        await engine.start()
        try:
            tok = pipe.tokenizer
            for text in ("The cat sat on the mat and looked at the bird in the tree.",
                         "Tom had a big red ball and he liked to throw it very high."):
                await _generate(engine, tok.encode(text), 40)
            held = engine.prefix_cache.tokens
            assert len(engine.prefix_cache) == 2
            engine.kv_budget = held + 60  # a new request needs prompt + 40: only one entry may stay
            await _generate(engine, tok.encode("Lily and Ben went to the park to play on the swings."), 40)
            stats = engine.stats().extra
            assert stats["prefix_cache_entries"] <= 2 and engine.prefix_cache.tokens < held + 60
            engine.kv_budget = None
            engine.pause("test: a new plan")
            engine.resume("test epoch", {})  # the new stages do not hold the kept KV
            assert len(engine.prefix_cache) == 0
            again, cached = await _generate(engine, tok.encode(STORY))
            assert cached == 0 and again
            for stage in pipe.stages:  # what was kept before the plan change was freed everywhere
                assert stage.kv.sequences() == [] and len(stage.kept) == 1
        finally:
            await engine.stop()

    loop.run(run())


def test_choices_of_a_cached_prompt_copy_it_after_it_started(loop, stories_gguf):
    """n > 1: the first choice starts from the cache; the others copy it in a later micro-batch
    (a stage checks a copy's source before the frame's starts run)."""
    pipe = LocalPipeline(str(stories_gguf), [2])

    async def run():
        engine = pipe.engine(prefix_cache=4096)
        await engine.start()
        try:
            ids = pipe.tokenizer.encode(STORY)
            alone, _ = await _generate(engine, ids, 16)
            texts: dict[int, list[int]] = {0: [], 1: []}
            req = GenerationRequest("n2", ids, 16, sampling=SamplingParams(temperature=0), n=2)
            async for ev in await engine.generate(req):
                assert ev.finish_reason in (None, "stop", "length"), ev.error
                if ev.token_id is not None:
                    texts[ev.index].append(ev.token_id)
            assert texts[0] == texts[1] == alone
        finally:
            await engine.stop()

    loop.run(run())


def test_the_planner_reserves_the_cache_and_the_flag_is_checked(tmp_path):
    spec = read_spec(str(shared_model("stories260K.gguf")))
    plain = stage_memory(spec, 0, spec.n_layers, PlanOptions(context=512, batch=2))
    cached = stage_memory(spec, 0, spec.n_layers, PlanOptions(context=512, batch=2, prefix_cache=512))
    assert cached.kv == plain.kv * 3 // 2
    proc = run_cli("join", "--model", str(shared_model("stories260K.gguf")), "--prefix-cache", "-5", "--insecure")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "p2pllm join: error: argument --prefix-cache: must be 0 or more, got -5"
    proc = run_cli("plan", "--model", str(shared_model("stories260K.gguf")), "--device", "name=a,mem=1GiB,tflops=1,bw=10GBps",
                   "--prefix-cache", "4096", "--json")
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- through the gateway


def test_the_openai_client_sees_cached_tokens_on_a_chats_second_turn(loop, stories_gguf):
    pipe = LocalPipeline(str(stories_gguf))

    async def start():
        engine = pipe.engine(prefix_cache=4096)
        await engine.start()
        return engine

    engine = loop.run(start())
    server = _serve(loop, engine)
    try:
        import openai

        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        first = client.completions.create(model=engine.model_name, prompt=STORY, max_tokens=20, temperature=0)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        second = client.completions.create(model=engine.model_name, prompt=STORY + first.choices[0].text + " Then",
                                           max_tokens=20, temperature=0)
        assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1
        assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    finally:
        loop.run(server.stop())
        loop.run(engine.stop())


@pytest.fixture(scope="module")
def cached_cluster(tmp_path_factory):
    """SmolLM2 on two live peers with `join`'s default prefix cache (the shared smol_cluster has it off)."""
    yield from live_smol_cluster(tmp_path_factory.mktemp("prefix-cluster"), "prefix", (7821, 7822, 8821, 8822),
                                 "--response-cache", "off")


def test_a_live_cluster_reuses_a_chats_history(cached_cluster):
    """Two peers (real gRPC ring): the kept KV lives on both stages, the count crosses from the
    coordinator to the gateway that forwarded the request."""
    smol_cluster = cached_cluster
    client = smol_cluster.client()
    history = [{"role": "system", "content": "You are a helpful assistant who answers in one sentence."},
               {"role": "user", "content": "Name a planet of the solar system that has rings."}]
    first = client.chat.completions.create(model=smol_cluster.model, messages=history, max_tokens=24, temperature=0)
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And which one is the largest?"}]
    second = client.chat.completions.create(model=smol_cluster.model, messages=history, max_tokens=24, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens - 1 <= cached < second.usage.prompt_tokens, (cached, first.usage)
    assert second.choices[0].message.content
