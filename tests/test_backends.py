"""External OpenAI-compatible backends as replicas of the ring, over real HTTP.

The stand-in for LM Studio / llama-server is llama-cpp-python's own server (`python -m
llama_cpp.server`) on the shared stories260K model, the ring is the real in-process engine on the
same file, and the failures come from a small purpose-built HTTP server that answers 500, hangs up
before the first token, or hangs up after it. The ring's engine runs one sequence at a time
(max_running=1), so a long request submitted straight to it makes it the busier target and the
next request goes to a backend first: that is how the tests choose where a request starts.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from conftest import REPO, LoopThread, assert_one_line_error, run_cli, shared_model
from p2pllm.errors import UsageError
from p2pllm.gateway.app import create_app
from p2pllm.gateway.backends import BackendConfig, BackendPool, load_workers, parse_backend_spec
from p2pllm.gateway.metrics import GatewayMetrics
from p2pllm.gateway.routing import Router
from p2pllm.gateway.server import serve_gateway
from p2pllm.runtime.api import GenerationRequest
from p2pllm.runtime.local import LocalPipeline

PROMPT = "Once upon a time"
MODEL = "stories260K.gguf"  # the name the ring serves (the file's name)


# --------------------------------------------------------------------------- servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """`python -m llama_cpp.server` on a model, killable and restartable on the same port."""

    def __init__(self, model: Path, log: Path):
        self.model, self.log, self.port = model, log, _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model), "--host", "127.0.0.1",
                "--port", str(self.port), "--n_ctx", "2048", "--n_threads", "1"]
        self.proc = subprocess.Popen(argv, stdout=open(self.log, "a"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("llama_cpp.server did not start: " + self.log.read_text()[-2000:])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


class ScriptedServer:
    """A real HTTP server that behaves on purpose: its /v1/models is fine, its completions are not.

    mode "500": an OpenAI error with HTTP 500; "hangup": a 200 event stream that ends after the role
    chunk, before any token (or, not streamed, a connection closed without an answer); "break": a
    stream that sends one token and then hangs up; "held": a good answer, once `release()` is called
    (it counts the requests it holds at once); "slow": a stream of a token every 0.1 s for 30 s."""

    def __init__(self, loop: LoopThread, mode: str):
        self.loop, self.mode, self.completions = loop, mode, 0
        self.models_status = 200  # what GET /v1/models answers (the health check)
        self.holding = self.peak = 0
        self.gate = asyncio.Event()
        self.server = loop.run(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"content-length: *(\d+)", head, re.I)
            body = await reader.readexactly(int(length.group(1))) if length else b""
            if head.startswith(b"GET /v1/models"):
                models = {"object": "list", "data": [{"id": "fails"}]}
                writer.write(_http(self.models_status, json.dumps(models).encode()))
            else:
                self.completions += 1
                if self.mode == "held":
                    self.holding += 1
                    self.peak = max(self.peak, self.holding)
                    await self.gate.wait()
                    self.holding -= 1
                    answer = {"id": "cmpl-held", "object": "text_completion", "created": 0, "model": "fails",
                              "choices": [{"index": 0, "text": " held", "logprobs": None, "finish_reason": "stop"}]}
                    writer.write(_http(200, json.dumps(answer).encode()))
                elif self.mode == "slow":
                    await self._slow(reader, writer)
                else:
                    writer.write(self._failure(json.loads(body).get("stream", False)))
            await writer.drain()
        finally:
            writer.close()

    def _failure(self, stream: bool) -> bytes:
        if self.mode == "500":
            return _http(500, b'{"error": {"message": "out of memory (on purpose)", "type": "server_error"}}')
        if self.mode == "hangup" and not stream:
            return b""
        chunk = {"id": "x", "object": "text_completion", "model": "fails",
                 "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": None}]}
        events = [chunk] if self.mode == "hangup" else [chunk, {**chunk, "choices": [{**chunk["choices"][0],
                                                                                       "text": " broken"}]}]
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
        return head + b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)

    async def _slow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
        for _ in range(300):
            if reader.at_eof() or writer.is_closing():  # the gateway closed it: stop, as a server would
                return
            chunk = {"id": "slow", "object": "text_completion", "model": "fails",
                     "choices": [{"index": 0, "text": " tick", "logprobs": None, "finish_reason": None}]}
            writer.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await writer.drain()
            await asyncio.sleep(0.1)
        writer.write(b"data: [DONE]\n\n")

    def release(self) -> None:
        self.loop.loop.call_soon_threadsafe(self.gate.set)

    def close(self, loop: LoopThread) -> None:
        self.server.close()
        loop.run(self.server.wait_closed())


def _http(status: int, body: bytes) -> bytes:
    reason = {200: "OK", 500: "Internal Server Error"}[status]
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode() + body


class Gateway:
    """The real gateway app over the real engine and a started backend pool, served on loopback."""

    def __init__(self, loop: LoopThread, engine, configs: list[BackendConfig], check_seconds: float = 30.0):
        self.loop, self.engine = loop, engine
        self.pool = BackendPool(configs, engine.model_name, check_seconds=check_seconds)
        loop.run(self.pool.start())
        self.server = loop.run(serve_gateway(create_app(engine, backends=self.pool), "127.0.0.1", 0))
        self.url = self.server.url

    def close(self) -> None:
        self.loop.run(self.server.stop())
        self.loop.run(self.pool.stop())

    def post(self, body: dict, path: str = "/v1/completions") -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=60)

    def stream(self, body: dict) -> tuple[httpx.Response, list]:
        """The reply and its events (parsed JSON, or the string "[DONE]")."""
        with httpx.stream("POST", self.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        return r, [e if e == "[DONE]" else json.loads(e) for e in events]

    def metric(self, name: str, **labels) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in text.splitlines():
            if line.startswith(name + ("{" + want + "}" if want else " ")):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    @contextmanager
    def ring_busy(self):
        """A long request submitted straight to the engine: the ring (one sequence at a time) is full
        until the block ends, so requests start on a backend."""
        async def submit():
            ids = self.engine.tokenizer.encode(PROMPT)
            it = await self.engine.generate(GenerationRequest("hold", ids, 2000, ignore_eos=True))
            await it.__anext__()  # running now; and an iterator that has started is cancelled by aclose()
            return it

        it = self.loop.run(submit())
        try:
            yield
        finally:
            self.loop.run(it.aclose())
            deadline = time.monotonic() + 10
            while self.loop.run(_busy(self.engine)) and time.monotonic() < deadline:
                time.sleep(0.02)


async def _busy(engine) -> int:
    stats = engine.stats()
    return stats.running + stats.queued


@pytest.fixture(scope="module")
def stories() -> Path:
    return shared_model(MODEL)


@pytest.fixture(scope="module")
def engine(loop, stories):
    """The ring: one sequence at a time, on one thread (ggml's threads spin: on a busy 2-core machine
    the default of every core stalled a 16-token answer for seconds)."""
    async def build():
        pipe = await asyncio.get_running_loop().run_in_executor(None, lambda: LocalPipeline(str(stories), threads=1))
        engine = pipe.engine(max_running=1)
        await engine.start()
        return engine

    engine = loop.run(build())
    yield engine
    loop.run(engine.stop())


@pytest.fixture(scope="module")
def llama_server(stories, tmp_path_factory):
    pytest.importorskip("llama_cpp.server.app", reason="needs llama-cpp-python[server] (the test extra)")
    server = LlamaServer(stories, tmp_path_factory.mktemp("llama-server") / "server.log")
    server.start()
    yield server
    server.kill()


# --------------------------------------------------------------------------- configuration


def test_backend_specs_and_workers_files_parse_into_backends(tmp_path):
    c = parse_backend_spec("http://127.0.0.1:1234/v1/,max_concurrent=4,type=lm_studio,model=smol,id=lms")
    assert (c.id, c.url, c.type, c.model, c.max_concurrent) == ("lms", "http://127.0.0.1:1234", "lm_studio", "smol", 4)
    assert parse_backend_spec("localhost:11434").url == "http://localhost:11434"  # no scheme: http
    assert parse_backend_spec("http://box,type=ollama").url == "http://box:11434"  # the type's own port
    assert parse_backend_spec("https://api.example.com/openai/v1").url == "https://api.example.com/openai"
    workers = tmp_path / "workers.json"
    workers.write_text(json.dumps([
        {"id": "lm-1", "host": "10.0.0.5", "port": 1234, "type": "lm_studio", "model": "m",
         "max_concurrent_requests": 2},
        {"id": "ol", "host": "10.0.0.6", "type": "ollama", "model": "m:q4"},
    ]))
    lm, ol = load_workers(str(workers))
    assert (lm.id, lm.url, lm.max_concurrent, lm.model) == ("lm-1", "http://10.0.0.5:1234", 2, "m")
    assert (ol.url, ol.max_concurrent) == ("http://10.0.0.6:11434", 1)


@pytest.mark.parametrize("spec, needle", [
    ("gmml", "expected auto, ggml, torch, or an OpenAI-compatible server's URL"),
    ("ftp://host:21", "expected an http:// or https:// URL"),
    ("http://h:1,max_concurrent=0", "max_concurrent must be a whole number of at least 1"),
    ("http://h:1,max_concurrent=two", "max_concurrent must be a whole number"),
    ("http://h:1,colour=red", "got 'colour=red'"),
    ("http://h:1,type=lmstudio", "type must be one of"),
    ("http://h:1,id=ring", "not 'ring'"),
    ("http://h:99999", "not a valid URL"),
])
def test_a_bad_backend_spec_says_what_is_wrong(spec, needle):
    with pytest.raises(UsageError, match=re.escape(needle)):
        parse_backend_spec(spec)


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not valid JSON"),
    ("[]", "non-empty JSON list"),
    ('[{"id": "a", "port": 1}]', "give 'host' (and 'port') or 'url'"),
    ('[{"id": "a", "host": "h", "port": 1, "colour": "red"}]', "unknown field 'colour'"),
    ('[{"id": "a", "host": "h", "max_concurrent_requests": 0}]', "at least 1"),
    ('[{"host": "h", "port": 1}, {"host": "h", "port": 1}]', None),  # same id twice: the pool refuses it
])
def test_a_bad_workers_file_says_what_is_wrong(tmp_path, content, needle):
    path = tmp_path / "workers.json"
    path.write_text(content)
    with pytest.raises(UsageError, match=re.escape(needle or "two backends have the id 'h:1'")):
        BackendPool(load_workers(str(path)), MODEL)


def test_join_refuses_bad_backends_in_one_line_and_keeps_backend_ggml(stories, tmp_path):
    from p2pllm.cli import build_parser

    args = build_parser().parse_args(["join", "--model", str(stories), "--backend", "ggml", "--backend",
                                      "http://127.0.0.1:1234,max_concurrent=2"])
    assert args.backend == "ggml" and args.backend_urls == ["http://127.0.0.1:1234,max_concurrent=2"]
    bad = tmp_path / "workers.json"
    bad.write_text('[{"id": "x", "host": "h", "port": "1234"}]')
    cases = [(["--backend", "http://127.0.0.1:1234,max_concurrent=0"], "max_concurrent"),
             (["--workers", str(bad)], "'port' must be a port number"),
             (["--workers", str(tmp_path / "absent.json")], "cannot read it")]
    for flags, needle in cases:
        proc = run_cli("join", "--model", stories, "--insecure", "--no-mdns", *flags, timeout=60)
        assert_one_line_error(proc, 2, needle)


# --------------------------------------------------------------------------- routing


def test_the_least_loaded_target_goes_first_and_ties_go_to_the_ring(loop, engine):
    pool = BackendPool([BackendConfig("a", "http://127.0.0.1:9", max_concurrent=4),
                        BackendConfig("b", "http://127.0.0.1:9", max_concurrent=1)], MODEL)
    router = Router(engine, GatewayMetrics(engine), pool)
    a, b = pool.backends
    ids = lambda: [t.id if t is not None else "ring" for t in loop.run(_order(router))]  # noqa: E731
    assert ids() == ["ring"]  # not checked yet: not in rotation
    a.mark_up(MODEL), b.mark_up(MODEL)
    assert ids() == ["ring", "a", "b"]  # all idle: the ring, then the most free room
    router.ring_in_flight = 1  # the ring's one slot taken: the idle backends first
    assert ids() == ["a", "b", "ring"]
    a.in_flight = 2  # a half full (2/4), b idle
    assert ids() == ["b", "a", "ring"]
    b.in_flight = 1  # b full: left out
    assert ids() == ["a", "ring"]
    a.mark_down("gone")
    assert ids() == ["ring"]


async def _order(router: Router):
    return router.order()


# --------------------------------------------------------------------------- over real servers


def test_requests_spread_over_the_ring_and_a_llama_server_backend(loop, engine, llama_server):
    gw = Gateway(loop, engine, [parse_backend_spec(f"{llama_server.url},type=llama_server,id=lms")])
    try:
        assert gw.health()["backends"][0]["healthy"] is True
        greedy = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0}
        on_ring = gw.post(greedy)
        assert on_ring.headers["x-p2pllm-backend"] == "ring", on_ring.text
        with gw.ring_busy():
            on_backend = gw.post(greedy)
            r, events = gw.stream(greedy)
        assert on_backend.status_code == 200 and on_backend.headers["x-p2pllm-backend"] == "lms", on_backend.text
        answer = on_backend.json()
        # the same model, greedy, answers the same; the answer names our model, not the backend's
        assert answer["choices"][0]["text"] == on_ring.json()["choices"][0]["text"]
        assert answer["model"] == MODEL and answer["usage"]["completion_tokens"] == 24
        assert r.headers["x-p2pllm-backend"] == "lms" and events[-1] == "[DONE]"
        assert all(e["model"] == MODEL for e in events[:-1])
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == answer["choices"][0]["text"]

        # concurrent clients: both targets serve, and every answer is whole
        body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0}
        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(lambda _: gw.post(body), range(6)))
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
        served_by = [r.headers["x-p2pllm-backend"] for r in replies]
        assert {"ring", "lms"} <= set(served_by), served_by
        assert gw.metric("p2pllm_gateway_routed_requests_total", backend="lms", outcome="served") == \
            served_by.count("lms") + 2
        assert gw.metric("p2pllm_gateway_routed_requests_total", backend="ring", outcome="served") == \
            served_by.count("ring") + 1
        assert gw.metric("p2pllm_backend_up", backend="lms") == 1
        assert gw.metric("p2pllm_backend_in_flight", backend="lms") == 0
        assert gw.health()["backends"][0]["served"] == served_by.count("lms") + 2
    finally:
        gw.close()


def test_a_backend_that_dies_leaves_rotation_and_requests_keep_succeeding(loop, engine, stories, tmp_path):
    pytest.importorskip("llama_cpp.server.app", reason="needs llama-cpp-python[server] (the test extra)")
    server = LlamaServer(stories, tmp_path / "server.log")
    server.start()
    # no periodic check during the test: the request that meets the dead server is what takes it out
    gw = Gateway(loop, engine, [parse_backend_spec(f"{server.url},type=lm_studio,id=lms")], check_seconds=300)
    try:
        body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0}
        with gw.ring_busy():
            assert gw.post(body).headers["x-p2pllm-backend"] == "lms"
        server.kill()
        with ThreadPoolExecutor(1) as pool:
            with gw.ring_busy():  # the ring is full: the request starts on the dead backend
                future = pool.submit(gw.post, body)
                _wait(lambda: gw.health()["backends"][0]["healthy"] is False)
            reply = future.result(60)
        assert reply.status_code == 200 and reply.headers["x-p2pllm-backend"] == "ring", reply.text
        row = gw.health()["backends"][0]
        assert row["failed"] == 1 and "connection failed" in row["reason"], row
        assert gw.metric("p2pllm_backend_up", backend="lms") == 0
        assert gw.metric("p2pllm_gateway_routed_requests_total", backend="lms", outcome="failed") == 1
        # out of rotation: every request goes to the ring, and the dead one is not tried again
        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(lambda _: gw.post(body), range(6)))
        assert [r.status_code for r in replies] == [200] * 6, [r.text for r in replies]
        assert {r.headers["x-p2pllm-backend"] for r in replies} == {"ring"}
        assert gw.health()["backends"][0]["failed"] == 1
        server.start()  # back on the same port: the next check (the loop's, tested below) re-admits it
        loop.run(gw.pool.check_all())
        assert gw.health()["backends"][0]["healthy"] is True
        with gw.ring_busy():
            assert gw.post(body).headers["x-p2pllm-backend"] == "lms"
    finally:
        gw.close()
        server.kill()


def test_health_checks_take_a_failing_backend_out_of_rotation_and_put_it_back(loop, engine):
    failing = ScriptedServer(loop, "500")
    gw = Gateway(loop, engine, [parse_backend_spec(f"{failing.url},id=flaky")], check_seconds=0.2)
    try:
        assert gw.health()["backends"][0]["healthy"] is True
        failing.models_status = 500
        _wait(lambda: gw.health()["backends"][0]["healthy"] is False)
        assert "/v1/models answered HTTP 500" in gw.health()["backends"][0]["reason"]
        failing.models_status = 200
        _wait(lambda: gw.health()["backends"][0]["healthy"] is True)
        assert gw.metric("p2pllm_backend_up", backend="flaky") == 1
    finally:
        gw.close()
        failing.close(loop)


def test_a_backend_is_never_given_more_than_its_max_concurrent(loop, engine):
    held = ScriptedServer(loop, "held")
    gw = Gateway(loop, engine, [parse_backend_spec(f"{held.url},max_concurrent=2,id=held")])
    body = {"prompt": PROMPT, "max_tokens": 8}
    try:
        with ThreadPoolExecutor(5) as pool:
            with gw.ring_busy():  # the ring is full: the backend's two slots first, then the ring's queue
                futures = [pool.submit(gw.post, body) for _ in range(5)]
                _wait(lambda: held.holding == 2 and loop.run(_busy(engine)) == 4)
                assert gw.metric("p2pllm_backend_in_flight", backend="held") == 2
                held.release()
            replies = [f.result(60) for f in futures]
        assert [r.status_code for r in replies] == [200] * 5, [r.text for r in replies]
        assert sorted(r.headers["x-p2pllm-backend"] for r in replies) == ["held", "held", "ring", "ring", "ring"]
        assert held.peak == 2 and held.completions == 2
    finally:
        gw.close()
        held.close(loop)


@pytest.mark.parametrize("mode", ["500", "hangup"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_backend_failing_before_its_first_token_is_retried_on_the_ring(loop, engine, mode, stream):
    failing = ScriptedServer(loop, mode)
    gw = Gateway(loop, engine, [parse_backend_spec(f"{failing.url},id=fails")])
    try:
        assert gw.health()["backends"][0]["healthy"] is True
        body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0}
        with ThreadPoolExecutor(1) as pool:
            with gw.ring_busy():  # the ring is full: the request starts on the failing backend
                future = pool.submit(gw.stream if stream else gw.post, body)
                _wait(lambda: failing.completions >= 1)
            reply = future.result(60)
        r = reply[0] if stream else reply
        assert r.status_code == 200 and r.headers["x-p2pllm-backend"] == "ring"
        if stream:
            events = reply[1]
            assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
            assert "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
        else:
            assert r.json()["choices"][0]["text"] and r.json()["model"] == MODEL
        assert failing.completions == 1
        assert gw.metric("p2pllm_gateway_routed_requests_total", backend="fails", outcome="failed") == 1
        row = gw.health()["backends"][0]
        assert row["healthy"] is False and row["failed"] == 1, row
        assert ("HTTP 500: out of memory (on purpose)" if mode == "500" else "before the first token"
                if stream else "closed the connection") in row["reason"], row
    finally:
        gw.close()
        failing.close(loop)


def test_a_backend_stream_broken_after_its_first_token_ends_with_an_error_event(loop, engine):
    failing = ScriptedServer(loop, "break")
    gw = Gateway(loop, engine, [parse_backend_spec(f"{failing.url},id=breaks")])
    try:
        with gw.ring_busy():
            r, events = gw.stream({"prompt": PROMPT, "max_tokens": 16})
        assert r.status_code == 200 and r.headers["x-p2pllm-backend"] == "breaks"
        assert events[-1] == "[DONE]"
        assert "".join(e["choices"][0]["text"] for e in events[:-2]) == " broken"
        assert events[-2]["error"]["code"] == "backend_error", events
        assert gw.metric("p2pllm_gateway_routed_requests_total", backend="breaks", outcome="broken") == 1
    finally:
        gw.close()
        failing.close(loop)


def test_a_peer_told_to_stop_takes_no_new_request_and_ends_its_backend_streams_with_why(loop, engine):
    """Ctrl-C on a peer whose gateway streams from a backend: new requests get a 503 even where a
    backend could take them, the stream goes on; a second Ctrl-C ends it with an error event
    before the gateway's shutdown grace would cut it without one (the daemon's `closing` and
    `stopping`; here set on the engine as the daemon sets them)."""
    slow = ScriptedServer(loop, "slow")
    gw = Gateway(loop, engine, [parse_backend_spec(f"{slow.url},id=slow")])
    body = {"prompt": PROMPT, "max_tokens": 16}
    try:
        with gw.ring_busy(), httpx.stream("POST", gw.url + "/v1/completions", json={**body, "stream": True},
                                          timeout=60) as r:
            assert r.status_code == 200 and r.headers["x-p2pllm-backend"] == "slow"
            events = (line[6:] for line in r.iter_lines() if line.startswith("data: "))
            assert json.loads(next(events))["choices"][0]["text"] == " tick"
            engine.closing = "this peer is leaving the cluster and takes no new requests"
            refused = gw.post(body)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["message"] == engine.closing
            assert json.loads(next(events))["choices"][0]["text"] == " tick"  # the running stream goes on
            engine.stopping = "this peer is shutting down"
            rest = list(events)
        assert rest[-1] == "[DONE]" and json.loads(rest[-2])["error"] == {
            "message": "this peer is shutting down", "type": "server_error", "param": None,
            "code": "service_unavailable"}, rest
        assert len(rest) < 10  # at once, not after the backend's 300 ticks
        assert gw.metric("p2pllm_gateway_routed_requests_total", backend="slow", outcome="broken") == 0
        _wait(lambda: gw.pool.in_flight() == 0)
    finally:
        engine.closing = engine.stopping = ""
        gw.close()
        slow.close(loop)


def test_a_ring_stream_broken_after_its_first_token_is_counted_broken(loop, engine):
    """As when the ring loses capacity mid-answer: the head parks its sequences, then fails them."""
    gw = Gateway(loop, engine, [])
    try:
        with httpx.stream("POST", gw.url + "/v1/completions", timeout=60,
                          json={"prompt": PROMPT, "max_tokens": 2000, "ignore_eos": True, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # the first token is out

            async def lose_the_ring():
                engine.pause("a peer of the ring was lost (test)")
                await engine.drain(10)
                engine.fail_parked("a peer of the ring was lost (test)")
                engine.resume("the same ring (test)", {})  # capacity back: serving again

            loop.run(lose_the_ring())
            rest = [line[6:] for line in lines if line.startswith("data: ")]
        assert rest[-1] == "[DONE]" and json.loads(rest[-2])["error"]["code"] == "engine_error", rest[-3:]
        assert gw.metric("p2pllm_gateway_routed_requests_total", backend="ring", outcome="broken") == 1
        assert gw.metric("p2pllm_gateway_routed_requests_total", backend="ring", outcome="served") == 1
    finally:
        gw.close()


def test_status_shows_the_backends_of_a_joined_peer(stories, llama_server, tmp_path):
    for port in (7811, 8811):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(f"port {port} on 127.0.0.1 is taken (another test session's daemon?)")
    workers = tmp_path / "workers.json"
    workers.write_text(json.dumps([
        {"id": "lms", "host": "127.0.0.1", "port": llama_server.port, "type": "lm_studio",
         "max_concurrent_requests": 2},
        {"id": "gone", "host": "127.0.0.1", "port": _free_port(), "type": "llama_server"},
    ]))
    env = dict(os.environ, HOME=str(tmp_path), PYTHONUNBUFFERED="1", P2PLLM_BACKEND_CHECK_SECONDS="1")
    argv = [sys.executable, "-m", "p2pllm", "join", "--model", str(stories), "--port", "7811", "--gateway-port",
            "8811", "--interface", "127.0.0.1", "--no-mdns", "--insecure", "--workers", str(workers)]
    log = tmp_path / "join.log"
    proc = subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=REPO, env=env, start_new_session=True)
    try:
        _wait(lambda: proc.poll() is None and _stages(8811) == 1, timeout=60, what=lambda: log.read_text()[-2000:])
        status = run_cli("status", "--host", "127.0.0.1:7811", "--insecure", "--json", timeout=60)
        assert status.returncode == 0, status.stderr
        rows = {b["id"]: b for b in json.loads(status.stdout)["backends"]}
        assert rows["lms"]["healthy"] is True and rows["lms"]["max_concurrent"] == 2
        assert rows["gone"]["healthy"] is False and "connection failed" in rows["gone"]["reason"]
        table = run_cli("status", "--host", "127.0.0.1:7811", "--insecure", timeout=60).stdout
        assert re.search(r"^lms +http://127\.0\.0\.1:\d+ +ok +0/2 ", table, re.M), table
        assert re.search(r"^gone +http://127\.0\.0\.1:\d+ +DOWN +0/1 .*connection failed", table, re.M), table
        reply = httpx.post("http://127.0.0.1:8811/v1/completions", timeout=60,
                           json={"prompt": PROMPT, "max_tokens": 8})
        assert reply.status_code == 200 and reply.headers["x-p2pllm-backend"] in ("ring", "lms"), reply.text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _stages(port: int) -> int:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json().get("stages") or 0
    except (httpx.HTTPError, ValueError):
        return 0


def _wait(condition, timeout: float = 20.0, what=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting: {what()}"
        time.sleep(0.05)
