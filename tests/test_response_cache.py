"""The gateway's response cache over real HTTP, in front of the real in-process engine (stories260K).

A hit must be the stored answer (fresh id, same content and usage), streamed or not, and must
not reach the engine: the proof is an engine that refuses every request (its own "unavailable"
state, as between plans) while the cached answer is still served. Only deterministic requests are
cached; every parameter that changes the answer is in the key; TTL, entry and byte bounds evict;
semantic mode matches a near-identical last user message in the same scope only. The CLI's
flags are checked as a user types them, and once through a real `p2pllm join`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from conftest import REPO, LoopThread, assert_one_line_error, run_cli, stop_daemon
from p2pllm.gateway.app import create_app
from p2pllm.gateway.response_cache import CacheSettings
from p2pllm.gateway.server import serve_gateway
from p2pllm.runtime.local import build_local_engine

STORIES = Path(__file__).resolve().parents[2] / "shared/models/stories260K.gguf"
JOIN_PORTS = (7803, 8803)  # grpc, gateway of the one `p2pllm join` below


@pytest.fixture(scope="module")
def engine(loop):
    if not STORIES.exists():
        pytest.skip(f"{STORIES} is absent (the shared test models live beside the checkout)")
    engine = loop.run(build_local_engine(str(STORIES)))
    yield engine
    loop.run(engine.stop())


class Gateway:
    """A gateway with its own response cache over the shared engine."""

    def __init__(self, loop: LoopThread, engine, settings: CacheSettings | None):
        self.loop, self.engine = loop, engine
        self.server = loop.run(serve_gateway(create_app(engine, response_cache=settings), "127.0.0.1", 0))
        self.url = self.server.url
        self.http = httpx.Client(base_url=self.url, timeout=120)

    def post(self, body: dict, chat: bool = False) -> httpx.Response:
        r = self.http.post("/v1/chat/completions" if chat else "/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r

    def cache(self, body: dict, chat: bool = False) -> str | None:
        """The x-p2pllm-cache header of the answer to `body`."""
        return self.post(body, chat).headers.get("x-p2pllm-cache")

    def metric(self, name: str, labels: str = "", text: str | None = None) -> float:
        """One value of /metrics (of `text`, one scrape already read, when given)."""
        text = self.http.get("/metrics").text if text is None else text
        m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
        assert m, f"{name}{labels} not in /metrics"
        return float(m.group(1))

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def close(self) -> None:
        self.http.close()
        self.loop.run(self.server.stop())


@pytest.fixture
def gateway(loop, engine):
    """gateway(settings) -> a Gateway, stopped after the test."""
    made = []

    def make(settings: CacheSettings | None | str = "default") -> Gateway:
        made.append(Gateway(loop, engine, CacheSettings() if settings == "default" else settings))
        return made[-1]

    yield make
    for g in made:
        g.close()


@contextmanager
def engine_refusing(engine):
    """The engine's own 503 state (no plan, draining): any request that reaches it fails."""
    engine.unavailable = "paused by the test: only the response cache may answer"
    try:
        yield
    finally:
        engine.unavailable = None


def _without_id(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in ("id", "created")}


def _same_answer(a: dict, b: dict) -> None:
    """Equal but for id and created; and the id is fresh."""
    assert a["id"] != b["id"]
    assert _without_id(a) == _without_id(b)


COMPLETION = {"model": "stories260K.gguf", "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}
CHAT = {"model": "stories260K.gguf", "messages": [{"role": "system", "content": "You tell stories."},
                                                  {"role": "user", "content": "Tell me about a cat."}],
        "max_tokens": 16, "temperature": 0}


# --------------------------------------------------------------------------- exact hits


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_a_repeated_greedy_request_is_a_hit_with_the_same_answer_and_never_reaches_the_engine(gateway, chat):
    g = gateway()
    body = CHAT if chat else COMPLETION
    first = g.post(body, chat)
    assert first.headers["x-p2pllm-cache"] == "miss"
    tokens = g.metric("p2pllm_gateway_completion_tokens_total")
    assert tokens == first.json()["usage"]["completion_tokens"] > 0
    with engine_refusing(g.engine):
        assert g.http.post("/v1/completions", json={**COMPLETION, "prompt": "Never asked"}).status_code == 503
        second = g.post(body, chat)
    assert second.headers["x-p2pllm-cache"] == "hit"
    _same_answer(first.json(), second.json())
    assert second.json()["id"].startswith("chatcmpl-" if chat else "cmpl-")
    assert g.metric("p2pllm_gateway_completion_tokens_total") == tokens  # nothing generated for the hit


def test_fields_that_do_not_change_the_answer_share_an_entry(gateway):
    g = gateway()
    assert g.cache(COMPLETION) == "miss"
    for same in ({"temperature": 0.0}, {"user": "someone"}, {"metadata": {"a": "b"}}, {"seed": None},
                 {"stream": False}, {"model": None}):
        assert g.cache({**COMPLETION, **same}) == "hit", same


@pytest.mark.parametrize("change", [
    {"prompt": "Once upon a time, a"}, {"max_tokens": 23}, {"top_k": 5}, {"top_p": 0.5}, {"seed": 1},
    {"stop": ["."]}, {"presence_penalty": 0.5}, {"frequency_penalty": 0.5}, {"logit_bias": {"13": -100}},
    {"n": 2}, {"logprobs": 2}, {"ignore_eos": True}, {"response_format": {"type": "json_object"}},
], ids=lambda change: next(iter(change)))
def test_any_parameter_that_changes_the_answer_is_a_miss(gateway, change):
    g = gateway()
    assert g.cache(COMPLETION) == "miss"
    changed = g.post({**COMPLETION, **change})
    assert changed.headers["x-p2pllm-cache"] == "miss"
    assert g.cache({**COMPLETION, **change}) == "hit"  # and it has an entry of its own
    _same_answer(changed.json(), g.post({**COMPLETION, **change}).json())


def test_chat_and_completions_of_the_same_text_are_different_entries(gateway):
    g = gateway()
    assert g.cache(COMPLETION) == "miss"
    chat = {**CHAT, "messages": [{"role": "user", "content": COMPLETION["prompt"]}], "max_tokens": 24}
    assert g.cache(chat, chat=True) == "miss"


def test_sampled_requests_are_never_cached_but_seeded_ones_are(gateway):
    g = gateway()
    sampled = {**COMPLETION, "temperature": 0.8}
    assert [g.cache(sampled) for _ in range(2)] == ["bypass", "bypass"]
    assert [g.cache({**COMPLETION, "temperature": 1.0}) for _ in range(2)] == ["bypass", "bypass"]
    no_temperature = {k: v for k, v in COMPLETION.items() if k != "temperature"}  # OpenAI's default: 1
    assert g.cache(no_temperature) == "bypass"
    seeded = {**sampled, "seed": 42}
    first, second = g.post(seeded), g.post(seeded)
    assert (first.headers["x-p2pllm-cache"], second.headers["x-p2pllm-cache"]) == ("miss", "hit")
    _same_answer(first.json(), second.json())
    assert g.metric("p2pllm_gateway_response_cache_bypassed_total") == 5


def test_without_a_cache_there_is_no_header(gateway):
    g = gateway(None)
    assert [g.cache(COMPLETION) for _ in range(2)] == [None, None]


def test_n_choices_and_logprobs_replay_exactly(gateway):
    g = gateway()
    body = {**CHAT, "n": 3, "seed": 7, "temperature": 0.9, "logprobs": True, "top_logprobs": 2}
    first = g.post(body, chat=True)
    with engine_refusing(g.engine):
        second = g.post(body, chat=True)
    assert second.headers["x-p2pllm-cache"] == "hit"
    _same_answer(first.json(), second.json())
    assert len(second.json()["choices"]) == 3 and second.json()["choices"][0]["logprobs"]["content"]


# --------------------------------------------------------------------------- streams


def _sse(r: httpx.Response) -> list:
    events = [line[len("data: "):] for line in r.text.split("\n\n") if line]
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def test_a_streamed_hit_replays_the_same_chunks_as_the_streamed_original(gateway):
    g = gateway()
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    first = g.post(body, chat=True)
    assert first.headers["x-p2pllm-cache"] == "miss"
    assert first.headers["content-type"].startswith("text/event-stream")
    with engine_refusing(g.engine):
        second = g.post(body, chat=True)
    assert second.headers["x-p2pllm-cache"] == "hit"
    assert second.headers["content-type"].startswith("text/event-stream")
    a, b = _sse(first), _sse(second)
    assert len({c["id"] for c in b}) == 1 and b[0]["id"] != a[0]["id"]
    # chunk by chunk: the role delta, each token's piece, the finish, the usage
    assert list(map(_without_id, a)) == list(map(_without_id, b))


def test_a_whole_answer_is_replayed_as_a_stream_the_openai_client_reads(gateway):
    g = gateway()
    client = g.client()
    whole = client.chat.completions.create(**CHAT)  # not streamed: stored, and replayed either way
    with engine_refusing(g.engine):
        raw = client.chat.completions.with_raw_response.create(**CHAT, stream=True,
                                                                 stream_options={"include_usage": True})
        assert raw.headers["x-p2pllm-cache"] == "hit"
        chunks = list(raw.parse())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_an_answer_the_client_abandoned_is_not_stored(gateway):
    g = gateway()
    body = {**COMPLETION, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with g.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.headers["x-p2pllm-cache"] == "miss"
        lines = r.iter_lines()
        next(lines)
    # the engine was told to stop: the entry would only exist if the answer had ended
    deadline = time.monotonic() + 10
    while _busy(g) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert g.metric("p2pllm_gateway_response_cache_entries") == 0
    assert [g.cache({**body, "stream": False}) for _ in range(2)] == ["miss", "hit"]


def _busy(g: Gateway) -> bool:
    async def stats():
        return g.engine.stats()

    return bool(g.loop.run(stats()).extra.get("active_sequences"))


# --------------------------------------------------------------------------- bounds


def test_an_answer_expires_after_its_ttl(gateway):
    g = gateway(CacheSettings(ttl=0.5))
    assert [g.cache(COMPLETION) for _ in range(2)] == ["miss", "hit"]
    time.sleep(0.6)
    scrape = g.http.get("/metrics").text  # one scrape: the entries gauge and the evictions agree in it
    assert g.metric("p2pllm_gateway_response_cache_entries", text=scrape) == 0
    assert g.metric("p2pllm_gateway_response_cache_evictions_total", '{reason="expired"}', text=scrape) == 1
    assert [g.cache(COMPLETION) for _ in range(2)] == ["miss", "hit"]  # stored again


def test_the_entry_bound_evicts_the_least_recently_used(gateway):
    g = gateway(CacheSettings(max_entries=2))
    a, b, c = ({**COMPLETION, "prompt": p} for p in ("The dog", "The cat", "The bird"))
    assert [g.cache(a), g.cache(b), g.cache(a)] == ["miss", "miss", "hit"]  # a is now the most recent
    assert g.cache(c) == "miss"  # evicts b
    assert g.metric("p2pllm_gateway_response_cache_evictions_total", '{reason="lru"}') == 1
    assert [g.cache(a), g.cache(c), g.cache(b)] == ["hit", "hit", "miss"]
    assert g.metric("p2pllm_gateway_response_cache_entries") == 2


def test_the_byte_bound_evicts_and_an_answer_larger_than_it_is_not_kept(gateway):
    short = [{**COMPLETION, "prompt": p, "max_tokens": 12, "ignore_eos": True} for p in ("The dog", "The cat",
                                                                                        "The bird")]
    measure = gateway()
    measure.post(short[0])
    one = measure.metric("p2pllm_gateway_response_cache_bytes")
    assert one > 12 * 64  # each of the 12 tokens is counted
    g = gateway(CacheSettings(max_bytes=int(2.5 * one)))  # two such answers fit, three do not
    assert [g.cache(b) for b in short] == ["miss"] * 3
    assert 0 < g.metric("p2pllm_gateway_response_cache_bytes") <= 2.5 * one
    assert g.metric("p2pllm_gateway_response_cache_entries") == 2
    assert g.metric("p2pllm_gateway_response_cache_evictions_total", '{reason="lru"}') == 1
    assert g.cache(short[-1]) == "hit" and g.cache(short[0]) == "miss"
    long = {**COMPLETION, "max_tokens": 48, "ignore_eos": True}  # four times one: never fits
    assert [g.cache(long) for _ in range(2)] == ["miss", "miss"]


def test_metrics_count_hits_misses_and_entries(gateway):
    g = gateway()
    for body in (COMPLETION, COMPLETION, COMPLETION, {**COMPLETION, "max_tokens": 5}):
        g.post(body)
    assert g.metric("p2pllm_gateway_response_cache_hits_total", '{kind="exact"}') == 2
    assert g.metric("p2pllm_gateway_response_cache_hits_total", '{kind="semantic"}') == 0
    assert g.metric("p2pllm_gateway_response_cache_misses_total") == 2
    assert g.metric("p2pllm_gateway_response_cache_entries") == 2
    assert g.metric("p2pllm_gateway_response_cache_bytes") > 0


# --------------------------------------------------------------------------- semantic


def _ask(g: Gateway, text: str, system: str = "You tell stories.", **extra) -> httpx.Response:
    return g.post({**CHAT, "messages": [{"role": "system", "content": system}, {"role": "user", "content": text}],
                   **extra}, chat=True)


def test_semantic_mode_serves_a_near_identical_question_in_the_same_scope_only(gateway):
    g = gateway(CacheSettings(semantic=0.9))
    first = _ask(g, "What is the capital of France?")
    assert first.headers["x-p2pllm-cache"] == "miss"
    near = _ask(g, "What is the capital of France ?")
    assert near.headers["x-p2pllm-cache"] == "hit"
    assert float(near.headers["x-p2pllm-cache-similarity"]) >= 0.9
    _same_answer(first.json(), near.json())
    assert g.metric("p2pllm_gateway_response_cache_hits_total", '{kind="semantic"}') == 1
    # unrelated text; the same text under another system prompt, another parameter or as a completion
    assert _ask(g, "Once upon a time, there was a little girl.").headers["x-p2pllm-cache"] == "miss"
    assert _ask(g, "What is the capital of France ?", system="Be brief.").headers["x-p2pllm-cache"] == "miss"
    assert _ask(g, "What is the capital of France ?", max_tokens=15).headers["x-p2pllm-cache"] == "miss"
    assert g.cache({**COMPLETION, "prompt": "What is the capital of France ?"}) == "miss"
    assert g.metric("p2pllm_gateway_response_cache_hits_total", '{kind="semantic"}') == 1


def test_a_request_the_engine_refuses_is_not_embedded_first_nor_counted_as_a_miss(gateway, engine, loop):
    g = gateway(CacheSettings(semantic=0.9))
    embedded = []
    real = engine.embed

    async def counting(inputs, request_id="embed"):  # the engine's own embed, counted
        embedded.append(request_id)
        return await real(inputs, request_id)

    engine.embed = counting
    try:
        _ask(g, "What is the capital of France?")
        assert len(embedded) == 1 and g.metric("p2pllm_gateway_response_cache_misses_total") == 1
        too_long = g.http.post("/v1/chat/completions", json={
            **CHAT, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": engine.context})  # prompt + max_tokens beyond the context
        assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
        assert len(embedded) == 1  # refused at once, not after embedding its text
        assert g.metric("p2pllm_gateway_response_cache_misses_total") == 1
        sampled = g.http.post("/v1/chat/completions", json={**CHAT, "temperature": 1, "max_tokens": engine.context})
        assert sampled.status_code == 400 and g.metric("p2pllm_gateway_response_cache_bypassed_total") == 0
    finally:
        engine.embed = real


def test_a_client_that_leaves_during_the_semantic_lookup_cancels_it(gateway, engine, loop):
    g = gateway(CacheSettings(semantic=0.9))
    cancelled = []
    real = engine.embed

    async def slow(inputs, request_id="embed"):  # a long text's embedding: slow on a big model
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(request_id)
            raise
        return await real(inputs, request_id)

    engine.embed = slow
    try:
        with pytest.raises(httpx.ReadTimeout):
            g.http.post("/v1/chat/completions", json=CHAT, timeout=1.0)
        deadline = time.monotonic() + 10
        while not cancelled and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cancelled, "the lookup went on after its client left"
    finally:
        engine.embed = real


def test_semantic_mode_is_off_by_default_and_its_threshold_is_strict(gateway):
    exact = gateway()
    assert _ask(exact, "What is the capital of France?").headers["x-p2pllm-cache"] == "miss"
    assert _ask(exact, "What is the capital of France ?").headers["x-p2pllm-cache"] == "miss"
    strict = gateway(CacheSettings(semantic=0.9999))
    assert _ask(strict, "What is the capital of France?").headers["x-p2pllm-cache"] == "miss"
    assert _ask(strict, "What is the capital of France ?").headers["x-p2pllm-cache"] == "miss"


def test_semantic_mode_on_completions_compares_the_prompt(gateway):
    g = gateway(CacheSettings(semantic=0.9))
    assert g.cache({**COMPLETION, "prompt": "Once upon a time there was a little girl."}) == "miss"
    assert g.cache({**COMPLETION, "prompt": "Once upon a time, there was a little girl."}) == "hit"
    assert g.cache({**COMPLETION, "prompt": "What is the capital of France?"}) == "miss"


# --------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("flags, message", [
    (["--response-cache", "lots"], "argument --response-cache: expected a number of answers or 'off', got 'lots'"),
    (["--response-cache-memory", "12parsecs"], "argument --response-cache-memory: bad size '12parsecs'"),
    (["--response-cache-ttl", "0"], "argument --response-cache-ttl: must be a positive number of seconds, got 0"),
    (["--semantic-cache", "1.5"], "argument --semantic-cache: must be greater than 0 and at most 1, got 1.5"),
])
def test_bad_cache_flags_are_one_argparse_line(flags, message):
    proc = run_cli("join", "--model", STORIES, *flags, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"p2pllm join: error: {message}"), proc.stderr


def test_semantic_cache_without_the_response_cache_is_one_line():
    proc = run_cli("join", "--model", STORIES, "--response-cache", "off", "--semantic-cache", timeout=60)
    assert_one_line_error(proc, 2, "--semantic-cache needs the response cache")


def test_join_flags_reach_the_gateway(tmp_path):
    """A real `p2pllm join` with a bare --semantic-cache (0.95), a 1-entry cache and a short TTL."""
    if not STORIES.exists():
        pytest.skip(f"{STORIES} is absent (the shared test models live beside the checkout)")
    grpc_port, gw = JOIN_PORTS
    log = open(tmp_path / "peer.log", "w")
    env = dict(os.environ, PYTHONUNBUFFERED="1", HOME=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "p2pllm", "join", "--model", str(STORIES), "--name", "cached",
                             "--port", str(grpc_port), "--gateway-port", str(gw), "--interface", "127.0.0.1",
                             "--no-mdns", "--insecure", "--cluster", "response-cache-test", "--response-cache", "1",
                             "--response-cache-ttl", "2", "--semantic-cache"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
    try:
        http = httpx.Client(base_url=f"http://127.0.0.1:{gw}", timeout=60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "peer.log").read_text()[-3000:]
            try:
                if http.get("/health", timeout=2).json().get("stages"):
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.3)
        else:
            pytest.fail("the peer never became ready:\n" + (tmp_path / "peer.log").read_text()[-3000:])

        def cache(text: str) -> tuple[str, str | None]:
            r = http.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": text}]})
            assert r.status_code == 200, r.text
            return r.headers["x-p2pllm-cache"], r.headers.get("x-p2pllm-cache-similarity")

        assert cache("What is the capital of France?") == ("miss", None)
        assert cache("What is the capital of France?") == ("hit", None)
        kind, similarity = cache("What is the capital of France ?")  # 0.998 with this model: above 0.95
        assert kind == "hit" and float(similarity) >= 0.95
        assert cache("Once upon a time, there was a little girl.")[0] == "miss"  # evicts the first (1 entry)
        assert cache("What is the capital of France?")[0] == "miss"
        time.sleep(2.2)
        assert cache("What is the capital of France?")[0] == "miss"  # expired
        assert "p2pllm_gateway_response_cache_misses_total 4.0" in http.get("/metrics").text
    finally:
        stop_daemon(proc)
        log.close()
