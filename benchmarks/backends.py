"""External-backend benchmark: the ring alone vs the ring plus a llama.cpp server of the same model,
and what a client sees when that server is killed in the middle of a run.

    python benchmarks/backends.py            # writes benchmarks/results/backends.json, prints a markdown table
    python benchmarks/backends.py --quick    # 8 requests, 4 clients, 1 repeat (a smoke test, not a result)

Two 2-peer loopback clusters (`p2pllm join --strategy even`, one stage each) serve
SmolLM2-135M-Instruct (Q4_1 GGUF, the shared test model), both with `--response-cache off` and
`--prefix-cache 0`, so every request, repeated or not, is computed. Configuration A is the ring
alone. Configuration B is the same ring plus one external backend: llama-cpp-python's server
(`python -m llama_cpp.server`, the stand-in for llama-server / LM Studio) on the same GGUF file with
`--n_threads 1 --n_threads_batch 1 --n_ctx 2048 --interrupt_requests False`, given to B's daemons as
`--backend http://127.0.0.1:PORT,max_concurrent=2,type=llama_server`. `start_cluster` gives the
flags to both of B's peers; only the gateway a request arrives at routes it, and every request here
goes to the coordinator's gateway (so no request is also forwarded between peers).

A run: the same K distinct greedy (temperature 0) chat requests, not streamed, `max_tokens` each,
sent by a pool of client threads (8 by default). Measured: requests/s and completion tokens/s over
the run's wall time, each request's latency (median, p90), who served each one (the answer's
`x-p2pllm-backend` header: `ring` or the backend's id) and errors. A and B alternate run by run,
`--repeats` times, so both see the same machine. Then the failure phase, on B: the same K requests
once more, and once a third of them are answered and the backend has a request in flight, the llama.cpp
server is killed with SIGKILL. Non-streamed answers are whole or retried (docs/gateway.md), so every
request should still succeed; the retries are read from the gateway's /metrics
(`p2pllm_gateway_routed_requests_total{backend=ID,outcome="failed"}`: tried there, failed before an
answer, tried on the next target, the ring being the only other one).

On a machine of few cores the backend competes with the ring's daemons for the same CPUs, so B's
gain here says little about a backend on another machine; the failure phase is the point there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch import uptime  # noqa: E402
from ring import RESTARTS, free_port, machine, pct, start_cluster  # noqa: E402  (the ring benchmark's loopback cluster)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "backends.json"
MODEL = ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SECRET = "backends-benchmark-secret-0123456789"
CLUSTER_FLAGS = ["--strategy", "even", "--response-cache", "off", "--prefix-cache", "0"]
LLAMA_SETTINGS = ["--n_ctx", "2048", "--n_threads", "1", "--n_threads_batch", "1", "--interrupt_requests", "False"]
MAX_CONCURRENT = 2
QUESTIONS = ["Write one sentence about {}.", "Name two things you might see at {}.", "Why would someone visit {}?"]
TOPICS = ["a bakery", "a river", "a library", "a train station", "a garden", "a bridge", "a market", "a school",
          "a harbour", "a forest", "a museum", "a farm", "a lighthouse", "a castle", "a mountain", "a kitchen"]


def prompts(k: int) -> list[str]:
    """k distinct user messages (at most len(QUESTIONS) * len(TOPICS))."""
    return [QUESTIONS[i // len(TOPICS)].format(TOPICS[i % len(TOPICS)]) for i in range(k)]


class LlamaServer:
    """`python -m llama_cpp.server` on the model, on a free loopback port; killable with SIGKILL."""

    def __init__(self, model: Path, log: Path):
        self.model, self.log, self.port = model, log, free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> None:
        argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model), "--host", "127.0.0.1",
                "--port", str(self.port), *LLAMA_SETTINGS]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited (rc {self.proc.returncode}): "
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"llama_cpp.server did not start: {self.log.read_text(errors='replace')[-2000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def chat(base: str, content: str, max_tokens: int) -> dict:
    """One greedy chat completion, not streamed: who served it, its tokens, its latency, or its error."""
    body = {"model": MODEL.name, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0}
    t0 = time.perf_counter()
    try:
        r = httpx.post(base + "/v1/chat/completions", json=body, timeout=300)
        seconds = time.perf_counter() - t0
        if r.status_code != 200:
            return {"seconds": seconds, "error": f"HTTP {r.status_code}: {r.text[:300]}",
                    "served_by": r.headers.get("x-p2pllm-backend")}
        data = r.json()
        return {"seconds": seconds, "served_by": r.headers.get("x-p2pllm-backend"),
                "completion_tokens": data["usage"]["completion_tokens"],
                "text": data["choices"][0]["message"]["content"], "finish": data["choices"][0]["finish_reason"]}
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:  # connection, timeout, an odd body
        return {"seconds": time.perf_counter() - t0, "error": f"{type(e).__name__}: {e}"[:300], "served_by": None}


def routed(base: str) -> dict[tuple[str, str], float]:
    """p2pllm_gateway_routed_requests_total by (backend, outcome), from the gateway's /metrics."""
    out = {}
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith("p2pllm_gateway_routed_requests_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
            out[(labels.get("backend", "?"), labels.get("outcome", "?"))] = float(line.rsplit(" ", 1)[1])
    return out


def backend_row(base: str) -> dict | None:
    rows = httpx.get(base + "/health", timeout=10).json().get("backends") or []
    return rows[0] if rows else None


def one_run(base: str, texts: list[str], max_tokens: int, clients: int, during=None) -> dict:
    """Every text once through `clients` threads; `during(done_count)` runs in this thread meanwhile."""
    before, load = routed(base), os.getloadavg()[0]
    done = [0]
    lock = threading.Lock()

    def task(text: str) -> dict:
        r = chat(base, text, max_tokens)
        with lock:
            done[0] += 1
        return r

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(task, t) for t in texts]
        extra = during(done, len(texts)) if during else None
        results = [f.result() for f in futures]
    wall = time.perf_counter() - t0
    after = routed(base)
    ok = [r for r in results if "error" not in r]
    lat = [r["seconds"] for r in ok]
    served: dict[str, int] = {}
    for r in ok:
        served[r["served_by"] or "?"] = served.get(r["served_by"] or "?", 0) + 1
    run = {"requests": len(texts), "errors": len(results) - len(ok), "wall_seconds": round(wall, 3),
           "requests_per_second": round(len(ok) / wall, 4),
           "completion_tokens": sum(r["completion_tokens"] for r in ok),
           "completion_tokens_per_second": round(sum(r["completion_tokens"] for r in ok) / wall, 3),
           "latency_median": round(statistics.median(lat), 4) if lat else None,
           "latency_p90": round(pct(lat, 90), 4) if lat else None,
           "served_by": served, "load_1min_before": round(load, 2),
           "routed_delta": {f"{b}|{o}": after.get((b, o), 0.0) - before.get((b, o), 0.0)
                            for b, o in sorted(set(after) | set(before))
                            if after.get((b, o), 0.0) != before.get((b, o), 0.0)},
           "error_messages": sorted({r["error"] for r in results if "error" in r})[:5],
           "answers": [(r.get("served_by"), r.get("text")) for r in results]}
    if extra is not None:
        run["kill"] = extra
    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 requests of 16 tokens from 4 clients, 1 repeat")
    ap.add_argument("--requests", type=int, default=24, help="K distinct requests per run")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    k, max_tokens, repeats = (8, 16, 1) if args.quick else (args.requests, args.max_tokens, args.repeats)
    if args.quick:
        args.clients = 4  # fewer clients than requests, so the backend takes more than its first one
    if not MODEL.exists():
        print(f"{MODEL} is absent (the shared test models live beside the checkout)", file=sys.stderr)
        return 2
    if not 1 <= k <= len(QUESTIONS) * len(TOPICS):
        print(f"--requests must be between 1 and {len(QUESTIONS) * len(TOPICS)}", file=sys.stderr)
        return 2
    texts = prompts(k)
    load_before = uptime()
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory(prefix="p2pllm-backends-bench-") as tmp:
        tmp_path = Path(tmp)
        llama = LlamaServer(MODEL, tmp_path / "llama-server.log")
        clusters = {}
        try:
            llama.start()  # before B's daemons: their gateways check it once before listening
            backend_id = f"127.0.0.1:{llama.port}"
            spec = f"http://127.0.0.1:{llama.port},max_concurrent={MAX_CONCURRENT},type=llama_server"
            clusters["A"] = start_cluster(MODEL, 2, extra=CLUSTER_FLAGS, secret=SECRET, log_dir=tmp_path, tag="ring")
            clusters["B"] = start_cluster(MODEL, 2, extra=[*CLUSTER_FLAGS, "--backend", spec], secret=SECRET,
                                          log_dir=tmp_path, tag="ring-backend")
            bases = {tag: f"http://127.0.0.1:{c.gw[c.head]}" for tag, c in clusters.items()}
            row = backend_row(bases["B"])
            if not row or row["healthy"] is not True:
                raise RuntimeError(f"B's gateway does not have the backend in rotation: {row}")
            # warm-up, not measured: first-call allocations on each ring; the backend's first request
            warm = ["Say hello.", "Count to three."]
            for tag, base in bases.items():
                with ThreadPoolExecutor(2) as pool:
                    list(pool.map(lambda t, b=base: chat(b, t, 8), warm))
            httpx.post(llama.url + "/v1/chat/completions", timeout=120,
                       json={"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
                             "temperature": 0})
            for i in range(repeats):
                for tag in ("A", "B"):
                    run = one_run(bases[tag], texts, max_tokens, args.clients)
                    runs[tag].append(run)
                    print(f"{tag} #{i + 1}: {run['requests_per_second']:.2f} req/s, "
                          f"{run['completion_tokens_per_second']:.1f} tok/s, served by {run['served_by']}, "
                          f"{run['errors']} errors", file=sys.stderr, flush=True)

            def kill_midway(done: list, n: int) -> dict:
                """SIGKILL the llama.cpp server once a third of the run is answered and it has a request."""
                deadline = time.monotonic() + 600
                while time.monotonic() < deadline and done[0] < n:
                    if done[0] >= max(1, n // 3):
                        row = backend_row(bases["B"])
                        if row and row["in_flight"] >= 1:
                            llama.kill()
                            return {"killed": True, "answered_before": done[0], "backend_in_flight": row["in_flight"],
                                    "backend_served_so_far": row["served"]}  # since it started, warm-up and earlier runs included
                    time.sleep(0.02)
                llama.kill()  # too late to be in the middle: still killed, and the run says so
                return {"killed": False, "answered_before": done[0]}

            failure = one_run(bases["B"], texts, max_tokens, args.clients, during=kill_midway)
            failure["backend_after"] = backend_row(bases["B"])
            print(f"B, backend killed: {failure['requests'] - failure['errors']} of {failure['requests']} answered, "
                  f"served by {failure['served_by']}, kill {failure['kill']}", file=sys.stderr, flush=True)
        finally:
            for c in clusters.values():
                c.close()
            llama.kill()
    res = {"benchmark": "backends", "quick": args.quick, "model": MODEL.name, "peers": 2, "requests": k,
           "max_tokens": max_tokens, "clients": args.clients, "repeats": repeats, "cluster_flags": CLUSTER_FLAGS,
           "backend": {"server": "llama_cpp.server", "settings": LLAMA_SETTINGS, "spec": spec, "id": backend_id},
           "requests_to": "the coordinator's gateway", "machine": machine(), "uptime_before": load_before,
           "uptime_after": uptime(), "cluster_restarts": list(RESTARTS), "configs": {}}
    for tag, rs in runs.items():
        res["configs"][tag] = {
            "requests_per_second_median": statistics.median(r["requests_per_second"] for r in rs),
            "completion_tokens_per_second_median": statistics.median(r["completion_tokens_per_second"] for r in rs),
            "latency_median": statistics.median(r["latency_median"] for r in rs if r["latency_median"] is not None),
            "latency_p90": statistics.median(r["latency_p90"] for r in rs if r["latency_p90"] is not None),
            "served_by": {who: sum(r["served_by"].get(who, 0) for r in rs)
                          for who in sorted({w for r in rs for w in r["served_by"]})},
            "errors": sum(r["errors"] for r in rs),
            "runs": [{key: v for key, v in r.items() if key != "answers"} for r in rs],
        }
    res["speedup_B_vs_A"] = round(res["configs"]["B"]["requests_per_second_median"]
                                  / res["configs"]["A"]["requests_per_second_median"], 2)
    # greedy answers should not depend on who served them (llama.cpp's repeat penalty is turned off), though
    # ggml's kernels on the ring and llama.cpp's, and batches of different make-up, may round a near-tie apart
    pairs = [(a, b) for ra, rb in zip(runs["A"], runs["B"]) for a, b in zip(ra["answers"], rb["answers"])
             if a[1] is not None and b[1] is not None]
    res["answers_differing_B_vs_A"] = {
        "B on the ring": [sum(a[1] != b[1] for a, b in pairs if b[0] == "ring"), sum(b[0] == "ring" for _, b in pairs)],
        "B on the backend": [sum(a[1] != b[1] for a, b in pairs if b[0] != "ring"),
                             sum(b[0] != "ring" for _, b in pairs)]}
    res["failure"] = {key: v for key, v in failure.items() if key != "answers"}
    res["failure"]["retried_after_backend_failed"] = failure["routed_delta"].get(f"{backend_id}|failed", 0.0)
    res["failure"]["broken_after_first_token"] = failure["routed_delta"].get(f"{backend_id}|broken", 0.0)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    return 0


def markdown(res: dict) -> str:
    m, f = res["machine"], res["failure"]
    load = res["uptime_before"].split("load average:")[-1].strip()
    load_after = res["uptime_after"].split("load average:")[-1].strip()
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores; load before: `{load}`, after: `{load_after}` (1/5/15 min); "
             f"{res['model']} on {res['peers']} loopback peers (one stage each, no response or prefix cache); "
             f"{res['requests']} distinct greedy chat requests of {res['max_tokens']} max tokens from "
             f"{res['clients']} client threads, not streamed, median of {res['repeats']}. B adds "
             f"llama_cpp.server ({' '.join(res['backend']['settings'])}) as `--backend ...,max_concurrent="
             f"{MAX_CONCURRENT},type=llama_server`.", "",
             "| | requests/s | completion tokens/s | latency median | latency p90 | served by (all runs) | errors "
             "| 1-min load before each run |", "|---|---|---|---|---|---|---|---|"]
    names = {"A": "A: ring", "B": "B: ring + llama.cpp"}
    for tag, x in res["configs"].items():
        served = ", ".join(f"{'backend' if who == res['backend']['id'] else who} {n}"
                           for who, n in x["served_by"].items())
        loads = ", ".join(f"{r['load_1min_before']:.1f}" for r in x["runs"])
        lines.append(f"| {names[tag]} | {x['requests_per_second_median']:.2f} | "
                     f"{x['completion_tokens_per_second_median']:.1f} | {x['latency_median']:.2f} s | "
                     f"{x['latency_p90']:.2f} s | {served} | {x['errors']} | {loads} |")
    served = ", ".join(f"{'backend' if who == res['backend']['id'] else who} {n}" for who, n in f["served_by"].items())
    kill = f["kill"]
    when = (f"after {kill['answered_before']} of {f['requests']} answers, with {kill['backend_in_flight']} request(s) "
            f"on it" if kill.get("killed") else f"only after the run ({kill['answered_before']} answered): not mid-run")
    diff = res["answers_differing_B_vs_A"]
    lines += ["", f"B vs A: **{res['speedup_B_vs_A']:.2f}x** requests/s (medians). Greedy answers that differ from A's "
                  f"to the same request in the same repeat: {diff['B on the ring'][0]} of {diff['B on the ring'][1]} "
                  f"that B's ring served, {diff['B on the backend'][0]} of {diff['B on the backend'][1]} that the "
                  f"backend served.", "",
              f"Backend killed (SIGKILL) {when}: {f['requests'] - f['errors']} of {f['requests']} requests answered "
              f"({served}), **{f['errors']} errors**; requests that failed on the backend before an answer and were "
              f"tried again on the ring: {f['retried_after_backend_failed']:.0f}; broken after their first token: "
              f"{f['broken_after_first_token']:.0f}; latency median {f['latency_median']:.2f} s, "
              f"p90 {f['latency_p90']:.2f} s."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
