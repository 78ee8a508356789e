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


@pytest.mark.parametrize("n", [1, 2])
def test_streamed_completion_text_offsets_run_through_the_whole_text(stories, n):
    """Each streamed chunk's text_offset restarted at 0; the whole answer's count from the start of
    the choice's text, and the stream must say the same."""
    client = stories.client()
    kw = dict(model="stories260K.gguf", prompt=PROMPT, max_tokens=12, temperature=0.8, seed=3, logprobs=1, n=n)
    whole = client.completions.create(**kw)
    streamed: dict[int, list] = {}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            if c.logprobs:
                streamed.setdefault(c.index, []).extend(zip(c.logprobs.tokens, c.logprobs.text_offset))
    for choice in whole.choices:
        lp = choice.logprobs
        assert lp.text_offset[0] == 0 and len(set(lp.text_offset)) > 3
        assert streamed[choice.index] == list(zip(lp.tokens, lp.text_offset))
        assert all(choice.text[o:].startswith(t) for t, o in zip(lp.tokens, lp.text_offset) if "\ufffd" not in t)


def test_a_stop_string_that_is_a_whole_token_keeps_its_logprob_when_streamed(stories):
    """The token that is all stop string has no text; the whole answer reports its logprob (it was
    generated and counted), so the stream must too: it came with no text and was lost."""
    client = stories.client()
    kw = dict(model="stories260K.gguf", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=2)
    tokens = client.completions.create(**kw).choices[0].logprobs.tokens
    k = next(i for i in range(3, len(tokens)) if tokens[i].strip() and tokens[i] not in "".join(tokens[:i]))
    stop = tokens[k]  # ends the text right before token k, which is then all stop string
    whole = client.completions.create(stop=[stop], **kw)
    assert whole.choices[0].finish_reason == "stop" and whole.choices[0].text == "".join(tokens[:k])
    assert whole.choices[0].logprobs.tokens == tokens[:k + 1] and whole.usage.completion_tokens == k + 1
    streamed = [t for chunk in client.completions.create(stop=[stop], stream=True, **kw)
                if chunk.choices and chunk.choices[0].logprobs for t in chunk.choices[0].logprobs.tokens]
    assert streamed == tokens[:k + 1]
    chat = dict(model="stories260K.gguf", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=12,
                temperature=0, logprobs=True, top_logprobs=1)
    tokens = [c.token for c in client.chat.completions.create(**chat).choices[0].logprobs.content]
    k = next(i for i in range(3, len(tokens)) if tokens[i].strip() and tokens[i] not in "".join(tokens[:i]))
    whole = client.chat.completions.create(stop=[tokens[k]], **chat)
    assert [c.token for c in whole.choices[0].logprobs.content] == tokens[:k + 1]
    streamed = [e.token for chunk in client.chat.completions.create(stop=[tokens[k]], stream=True, **chat)
                if chunk.choices and chunk.choices[0].logprobs for e in chunk.choices[0].logprobs.content]
    assert streamed == tokens[:k + 1]


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
