"""`p2pllm demo`: a local cluster of `p2pllm join` processes on loopback, one question, the plan.

Each peer is a real daemon process with its own gRPC port and gateway, found through `--peer`
(mDNS is off: loopback has no multicast). Everything is stopped at the end unless --keep.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .errors import P2PError

BASE_GRPC = 7701
BASE_GATEWAY = 8701


def default_demo_model() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "p2pllm"
    return cache / "demo-tiny.gguf"


def cmd_demo(args) -> int:
    model = Path(args.model) if args.model else default_demo_model()
    if not model.exists():
        if args.model:
            raise P2PError(f"{model}: no such file")
        from .model.demo import make_demo_model

        print(f"writing the demo model to {model} (random weights: it answers with random text)", file=sys.stderr)
        make_demo_model(model, "gguf", "tiny")
    from .transport.security import Security, generate_secret

    logs = Path(tempfile.mkdtemp(prefix="p2pllm-demo-"))
    secret = generate_secret()  # this demo's own cluster secret: its peers talk mutual TLS, like any cluster
    procs = []
    try:
        for i in range(args.peers):
            procs.append(_start_peer(i, model, args, logs, secret))
        print(f"started {args.peers} peers (logs in {logs}); waiting for them to agree on a plan ...", file=sys.stderr)
        status = _wait_ready(procs, args.peers, logs, Security.from_secret(secret), timeout=args.timeout)
        answer, seconds, n_tokens = _ask(BASE_GATEWAY, args.prompt, args.max_tokens)
        print(f"\nQ: {args.prompt}\nA: {answer}\n")
        _print_plan(status)
        print(f"\n{n_tokens} tokens in {seconds:.2f}s: {n_tokens / seconds:.1f} tokens/s through {args.peers} peers")
        if args.keep:
            print(f"\nthe cluster keeps running: p2pllm chat --host 127.0.0.1:{BASE_GATEWAY}  |  "
                  f"P2PLLM_SECRET={secret} p2pllm status --host 127.0.0.1:{BASE_GRPC}  |  "
                  f"stop: kill {' '.join(str(p.pid) for p in procs)}")
            procs = []
        return 0
    finally:
        _stop(procs)


def _start_peer(i: int, model: Path, args, logs: Path, secret: str) -> subprocess.Popen:
    argv = [
        sys.executable, "-m", "p2pllm", "join", "--model", str(model), "--name", f"demo-peer-{i + 1}",
        "--port", str(BASE_GRPC + i), "--gateway-port", str(BASE_GATEWAY + i), "--interface", "127.0.0.1",
        "--no-mdns", "--peer", f"127.0.0.1:{BASE_GRPC}", "--strategy", "even", "--cluster", f"demo-{os.getpid()}",
    ]
    log = open(logs / f"peer-{i + 1}.log", "w")
    env = dict(os.environ, P2PLLM_SECRET=secret)  # in the environment, not argv: other users can read argv
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env=env)


def _wait_ready(procs, n: int, logs: Path, security, timeout: float) -> dict:
    import asyncio

    from .cli import _fetch_status

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        for i, p in enumerate(procs):
            if p.poll() is not None:
                tail = (logs / f"peer-{i + 1}.log").read_text()[-600:].strip().splitlines()
                raise P2PError(f"peer {i + 1} exited ({tail[-1] if tail else 'no output'}); logs in {logs}")
        try:
            status = asyncio.run(_fetch_status(f"127.0.0.1:{BASE_GRPC}", security))
            with_layers = [p for p in status["peers"] if p["layers"]]
            if status["epoch"] > 0 and len(with_layers) == n:
                return status
            last = f"epoch {status['epoch']}, {len(with_layers)} of {n} peers placed"
        except P2PError as e:
            last = str(e)
        time.sleep(0.5)
    raise P2PError(f"the demo cluster was not ready within {timeout:.0f}s ({last}); logs in {logs}")


def _ask(port: int, prompt: str, max_tokens: int) -> tuple[str, float, int]:
    import httpx

    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    parts, n_tokens = [], 0
    t0 = time.perf_counter()
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120) as r:
        if r.status_code != 200:
            raise P2PError(f"the gateway answered {r.status_code}: {r.read().decode()[:300]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                parts.append(choice.get("delta", {}).get("content") or "")
            if chunk.get("usage"):
                n_tokens = chunk["usage"]["completion_tokens"]
    return "".join(parts), time.perf_counter() - t0, n_tokens


def _print_plan(status: dict) -> None:
    names = {p["id"]: p["name"] for p in status["peers"]}
    print(f"plan epoch {status['epoch']} (coordinator {names.get(status['coordinator'], status['coordinator'])}):")
    for stage in status["plan"]["stages"]:
        start, end = stage["layers"]
        print(f"  {names.get(stage['peer'], stage['peer'])}: layers [{start}, {end})")


def _stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="start a local 3-peer cluster on the demo model and ask it one question",
                       description="Start peers on loopback, wait for one plan, ask one question through the "
                                   "gateway, print the answer, the plan and tokens/s, and stop them.")
    p.add_argument("--model", default=None, help="a model to serve (default: the embedded demo model)")
    p.add_argument("--peers", type=int, default=3, choices=range(1, 9), metavar="N", help="peers to start (1-8)")
    p.add_argument("--prompt", default="Tell me a story about a robot.")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for the cluster")
    p.add_argument("--keep", action="store_true", help="leave the cluster running")
    p.set_defaults(func=cmd_demo)

