"""The OpenAI gateway over real HTTP (uvicorn on loopback) against the real in-process engine.

Clients are the ones users run: the official `openai` package, raw httpx for the error cases,
and `p2pllm chat` in a subprocess. The server side runs in its own event-loop thread, exactly as
in the daemon (serve_gateway inside a running loop).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import random
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from conftest import LoopThread  # noqa: F401  (other test modules import it from here)
from p2pllm.errors import P2PError
from p2pllm.gateway.app import create_app
from p2pllm.gateway.server import serve_gateway
from p2pllm.model.sampling import SamplingParams
from p2pllm.runtime.api import GenerationRequest
from p2pllm.runtime.local import build_local_engine

STORIES = Path(__file__).resolve().parents[2] / "shared/models/stories260K.gguf"
REPO = Path(__file__).resolve().parents[1]
LLAMA2C_ONCE = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
API_KEY = "sk-test-0123456789"


class Served:
    def __init__(self, loop: LoopThread, engine, server):
        self.loop, self.engine, self.server = loop, engine, server
        self.url = server.url

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0,
                             timeout=60, **kw)

    def stats(self):
        """The engine's stats, read on its own loop (it mutates them there)."""

        async def read():
            return self.engine.stats()

        return self.loop.run(read())

    def direct(self, prompt_ids: list[int], max_tokens: int, sampling=SamplingParams(), stop=()) -> tuple[str, int]:
        """The engine's own answer, without HTTP: (text, completion tokens)."""

        async def go():
            it = await self.engine.generate(GenerationRequest("direct", prompt_ids, max_tokens, sampling, tuple(stop)))
            text, n = "", 0
            async for event in it:
                text += event.text
                n += event.token_id is not None
            return text, n

        return self.loop.run(go())


def _serve(loop: LoopThread, engine, **kw):
    return loop.run(serve_gateway(create_app(engine, **kw), "127.0.0.1", 0))


@pytest.fixture(scope="module")
def stories(loop):
    if not STORIES.exists():
        pytest.skip(f"{STORIES} is absent (the shared test models live beside the checkout)")
    engine = loop.run(build_local_engine(str(STORIES)))
    server = _serve(loop, engine)
    yield Served(loop, engine, server)
    loop.run(server.stop())
    loop.run(engine.stop())


@pytest.fixture(scope="module")
def demo(loop, tmp_path_factory):
    """The demo model (it has a chat template), behind an API key."""
    from p2pllm.model.demo import make_demo_model

    path = make_demo_model(tmp_path_factory.mktemp("gw-demo") / "tiny.gguf", "gguf", "tiny")
    engine = loop.run(build_local_engine(str(path)))
    server = _serve(loop, engine, api_key=API_KEY)
    yield Served(loop, engine, server)
    loop.run(server.stop())
    loop.run(engine.stop())


def _error(reply: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert reply.status_code == status, (reply.status_code, reply.text)
    body = reply.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    assert reply.headers.get("x-request-id")
    return err


def _wait_idle(served: Served, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = served.stats()
        if stats.running == 0 and stats.queued == 0 and not stats.extra.get("active_sequences"):
            return
        time.sleep(0.05)
    raise AssertionError(f"the engine still has sequences: {served.stats()}")


# --------------------------------------------------------------------------- completions


def test_greedy_completion_equals_engine_and_llama2c_text(stories):
    client = stories.client()
    model = client.models.list().data[0].id
    assert model == stories.engine.model_name
    res = client.completions.create(model=model, prompt="Once upon a time", max_tokens=40, temperature=0)
    text = res.choices[0].text
    direct, n = stories.direct(stories.engine.tokenizer.encode("Once upon a time"), 40)
    assert text == direct
    assert ("Once upon a time" + text).startswith(LLAMA2C_ONCE)
    assert res.object == "text_completion" and res.id.startswith("cmpl-") and res.model == model
    assert res.choices[0].finish_reason == "length" and res.choices[0].index == 0
    prompt_tokens = len(stories.engine.tokenizer.encode("Once upon a time"))
    assert (res.usage.prompt_tokens, res.usage.completion_tokens, res.usage.total_tokens) == (
        prompt_tokens, n, prompt_tokens + n)
    assert n == 40


def test_streamed_completion_deltas_concatenate_to_the_whole_text(stories):
    client = stories.client()
    kw = dict(model=stories.engine.model_name, prompt="The cat sat", max_tokens=30, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.id == chunks[0].id for c in chunks)


def test_prompt_as_token_ids_and_list_of_one_string(stories):
    client = stories.client()
    ids = stories.engine.tokenizer.encode("Once upon a time")
    by_ids = client.completions.create(model=stories.engine.model_name, prompt=ids, max_tokens=12, temperature=0)
    by_list = client.completions.create(model=stories.engine.model_name, prompt=["Once upon a time"], max_tokens=12,
                                        temperature=0)
    assert by_ids.choices[0].text == by_list.choices[0].text == stories.direct(ids, 12)[0]
    assert by_ids.usage.prompt_tokens == len(ids)


def test_stop_string_ends_text_before_it(stories):
    client = stories.client()
    full, _ = stories.direct(stories.engine.tokenizer.encode("Once upon a time"), 40)
    res = client.completions.create(model=stories.engine.model_name, prompt="Once upon a time", max_tokens=40,
                                    temperature=0, stop=[" Lily", "zzz"])
    assert res.choices[0].text == full[: full.index(" Lily")]
    assert res.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=stories.engine.model_name, prompt="Once upon a time", max_tokens=40,
                                         temperature=0, stop=" Lily", stream=True)
    assert "".join(c.choices[0].text for c in streamed) == res.choices[0].text


def test_seed_makes_sampling_reproducible(stories):
    client = stories.client()

    def sample(seed):
        return client.completions.create(model=stories.engine.model_name, prompt="One day", max_tokens=30,
                                         temperature=1.0, top_p=0.95, seed=seed,
                                         extra_body={"top_k": 40}).choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_sixteen_concurrent_prompts_each_equal_their_solo_result(stories):
    client = stories.client()
    prompts = [f"{name} went to the" for name in
               ("Tom", "Lily", "Sue", "Ben", "Max", "Anna", "Tim", "Mia", "Sam", "Lucy", "Jack", "Amy", "Bob",
                "Kim", "Joe", "Zoe")]

    def ask(prompt, max_tokens):
        return client.completions.create(model=stories.engine.model_name, prompt=prompt, max_tokens=max_tokens,
                                         temperature=0).choices[0].text

    lengths = [12 + 3 * i for i in range(16)]
    solo = [ask(p, n) for p, n in zip(prompts, lengths)]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, prompts, lengths))
    assert together == solo
    assert len(set(solo)) > 8  # different prompts, different stories


def test_client_disconnect_mid_stream_frees_the_sequence(stories):
    body = {"model": stories.engine.model_name, "prompt": "Once upon a time", "max_tokens": 1500,
            "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=stories.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as reply:
            assert reply.status_code == 200
            lines = reply.iter_lines()
            got = [line for line, _ in zip(lines, range(6)) if line.startswith("data:")]
            assert got
            assert stories.stats().running == 1
        # the connection is closed here, long before 1500 tokens
    _wait_idle(stories)
    # and the engine still serves
    res = stories.client().completions.create(model=stories.engine.model_name, prompt="Hi", max_tokens=3,
                                              temperature=0)
    assert res.usage.completion_tokens == 3


def test_client_disconnect_while_waiting_for_a_whole_answer_frees_the_sequence(stories):
    body = {"model": stories.engine.model_name, "prompt": "Once upon a time", "max_tokens": 1500,
            "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=stories.url, timeout=0.3) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json=body)
    _wait_idle(stories)


def test_prompt_beyond_the_context_is_a_400_in_openai_shape(stories):
    client = stories.client()
    ctx = stories.engine.context
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=stories.engine.model_name, prompt=[5] * ctx, max_tokens=4)
    assert info.value.status_code == 400
    assert info.value.code == "context_length_exceeded"
    assert str(ctx) in info.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=stories.engine.model_name,
                                       messages=[{"role": "user", "content": "tale " * ctx}], max_tokens=4)


def test_a_prompt_far_beyond_the_context_is_refused_without_tokenizing_it(stories):
    """~3.5 MB of text cannot fit whatever its tokens: a 400 at once, on every generation endpoint.
    Tokenizing it first took seconds (here; the Hugging Face tokenizer of bigger models holds the
    GIL throughout, stalling the daemon's event loop and heartbeats) only for the engine to refuse it."""
    text = "tale " * 700_000
    name = stories.engine.model_name
    requests = [("/v1/completions", {"prompt": text, "max_tokens": 2}),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": text}], "max_tokens": 2}),
                ("/v1/responses", {"input": text, "max_output_tokens": 2}), ("/v1/embeddings", {"input": ["a", text]}),
                # no text at all, but 100,000 messages render to megabytes of template
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": ""},
                                                       {"role": "assistant", "content": ""}] * 50_000})]
    with httpx.Client(base_url=stories.url, timeout=60) as http:
        for path, body in requests:
            started = time.perf_counter()
            err = _error(http.post(path, json=body), 400, "context_length_exceeded")
            assert time.perf_counter() - started < 3, path  # tokenizing it takes ~8 s on this model
            assert f"maximum context length is {stories.engine.context} tokens" in err["message"]
        started = time.perf_counter()
        reply = http.post("/api/generate", json={"model": name, "prompt": text, "raw": True, "stream": False})
        assert reply.status_code == 400 and "context length" in reply.json()["error"]
        assert time.perf_counter() - started < 3
    _wait_idle(stories)


def test_max_tokens_beyond_what_fits_is_a_400(stories):
    client = stories.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=stories.engine.model_name, prompt="Once", max_tokens=stories.engine.context)
    assert info.value.code == "context_length_exceeded"


def test_default_max_tokens_fills_at_most_256(stories):
    with httpx.Client(base_url=stories.url, timeout=60) as http:
        reply = http.post("/v1/completions", json={"prompt": "Once upon a time", "temperature": 0,
                                                   "ignore_eos": True})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 256


# --------------------------------------------------------------------------- chat


def test_chat_completion_with_the_models_template_streamed_and_not(demo):
    client = demo.client(api_key=API_KEY)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]
    res = client.chat.completions.create(model=demo.engine.model_name, messages=messages, max_tokens=20,
                                         temperature=0)
    msg = res.choices[0].message
    assert res.object == "chat.completion" and res.id.startswith("chatcmpl-")
    assert msg.role == "assistant" and isinstance(msg.content, str)
    prompt_ids = demo.engine.tokenizer.encode_chat(messages)
    direct, n = demo.direct(prompt_ids, 20)
    assert msg.content == direct
    assert (res.usage.prompt_tokens, res.usage.completion_tokens) == (len(prompt_ids), n)
    assert res.choices[0].finish_reason in ("stop", "length")

    chunks = list(client.chat.completions.create(model=demo.engine.model_name, messages=messages, max_tokens=20,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == msg.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        res.choices[0].finish_reason]
    assert chunks[-1].usage.total_tokens == res.usage.total_tokens


def test_chat_accepts_text_parts_and_max_completion_tokens(demo):
    client = demo.client(api_key=API_KEY)
    res = client.chat.completions.create(
        model=demo.engine.model_name, temperature=0, max_completion_tokens=5,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "color."}]}])
    same = client.chat.completions.create(model=demo.engine.model_name, temperature=0, max_tokens=5,
                                          messages=[{"role": "user", "content": "Name a color."}])
    assert res.choices[0].message.content == same.choices[0].message.content
    assert res.usage.completion_tokens <= 5


# --------------------------------------------------------------------------- auth and bad input


def test_api_key_is_required_when_set(demo):
    with httpx.Client(base_url=demo.url, timeout=30) as http:
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        _error(http.post("/v1/chat/completions", json=chat), 401, "invalid_api_key")
        _error(http.post("/v1/chat/completions", json=chat, headers={"Authorization": "Bearer wrong"}), 401)
        _error(http.get("/v1/models", headers={"Authorization": API_KEY}), 401)  # no "Bearer"
        _error(http.get("/metrics"), 401)
        _error(http.get("/no/such/route"), 401)  # nothing is revealed without the key
        assert http.get("/health").status_code == 200
        for data in ("/v1/cluster", "/v1/cluster/events", "/v1/history"):  # the dashboard's data needs the key
            _error(http.get(data), 401)
        _error(http.post("/v1/peers/x/drain"), 401)
        page = http.get("/")  # its page does not (it holds no data and asks for the key)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        ok = http.post("/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {API_KEY}"})
        assert ok.status_code == 200, ok.text
    with pytest.raises(openai.AuthenticationError):
        demo.client(api_key="sk-wrong").models.list()


def _key(demo: Served) -> dict:
    return {"Authorization": f"Bearer {API_KEY}"}


@pytest.mark.parametrize("body, param, code", [
    (b"{not json", None, None),
    (b"", None, None),
    (b"[1, 2]", None, None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": NaN}', None, None),
    (b"\xff\xfe", None, None),
    (json.dumps({"messages": "hi"}), "messages", "invalid_type"),
    (json.dumps({}), "messages", "missing_required_parameter"),
    (json.dumps({"messages": []}), "messages", "empty_array"),
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}), "messages[0].role", "invalid_value"),
    (json.dumps({"messages": ["hi"]}), "messages[0]", "invalid_type"),
    (json.dumps({"messages": [{"role": "user", "content": 42}]}), "messages[0].content", "invalid_type"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
     "messages[0].content", "unsupported_value"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "10"}), "max_tokens", "invalid_type"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}), "max_tokens", "invalid_value"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}), "max_tokens", "invalid_value"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**12}), "max_tokens",
     "invalid_value"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2.5}), "max_tokens", "invalid_type"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}), "temperature",
     "invalid_type"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": 7}), "temperature", "invalid_value"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}), "top_p", "invalid_value"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "top_k": -5}), "top_k", "invalid_value"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "seed": -1}), "seed", "invalid_value"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}), "stop",
     "invalid_value"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "stop": 5}), "stop", "invalid_type"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 129}), "n", "invalid_value"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}), "stream", "invalid_type"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True,
                 "stream_options": {"include_usage": "yes"}}), "stream_options.include_usage", "invalid_type"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"}), "model", "model_not_found"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "model": 7}), "model", "invalid_type"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "logprobs": 3}), "logprobs", "invalid_type"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}), "tools[0]",
     "invalid_value"),
])
def test_bad_chat_requests_are_400_in_openai_shape(demo, body, param, code):
    with httpx.Client(base_url=demo.url, timeout=30) as http:
        reply = http.post("/v1/chat/completions", content=body, headers=_key(demo))
    err = _error(reply, 400, code, param)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, param", [
    ({"prompt": 5}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, -3]}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "prompt"),
])
def test_bad_completion_requests_are_400(demo, body, param):
    with httpx.Client(base_url=demo.url, timeout=30) as http:
        _error(http.post("/v1/completions", json=body, headers=_key(demo)), 400, param=param)


@pytest.mark.parametrize("prompt, code", [
    ([1, 2.5], "invalid_type"), ([1, True], "invalid_type"), ([1, None], "invalid_type"), (["a", 1], "invalid_type"),
    (["a", "b"], "unsupported_value"), ([[1], [2]], "unsupported_value"),
])
def test_a_prompt_list_is_a_batch_or_token_ids_and_anything_else_a_type_error(demo, prompt, code):
    """Token ids mixed with other values were told "only one prompt per request is supported"."""
    with httpx.Client(base_url=demo.url, timeout=30) as http:
        _error(http.post("/v1/completions", json={"prompt": prompt}, headers=_key(demo)), 400, code, "prompt")


def test_five_hundred_malformed_requests_never_get_a_5xx(stories):
    """Mutated bodies of both endpoints: each answer is a 200 or a 4xx in OpenAI's shape."""
    rng = random.Random(0)
    values = [None, True, False, 0, -1, 1, 2, 3.5, -1e308, 1e308, 2**64, "", "x", "\u0000", "\ud800", [], [1], ["a"],
              [[1, 2]], {}, {"role": "user"}, {"type": "text"}, [{"role": "user", "content": "hi"}],
              [{"role": "user", "content": [{"type": "text", "text": 5}]}], "Once upon a time"]
    fields = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
              "seed", "stop", "n", "stream", "stream_options", "logprobs", "top_logprobs", "echo", "ignore_eos",
              "tools", "response_format", "logit_bias", "presence_penalty", "frequency_penalty"]
    statuses = []
    with httpx.Client(base_url=stories.url, timeout=60) as http:
        for i in range(500):
            path = "/v1/chat/completions" if i % 2 else "/v1/completions"
            body: dict = {"max_tokens": 2}
            body.update({"messages": [{"role": "user", "content": "hi"}]} if i % 2 else {"prompt": "Once"})
            for _ in range(rng.randint(1, 3)):
                body[rng.choice(fields)] = rng.choice(values)
            raw = json.dumps(body).encode()
            if i % 10 == 0:  # and some broken bytes
                cut = rng.randrange(len(raw))
                raw = raw[:cut] + bytes([rng.randrange(256)]) + raw[cut + 1:]
            if i % 50 == 0:
                raw = b"[" * 100_000 + b"]" * 100_000
            reply = http.post(path, content=raw)
            statuses.append(reply.status_code)
            if reply.status_code != 200:
                _error(reply, reply.status_code)
                assert 400 <= reply.status_code < 500, reply.text
    assert statuses.count(200) > 20 and statuses.count(400) > 200
    assert stories.client().completions.create(model=stories.engine.model_name, prompt="Once", max_tokens=2,
                                               temperature=0).usage.completion_tokens == 2


def test_oversized_bodies_are_413(demo):
    big = json.dumps({"prompt": "x" * (5 << 20)}).encode()
    with httpx.Client(base_url=demo.url, timeout=60) as http:
        _error(http.post("/v1/completions", content=big, headers=_key(demo)), 413, "request_too_large")

        def chunked():  # no Content-Length: the limit applies to the bytes as they arrive
            for i in range(0, len(big), 1 << 16):
                yield big[i: i + (1 << 16)]

        _error(http.post("/v1/completions", content=chunked(), headers=_key(demo)), 413, "request_too_large")
        assert http.get("/v1/models", headers=_key(demo)).status_code == 200  # still serving


def test_a_body_that_trickles_in_is_a_408_and_frees_its_connection(demo, monkeypatch):
    import p2pllm.gateway.app as gateway_app
    monkeypatch.setattr(gateway_app, "BODY_TIMEOUT_SECONDS", 1.0)
    started = time.monotonic()

    def trickle():  # a byte every 0.3 s, forever: a client (or an attacker) that never finishes
        yield b'{"prompt": "'
        while time.monotonic() - started < 30:
            time.sleep(0.3)
            yield b"x"

    with httpx.Client(base_url=demo.url, timeout=60) as http:
        err = _error(http.post("/v1/completions", content=trickle(), headers=_key(demo)), 408, "request_timeout")
        assert "did not arrive within 1 s" in err["message"], err
        assert time.monotonic() - started < 10
        assert http.get("/v1/models", headers=_key(demo)).status_code == 200  # still serving


def test_unknown_routes_and_methods_answer_in_openai_shape(stories):
    with httpx.Client(base_url=stories.url, timeout=30) as http:
        err = _error(http.get("/v1/images/generations"), 404)
        assert "/v1/images/generations" in err["message"]
        _error(http.get("/v1/chat/completions"), 405)
        _error(http.delete("/v1/models"), 405)
        _error(http.get("/v1/models/some-other-model"), 404, "model_not_found")
        card = http.get(f"/v1/models/{stories.engine.model_name}").json()
        assert card["id"] == stories.engine.model_name and card["object"] == "model"


def test_request_ids_are_echoed_when_sane_and_made_otherwise(stories):
    with httpx.Client(base_url=stories.url, timeout=30) as http:
        assert http.get("/health", headers={"X-Request-Id": "abc-123"}).headers["x-request-id"] == "abc-123"
        made = http.get("/health", headers={"X-Request-Id": "bad id\twith spaces"}).headers["x-request-id"]
        assert made != "bad id\twith spaces" and re.fullmatch(r"req-[0-9a-f]{32}", made)
        assert http.get("/nowhere").headers["x-request-id"]


def test_health_reports_an_engine_that_cannot_serve(stories):
    with httpx.Client(base_url=stories.url, timeout=30) as http:
        ok = http.get("/health")
        assert ok.status_code == 200 and ok.json()["status"] == "ok"
        stories.engine.ready = False
        try:
            down = http.get("/health")
            assert down.status_code == 503 and down.json()["status"] == "unavailable"
            _error(http.post("/v1/completions", json={"prompt": "Once", "max_tokens": 2}), 503)
        finally:
            stories.engine.ready = True


def test_metrics_count_requests_tokens_and_latencies(stories):
    client = stories.client()
    client.completions.create(model=stories.engine.model_name, prompt="Once upon a time", max_tokens=5,
                              temperature=0)
    with httpx.Client(base_url=stories.url, timeout=30) as http:
        http.get("/definitely-not-here")
        text = http.get("/metrics").text

    def value(pattern: str) -> float:
        match = re.search("^" + pattern + r" ([0-9.e+]+)$", text, re.M)
        assert match, (pattern, text)
        return float(match.group(1))

    assert value(r'p2pllm_gateway_requests_total\{endpoint="/v1/completions",status="200"\}') >= 1
    assert value(r'p2pllm_gateway_requests_total\{endpoint="other",status="404"\}') >= 1
    assert value("p2pllm_gateway_prompt_tokens_total") >= 5
    assert value("p2pllm_gateway_completion_tokens_total") >= 5
    assert value("p2pllm_gateway_time_to_first_token_seconds_count") >= 1
    assert value("p2pllm_gateway_inter_token_latency_seconds_count") >= 4
    assert value("p2pllm_engine_running_requests") == 0
    assert value("p2pllm_engine_queued_requests") == 0
    assert value("p2pllm_engine_stages") == 1
    # counts are counters (rate() and Grafana expect NAME_total of TYPE counter); levels are gauges
    assert value("p2pllm_engine_tokens_generated_total") >= 5
    assert "# TYPE p2pllm_engine_tokens_generated_total counter" in text
    assert "# TYPE p2pllm_engine_stages gauge" in text


def test_a_client_that_leaves_mid_upload_is_a_499_not_a_logged_500(stories, caplog):
    """Each such request was logged as ERROR with a traceback and counted as a 500."""
    def count(status: str) -> float:
        text = httpx.get(f"{stories.url}/metrics", timeout=30).text
        match = re.search(r'^p2pllm_gateway_requests_total\{endpoint="/v1/completions",status="%s"\} ([0-9.e+]+)$'
                          % status, text, re.M)
        return float(match.group(1)) if match else 0.0

    before_499, before_500 = count("499"), count("500")
    with caplog.at_level(logging.INFO, logger="p2pllm"):
        for i in range(3):
            with socket.create_connection(("127.0.0.1", stories.server.port), timeout=10) as s:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 1000\r\n\r\n{\"prompt\": \"Once")
            deadline = time.monotonic() + 10
            while count("499") < before_499 + i + 1 and time.monotonic() < deadline:
                time.sleep(0.05)
        assert count("499") == before_499 + 3 and count("500") == before_500
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


# --------------------------------------------------------------------------- server


def test_keep_alive_requests_do_not_wait_for_delayed_acks(stories):
    """Small responses on a kept-alive connection come back at once (TCP_NODELAY on accepted
    sockets), not ~40 ms later."""
    with httpx.Client(base_url=stories.url, timeout=30) as http:
        http.get("/health")
        times = []
        for _ in range(11):
            t0 = time.perf_counter()
            assert http.get("/health").status_code == 200
            times.append(time.perf_counter() - t0)
    assert sorted(times)[5] < 0.03, times


def test_a_port_in_use_is_one_clear_error(stories, loop):
    port = stories.server.port
    with pytest.raises(P2PError, match=f"cannot bind the gateway to 127.0.0.1:{port}: address already in use"):
        _serve_on = serve_gateway(create_app(stories.engine), "127.0.0.1", port)
        loop.run(_serve_on)


# --------------------------------------------------------------------------- p2pllm chat


def _chat_wired() -> bool:
    from p2pllm.cli import build_parser

    try:
        build_parser().parse_args(["chat", "--prompt", "x"])
    except SystemExit:
        return False
    return True


def _run_chat(*args: str, input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    full_env.pop("P2PLLM_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "p2pllm", "chat", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env=full_env, input=input)


def _host(served) -> str:
    return f"127.0.0.1:{served.server.port}"


def _chat_args(**kw) -> argparse.Namespace:
    base = dict(host="127.0.0.1:8700", prompt=None, max_tokens=None, temperature=0.0, api_key=None, system=None,
                seed=None, timeout=60.0)
    base.update(kw)
    return argparse.Namespace(**base)


def test_chat_prompt_prints_one_answer(demo, capsys):
    direct, _ = demo.direct(demo.engine.tokenizer.encode_chat([{"role": "user", "content": "Say hi."}]), 16)
    if _chat_wired():
        proc = _run_chat("--host", _host(demo), "--prompt", "Say hi.", "--max-tokens", "16", "--temperature", "0",
                         env={"P2PLLM_API_KEY": API_KEY})
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == direct + "\n"
    else:
        from p2pllm.gateway.chat_cli import cmd_chat

        assert cmd_chat(_chat_args(host=_host(demo), prompt="Say hi.", max_tokens=16, api_key=API_KEY)) == 0
        assert capsys.readouterr().out == direct + "\n"


def test_chat_conversation_keeps_history_and_resets(demo):
    from p2pllm.gateway.chat_cli import ChatClient

    client = ChatClient(_host(demo), api_key=API_KEY, max_tokens=8, temperature=0.0)
    try:
        client.connect()
        first = "".join(client.ask("Name a color."))
        second = "".join(client.ask("Another one."))
        assert [m["role"] for m in client.history] == ["user", "assistant", "user", "assistant"]
        expected, _ = demo.direct(demo.engine.tokenizer.encode_chat(client.history[:3]), 8)
        assert second == expected and client.history[1]["content"] == first
        client.reset()
        assert client.history == []
    finally:
        client.close()


def test_chat_repl_reads_turns_until_exit(demo, monkeypatch, capsys):
    script = "Name a color.\n/reset\n\nName a color.\n/exit\nnot asked\n"
    if _chat_wired():
        proc = _run_chat("--host", _host(demo), "--max-tokens", "8", "--temperature", "0", "--api-key", API_KEY,
                         input=script)
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
    else:
        from p2pllm.gateway.chat_cli import cmd_chat

        monkeypatch.setattr(sys, "stdin", io.StringIO(script))
        assert cmd_chat(_chat_args(host=_host(demo), max_tokens=8, api_key=API_KEY)) == 0
        out = capsys.readouterr().out
    answers = out.splitlines()
    assert len(answers) == 2 and answers[0] == answers[1]  # /reset: the second turn starts afresh


def test_chat_repl_skips_a_line_that_is_not_utf8(demo):
    """Such a line ended the conversation with "internal error: UnicodeEncodeError"."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("P2PLLM_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "p2pllm", "chat", "--host", _host(demo), "--max-tokens", "8",
                           "--temperature", "0", "--api-key", API_KEY],
                          input=b"\xff\xfe caf\xe9\nName a color.\n/exit\n", capture_output=True, timeout=120,
                          cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    assert b"(that line is not valid UTF-8; nothing was sent)" in proc.stderr
    assert len(proc.stdout.decode().splitlines()) == 1  # the next line was answered


def test_stopping_an_answer_closes_its_stream_and_keeps_what_came(stories):
    from p2pllm.gateway.chat_cli import ChatClient

    client = ChatClient(_host(stories), max_tokens=1500, temperature=0.0)
    try:
        client.connect()
        answer = client.ask("Tell me a long story.")
        pieces = [next(answer) for _ in range(3)]
        answer.close()  # what Ctrl-C does in the REPL
        assert client.history[-1] == {"role": "assistant", "content": "".join(pieces)}
        _wait_idle(stories)
    finally:
        client.close()


def test_chat_without_a_gateway_is_one_line_exit_1():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        host = f"127.0.0.1:{s.getsockname()[1]}"
    if _chat_wired():
        proc = _run_chat("--host", host, "--prompt", "hi")
        assert proc.returncode == 1
        assert proc.stderr.strip() == f"p2pllm: error: no gateway at {host} (connection refused)"
    else:
        from p2pllm.gateway.chat_cli import cmd_chat

        with pytest.raises(P2PError, match=re.escape(f"no gateway at {host} (connection refused)")):
            cmd_chat(_chat_args(host=host, prompt="hi"))


def test_chat_gives_up_on_a_port_that_accepts_and_never_answers():
    """It waited for the answer timeout (600 s) before its first word."""
    with socket.socket() as silent:  # the kernel completes the handshake; nobody ever reads or writes
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        host = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        proc = _run_chat("--host", host, "--prompt", "hi")
        took = time.monotonic() - started
    assert proc.returncode == 1 and took < 60, (took, proc.stderr)
    assert proc.stderr.strip() == f"p2pllm: error: the gateway at {host} did not answer in time (ReadTimeout)"


def test_chat_reports_the_gateways_error_message(demo):
    if _chat_wired():
        proc = _run_chat("--host", _host(demo), "--prompt", "hi", env={"P2PLLM_API_KEY": "sk-wrong"})
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Incorrect or missing API key" in lines[0] and "401" in lines[0]
    else:
        from p2pllm.gateway.chat_cli import cmd_chat

        with pytest.raises(P2PError, match="Incorrect or missing API key"):
            cmd_chat(_chat_args(host=_host(demo), prompt="hi", api_key="sk-wrong"))
