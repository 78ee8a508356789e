"""Ollama's API (/api/*) on the gateway's port, over real HTTP against the real in-process engine.

The client is the official `ollama` package, as Ollama tools use it; the reference is the same
gateway's /v1 endpoints through the official `openai` package: a greedy request must give the same
text and the same token counts on both. Raw httpx covers the wire (NDJSON, error shapes).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading

import httpx
import openai
import pytest
from pydantic import BaseModel

ollama = pytest.importorskip("ollama", reason="the ollama client is in the test extra (pip install 'ollama>=0.4')")

from conftest import shared_model  # noqa: E402
from p2pllm import __version__  # noqa: E402
from p2pllm.gateway.app import create_app  # noqa: E402
from p2pllm.gateway.ollama import parse_chat, parse_generate  # noqa: E402
from p2pllm.gateway.server import serve_gateway  # noqa: E402
from p2pllm.runtime.local import build_local_engine  # noqa: E402

API_KEY = "sk-ollama-test-42"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
N = 12  # tokens per greedy answer: enough to compare, cheap on a CPU


class Served:
    def __init__(self):
        path = shared_model("SmolLM2-135M-Instruct.Q4_1.gguf")  # skips when the shared models are absent
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="gateway-loop", daemon=True)
        self.thread.start()
        self.engine = self.run(build_local_engine(str(path)))
        self.server = self.run(serve_gateway(create_app(self.engine, api_key=API_KEY), "127.0.0.1", 0))
        self.url = self.server.url
        self.name = self.engine.model_name

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.run(self.server.stop())
        self.run(self.engine.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def ollama(self, **kw) -> ollama.Client:
        return ollama.Client(host=self.url, headers=kw.pop("headers", AUTH), timeout=60, **kw)

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)

    def http(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=kw.pop("headers", AUTH), timeout=60, **kw)


@pytest.fixture(scope="module")
def smol():
    served = Served()
    yield served
    served.close()


def _greedy(**extra) -> dict:
    return {"temperature": 0, "num_predict": N, **extra}


def _ollama_error(reply: httpx.Response, status: int, needle: str = "") -> str:
    """Ollama's error shape: exactly {"error": "message"}."""
    assert reply.status_code == status, (reply.status_code, reply.text)
    body = reply.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    assert needle.lower() in body["error"].lower(), (needle, body["error"])
    return body["error"]


# --------------------------------------------------------------------------- the model


def test_version_tags_ps_and_show_describe_the_served_model(smol):
    client = smol.ollama()
    models = client.list().models
    assert [m.model for m in models] == [smol.name]
    details = models[0].details
    assert (details.format, details.family, details.quantization_level) == ("gguf", "llama", "Q4_1")
    assert re.fullmatch(r"13\d(\.\d\d)?M", details.parameter_size), details.parameter_size
    assert models[0].size > 50_000_000 and re.fullmatch(r"[0-9a-f]{64}", models[0].digest)
    with smol.http() as http:
        raw = http.get("/api/tags").json()["models"][0]
        assert raw["name"] == raw["model"] == smol.name
        assert http.get("/api/version").json() == {"version": __version__}
    for name in (smol.name, smol.name + ":latest"):
        shown = client.show(name)
        assert shown.details == details and shown.capabilities == ["completion"]
        assert shown.modelinfo["general.architecture"] == "llama"
        assert shown.modelinfo["llama.context_length"] == 8192
        assert "<|im_start|>" in shown.template
    running = client.ps().models
    assert [m.model for m in running] == [smol.name] and running[0].context_length == smol.engine.context
    with pytest.raises(ollama.ResponseError) as e:
        client.show("llama3.2")
    assert e.value.status_code == 404 and "llama3.2" in e.value.error


# --------------------------------------------------------------------------- answers equal /v1's


def test_chat_equals_openai_chat_streamed_and_not(smol):
    client = smol.ollama()
    reference = smol.openai().chat.completions.create(model=smol.name, messages=QUESTION, temperature=0,
                                                      max_tokens=N)
    text = reference.choices[0].message.content
    assert text

    whole = client.chat(model=smol.name, messages=QUESTION, options=_greedy(), stream=False)
    assert whole.message.role == "assistant" and whole.message.content == text
    assert whole.done and whole.done_reason == reference.choices[0].finish_reason == "length"
    assert whole.prompt_eval_count == reference.usage.prompt_tokens
    assert whole.eval_count == reference.usage.completion_tokens == N
    durations = (whole.load_duration, whole.prompt_eval_duration, whole.eval_duration)
    assert all(isinstance(d, int) and d >= 0 for d in durations) and whole.prompt_eval_duration > 0
    assert abs(whole.total_duration - sum(durations)) <= 3  # nanoseconds, each rounded down

    # streamed, named with Ollama's default tag, options that never change the text given
    parts = list(client.chat(model=smol.name + ":latest", messages=QUESTION, stream=True, keep_alive="5m",
                             options=_greedy(num_thread=2, use_mmap=True, num_gpu=0, repeat_penalty=1.0,
                                             repeat_last_n=64, num_keep=4)))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == text
    assert {p.model for p in parts} == {smol.name + ":latest"}
    last = parts[-1]
    assert (last.done_reason, last.eval_count, last.prompt_eval_count) == ("length", N, whole.prompt_eval_count)


def test_generate_equals_openai_chat_and_raw_equals_completions(smol):
    client, oai = smol.ollama(), smol.openai()
    system = "You are a geography teacher."
    reference = oai.chat.completions.create(model=smol.name, temperature=0, max_tokens=N, messages=[
        {"role": "system", "content": system}, *QUESTION])
    whole = client.generate(model=smol.name, prompt=QUESTION[0]["content"], system=system, options=_greedy())
    assert whole.response == reference.choices[0].message.content
    assert (whole.prompt_eval_count, whole.eval_count) == (reference.usage.prompt_tokens,
                                                           reference.usage.completion_tokens)
    assert whole.done_reason == "length" and whole.context is None

    raw_prompt = "The capital of France is"
    completion = oai.completions.create(model=smol.name, prompt=raw_prompt, temperature=0, max_tokens=N)
    parts = list(client.generate(model=smol.name, prompt=raw_prompt, raw=True, options=_greedy(), stream=True))
    assert "".join(p.response for p in parts) == completion.choices[0].text
    assert parts[-1].done and parts[-1].eval_count == completion.usage.completion_tokens
    assert parts[-1].prompt_eval_count == completion.usage.prompt_tokens


def test_stop_strings_end_the_answer_with_done_reason_stop(smol):
    client = smol.ollama()
    full = client.chat(model=smol.name, messages=QUESTION, options=_greedy()).message.content
    stop = full.split()[1]
    expected = full[: full.index(stop)]
    reference = smol.openai().chat.completions.create(model=smol.name, messages=QUESTION, temperature=0,
                                                      max_tokens=N, stop=[stop])
    assert reference.choices[0].message.content == expected
    answer = client.chat(model=smol.name, messages=QUESTION, options=_greedy(stop=[stop]))
    assert (answer.message.content, answer.done_reason) == (expected, "stop")
    assert answer.eval_count == reference.usage.completion_tokens


def test_num_ctx_bounds_the_answer_when_num_predict_is_not_given(smol):
    prompt_tokens = len(smol.engine.tokenizer.encode_chat(QUESTION))
    answer = smol.ollama().chat(model=smol.name, messages=QUESTION,
                                options={"temperature": 0, "num_ctx": prompt_tokens + 4})
    assert answer.prompt_eval_count == prompt_tokens
    assert answer.eval_count <= 4 and (answer.done_reason == "stop" or answer.eval_count == 4)
    with smol.http() as http:  # a prompt that does not fit the window is refused, not truncated
        _ollama_error(http.post("/api/chat", json={"model": smol.name, "messages": QUESTION, "stream": False,
                                                   "options": {"num_ctx": prompt_tokens}}), 400, "context window")


def test_ollama_defaults_and_option_spellings():
    """Without options: Ollama's sampling defaults and a window of 4096 tokens (at most the context)."""
    req = parse_chat({"model": "m", "messages": QUESTION}, model_name="m", context=8192)
    c = req.completion
    assert req.stream and c.chat and c.messages == QUESTION and c.max_tokens is None and c.window == 4096
    assert (c.sampling.temperature, c.sampling.top_k, c.sampling.top_p, c.sampling.seed) == (0.8, 40, 0.9, None)
    assert parse_chat({"model": "m", "messages": QUESTION}, model_name="m", context=512).completion.window == 512
    c = parse_chat({"model": "m:latest", "messages": QUESTION, "stream": False, "options": {
        "num_predict": 7, "num_ctx": 100, "seed": 5, "top_k": -1, "top_p": 0, "temperature": 1.5, "stop": "\n",
        "num_thread": 8, "num_gpu": 99, "use_mlock": True, "mirostat_tau": 4.0, "mirostat": 0, "min_p": 0,
        "presence_penalty": 0, "typical_p": 1, "penalize_newline": False, "num_batch": None}},
        model_name="m", context=512).completion
    assert (c.max_tokens, c.window, c.stop, c.stream) == (7, 100, ("\n",), False)
    assert (c.sampling.seed, c.sampling.top_k, c.sampling.greedy) == (5, 0, True)  # top_p 0: the top token only
    for n in (-1, -2, 0):  # Ollama's "no limit" and "fill the context": until the window is full
        opts = {"num_predict": n, "seed": -1}
        c = parse_generate({"model": "m", "prompt": "Hi", "options": opts}, model_name="m", context=512).completion
        assert c.max_tokens is None and c.sampling.seed is None
    raw = parse_generate({"model": "m", "prompt": "Hi", "raw": True}, model_name="m", context=512).completion
    assert (raw.chat, raw.prompt) == (False, "Hi")
    templated = parse_generate({"model": "m", "prompt": "Hi", "system": "S"}, model_name="m", context=512)
    assert templated.completion.messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]


def test_an_engine_that_cannot_serve_is_a_503_in_ollama_shape(smol):
    with smol.http() as http:
        smol.engine.ready = False
        try:
            _ollama_error(http.post("/api/chat", json={"model": smol.name, "messages": QUESTION}), 503)
            _ollama_error(http.post("/api/generate", json={"model": smol.name}), 503)  # the load call too
        finally:
            smol.engine.ready = True


def test_stream_is_the_default_and_is_ndjson(smol):
    with smol.http() as http:
        reply = http.post("/api/generate", json={"model": smol.name, "prompt": "Hi", "options": _greedy()})
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in reply.text.splitlines()]
        assert len(lines) > 2 and [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
        assert set(lines[0]) == {"model", "created_at", "response", "done"}
        assert {"done_reason", "total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
                "eval_count", "eval_duration"} <= set(lines[-1])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", lines[0]["created_at"])
        counted = re.search(r'^p2pllm_gateway_requests_total\{endpoint="/api/generate",status="200"\} ([0-9.]+)$',
                            http.get("/metrics").text, re.M)
        assert counted and float(counted.group(1)) >= 1


def test_load_calls_answer_done_at_once(smol):
    client = smol.ollama()
    loaded = client.chat(model=smol.name, messages=[])
    assert loaded.done and loaded.done_reason == "load" and loaded.message.content == ""
    loaded = client.generate(model=smol.name)
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    with smol.http() as http:  # streamed by default, it is still one object
        reply = http.post("/api/generate", json={"model": smol.name, "keep_alive": 0})
        assert reply.json()["done_reason"] == "load"


# --------------------------------------------------------------------------- the API key, bad input


def test_api_key_is_enforced_on_api_as_on_v1(smol):
    with smol.http(headers={}) as http:
        chat = {"model": smol.name, "messages": QUESTION, "stream": False}
        for path, body in (("/api/chat", chat), ("/api/generate", {"model": smol.name, "prompt": "Hi"}),
                           ("/api/show", {"model": smol.name})):
            _ollama_error(http.post(path, json=body), 401, "api key")
            _ollama_error(http.post(path, json=body, headers={"Authorization": "Bearer wrong"}), 401)
        for path in ("/api/tags", "/api/version", "/api/ps", "/api/nothing"):
            _ollama_error(http.get(path), 401)
        assert http.get("/v1/models").status_code == 401  # the same rule as /v1
    with pytest.raises(ollama.ResponseError) as e:
        smol.ollama(headers={}).list()
    assert e.value.status_code == 401
    with pytest.raises(ollama.ResponseError) as e:
        list(smol.ollama(headers={"Authorization": "Bearer nope"}).chat(model=smol.name, messages=QUESTION,
                                                                          stream=True))
    assert e.value.status_code == 401


BAD = [
    ("/api/chat", {"messages": QUESTION}, 400, "model is required"),
    ("/api/chat", {"model": "llama3.2", "messages": QUESTION}, 404, "llama3.2"),
    ("/api/generate", {"model": "llama3.2:8b", "prompt": "Hi"}, 404, "not found"),
    ("/api/show", {}, 400, "model is required"),
    ("/api/chat", {"model": "M", "messages": QUESTION, "format": "xml"}, 400, "format"),
    ("/api/chat", {"model": "M", "messages": QUESTION, "format": {"$ref": "#/nowhere"}}, 400, "format"),
    ("/api/chat", {"model": "M", "messages": QUESTION, "tools": [{"type": "function", "function": {"name": "f"}}]},
     400, "tools"),
    ("/api/chat", {"model": "M", "messages": [{"role": "user", "content": "Hi", "images": ["aGk="]}]}, 400, "images"),
    ("/api/generate", {"model": "M", "prompt": "Hi", "images": ["aGk="]}, 400, "images"),
    ("/api/chat", {"model": "M", "messages": [{"role": "tool", "content": "42"}]}, 400, "tool"),
    ("/api/chat", {"model": "M", "messages": [{"role": "wizard", "content": "Hi"}]}, 400, "role"),
    ("/api/chat", {"model": "M", "messages": [*QUESTION, {"role": "assistant", "content": "Paris"}]}, 400,
     "assistant message"),
    ("/api/chat", {"model": "M", "messages": "Hi"}, 400, "messages"),
    ("/api/chat", {"model": "M", "messages": [{"role": "user", "content": ["Hi"]}]}, 400, "content"),
    ("/api/chat", {"model": "M", "messages": QUESTION, "think": True}, 400, "think"),
    ("/api/chat", {"model": "M", "messages": QUESTION, "stream": "yes"}, 400, "stream"),
    ("/api/chat", {"model": "M", "messages": QUESTION, "options": [1]}, 400, "options"),
    ("/api/generate", {"model": "M", "prompt": "Hi", "raw": True, "system": "Be brief."}, 400, "system"),
    ("/api/generate", {"model": "M", "prompt": "Hi", "template": "{{ .Prompt }}"}, 400, "template"),
    ("/api/generate", {"model": "M", "prompt": "def f(", "suffix": "return 1"}, 400, "suffix"),
    ("/api/generate", {"model": "M", "prompt": "Hi", "context": [1, 2, 3]}, 400, "context"),
    ("/api/generate", {"model": "M", "prompt": 42}, 400, "prompt"),
    ("/api/generate", {"model": "M", "prompt": "Hi", "logprobs": True}, 400, "logprobs"),
] + [
    ("/api/chat", {"model": "M", "messages": QUESTION, "options": {name: value}}, 400, needle)
    for name, value, needle in (
        ("repeat_penalty", 1.1, "options.repeat_penalty"),
        ("presence_penalty", 0.5, "options.presence_penalty"),
        ("frequency_penalty", 0.5, "options.frequency_penalty"),
        ("mirostat", 2, "options.mirostat"),
        ("typical_p", 0.7, "options.typical_p"),
        ("min_p", 0.05, "options.min_p"),
        ("num_ctx", 1 << 20, "options.num_ctx"),
        ("temperature", "hot", "options.temperature"),
        ("temperature", -1, "options.temperature"),
        ("top_p", 2, "options.top_p"),
        ("top_k", 4.5, "options.top_k"),
        ("seed", 2**64, "options.seed"),
        ("stop", [1, 2], "options.stop"),
        ("made_up_option", 1, "options.made_up_option"),
    )
]


@pytest.mark.parametrize("path,body,status,needle", BAD, ids=[f"{b[0]}:{b[3]}" for b in BAD])
def test_bad_requests_are_4xx_in_ollama_shape(smol, path, body, status, needle):
    body = {**body, "model": smol.name} if body.get("model") == "M" else body
    with smol.http() as http:
        _ollama_error(http.post(path, json=body), status, needle)


def test_malformed_bodies_routes_and_methods_are_4xx_in_ollama_shape(smol):
    with smol.http() as http:
        for body in (b"{not json", b"[1, 2]", b"", b'{"model": NaN}', b"\xff\xfe"):
            _ollama_error(http.post("/api/chat", content=body), 400)
        _ollama_error(http.post("/api/pull", json={"model": "llama3.2"}), 404)
        _ollama_error(http.get("/api/chat"), 405)
        _ollama_error(http.post("/api/generate", content=b"x" * (5 << 20)), 413)
        reply = http.post("/v1/chat/completions", content=b"{not json")  # /v1 keeps OpenAI's shape
        assert reply.status_code == 400 and set(reply.json()["error"]) == {"message", "type", "param", "code"}


class Capital(BaseModel):
    country: str
    capital: str


def test_format_constrains_the_answer_to_json_or_a_schema(smol):
    client = smol.ollama()
    reply = client.chat(model=smol.name, messages=QUESTION, format=Capital.model_json_schema(),
                        options={"temperature": 0, "num_predict": 60})
    assert reply.done_reason == "stop" and Capital.model_validate_json(reply.message.content).capital == "Paris"
    made = client.generate(model=smol.name, prompt="Describe a cat as a JSON object.", format="json",
                           options={"temperature": 0, "num_predict": 24})
    assert made.response.startswith("{")


@pytest.mark.parametrize("stream", [False, True])
def test_a_format_no_json_meets_is_an_error_naming_format(smol, stream):
    """The shared generation path's error named OpenAI's `response_format`, which no Ollama client sends."""
    endless = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"], "additionalProperties": False}
    with pytest.raises(ollama.ResponseError) as info:
        reply = smol.ollama().chat(model=smol.name, messages=QUESTION, format=endless, stream=stream,
                                   options={"temperature": 0, "num_predict": 200})
        for _ in reply if stream else ():
            pass
    assert "format cannot be met" in info.value.error and "response_format" not in info.value.error
    if not stream:
        assert info.value.status_code == 400


def test_the_ollama_client_against_a_live_two_peer_cluster(smol_cluster):
    client = ollama.Client(host=smol_cluster.url)
    assert [m.model for m in client.list().models] == [smol_cluster.model]
    chat = client.chat(model=smol_cluster.model, messages=QUESTION, options={"temperature": 0, "num_predict": 12})
    same = smol_cluster.client().chat.completions.create(model=smol_cluster.model, messages=QUESTION,
                                                          max_tokens=12, temperature=0)
    assert chat.message.content == same.choices[0].message.content and chat.eval_count == same.usage.completion_tokens
    streamed = "".join(part.response for part in client.generate(model=smol_cluster.model, prompt="Say hi.",
                                                                  stream=True,
                                                                  options={"temperature": 0, "num_predict": 8}))
    assert streamed
