"""Tokens through a real cluster: three namespace hosts, real gRPC ring, real HTTP, openai client."""

from __future__ import annotations

import json
import sys
import time

import pytest

from clusterutil import client, coordinator_host, join, status, wait_for_agreement
from conftest import llama_cpp_model
from netns import Hosts, netns_available
from p2pllm.runtime.local import LocalPipeline

PROMPTS = ["Once upon a time", "The little dog", "Lily and Ben went to the park", "Tom had a red ball. He"]


@pytest.fixture(scope="module")
def cluster(stories_gguf, tmp_path_factory):
    """One three-host cluster shared by this module's tests (each test leaves it idle)."""
    reason = netns_available()
    if reason:
        pytest.skip(reason)
    with Hosts(3, log_dir=tmp_path_factory.mktemp("ring-logs")) as h:
        for i in (1, 2, 3):  # f32 KV: bit-for-bit llama.cpp's f32 cache (f16 is compared in test_engine)
            join(h, i, stories_gguf, "--kv-dtype", "f32")
        views = wait_for_agreement(h, [1, 2, 3], n_layers=5)
        yield h, views[0]


def assert_idle(h: Hosts, timeout: float = 10) -> None:
    """Every stage of the ring holds no sequence and no KV (within `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        busy = [(v["active_sequences"], v["kv_sequences"]) for v in (status(h, i) for i in (1, 2, 3))]
        if all(a == 0 and k == 0 for a, k in busy) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert all(a == 0 and k == 0 for a, k in busy), busy


def post(h: Hosts, i: int, path: str, body: dict) -> dict:
    """A raw JSON POST to host i's gateway: {"status", "json"}."""
    return client(h, i, {"kind": "raw", "method": "POST", "path": path, "body": json.dumps(body),
                         "headers": {"content-type": "application/json"}})


def test_greedy_completions_through_the_ring_equal_llama_cpp(cluster, llama_cpp, stories_gguf):
    h, view = cluster
    llm = llama_cpp_model(llama_cpp, stories_gguf)
    expected = []
    for p in PROMPTS:
        llm.reset()
        expected.append(llm.create_completion(p, max_tokens=40, temperature=0.0)["choices"][0]["text"])
    # ask through a peer that is not the coordinator: its gateway forwards over gRPC
    other = next(i for i in (1, 2, 3) if i != coordinator_host(h, [1, 2, 3], view))
    got = client(h, other, {"kind": "complete", "model": "stories260K.gguf", "prompts": PROMPTS,
                            "max_tokens": 40})
    assert [g["text"] for g in got] == expected
    assert all(g["usage"]["completion_tokens"] == 40 and g["finish_reason"] == "length" for g in got)
    streamed = client(h, other, {"kind": "complete", "model": "stories260K.gguf", "prompts": PROMPTS,
                                 "max_tokens": 40, "stream": True})
    assert [s["text"] for s in streamed] == expected
    assert all(s["chunks"] > 1 for s in streamed)


def test_chat_completions_streamed_and_not(cluster):
    h, view = cluster
    messages = [{"role": "user", "content": "Tell me about Lily."}]
    whole = client(h, 1, {"kind": "chat", "model": "stories260K.gguf", "messages": messages})
    streamed = client(h, 2, {"kind": "chat", "model": "stories260K.gguf", "messages": messages, "stream": True})
    assert whole["role"] == "assistant" and whole["text"] and whole["finish_reason"] in ("stop", "length")
    assert streamed["text"] == whole["text"]


def test_sixteen_concurrent_requests_each_equal_their_solo_result(cluster, stories_gguf):
    h, _ = cluster
    pipe = LocalPipeline(str(stories_gguf), kv_dtype="f32")  # as the cluster runs
    words = ["cat", "dog", "park", "ball", "tree", "sun", "boat", "cake"]
    prompts = [f"The {words[i % 8]} and the {words[(i * 3 + 1) % 8]}" + "!" * (i // 8) for i in range(16)]
    solo = [pipe.tokenizer.decode(pipe.generate(pipe.tokenizer.encode(p), max_tokens=24).ids, continuation=True)
            for p in prompts]
    got = client(h, 3, {"kind": "concurrent", "model": "stories260K.gguf", "prompts": prompts, "max_tokens": 24})
    assert got == solo


def test_chat_command_on_a_non_coordinator_peer_answers(cluster):
    h, view = cluster
    other = next(i for i in (1, 2, 3) if i != coordinator_host(h, [1, 2, 3], view))
    proc = h.run(other, [sys.executable, "-m", "p2pllm", "chat", "--prompt", "Once upon a time", "--max-tokens", "16",
                         "--temperature", "0"], timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_client_disconnect_frees_the_sequence_on_every_stage(cluster):
    h, view = cluster
    got = client(h, 1, {"kind": "disconnect", "model": "stories260K.gguf", "prompt": "Once upon a time",
                        "max_tokens": 1500, "after_chunks": 3})
    assert got["chunks"] == 3
    assert_idle(h)


def test_over_long_prompt_is_a_400_in_openai_shape(cluster):
    h, _ = cluster
    body = '{"model": "stories260K.gguf", "prompt": "' + "Once upon a time " * 700 + '", "max_tokens": 4}'
    got = client(h, 2, {"kind": "raw", "method": "POST", "path": "/completions", "body": body,
                        "headers": {"content-type": "application/json"}})
    assert got["status"] == 400
    err = got["json"]["error"]
    assert err["code"] == "context_length_exceeded" and "context" in err["message"]


def test_penalties_and_logit_bias_reach_the_last_stage_through_a_forwarding_gateway(cluster, stories_gguf):
    from p2pllm.model.sampling import SamplingParams

    h, view = cluster
    other = next(i for i in (1, 2, 3) if i != coordinator_host(h, [1, 2, 3], view))
    pipe = LocalPipeline(str(stories_gguf), kv_dtype="f32")
    prompt = pipe.tokenizer.encode("Once upon a time")
    banned = pipe.generate(prompt, max_tokens=1).ids[0]  # the greedy first token, banned below
    sampling = SamplingParams(frequency_penalty=1.5, presence_penalty=0.5, logit_bias=((banned, -100.0),))
    def text(**kw) -> str:
        return pipe.tokenizer.decode(pipe.generate(prompt, max_tokens=40, **kw).ids, continuation=True)

    expected = text(sampling=sampling)
    body = {"model": "stories260K.gguf", "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0,
            "frequency_penalty": 1.5, "presence_penalty": 0.5, "logit_bias": {str(banned): -100}}
    got = post(h, other, "/completions", body)
    assert got["status"] == 200, got
    assert got["json"]["choices"][0]["text"] == expected != text()


def test_a_json_schema_answer_through_the_ring_equals_one_process(cluster, stories_gguf):
    from p2pllm.model.grammar import grammar_for_response_format
    from p2pllm.model.sampling import SamplingParams

    h, view = cluster
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "happy": {"type": "boolean"}}, "required": ["name", "happy"],
              "additionalProperties": False}
    rf = {"type": "json_schema", "json_schema": {"name": "kid", "schema": schema}}
    pipe = LocalPipeline(str(stories_gguf), kv_dtype="f32")
    prompt = pipe.tokenizer.encode("Lily was a little girl")
    ids = pipe.generate(prompt, max_tokens=40, sampling=SamplingParams(grammar=grammar_for_response_format(rf))).ids
    expected = pipe.tokenizer.decode(ids, continuation=True)
    body = {"model": "stories260K.gguf", "prompt": "Lily was a little girl", "max_tokens": 40, "temperature": 0,
            "response_format": rf}
    other = next(i for i in (1, 2, 3) if i != coordinator_host(h, [1, 2, 3], view))
    got = post(h, other, "/completions", body)
    assert got["status"] == 200, got
    text = got["json"]["choices"][0]["text"]
    assert text == expected and set(json.loads(text)) == {"name", "happy"}, text


def test_logprobs_through_the_ring_equal_llama_cpps(cluster, llama_cpp, stories_gguf):
    h, view = cluster
    llm = llama_cpp_model(llama_cpp, stories_gguf)
    ref = llm.create_completion("Lily and Ben", max_tokens=10, temperature=0.0, logprobs=2)["choices"][0]["logprobs"]
    body = {"model": "stories260K.gguf", "prompt": "Lily and Ben", "max_tokens": 10, "temperature": 0, "logprobs": 2}
    other = next(i for i in (1, 2, 3) if i != coordinator_host(h, [1, 2, 3], view))
    got = post(h, other, "/completions", body)
    ours = got["json"]["choices"][0]["logprobs"]
    assert ours["tokens"] == ref["tokens"]
    assert ours["token_logprobs"] == pytest.approx(ref["token_logprobs"], abs=1e-3)  # f32 KV on both sides
    for mine, theirs in zip(ours["top_logprobs"], ref["top_logprobs"]):
        assert set(mine) == set(theirs) and all(mine[t] == pytest.approx(theirs[t], abs=1e-3) for t in mine)


def test_embeddings_through_a_forwarding_gateway_equal_one_process(cluster, stories_gguf):
    """/v1/embeddings on a peer that is not the coordinator: the Embed RPC, every input prefilled
    around the ring, pooled on the last stage; the vectors equal one process's, and no stage keeps
    anything afterwards."""
    import asyncio
    import numpy as np

    h, view = cluster
    texts = ["Once upon a time", "Lily and Ben went to the park. " * 40]  # the second spans two prefill chunks
    pipe = LocalPipeline(str(stories_gguf), kv_dtype="f32")  # as the cluster runs

    async def local():
        engine = pipe.engine()
        await engine.start()
        try:
            return await engine.embed([pipe.tokenizer.encode(t) for t in texts])
        finally:
            await engine.stop()

    expected = [v.numpy() for v in asyncio.run(local())]
    other = next(i for i in (1, 2, 3) if i != coordinator_host(h, [1, 2, 3], view))
    body = {"model": "stories260K.gguf", "input": texts}
    got = post(h, other, "/embeddings", body)
    assert got["status"] == 200, got
    data = got["json"]["data"]
    assert [d["index"] for d in data] == [0, 1]
    assert got["json"]["usage"]["prompt_tokens"] == sum(len(pipe.tokenizer.encode(t)) for t in texts)
    for d, e in zip(data, expected):
        assert np.abs(np.array(d["embedding"], dtype=np.float32) - e).max() < 1e-4
    bad = post(h, other, "/embeddings", {"input": [[1] * 300000]})
    assert bad["status"] == 400 and bad["json"]["error"]["param"] == "input", bad
    assert_idle(h)


def test_choices_copy_the_prompt_on_every_stage_of_the_ring(cluster):
    h, view = cluster
    other = next(i for i in (1, 2, 3) if i != coordinator_host(h, [1, 2, 3], view))
    body = {"model": "stories260K.gguf", "prompt": "Tom had a red ball. He", "max_tokens": 16, "n": 3}
    greedy = post(h, other, "/completions", {**body, "temperature": 0})
    assert greedy["status"] == 200, greedy
    texts = [c["text"] for c in greedy["json"]["choices"]]
    assert len(texts) == 3 and texts[0] and len(set(texts)) == 1  # the same copied prompt, the same argmax
    sampled = post(h, other, "/completions", {**body, "temperature": 1.0, "seed": 3})
    assert sampled["status"] == 200 and len({c["text"] for c in sampled["json"]["choices"]}) > 1, sampled
