"""The request history: the SQLite store, GET /v1/history over a real gateway, and a `p2pllm join`
daemon that is SIGKILLed and restarted on the same --state-dir.

The gateways are real (uvicorn on loopback) over the real in-process engine on the tiny demo
model; the external backend is another p2pllm gateway, reached over HTTP by the first one's
backend pool while its own ring drains (as a real draining peer does).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import REPO, LoopThread, assert_one_line_error, run_cli, shared_model
from p2pllm.errors import UsageError
from p2pllm.gateway.app import create_app
from p2pllm.gateway.backends import BackendPool, parse_backend_spec
from p2pllm.gateway.history import CLIENT_GONE, FILE_NAME, RequestHistory, RequestRecord, UnknownId
from p2pllm.gateway.response_cache import CacheSettings
from p2pllm.gateway.schema import CompletionRequest
from p2pllm.gateway.server import serve_gateway
from p2pllm.model.sampling import SamplingParams
from p2pllm.runtime.local import build_local_engine

API_KEY = "sk-history-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


# --------------------------------------------------------------------------- the store


def _row(i: int, prompt: str | None = None, completion: str = "an answer") -> dict:
    """The row RequestRecord makes for a finished /v1/completions request number i."""
    record = RequestRecord(f"req-{i}", "/v1/completions", "tiny.gguf")
    record.begin(CompletionRequest(chat=False, max_tokens=4, sampling=SamplingParams(), stop=(), stream=False,
                                   include_usage=False, ignore_eos=False, prompt=prompt or f"prompt {i}"))
    record.note_answer({"id": f"cmpl-{i}", "usage": {"prompt_tokens": 3, "completion_tokens": 4},
                        "choices": [{"index": 0, "text": completion, "finish_reason": "length"}]}, streamed=False)
    return record.end(200, 7)


def _ids(page: dict) -> list[str]:
    return [r["id"] for r in page["data"]]


def test_rows_are_bounded_and_listed_newest_first(tmp_path):
    history = RequestHistory(tmp_path / FILE_NAME, max_rows=5)
    for i in range(8):
        history.add(_row(i))
    assert history.count() == 5
    page = history.page(limit=20)
    assert _ids(page) == ["cmpl-7", "cmpl-6", "cmpl-5", "cmpl-4", "cmpl-3"]
    assert (page["first_id"], page["last_id"], page["has_more"]) == ("cmpl-7", "cmpl-3", False)
    row = page["data"][0]
    assert (row["request_id"], row["endpoint"], row["status"], row["epoch"], row["stream"]) == (
        "req-7", "/v1/completions", 200, 7, False)
    assert (row["prompt_tokens"], row["completion_tokens"], row["finish_reason"]) == (3, 4, "length")
    history.close()
    # a smaller bound on the next start drops the oldest at once
    history = RequestHistory(tmp_path / FILE_NAME, max_rows=2)
    assert _ids(history.page()) == ["cmpl-7", "cmpl-6"]
    history.close()


def test_pages_go_older_after_an_id_until_has_more_is_false(tmp_path):
    history = RequestHistory(tmp_path / FILE_NAME)
    for i in range(7):
        history.add(_row(i))
    first = history.page(limit=3)
    assert (_ids(first), first["has_more"]) == (["cmpl-6", "cmpl-5", "cmpl-4"], True)
    second = history.page(limit=3, after=first["last_id"])
    assert (_ids(second), second["has_more"]) == (["cmpl-3", "cmpl-2", "cmpl-1"], True)
    third = history.page(limit=3, after=second["last_id"])
    assert (_ids(third), third["has_more"], third["last_id"]) == (["cmpl-0"], False, "cmpl-0")
    assert history.page(after="cmpl-0") == {"object": "list", "data": [], "first_id": None, "last_id": None,
                                            "has_more": False}
    with pytest.raises(UnknownId):
        history.page(after="cmpl-nobody")
    history.close()


def test_meta_keeps_a_hash_and_no_text_full_keeps_the_text(tmp_path):
    secret = "my private question about lighthouses"
    full = RequestHistory(tmp_path / "full" / FILE_NAME, mode="full")
    full.add(_row(1, secret, "a private answer"))
    stored = full.page()["data"][0]
    assert (stored["prompt"], stored["completion"]) == (secret, "a private answer")
    assert stored["prompt_sha256"] == hashlib.sha256(json.dumps(secret).encode()).hexdigest()
    full.close()

    meta = RequestHistory(tmp_path / "meta" / FILE_NAME, mode="meta")
    meta.add(_row(1, secret, "a private answer"))
    row = meta.page()["data"][0]
    assert (row["prompt"], row["completion"]) == (None, None)
    assert row["prompt_sha256"] == stored["prompt_sha256"] and row["completion_tokens"] == 4
    meta.close()
    assert not _file_mentions(tmp_path / "meta", b"lighthouses")

    # a restart with meta forgets the text an earlier --history full kept
    again = RequestHistory(tmp_path / "full" / FILE_NAME, mode="meta")
    row = again.page()["data"][0]
    assert (row["prompt"], row["completion"], row["prompt_sha256"]) == (None, None, stored["prompt_sha256"])
    again.close()
    assert not _file_mentions(tmp_path / "full", b"lighthouses")  # not in free pages nor in the log either


def _file_mentions(folder: Path, needle: bytes) -> bool:
    return any(needle in p.read_bytes() for p in folder.iterdir() if p.is_file())


def test_full_text_is_bounded_by_bytes_oldest_dropped(tmp_path):
    history = RequestHistory(tmp_path / FILE_NAME, mode="full", max_text_bytes=3000)
    for i in range(6):
        history.add(_row(i, prompt="x" * 990, completion="y"))  # 993 bytes of text each (the prompt as JSON)
    assert _ids(history.page()) == ["cmpl-5", "cmpl-4", "cmpl-3"]
    history.close()
    reopened = RequestHistory(tmp_path / FILE_NAME, mode="full", max_text_bytes=2000)
    assert _ids(reopened.page()) == ["cmpl-5", "cmpl-4"] and reopened.text_bytes == 2 * 993
    reopened.close()


def test_rows_survive_a_reopen(tmp_path):
    history = RequestHistory(tmp_path / FILE_NAME)
    assert (tmp_path / FILE_NAME).stat().st_mode & 0o777 == 0o600  # prompts may be in it
    for i in range(3):
        history.add(_row(i))
    before = history.page()
    history.close()
    reopened = RequestHistory.open(tmp_path)
    assert reopened.page() == before
    reopened.add(_row(3))
    assert _ids(reopened.page(limit=2)) == ["cmpl-3", "cmpl-2"]
    reopened.close()


def test_off_opens_nothing(tmp_path):
    assert RequestHistory.open(tmp_path / "state", "off") is None
    assert not (tmp_path / "state").exists()


def test_an_unusable_state_dir_is_one_clear_error(tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / FILE_NAME).write_bytes(b"this is not a database, it is a text file " * 100)
    with pytest.raises(UsageError, match=r"cannot keep the request history in .*: file is not a database"):
        RequestHistory.open(corrupt)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with pytest.raises(UsageError, match="--state-dir"):
        RequestHistory.open(a_file)
    newer = RequestHistory.open(tmp_path / "newer")
    newer.close()
    with sqlite3.connect(tmp_path / "newer" / FILE_NAME) as con:
        con.execute("PRAGMA user_version = 99")
    with pytest.raises(UsageError, match="newer p2pllm"):
        RequestHistory.open(tmp_path / "newer")


def test_join_with_an_unusable_state_dir_exits_2_with_one_line(tmp_path, demo_tiny_gguf):
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("")
    proc = run_cli("join", "--model", demo_tiny_gguf, "--state-dir", a_file, "--insecure", "--port", "7831",
                   "--gateway-port", "8831", "--no-mdns", timeout=120)
    line = assert_one_line_error(proc, 2, "cannot keep the request history in", "--state-dir")
    assert line.startswith("p2pllm: error: ")


# --------------------------------------------------------------------------- the route, in process


class Gateways:
    """The demo model's engine behind a gateway with the history on (full, an API key, the response
    cache), one with it off, and one whose ring drains so that an external backend (a third gateway,
    over another engine) serves its completions."""

    def __init__(self, loop: LoopThread, model: Path, state: Path):
        self.loop = loop
        self.engine = loop.run(build_local_engine(str(model)))
        self.history = RequestHistory.open(state / "main", "full")
        self.main = loop.run(serve_gateway(create_app(self.engine, api_key=API_KEY, history=self.history,
                                                      response_cache=CacheSettings()), "127.0.0.1", 0))
        self.off = loop.run(serve_gateway(create_app(self.engine), "127.0.0.1", 0))
        self.backend = loop.run(serve_gateway(create_app(self.engine), "127.0.0.1", 0))
        self.draining = loop.run(build_local_engine(str(model)))
        self.draining.ready = False  # what `p2pllm join` does on its first Ctrl-C: no new requests on this ring
        self.pool = BackendPool([parse_backend_spec(f"{self.backend.url},id=other,max_concurrent=2")],
                                self.engine.model_name)
        loop.run(self.pool.start())
        self.proxy_history = RequestHistory.open(state / "proxy", "full")
        self.proxy = loop.run(serve_gateway(create_app(self.draining, backends=self.pool,
                                                       history=self.proxy_history), "127.0.0.1", 0))

    def close(self) -> None:
        for server in (self.main, self.off, self.backend, self.proxy):
            self.loop.run(server.stop())
        self.loop.run(self.pool.stop())
        for engine in (self.engine, self.draining):
            self.loop.run(engine.stop())
        self.history.close()
        self.proxy_history.close()


@pytest.fixture(scope="module")
def gateways(loop, demo_tiny_gguf, tmp_path_factory):
    g = Gateways(loop, demo_tiny_gguf, tmp_path_factory.mktemp("history"))
    yield g
    g.close()


def _latest(url: str, n: int = 1, headers: dict | None = None) -> list[dict]:
    reply = httpx.get(f"{url}/v1/history", params={"limit": n}, headers=headers or AUTH, timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()["data"]


def _sse(reply: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: {")]


def test_each_kind_of_completion_is_recorded_once_when_it_ends(gateways):
    url, model = gateways.main.url, gateways.engine.model_name
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as http:
        whole = http.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 5,
                                                   "temperature": 0.7, "ignore_eos": True}).json()
        [row] = _latest(url)  # in the history as soon as the answer is in
        assert (row["id"], row["endpoint"], row["backend"], row["status"], row["stream"]) == (
            whole["id"], "/v1/completions", "ring", 200, False)
        usage = whole["usage"]
        assert (row["prompt_tokens"], row["completion_tokens"]) == (usage["prompt_tokens"], 5)
        assert (row["finish_reason"], row["error"], row["epoch"], row["model"]) == ("length", None, 0, model)
        assert row["prompt"] == "Once upon a time" and row["completion"] == whole["choices"][0]["text"]
        assert 0 < row["ttft_ms"] <= row["duration_ms"] and row["tokens_per_s"] > 0
        assert row["request_id"].startswith("req-") and abs(row["created"] - time.time()) < 60

        messages = [{"role": "user", "content": "Tell me a story"}]
        with http.stream("POST", "/v1/chat/completions", json={
                "messages": messages, "max_tokens": 6, "temperature": 0.5, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}) as reply:
            chunks = _sse(reply)
        [row] = _latest(url)
        assert (row["id"], row["endpoint"], row["stream"]) == (chunks[0]["id"], "/v1/chat/completions", True)
        assert row["completion_tokens"] == chunks[-1]["usage"]["completion_tokens"] == 6
        assert row["prompt"] == messages and row["completion"] == "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])

        ollama = http.post("/api/chat", json={"model": model, "messages": messages, "stream": False,
                                              "options": {"num_predict": 3}}).json()
        [row] = _latest(url)
        assert (row["endpoint"], row["completion_tokens"], row["prompt_tokens"]) == (
            "/api/chat", ollama["eval_count"], ollama["prompt_eval_count"])
        assert row["id"].startswith("ollama-chat-") and row["completion"] == ollama["message"]["content"]

        too_long = http.post("/v1/completions", json={"prompt": [5] * gateways.engine.context, "max_tokens": 4})
        assert too_long.status_code == 400
        [row] = _latest(url)
        assert (row["status"], row["error"], row["completion_tokens"]) == (
            400, too_long.json()["error"]["message"], None)
        assert row["id"] == row["request_id"] == too_long.headers["x-request-id"]

        # a body that does not parse is no completion; a load call of Ollama's neither
        assert http.post("/v1/completions", content=b"{not json").status_code == 400
        assert http.post("/api/generate", json={"model": model}).status_code == 200
        assert _latest(url, 4)[0]["id"] == row["id"]
        assert [r["endpoint"] for r in _latest(url, 4)] == [
            "/v1/completions", "/api/chat", "/v1/chat/completions", "/v1/completions"]


def test_a_responses_api_answer_is_recorded_under_its_response_id(gateways):
    url = gateways.main.url
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as http:
        reply = http.post("/v1/responses", json={"input": "Tell me a story", "max_output_tokens": 4,
                                                 "temperature": 0.5})
        assert reply.status_code == 200, reply.text
        answer = reply.json()
        scrape = http.get("/metrics").text
    [row] = _latest(url)
    assert (row["id"], row["endpoint"], row["status"], row["completion_tokens"]) == (
        answer["id"], "/v1/responses", 200, answer["usage"]["output_tokens"])
    assert row["completion"] == answer["output"][0]["content"][0]["text"]
    assert 'endpoint="/v1/responses",status="200"' in scrape  # its own label, not "other"


def test_an_answer_that_ended_empty_is_recorded_as_empty_text_not_as_no_answer(gateways):
    """An empty completion was stored as null, which the history uses for "no answer" (or "not kept")."""
    url = gateways.main.url
    eos = gateways.engine.tokenizer.eos_id
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as http:
        reply = http.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0,
                                                   "logit_bias": {str(eos): 100}})  # end-of-text first
        assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == "", reply.text
    [row] = _latest(url)
    assert (row["status"], row["finish_reason"], row["completion"]) == (200, "stop", "")


def test_a_response_cache_hit_is_recorded_as_served_by_the_cache(gateways):
    body = {"prompt": "Once upon a time there", "max_tokens": 4, "temperature": 0}
    with httpx.Client(base_url=gateways.main.url, headers=AUTH, timeout=60) as http:
        first = http.post("/v1/completions", json=body)
        second = http.post("/v1/completions", json=body)
    assert (first.headers["x-p2pllm-cache"], second.headers["x-p2pllm-cache"]) == ("miss", "hit")
    hit, miss = _latest(gateways.main.url, 2)
    assert (hit["id"], hit["backend"], miss["id"], miss["backend"]) == (
        second.json()["id"], "cache", first.json()["id"], "ring")
    assert hit["completion_tokens"] == miss["completion_tokens"] and hit["completion"] == miss["completion"]


def test_a_client_that_leaves_mid_stream_is_recorded_with_its_error(gateways):
    body = {"prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0.9, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=gateways.main.url, headers=AUTH, timeout=30) as http, \
            http.stream("POST", "/v1/completions", json=body) as reply:
        first = next(line for line in reply.iter_lines() if line.startswith("data: {"))
    # the connection is closed here, long before 1500 tokens
    cid = json.loads(first[6:])["id"]
    deadline = time.monotonic() + 15
    while not (rows := _latest(gateways.main.url)) or rows[0]["id"] != cid:
        assert time.monotonic() < deadline, rows
        time.sleep(0.05)
    row = rows[0]
    assert (row["error"], row["finish_reason"], row["status"], row["stream"]) == (CLIENT_GONE, None, 200, True)
    assert 1 <= row["completion_tokens"] < 1500


def test_answers_of_an_external_backend_are_recorded_with_its_id(gateways):
    url = gateways.proxy.url
    with httpx.Client(base_url=url, timeout=60) as http:
        whole = http.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 4, "ignore_eos": True})
        assert whole.headers["x-p2pllm-backend"] == "other", whole.text
        [row] = _latest(url, headers={})
        assert (row["id"], row["backend"], row["completion_tokens"], row["finish_reason"]) == (
            whole.json()["id"], "other", 4, "length")
        assert row["completion"] == whole.json()["choices"][0]["text"] and row["ttft_ms"] is None
        with http.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}) as reply:
            chunks = _sse(reply)
    [row] = _latest(url, headers={})
    assert (row["id"], row["backend"], row["stream"], row["completion_tokens"]) == (
        chunks[0]["id"], "other", True, 5)
    assert row["completion"] == "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert row["ttft_ms"] > 0 and row["error"] is None


def test_history_route_errors_are_openai_errors(gateways):
    url = gateways.main.url
    for query, param in (({"limit": 0}, "limit"), ({"limit": 1001}, "limit"), ({"limit": "ten"}, "limit"),
                         ({"after": "cmpl-nobody"}, "after")):
        reply = httpx.get(f"{url}/v1/history", params=query, headers=AUTH)
        assert reply.status_code == 400, (query, reply.text)
        assert reply.json()["error"]["param"] == param and reply.json()["error"]["type"] == "invalid_request_error"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        reply = httpx.get(f"{url}/v1/history", headers=headers)
        assert (reply.status_code, reply.json()["error"]["code"]) == (401, "invalid_api_key")
    off = httpx.get(f"{gateways.off.url}/v1/history")
    assert (off.status_code, off.json()["error"]["code"]) == (404, "history_off")
    assert "--history off" in off.json()["error"]["message"]
    # and a gateway without a history answers completions as before, recording nothing
    res = httpx.post(f"{gateways.off.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert res.status_code == 200


# --------------------------------------------------------------------------- a live daemon, killed and restarted


def _join(model: Path, state: Path, log: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, P2PLLM_SECRET="history-test-secret-0123456789", HOME=str(state.parent),
               PYTHONUNBUFFERED="1")
    env.pop("XDG_STATE_HOME", None)
    argv = [sys.executable, "-m", "p2pllm", "join", "--model", str(model), "--name", "history-1", "--port", "7831",
            "--gateway-port", "8831", "--interface", "127.0.0.1", "--no-mdns", "--cluster", "history-test",
            "--state-dir", str(state), *extra]
    return subprocess.Popen(argv, stdout=open(log, "a"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=REPO, env=env, start_new_session=True)


def _ready(proc: subprocess.Popen, log: Path, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            health = httpx.get("http://127.0.0.1:8831/health", timeout=5).json()
            if health.get("stages"):
                return health
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.3)
    raise AssertionError("the daemon did not get ready: " + log.read_text()[-3000:])


def _ports_free() -> None:
    for port in (7831, 8831):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(f"port {port} on 127.0.0.1 is taken (another test session's daemon?)")


def test_a_killed_daemon_keeps_its_history_across_a_restart(tmp_path):
    model = shared_model("SmolLM2-135M-Instruct.Q4_1.gguf")
    _ports_free()
    state, log = tmp_path / "state", tmp_path / "peer.log"
    proc = _join(model, state, log, "--history", "full")
    try:
        epoch = _ready(proc, log)["epoch"]
        gateway = "http://127.0.0.1:8831"
        question = [{"role": "user", "content": "What is the capital of France?"}]
        with httpx.Client(base_url=gateway, timeout=120) as http:
            whole = http.post("/v1/chat/completions", json={"messages": question, "max_tokens": 4,
                                                            "temperature": 0}).json()
            with http.stream("POST", "/v1/completions", json={"prompt": "The sky is", "max_tokens": 3,
                                                              "stream": True, "ignore_eos": True}) as reply:
                chunks = _sse(reply)
        before = _latest(gateway, 5, headers={})
        assert [r["id"] for r in before] == [chunks[0]["id"], whole["id"]]
        assert before[1]["prompt"] == question and before[1]["completion"] == whole["choices"][0]["message"]["content"]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert "request history (full):" in log.read_text()

        proc = _join(model, state, log, "--history", "meta")  # the same state dir; meta forgets the texts
        assert _ready(proc, log)["epoch"] >= 1
        after = _latest(gateway, 5, headers={})
        assert [r["id"] for r in after] == [r["id"] for r in before]
        streamed, chat = after
        assert (chat["prompt_tokens"], chat["completion_tokens"], chat["epoch"], chat["stream"]) == (
            whole["usage"]["prompt_tokens"], whole["usage"]["completion_tokens"], epoch, False)
        assert (streamed["completion_tokens"], streamed["finish_reason"], streamed["epoch"], streamed["stream"]) == (
            3, "length", epoch, True)
        assert all(r["prompt"] is None and r["completion"] is None and len(r["prompt_sha256"]) == 64 for r in after)
        assert chat["prompt_sha256"] == before[1]["prompt_sha256"]
        assert not _file_mentions(state, b"capital of France")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def test_a_response_cache_hit_has_no_tokens_per_s(gateways):
    """A replay of a cached answer generates nothing: its row has no decode rate (the dashboard's "last
    request" rate once showed a replay's thousands of tokens/s), while the miss it replays has one."""
    body = {"prompt": "The cache replays this", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=gateways.main.url, headers=AUTH, timeout=60) as http:
        first = http.post("/v1/completions", json=body)
        second = http.post("/v1/completions", json={**body, "stream": True})  # a streamed replay: token timings
        assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert (first.headers["x-p2pllm-cache"], second.headers["x-p2pllm-cache"]) == ("miss", "hit")
    hit, miss = _latest(gateways.main.url, 2)
    assert (hit["backend"], miss["backend"]) == ("cache", "ring")
    assert hit["completion_tokens"] == miss["completion_tokens"] == 6
    assert miss["tokens_per_s"] > 0 and hit["tokens_per_s"] is None


# --------------------------------------------------------------------------- text UTF-8 cannot carry, repeated ids

LONE = "x\ud800y"  # a lone surrogate: valid JSON ("x\ud800y"), not encodable as UTF-8


def test_a_prompt_with_a_lone_surrogate_is_answered_whole_and_recorded_as_sent(gateways):
    """Once the row's INSERT raised UnicodeEncodeError: the answer's last chunk never went out (a 200
    cut short) and no row was written. Now the prompt reads back as sent, escaped as every answer's JSON."""
    url, model = gateways.main.url, gateways.engine.model_name
    messages = [{"role": "user", "content": LONE}]
    cases = [("/v1/chat/completions", {"messages": messages, "max_tokens": 3}, messages),
             ("/v1/completions", {"prompt": LONE, "max_tokens": 3, "stream": True, "ignore_eos": True}, LONE),
             ("/api/generate", {"model": model, "prompt": LONE, "stream": False, "options": {"num_predict": 3}},
              messages)]  # not raw: Ollama's generate is the chat template's user turn
    with httpx.Client(base_url=url, headers={**AUTH, "Content-Type": "application/json"}, timeout=60) as http:
        for path, body, prompt in cases:
            raw = json.dumps(body).encode()  # ASCII: the surrogate goes as its \ud800 escape
            assert b"\\ud800" in raw
            reply = http.post(path, content=raw)  # a response cut short raises here
            assert reply.status_code == 200, (path, reply.text)
            assert len(reply.content) == int(reply.headers.get("content-length", len(reply.content)))
            [row] = _latest(url)
            assert (row["endpoint"], row["status"], row["error"]) == (path, 200, None), row
            assert row["request_id"] == reply.headers["x-request-id"]
            assert row["prompt"] == prompt and row["completion"]


def test_text_utf8_cannot_carry_is_stored_and_a_failing_add_never_raises(tmp_path, caplog):
    history = RequestHistory(tmp_path / FILE_NAME, mode="full")
    row = _row(1, prompt=LONE, completion="half an emoji \ud83d, then a whole one: \ud83d\ude00")
    row["error"] = "the backend said \udc00"
    history.add(row)
    [stored] = history.page()["data"]
    assert stored["prompt"] == LONE  # the prompt as sent (its JSON escape), the rest with U+FFFD
    assert stored["completion"] == "half an emoji \ufffd, then a whole one: \U0001f600"
    assert stored["error"] == "the backend said \ufffd"
    assert history.text_bytes == len(json.dumps(LONE)) + len(stored["completion"].encode())
    # a row that makes no sense is a bug: logged once with its traceback, never raised (the request is answered)
    with caplog.at_level("WARNING", logger="p2pllm.gateway.history"):
        history.add({"id": "broken"})
        history.add({"id": "broken again", "prompt": object()})
    failures = [r for r in caplog.records if r.name == "p2pllm.gateway.history"]
    assert len(failures) == 1 and failures[0].exc_info is not None
    history.add(_row(2))
    assert _ids(history.page()) == ["cmpl-2", "cmpl-1"]
    history.close()


def _all_pages(url: str, limit: int, bound: int) -> list[str]:
    """The ids of every page, following last_id as the docs say (at most `bound` pages)."""
    ids, after = [], None
    for _ in range(bound):
        params = {"limit": limit, **({"after": after} if after else {})}
        page = httpx.get(f"{url}/v1/history", params=params, headers=AUTH, timeout=10).json()
        ids += _ids(page)
        if not page["has_more"]:
            return ids
        assert page["last_id"] == page["data"][-1]["id"]
        after = page["last_id"]
    raise AssertionError(f"paging did not end after {bound} pages: {ids[-8:]}")


def test_paging_visits_each_row_once_when_a_client_reuses_its_request_id(gateways):
    """A failed request's row has its x-request-id as id, and clients reuse theirs across retries:
    `after` named the newest of those rows, so paging went round for ever."""
    url, retry = gateways.main.url, {**AUTH, "x-request-id": "client-retry-42"}
    too_long = {"prompt": [5] * gateways.engine.context, "max_tokens": 4}
    with httpx.Client(base_url=url, timeout=60) as http:
        for i in range(5):
            if i % 2:
                reply = http.post("/v1/completions", json=too_long, headers=retry)
                assert (reply.status_code, reply.headers["x-request-id"]) == (400, "client-retry-42")
            else:
                assert http.post("/v1/completions", json={"prompt": f"Retry {i}", "max_tokens": 2},
                                 headers=AUTH).status_code == 200
    everything = _ids(httpx.get(f"{url}/v1/history", params={"limit": 1000}, headers=AUTH).json())
    for limit in (1, 2, 3):
        assert _all_pages(url, limit, bound=len(everything) + 2) == everything
    assert len(everything) == len(set(everything))
    retried = [r for r in _latest(url, 5) if r["request_id"] == "client-retry-42"]
    assert [r["id"] for r in retried] == ["client-retry-42~2", "client-retry-42"]  # the newer one is renamed


def test_a_history_with_repeated_ids_is_given_unique_ones_when_opened(tmp_path):
    """A history an earlier p2pllm kept, with one id on several rows, pages through each row once."""
    history = RequestHistory(tmp_path / FILE_NAME)
    for i in range(6):
        history.add(_row(i))
    history.close()
    with sqlite3.connect(tmp_path / FILE_NAME) as con:  # as the earlier code stored retries of one request id
        con.execute("UPDATE requests SET id = 'client-retry-42' WHERE id IN ('cmpl-1', 'cmpl-3', 'cmpl-4')")
    con.close()
    history = RequestHistory(tmp_path / FILE_NAME)
    assert _ids(history.page()) == ["cmpl-5", "client-retry-42~3", "client-retry-42~2", "cmpl-2",
                                    "client-retry-42", "cmpl-0"]
    seen, after = [], None
    for _ in range(10):
        page = history.page(limit=1, after=after)
        seen += _ids(page)
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == _ids(history.page())
    history.add(_row(9))
    history.add({**_row(10), "id": "client-retry-42"})
    assert _ids(history.page(limit=2)) == ["client-retry-42~4", "cmpl-9"]
    history.close()
