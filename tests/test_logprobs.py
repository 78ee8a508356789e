"""logprobs / top_logprobs: each token's log-probability under the model and its most likely
alternatives, in OpenAI's chat and completions shapes, streamed or not, equal to llama.cpp's."""

from __future__ import annotations

import httpx
import pytest

from conftest import llama_cpp_model
from test_gateway import STORIES, _error, stories  # noqa: F401  (fixtures)

PROMPT = "Once upon a time"


def test_completion_logprobs_equal_llama_cpps(stories, llama_cpp):
    llm = llama_cpp_model(llama_cpp, STORIES, kv="f16")  # our ggml stages keep f16 KV by default, as llama.cpp
    ref = llm.create_completion(PROMPT, max_tokens=12, temperature=0.0, logprobs=3)["choices"][0]
    with httpx.Client(base_url=stories.url, timeout=60) as http:
        got = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0,
                                                 "logprobs": 3}).json()["choices"][0]
    assert got["text"] == ref["text"]
    ours, theirs = got["logprobs"], ref["logprobs"]
    assert ours["tokens"] == theirs["tokens"] and ours["text_offset"] == [o - len(PROMPT) for o in
                                                                          theirs["text_offset"]]
    assert ours["token_logprobs"] == pytest.approx(theirs["token_logprobs"], abs=0.01)
    for mine, ref_top in zip(ours["top_logprobs"], theirs["top_logprobs"]):
        assert set(mine) == set(ref_top) and all(mine[t] == pytest.approx(ref_top[t], abs=0.01) for t in mine)


@pytest.mark.parametrize("top", [0, 5])
def test_chat_logprobs_streamed_and_whole_agree_and_make_sense(stories, top):
    client = stories.client()
    kw = dict(model="stories260K.gguf", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=10,
              temperature=0, logprobs=True, top_logprobs=top)
    whole = client.chat.completions.create(**kw)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens == 10
    assert "".join(c.token for c in content) == whole.choices[0].message.content
    for c in content:
        assert c.logprob <= 0 and bytes(c.bytes).decode("utf-8", "replace") == c.token
        assert len(c.top_logprobs) == top
        if top:  # greedy: the chosen token is the most likely one, and the list is sorted
            assert c.top_logprobs[0].token == c.token and c.top_logprobs[0].logprob == pytest.approx(c.logprob)
            assert [a.logprob for a in c.top_logprobs] == sorted((a.logprob for a in c.top_logprobs), reverse=True)
    streamed = [e for chunk in client.chat.completions.create(stream=True, **kw) if chunk.choices
                and chunk.choices[0].logprobs for e in chunk.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(c.token, round(c.logprob, 5)) for c in content]
    plain = client.chat.completions.create(**{**kw, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == whole.choices[0].message.content


@pytest.mark.parametrize("route, body, param", [
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": 3}, "logprobs"),
    ("/v1/completions", {"logprobs": 6}, "logprobs"),
    ("/v1/completions", {"logprobs": True}, "logprobs"),
    ("/v1/completions", {"logprobs": 2, "top_logprobs": 2}, "top_logprobs"),
])
def test_bad_logprobs_requests_are_400(stories, route, body, param):
    base = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in route else {"prompt": "hi"}
    with httpx.Client(base_url=stories.url, timeout=30) as http:
        _error(http.post(route, json={**base, **body, "max_tokens": 2}), 400, param=param)


def test_logprobs_through_a_live_two_peer_cluster(smol_cluster):
    reply = smol_cluster.client().chat.completions.create(
        model=smol_cluster.model, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens and "".join(c.token for c in content) == \
        reply.choices[0].message.content
    assert all(c.top_logprobs[0].token == c.token and len(c.top_logprobs) == 3 for c in content)
