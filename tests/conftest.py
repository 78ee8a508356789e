"""Shared fixtures: the shared test models, generated demo models, and running the CLI for real."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
REPO = Path(__file__).resolve().parents[1]


def shared_model(name: str) -> Path:
    path = SHARED_MODELS / name
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared test models live beside the checkout)")
    return path


@pytest.fixture(scope="session")
def stories_gguf() -> Path:
    return shared_model("stories260K.gguf")


@pytest.fixture(scope="session")
def demo_tiny_gguf(tmp_path_factory) -> Path:
    from p2pllm.model.demo import make_demo_model

    return make_demo_model(tmp_path_factory.mktemp("demo") / "tiny.gguf", "gguf", "tiny")


@pytest.fixture(scope="session")
def demo_tiny_hf(tmp_path_factory) -> Path:
    from p2pllm.model.demo import make_demo_model

    return make_demo_model(tmp_path_factory.mktemp("demo-hf") / "tiny", "hf", "tiny")


class LoopThread:
    """An asyncio loop in a background thread: the server side of every test."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="gateway-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def loop():
    """A LoopThread for the module's servers and engines."""
    lt = LoopThread()
    yield lt
    lt.close()


def stop_daemon(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM (a daemon drains), then SIGKILL if it has not ended within `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_cli(*args: str, timeout: float = 300, input: str | None = None,
            env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """`p2pllm ARGS...` in a fresh process, as a user would run it (with env_extra's variables set)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    env.pop("P2PLLM_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "p2pllm", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env, input=input,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int = 2, *needles: str) -> str:
    """A clear error: the expected exit code, one line on stderr, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="session")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is the reference; scripts/setup.sh installs it")


LLAMA_CPP_KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}


def llama_cpp_model(llama_cpp, path, n_ctx=512, kv="f32"):
    # f32 KV cache by default: llama.cpp's default f16 cache can flip near-ties in random models;
    # compare like with like (our ggml stages keep f16 by default, as llama.cpp does)
    t = LLAMA_CPP_KV_TYPES[kv]
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, logits_all=True, verbose=False,
                           seed=0, type_k=t, type_v=t, flash_attn=kv == "q8_0")


def llama_cpp_greedy(llm, prompt_ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt_ids)
    out = []
    for _ in range(n):
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
        if tok == llm.token_eos():
            break
        out.append(tok)
        llm.eval([tok])
    return out


class LiveCluster:
    """`p2pllm join` processes on loopback serving one model; clients talk to `url`."""

    def __init__(self, url: str, model: str, secret: str = "", procs: list | None = None,
                 timeline: Path | None = None):
        self.url, self.model, self.secret, self.procs = url, model, secret, procs or []
        self.timeline = timeline  # the daemons' P2PLLM_TIMELINE file

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def smol_cluster(tmp_path_factory):
    """SmolLM2 on a live 2-peer cluster (real gRPC ring, mutual TLS, each peer half the layers);
    `url` is the gateway of the peer that is not the coordinator, so requests are forwarded."""
    # tests repeat requests to watch the ring compute them, and compare greedy answers with
    # references: a reused prefix may round differently (docs/architecture.md, "Prefix cache")
    yield from live_smol_cluster(tmp_path_factory.mktemp("smol-cluster"), "smol", (7761, 7762, 8761, 8762),
                                 "--response-cache", "off", "--prefix-cache", "0")


def live_smol_cluster(logs: Path, name: str, ports: tuple[int, int, int, int], *extra: str):
    """A LiveCluster of `p2pllm join` daemons on SmolLM2, one per two ports (gRPC ports[:n], gateways
    ports[n:]; named NAME-1 ... NAME-n), stopped when the generator is closed."""
    import asyncio
    import socket

    import httpx

    from p2pllm.transport.client import fetch_status
    from p2pllm.transport.security import Security

    path = shared_model("SmolLM2-135M-Instruct.Q4_1.gguf")
    for port in ports:  # another test session's cluster must not answer for this one
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(f"port {port} on 127.0.0.1 is taken (another test session's cluster?)")
    timeline = logs / "timeline.txt"
    env = dict(os.environ, P2PLLM_SECRET=f"{name}-cluster-test-secret-0123456789", HOME=str(logs),
               P2PLLM_TIMELINE=str(timeline))
    n = len(ports) // 2
    grpc, gateways = ports[:n], ports[n:]
    procs = []
    for i in range(n):
        argv = [sys.executable, "-m", "p2pllm", "join", "--model", str(path), "--name", f"{name}-{i + 1}",
                "--port", str(grpc[i]), "--gateway-port", str(gateways[i]), "--interface", "127.0.0.1", "--no-mdns",
                "--peer", f"127.0.0.1:{grpc[0]}", "--strategy", "even", "--cluster", f"{name}-test", *extra]
        procs.append(subprocess.Popen(argv, stdout=open(logs / f"peer-{i + 1}.log", "w"), stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, cwd=REPO, env=env, start_new_session=True))
    try:
        deadline, healthy = time.monotonic() + 90, []
        while time.monotonic() < deadline and len(healthy) < n:
            assert all(p.poll() is None for p in procs), [(logs / f"peer-{i + 1}.log").read_text()[-2000:]
                                                         for i in range(n)]
            healthy = [port for port in gateways if _stages_of(httpx, port) == n]
            time.sleep(0.5)
        assert len(healthy) == n, [(logs / f"peer-{i + 1}.log").read_text()[-2000:] for i in range(n)]
        status = asyncio.run(fetch_status(f"127.0.0.1:{grpc[0]}", Security.from_secret(env["P2PLLM_SECRET"])))
        coordinator = next(p["address"] for p in status["peers"] if p["id"] == status["coordinator"])
        other_gateway = next(gw for rpc, gw in zip(grpc, gateways) if not coordinator.endswith(f":{rpc}"))
        yield LiveCluster(f"http://127.0.0.1:{other_gateway}", path.name, env["P2PLLM_SECRET"], procs, timeline)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 15)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)


def _stages_of(httpx, port: int) -> int:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json().get("stages") or 0
    except (httpx.HTTPError, ValueError):
        return 0
