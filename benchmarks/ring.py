"""Ring benchmark: real `p2pllm join` daemons, real gRPC, on one machine.

    python benchmarks/ring.py                # writes benchmarks/results/ring.json, prints markdown
    python benchmarks/ring.py --quick        # fewer tokens and repeats (a smoke test, not a result)
    python benchmarks/ring.py --only 1,3     # some parts only
    python benchmarks/ring.py --only 1 --threads 2   # part 1's daemons with 2 compute threads each

1. 125M demo model on loopback: single-stream decode tokens/s with 3 daemons (`--strategy even`)
   vs 1 daemon, and the latency one ring hop adds (p50/p99); the same two with 8 concurrent
   streams; and where a single stream's token goes, from the daemons' timelines
   (`P2PLLM_TIMELINE`, p2pllm/runtime/timeline.py): each stage's decode, layers and encode, each
   ring message, the head's turn.
2. Two daemons pinned to one core each (`taskset -c 0` / `-c 1`, `--threads 1`), 8 concurrent
   fixed-length streams: aggregate tokens/s with `--micro-batches 2` vs `--micro-batches 1`.
3. Three network-namespace hosts (tests/netns.py) whose links are shaped to 100 Mbit/s
   (`tc ... tbf rate 100mbit`): measured tokens/s vs the planner's prediction in `status`.

How tokens are timed: the benchmark client calls the coordinator's `Generate` RPC (the same
streaming RPC a non-coordinator peer's gateway forwards OpenAI requests with), one event per
generated token, and stamps each event on arrival. It does not use the SSE stream of the HTTP
gateway because the 125M demo model's greedy tokens mostly decode to empty text (only ~1,070
of its 32,000 ids have text) and the gateway, like OpenAI's, sends no chunk for empty text; an
HTTP `/v1/completions` request per repeat is still made and its end-to-end rate reported.
Every request is greedy with `ignore_eos`, so each run has exactly `max_tokens` tokens.

Every process, namespace and bridge made here is removed at the end, also on failure or Ctrl-C.
Run as root for part 3 (network namespaces and tc); it is skipped with the reason otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ring.json"
MODEL_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "p2pllm" / "demo-125m.gguf"
PROMPT_IDS = [1, 599, 610, 265, 593, 294, 263, 2319, 4726, 491, 278, 7205]  # a fixed 12-token prompt
READY_TIMEOUT = 120.0
STREAMS1 = 8  # part 1's concurrent streams (besides the single stream)
SPLIT_BRAIN_SECONDS = 10.0


# =========================================================================== the client

_LOOP: asyncio.AbstractEventLoop | None = None


def run(coro):
    """Run a coroutine on this process's one event loop (gRPC aio channels must not outlive their loop)."""
    global _LOOP
    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()
    return _LOOP.run_until_complete(coro)

# (runs in this process for loopback clusters, and as `ring.py --client` inside a namespace host)


def _channel(address: str, secret: str | None):
    from p2pllm.transport.client import CHANNEL_OPTIONS

    try:
        from p2pllm.transport.security import Security
    except ImportError:  # a tree without peer authentication
        import grpc

        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    security = Security.from_secret(secret) if secret else Security.insecure()
    return security.channel(address, CHANNEL_OPTIONS)


async def _status(address: str, secret: str | None, timeout: float = 5.0) -> dict:
    from p2pllm.proto import p2pllm_pb2 as pb
    from p2pllm.proto import p2pllm_pb2_grpc as pb_grpc

    channel = _channel(address, secret)
    try:
        reply = await pb_grpc.PeerStub(channel).Status(pb.StatusRequest(), timeout=timeout)
        return json.loads(reply.json)
    finally:
        await channel.close()


async def _generate(address: str, secret: str | None, streams: int, max_tokens: int, timeout: float = 600) -> dict:
    """`streams` concurrent greedy requests of exactly `max_tokens` tokens; arrival time of each token."""
    from p2pllm.proto import p2pllm_pb2 as pb
    from p2pllm.proto import p2pllm_pb2_grpc as pb_grpc

    channel = _channel(address, secret)
    stub = pb_grpc.PeerStub(channel)

    async def one(i: int) -> dict:
        prompt = [PROMPT_IDS[0]] + [(t + 37 * i) % 1000 + 3 for t in PROMPT_IDS[1:]]  # distinct prompts
        req = pb.GenerateRequest(request_id=f"bench-{uuid.uuid4().hex[:12]}", prompt_ids=prompt,
                                 max_tokens=max_tokens, temperature=0.0, top_p=1.0, ignore_eos=True)
        sent = time.perf_counter()
        times: list[float] = []
        finish = ""
        async for ev in stub.Generate(req, timeout=timeout):
            if ev.error or ev.status:
                raise RuntimeError(f"Generate failed: {ev.status} {ev.code} {ev.error}")
            if ev.has_token:
                times.append(time.perf_counter())
            if ev.finish_reason:
                finish = ev.finish_reason
                break
        return {"sent": sent, "times": times, "finish": finish}

    try:
        t0 = time.perf_counter()
        out = await asyncio.gather(*(one(i) for i in range(streams)))
        t1 = time.perf_counter()
    finally:
        await channel.close()
    for o in out:  # relative to the start, for JSON
        o["sent"] -= t0
        o["times"] = [t - t0 for t in o["times"]]
    return {"wall": t1 - t0, "streams": out}


async def _ping(address: str, secret: str | None, n: int) -> list[float]:
    """Round-trip times of n empty unary Ping RPCs on one warm channel (seconds)."""
    from p2pllm.proto import p2pllm_pb2 as pb
    from p2pllm.proto import p2pllm_pb2_grpc as pb_grpc

    channel = _channel(address, secret)
    stub = pb_grpc.PeerStub(channel)
    try:
        for _ in range(10):
            await stub.Ping(pb.PingRequest(), timeout=5)
        rtts = []
        for _ in range(n):
            t0 = time.perf_counter()
            await stub.Ping(pb.PingRequest(), timeout=5)
            rtts.append(time.perf_counter() - t0)
        return rtts
    finally:
        await channel.close()


def _metrics(gateway_port: int) -> dict:
    """This daemon's stage compute seconds, frames and ring bytes from its gateway's /metrics."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{gateway_port}/metrics", timeout=10).text
    want = {"p2pllm_engine_stage_compute_seconds_total": "compute_s", "p2pllm_engine_stage_frames_total": "frames",
            "p2pllm_engine_ring_bytes_sent_total": "ring_bytes"}
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in want:
            out[want[parts[0]]] = float(parts[1])
    return out


def _http_completion(gateway_port: int, model: str, max_tokens: int) -> dict:
    import httpx

    body = {"model": model, "prompt": PROMPT_IDS, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    r = httpx.post(f"http://127.0.0.1:{gateway_port}/v1/completions", json=body, timeout=300)
    seconds = time.perf_counter() - t0
    r.raise_for_status()
    return {"seconds": seconds, "completion_tokens": r.json()["usage"]["completion_tokens"]}


def client_job(job: dict) -> object:
    kind = job["kind"]
    if kind == "status":
        return run(_status(job["address"], job.get("secret")))
    if kind == "generate":
        return run(_generate(job["address"], job.get("secret"), job["streams"], job["max_tokens"]))
    if kind == "metrics":
        return _metrics(job["gateway_port"])
    if kind == "ping":
        return run(_ping(job["address"], job.get("secret"), job["n"]))
    raise SystemExit(f"unknown job {kind}")


# =========================================================================== statistics


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (linear interpolation)."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def decode_rate(stream: dict) -> float:
    """Tokens/s of one stream after its first token (prefill and time to first token excluded)."""
    t = stream["times"]
    return (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else float("nan")


def intervals(stream: dict) -> list[float]:
    t = stream["times"]
    return [b - a for a, b in zip(t, t[1:])]


def aggregate(run: dict) -> dict:
    """Aggregate tokens/s of concurrent streams: all tokens over the wall time, and the steady state
    (tokens that arrived while every stream was decoding, over that window)."""
    streams = run["streams"]
    total = sum(len(s["times"]) for s in streams)
    start = max(s["times"][0] for s in streams)
    end = min(s["times"][-1] for s in streams)
    inside = sum(1 for s in streams for t in s["times"] if start < t <= end)
    return {"tokens": total, "wall_tokens_per_s": total / run["wall"],
            "steady_tokens_per_s": inside / (end - start) if end > start else float("nan")}


def timeline_breakdown(path: Path, spans: list[tuple[float, float]]) -> dict | None:
    """Where a single stream's token goes, from the daemons' timeline (p2pllm/runtime/timeline.py)
    over the measured runs (`spans`): median ms per token of each stage's decode, layers and encode
    (in ring order), of each ring message (the sender's frame encoded -> the receiver's handler
    running; the first from the head's launch, the last to the head's result), and of the head's
    turn (the answers taken, the next micro-batch launched). Medians of parts do not add up to the
    median cycle exactly. None when the timeline has no lines (a tree without it)."""
    try:
        lines = [line.split() for line in path.read_text().splitlines()]
    except FileNotFoundError:
        return None
    events = sorted((float(t), int(pid), name) for t, pid, name in lines)
    inside = lambda t: any(a <= t <= b for a, b in spans)  # noqa: E731
    launches = [i for i, (t, _, name) in enumerate(events) if name == "launch" and inside(t)]
    cycles = []
    for a, b in zip(launches, launches[1:]):
        if not any(s0 <= events[a][0] and events[b][0] <= s1 for s0, s1 in spans):
            continue  # the last token of one run and the first of the next
        first: dict = {}
        for t, pid, name in events[a + 1: b + 1]:
            first.setdefault((pid, name), t)
        order = sorted((t, pid) for (pid, name), t in first.items() if name == "recv")
        if not order or any((pid, e) not in first for _, pid in order for e in ("decoded", "stepped", "computed")):
            continue
        head, t0 = events[a][1], events[a][0]
        if (head, "result") not in first or (head, "answers") not in first:
            continue
        stages = [pid for _, pid in order]
        hops = [first[(stages[0], "recv")] - t0]
        hops += [first[(nxt, "recv")] - first[(pid, "computed")] for pid, nxt in zip(stages, stages[1:])]
        hops.append(first[(head, "result")] - first[(stages[-1], "computed")])
        cycles.append({
            "cycle": events[b][0] - t0,
            "stages": [(first[(p, "decoded")] - first[(p, "recv")], first[(p, "stepped")] - first[(p, "decoded")],
                        first[(p, "computed")] - first[(p, "stepped")]) for p in stages],
            "hops": hops,
            "head": (first[(head, "answers")] - first[(head, "result")], events[b][0] - first[(head, "answers")]),
            "head_stage": stages.index(head) if head in stages else None,
        })
    n_stages = statistics.mode(len(c["stages"]) for c in cycles) if cycles else 0
    cycles = [c for c in cycles if len(c["stages"]) == n_stages]
    if not cycles:
        return None
    med = lambda f: statistics.median(f(c) for c in cycles) * 1e3  # noqa: E731
    return {
        "tokens": len(cycles),
        "cycle_ms": med(lambda c: c["cycle"]),
        "head_stage": statistics.mode(c["head_stage"] for c in cycles),
        "stages_ms": [{"decode": med(lambda c: c["stages"][i][0]), "layers": med(lambda c: c["stages"][i][1]),
                       "encode": med(lambda c: c["stages"][i][2])} for i in range(n_stages)],
        "messages_ms": [med(lambda c: c["hops"][i]) for i in range(n_stages + 1)],
        "head_ms": {"take": med(lambda c: c["head"][0]), "launch": med(lambda c: c["head"][1])},
    }


# =========================================================================== loopback clusters


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_supports(flag: str) -> bool:
    return flag in _join_help()


@functools.lru_cache(maxsize=1)
def _join_help() -> str:
    return subprocess.run([sys.executable, "-m", "p2pllm", "join", "--help"], capture_output=True, text=True).stdout


def caches_off() -> list[str]:
    """Every request computed: the gateway's response cache would answer a repeated request at once."""
    return [f for flag in ("--response-cache", "--prefix-cache") if join_supports(flag)
            for f in (flag, "off" if flag == "--response-cache" else "0")]


class LoopbackCluster:
    """N `p2pllm join` daemons on 127.0.0.1, each optionally pinned with taskset."""

    def __init__(self, model: Path, n: int, *, extra=(), pin: list[str] | None = None, secret: str | None,
                 log_dir: Path, tag: str, timeline: Path | None = None):
        self.model, self.n, self.secret, self.log_dir, self.tag = model, n, secret, log_dir, tag
        self.timeline = timeline  # where the daemons write p2pllm/runtime/timeline.py's lines (None: not)
        env = {**os.environ, "P2PLLM_TIMELINE": str(timeline)} if timeline else None
        self.procs: list[subprocess.Popen] = []
        self.grpc = [free_port() for _ in range(n)]
        self.gw = [free_port() for _ in range(n)]
        cluster = f"bench-{tag}-{os.getpid()}"
        security = [f"--secret={secret}"] if secret else (["--insecure"] if join_supports("--insecure") else [])
        try:
            for i in range(n):
                argv = [sys.executable, "-m", "p2pllm", "join", "--model", str(model), "--name", f"{tag}-{i + 1}",
                        "--port", str(self.grpc[i]), "--gateway-port", str(self.gw[i]), "--interface", "127.0.0.1",
                        "--no-mdns", "--peer", f"127.0.0.1:{self.grpc[0]}", "--cluster", cluster, *security,
                        *caches_off(), *extra]
                if pin:
                    argv = ["taskset", "-c", pin[i], *argv]
                log = open(log_dir / f"{tag}-{i + 1}.log", "w")
                self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                   stdin=subprocess.DEVNULL, start_new_session=True))
                log.close()
            self.status = self._wait_ready()
        except BaseException:
            self.close()
            raise
        me = {p["id"]: p for p in self.status["peers"]}
        coord_port = int(me[self.status["coordinator"]]["address"].rsplit(":", 1)[1])
        self.head = self.grpc.index(coord_port)
        self.address = f"127.0.0.1:{coord_port}"

    def _logs_tail(self) -> str:
        parts = []
        for i in range(self.n):
            text = (self.log_dir / f"{self.tag}-{i + 1}.log").read_text(errors="replace")
            parts.append(f"--- {self.tag}-{i + 1} ---\n{text[-1500:]}")
        return "\n".join(parts)

    def _wait_ready(self) -> dict:
        deadline = time.monotonic() + READY_TIMEOUT
        last, stable_since, stable_epoch, split_since = "", 0.0, None, None
        while time.monotonic() < deadline:
            for i, p in enumerate(self.procs):
                if p.poll() is not None:
                    raise RuntimeError(f"daemon {self.tag}-{i + 1} exited (rc {p.returncode})\n{self._logs_tail()}")
            try:
                views = [run(_status(f"127.0.0.1:{port}", self.secret)) for port in self.grpc]
            except Exception as e:  # not listening yet
                last = str(e)[:200]
                time.sleep(0.5)
                continue
            epochs = {v["epoch"] for v in views}
            placed = [p for p in views[0]["peers"] if p["layers"]]
            if len({v["coordinator"] for v in views}) > 1 and min(epochs) > 0:
                split_since = split_since or time.monotonic()
                if time.monotonic() - split_since > SPLIT_BRAIN_SECONDS:
                    raise RuntimeError(f"split brain: daemons see different coordinators "
                                       f"{sorted(v['coordinator'][:8] for v in views)} (epochs {sorted(epochs)})\n"
                                       f"{self._logs_tail()}")
            else:
                split_since = None
            if len(epochs) == 1 and views[0]["epoch"] > 0 and len(placed) == self.n and all(
                    v["peers"] and all(p["state"] == "serving" for p in v["peers"] if p["id"] == v["id"]) for v in views):
                # the plan must also stay put for a moment (a replan after link measurements fails requests)
                if stable_epoch != views[0]["epoch"]:
                    stable_epoch, stable_since = views[0]["epoch"], time.monotonic()
                elif time.monotonic() - stable_since >= 2.0:
                    return views[0]
            else:
                stable_epoch = None
                last = f"epochs {sorted(epochs)}, {len(placed)} of {self.n} placed"
            time.sleep(0.5)
        raise RuntimeError(f"cluster {self.tag} not ready within {READY_TIMEOUT:.0f}s ({last})\n{self._logs_tail()}")

    def generate(self, streams: int, max_tokens: int) -> dict:
        return run(_generate(self.address, self.secret, streams, max_tokens))

    def metrics(self) -> list[dict]:
        return [_metrics(port) for port in self.gw]

    def close(self) -> None:
        stop_groups(self.procs)
        self.procs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def start_cluster(*args, attempts: int = 3, **kw) -> LoopbackCluster:
    """A LoopbackCluster, started again when a daemon was killed from outside while starting (on a
    shared machine something SIGKILLed daemons now and then) or when the daemons ended up with two
    coordinators (two peers that each committed a one-peer plan before meeting never converge; see
    docs/performance.md). The run records every restart."""
    for attempt in range(attempts):
        try:
            return LoopbackCluster(*args, **kw)
        except RuntimeError as e:
            why = "killed (SIGKILL)" if "(rc -9)" in str(e) else "split brain" if "split brain" in str(e) else None
            if why is None or attempt == attempts - 1:
                raise
            RESTARTS.append(f"{kw.get('tag', '?')}: {why}")
            print(f"cluster {kw.get('tag')}: {why} while starting; starting again", file=sys.stderr, flush=True)
    raise AssertionError("unreachable")


RESTARTS: list[str] = []


def delta(before: list[dict], after: list[dict]) -> list[dict]:
    return [{k: a.get(k, 0.0) - b.get(k, 0.0) for k in a} for b, a in zip(before, after)]


# =========================================================================== part 1


def measure(c: LoopbackCluster, streams: int, max_tokens: int) -> dict:
    """One run on c, with every daemon's stage counters read around it."""
    before = c.metrics()
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    r = c.generate(streams, max_tokens)
    r["span"] = (t0, time.perf_counter())  # on the daemons' timeline clock (CLOCK_MONOTONIC)
    r["stages"] = delta(before, c.metrics())
    r["load1"] = load
    return r


def side_by_side(clusters: dict, streams: int, max_tokens: int, repeats: int) -> dict:
    """Alternate the configurations repeat by repeat, so a change in the machine's background
    load hits them alike (this machine is shared)."""
    runs: dict = {k: [] for k in clusters}
    for _ in range(repeats):
        for k, c in clusters.items():
            runs[k].append(measure(c, streams, max_tokens))
    return runs


def _compact(run: dict) -> dict:
    return {"wall": round(run["wall"], 4), "load1": run["load1"], "stages": run["stages"],
            "streams": [{"sent": round(s["sent"], 5), "times": [round(t, 5) for t in s["times"]]}
                        for s in run["streams"]]}


def network_messages(view: dict) -> int:
    """Ring messages per token that cross the network: head -> stage 1 -> ... -> stage n -> head, less
    the links from the head to its own stage (a peer hands frames to itself without gRPC)."""
    stages = sorted((p for p in view["peers"] if p["layers"]), key=lambda p: p["layers"][0])
    head = view["coordinator"]
    return len(stages) + 1 - (stages[0]["id"] == head) - (stages[-1]["id"] == head)


def part1(model: Path, cfg: dict, secret: str | None, log_dir: Path) -> dict:
    """Single stream: 1 daemon vs 3 daemons (even split), same model, same settings, interleaved."""
    out = {"max_tokens": cfg["tokens"], "repeats": cfg["repeats"], "configs": {}}
    with contextlib.ExitStack() as stack:
        clusters = {}
        configs = {"1": (1, []), "3": (3, [])}
        if join_supports("--kv-replicas"):  # the same ring without streaming KV deltas to the successor
            configs["3-norep"] = (3, ["--kv-replicas", "0"])
        for key, (n, flags) in configs.items():
            threads = ["--threads", str(cfg["threads1"])] if cfg.get("threads1") else []
            clusters[key] = stack.enter_context(start_cluster(model, n, extra=["--strategy", "even", *threads, *flags],
                                                              secret=secret, log_dir=log_dir, tag=f"p1-{key}",
                                                              timeline=log_dir / f"timeline-p1-{key}.txt"))
        for c in clusters.values():  # warm-up: first-call allocations, ring streams opened
            c.generate(1, 16)
            c.generate(STREAMS1, 8)
            _http_completion(c.gw[c.head], model.name, 8)
        runs = side_by_side(clusters, 1, cfg["tokens"], cfg["repeats"])
        # the same two rings with several streams at once (no replicas variant: single stream says it)
        many = side_by_side({k: clusters[k] for k in ("1", "3")}, STREAMS1, cfg["tokens"], cfg["repeats"])
        http = {k: [_http_completion(c.gw[c.head], model.name, cfg["tokens"]) for _ in range(cfg["repeats"])]
                for k, c in clusters.items()}
        pings = {k: run(_ping(c.address, secret, cfg["pings"])) for k, c in clusters.items()}
        for key, c in clusters.items():
            n = c.n
            rows = []
            for r in runs[key]:
                s = r["streams"][0]
                itl = intervals(s)
                frames = max(st["frames"] for st in r["stages"])  # every stage sees every token's frame once
                compute = sum(st["compute_s"] for st in r["stages"]) / frames
                rows.append({"rate": decode_rate(s), "itl_mean": statistics.fmean(itl), "compute": compute,
                             "per_stage": [st["compute_s"] / frames for st in r["stages"]],
                             "overhead": statistics.fmean(itl) - compute, "itl": itl,
                             "ring_bytes": sum(st.get("ring_bytes", 0) for st in r["stages"]) / frames,
                             "ttft": s["times"][0] - s["sent"]})
            itl = [x for row in rows for x in row["itl"]]
            med = lambda key: statistics.median(row[key] for row in rows)  # noqa: E731
            out["configs"][key] = {
                "daemons": n,
                "flags": configs[key][1],
                "layers": [p["layers"] for p in c.status["peers"]],
                "decode_tokens_per_s": [row["rate"] for row in rows],
                "decode_tokens_per_s_median": med("rate"),
                "ttft_s": [row["ttft"] for row in rows],
                "itl_ms": {"mean": statistics.fmean(itl) * 1e3, "p50": pct(itl, 50) * 1e3, "p90": pct(itl, 90) * 1e3,
                           "p99": pct(itl, 99) * 1e3, "max": max(itl) * 1e3, "n": len(itl)},
                "compute_ms_per_token": med("compute") * 1e3,
                "stage_compute_ms_per_token": [statistics.median(row["per_stage"][i] for row in rows) * 1e3
                                               for i in range(n)],
                "ring_messages_per_token": network_messages(c.status),
                "ring_overhead_ms_per_token": med("overhead") * 1e3,
                "ring_bytes_per_token": med("ring_bytes"),
                "http_e2e_tokens_per_s": [h["completion_tokens"] / h["seconds"] for h in http[key]],
                "ping_rtt_ms": {"p50": pct(pings[key], 50) * 1e3, "p99": pct(pings[key], 99) * 1e3,
                                "n": len(pings[key])},
                "load1": [r["load1"] for r in runs[key]],
                "runs": [_compact(r) for r in runs[key]],
            }
    for key, c in clusters.items():  # (the daemons have exited: their timelines are written)
        out["configs"][key]["timeline"] = timeline_breakdown(c.timeline, [r["span"] for r in runs[key]])
    out["streams"] = STREAMS1
    for key in many:
        aggs = [aggregate(r) for r in many[key]]
        out["configs"][key]["many_streams"] = {
            "steady_tokens_per_s": [a["steady_tokens_per_s"] for a in aggs],
            "wall_tokens_per_s": [a["wall_tokens_per_s"] for a in aggs],
            "steady_tokens_per_s_median": statistics.median(a["steady_tokens_per_s"] for a in aggs),
            "wall_tokens_per_s_median": statistics.median(a["wall_tokens_per_s"] for a in aggs),
            "runs": [_compact(r) for r in many[key]],
        }
    one, three = out["configs"]["1"], out["configs"]["3"]
    out["ratio_3_vs_1"] = three["decode_tokens_per_s_median"] / one["decode_tokens_per_s_median"]
    out["ratio_3_vs_1_streams"] = (three["many_streams"]["steady_tokens_per_s_median"]
                                   / one["many_streams"]["steady_tokens_per_s_median"])
    if "3-norep" in out["configs"]:
        out["ratio_3_norep_vs_1"] = (out["configs"]["3-norep"]["decode_tokens_per_s_median"]
                                     / one["decode_tokens_per_s_median"])
    # per ring message: the token's time not spent computing, over the messages it took
    out["hop_ms_mean"] = three["ring_overhead_ms_per_token"] / three["ring_messages_per_token"]
    extra = max(1, three["ring_messages_per_token"] - one["ring_messages_per_token"])
    out["extra_messages"] = extra
    out["extra_hop_ms"] = {
        "mean": (three["ring_overhead_ms_per_token"] - one["ring_overhead_ms_per_token"]) / extra,
        "p50": (three["itl_ms"]["p50"] - three["compute_ms_per_token"]
                - one["itl_ms"]["p50"] + one["compute_ms_per_token"]) / extra,
        "p99": (three["itl_ms"]["p99"] - three["compute_ms_per_token"]
                - one["itl_ms"]["p99"] + one["compute_ms_per_token"]) / extra,
    }
    return out


# =========================================================================== part 2


def part2(model: Path, cfg: dict, secret: str | None, log_dir: Path) -> dict:
    """Two pinned single-core daemons, 8 concurrent streams: --micro-batches 2 vs 1, interleaved."""
    if shutil.which("taskset") is None:
        return {"skipped": "taskset is not installed"}
    if (os.cpu_count() or 1) < 2:
        return {"skipped": "needs two cores"}
    streams = 8
    out = {"streams": streams, "max_tokens": cfg["tokens2"], "repeats": cfg["repeats"], "configs": {}}
    with contextlib.ExitStack() as stack:
        clusters = {}
        variants = [("1", 1, []), ("2", 2, [])]
        if join_supports("--kv-replicas"):  # the same without streaming KV deltas to the successor
            variants += [("1-norep", 1, ["--kv-replicas", "0"]), ("2-norep", 2, ["--kv-replicas", "0"])]
        flags = {}
        for key, m, more in variants:
            extra = ["--strategy", "even", "--threads", "1", "--micro-batches", str(m), *more]
            flags[key] = (m, more)
            clusters[key] = stack.enter_context(start_cluster(model, 2, extra=extra, pin=["0", "1"], secret=secret,
                                                                log_dir=log_dir, tag=f"p2-m{key}"))
        for c in clusters.values():
            c.generate(streams, 8)  # warm-up with the same batch shape
        runs = side_by_side(clusters, streams, cfg["tokens2"], cfg["repeats"])
        for key, c in clusters.items():
            m = flags[key][0]
            aggs = [aggregate(r) for r in runs[key]]
            out["configs"][key] = {
                "micro_batches": m,
                "flags": flags[key][1],
                "layers": [p["layers"] for p in c.status["peers"]],
                "wall_tokens_per_s": [a["wall_tokens_per_s"] for a in aggs],
                "steady_tokens_per_s": [a["steady_tokens_per_s"] for a in aggs],
                "wall_tokens_per_s_median": statistics.median(a["wall_tokens_per_s"] for a in aggs),
                "steady_tokens_per_s_median": statistics.median(a["steady_tokens_per_s"] for a in aggs),
                "stage_busy_fraction": [statistics.median(r["stages"][i]["compute_s"] / r["wall"] for r in runs[key])
                                        for i in range(2)],
                "stage_ms_per_frame": [statistics.median(r["stages"][i]["compute_s"] / max(r["stages"][i]["frames"], 1)
                                                         for r in runs[key]) * 1e3 for i in range(2)],
                "frames_per_run": [statistics.median(r["stages"][i]["frames"] for r in runs[key]) for i in range(2)],
                "itl_ms_p50": pct([x for r in runs[key] for s in r["streams"] for x in intervals(s)], 50) * 1e3,
                "load1": [r["load1"] for r in runs[key]],
                "runs": [_compact(r) for r in runs[key]],
            }
    one, two = out["configs"]["1"], out["configs"]["2"]
    out["ratio_m2_vs_m1"] = two["steady_tokens_per_s_median"] / one["steady_tokens_per_s_median"]
    out["ratio_m2_vs_m1_wall"] = two["wall_tokens_per_s_median"] / one["wall_tokens_per_s_median"]
    if "2-norep" in out["configs"]:
        out["ratio_m2_vs_m1_norep"] = (out["configs"]["2-norep"]["steady_tokens_per_s_median"]
                                       / out["configs"]["1-norep"]["steady_tokens_per_s_median"])
    return out


# =========================================================================== part 3


def part3(model: Path, cfg: dict, secret: str | None, log_dir: Path) -> dict:
    """Three namespace hosts, links shaped to 100 Mbit/s: measured vs the planner's prediction."""
    sys.path.insert(0, str(ROOT / "tests"))
    from netns import Hosts, netns_available

    why = netns_available()
    if why:
        return {"skipped": why}
    if shutil.which("tc") is None:
        return {"skipped": "tc (iproute2) is not installed"}
    out = {"rate": "100mbit", "context": cfg["context3"], "max_tokens": cfg["tokens3"], "repeats": cfg["repeats"],
           "clusters": []}
    for m in cfg["mb3"]:
        for attempt in range(3):
            try:
                with Hosts(3, log_dir=log_dir / f"netns-m{m}") as h:
                    for i in h.indices:
                        subprocess.run(["tc", "qdisc", "add", "dev", h.veth(i), "root", "tbf", "rate", "100mbit",
                                        "burst", "64kb", "latency", "100ms"], check=True, capture_output=True, text=True)
                    security = [f"--secret={secret}"] if secret else (["--insecure"] if join_supports("--insecure") else [])

                    def client(i: int, job: dict, timeout: float = 600):
                        job = {**job, "secret": secret}
                        proc = h.run(i, [sys.executable, str(Path(__file__).resolve()), "--client"],
                                     input=json.dumps(job), timeout=timeout)
                        if proc.returncode != 0:
                            raise RuntimeError(f"client in host {i} failed: {proc.stderr[-2000:]}")
                        return json.loads(proc.stdout)

                    for i in h.indices:
                        h.popen(i, [sys.executable, "-m", "p2pllm", "join", "--model", str(model), "--name", f"host{i}",
                                    "--interface", h.addr(i), "--no-mdns", "--peer", f"{h.addr(1)}:7700",
                                    "--cluster", f"bench-ns-{os.getpid()}", "--strategy", "even",
                                    "--context", str(cfg["context3"]), "--micro-batches", str(m), *security])
                    view = _wait_netns(h, client)
                    coord = next(p for p in view["peers"] if p["id"] == view["coordinator"])
                    head = next(i for i in h.indices if coord["address"].startswith(h.addr(i) + ":"))
                    address = coord["address"]
                    plan = view["plan"]
                    pred = plan["predicted"]
                    client(head, {"kind": "generate", "address": address, "streams": 1, "max_tokens": 8})  # warm-up
                    rows = []
                    for streams in cfg["streams3"][m]:
                        client(head, {"kind": "generate", "address": address, "streams": streams, "max_tokens": 8})
                        runs = [client(head, {"kind": "generate", "address": address, "streams": streams,
                                              "max_tokens": cfg["tokens3"]}) for _ in range(cfg["repeats"])]
                        if streams == 1:
                            got = [decode_rate(r["streams"][0]) for r in runs]
                            predicted, what = 1000.0 / pred["ms_per_token"], "1000 / ms_per_token"
                        else:
                            got = [aggregate(r)["steady_tokens_per_s"] for r in runs]
                            if m == 1:
                                predicted, what = pred["tokens_per_s_single"], "tokens_per_s_single"
                            else:
                                predicted, what = pred["tokens_per_s_pipelined"], "tokens_per_s_pipelined"
                        rows.append({"streams": streams, "micro_batches": m, "measured_tokens_per_s": got,
                                     "measured_median": statistics.median(got), "predicted": predicted,
                                     "predicted_from": what, "ratio": statistics.median(got) / predicted})
                    final = client(head, {"kind": "status", "address": address})
                    # a replan during the measurement (the coordinator re-measures links every minute) is recorded,
                    # with the plan it ended on; the sequences in flight are carried over, not failed
                    out["clusters"].append({"micro_batches": m, "epoch": view["epoch"], "plan": plan, "rows": rows,
                                            "links": _links(h, client, view), "final_epoch": final["epoch"],
                                            "final_plan": final["plan"]})

                break
            except RuntimeError as e:  # two coordinators that never converge: start again (see docs)
                if "split brain" not in str(e) or attempt == 2:
                    raise
                RESTARTS.append(f"netns-m{m}: split brain")
                print(f"part 3 (--micro-batches {m}): split brain while starting; starting again",
                      file=sys.stderr, flush=True)
    return out


def _wait_netns(h, client) -> dict:
    deadline = time.monotonic() + READY_TIMEOUT
    last, stable, split = "", None, None
    while time.monotonic() < deadline:
        for p in h._procs:
            if p.poll() is not None:
                raise RuntimeError(f"a daemon exited (rc {p.returncode})\n{h.logs()[-4000:]}")
        try:
            views = [client(i, {"kind": "status", "address": f"{h.addr(i)}:7700"}, timeout=30) for i in h.indices]
        except RuntimeError as e:
            last = str(e)[-200:]
            time.sleep(1.0)
            continue
        placed = [p for p in views[0]["peers"] if p["layers"]]
        if len({v["coordinator"] for v in views}) > 1 and min(v["epoch"] for v in views) > 0:
            split = split or time.monotonic()
            if time.monotonic() - split > SPLIT_BRAIN_SECONDS:
                raise RuntimeError(f"split brain: hosts see coordinators {[v['coordinator'][:8] for v in views]}")
        else:
            split = None
        if len({v["epoch"] for v in views}) == 1 and views[0]["epoch"] > 0 and len(placed) == len(h):
            if stable is None or stable[0] != views[0]["epoch"]:
                stable = (views[0]["epoch"], time.monotonic())
            elif time.monotonic() - stable[1] >= 2.0:
                return views[0]
        else:
            last = f"epochs {[v['epoch'] for v in views]}, {len(placed)} placed"
        time.sleep(0.5)
    raise RuntimeError(f"namespace cluster not ready within {READY_TIMEOUT:.0f}s ({last})\n{h.logs()[-6000:]}")


def _links(h, client, view) -> list:
    """The hops of the committed plan as the planner priced them (ms, from measured rtt and bandwidth)."""
    names = {p["id"]: p["name"] for p in view["peers"]}
    return [{"from": names.get(x["from"], x["from"]), "to": names.get(x["to"], x["to"]), "ms": x["ms"],
             "payload": x["payload"]} for x in view["plan"].get("hops", [])]


# =========================================================================== report


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "kernel": platform.release()}


def markdown(res: dict) -> str:
    lines = []
    m = res["machine"]
    lines.append(f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, torch {m['torch']}; "
                 f"{'quick run' if res['quick'] else 'full run'}; peer traffic: {res['security']}.")
    for part in (1, 2, 3):
        if "error" in res.get(f"part{part}", {}):
            lines += ["", f"**{part}.** failed: {res[f'part{part}']['error'][-500:]}"]
    p1 = res.get("part1")
    if p1 and "configs" in p1:
        one, three = p1["configs"]["1"], p1["configs"]["3"]
        threads = f"; every daemon with `--threads {res['config']['threads1']}`" \
            if res.get("config", {}).get("threads1") else ""
        lines += ["", f"**1. Single stream, {res.get('model', 'the 125M demo model')}, loopback** ({p1['max_tokens']} tokens, median of "
                      f"{p1['repeats']} alternating repeats; decode = tokens after the first over their time"
                      f"{threads})", "",
                  "| daemons | layers | decode tok/s | ITL mean / p50 / p99 (ms) | compute ms/token (per stage) "
                  "| not computing, ms/token | ring messages/token | ring KiB/token | HTTP e2e tok/s "
                  "| gRPC Ping RTT p50 / p99 (ms) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c in [one, three] + ([p1["configs"]["3-norep"]] if "3-norep" in p1["configs"] else []):
            per_stage = " + ".join(f"{x:.1f}" for x in c["stage_compute_ms_per_token"])
            lines.append(
                f"| {c['daemons']}{' (' + ' '.join(c.get('flags', [])) + ')' if c.get('flags') else ''} "
                f"| {' '.join(f'[{a},{b})' for a, b in sorted(l for l in c['layers'] if l))} "
                f"| {c['decode_tokens_per_s_median']:.1f} | {c['itl_ms']['mean']:.1f} / {c['itl_ms']['p50']:.1f} / "
                f"{c['itl_ms']['p99']:.1f} | {c['compute_ms_per_token']:.1f} ({per_stage}) "
                f"| {c['ring_overhead_ms_per_token']:.1f} | {c['ring_messages_per_token']} "
                f"| {c['ring_bytes_per_token'] / 1024:.1f} | {statistics.median(c['http_e2e_tokens_per_s']):.1f} "
                f"| {c['ping_rtt_ms']['p50']:.2f} / {c['ping_rtt_ms']['p99']:.2f} |")
        x = p1["extra_hop_ms"]
        norep = (f" Without KV replication (`--kv-replicas 0`): {p1['ratio_3_norep_vs_1']:.2f}×."
                 if "ratio_3_norep_vs_1" in p1 else "")
        lines += ["", f"3 daemons / 1 daemon: **{p1['ratio_3_vs_1']:.2f}×** (goal ≥ 0.90×).{norep} Per ring message "
                      f"(3 daemons): {p1['hop_ms_mean']:.2f} ms on average. Each of the {p1['extra_messages']} extra "
                      f"messages of the 3-daemon ring: {x['mean']:.2f} ms mean, {x['p50']:.2f} ms at p50, "
                      f"{x['p99']:.2f} ms at p99 (ITL minus compute, 3 daemons minus 1 daemon, over "
                      f"{p1['extra_messages']})."]
        if "ratio_3_vs_1_streams" in p1:
            m1, m3 = one["many_streams"], three["many_streams"]
            lines += ["", f"{p1['streams']} concurrent streams ({p1['max_tokens']} tokens each; steady state: "
                          f"tokens while all decode): 1 daemon {m1['steady_tokens_per_s_median']:.1f} tok/s "
                          f"({m1['wall_tokens_per_s_median']:.1f} with the prefills), 3 daemons "
                          f"{m3['steady_tokens_per_s_median']:.1f} ({m3['wall_tokens_per_s_median']:.1f}): "
                          f"**{p1['ratio_3_vs_1_streams']:.2f}×** (goal ≥ 0.90×)."]
        timed = [(k, c) for k, c in p1["configs"].items() if c.get("timeline")]
        if timed:
            lines += ["", "Where a single stream's token goes (median ms per token over the measured runs, from "
                          "the daemons' timelines: `P2PLLM_TIMELINE`, p2pllm/runtime/timeline.py; ring messages "
                          "from the sender's encoded frame to the receiver's handler, in ring order from the "
                          "head's launch to its result; (local): the head's own stage, no network)", "",
                      "| daemons | token | layers (per stage) | decode + encode (per stage) | ring messages "
                      "| head: take answers + launch next |", "|---|---|---|---|---|---|"]
            for k, c in timed:
                tl = c["timeline"]
                st, msgs, n = tl["stages_ms"], list(tl["messages_ms"]), len(tl["stages_ms"])
                local = {0} if tl["head_stage"] == 0 else set()
                local |= {n} if tl["head_stage"] == n - 1 else set()
                layers = " + ".join(f"{x['layers']:.2f}" for x in st)
                other = " + ".join(f"{x['decode']:.2f} + {x['encode']:.2f}" for x in st)
                hops = " → ".join(f"{m:.2f}" + (" (local)" if i in local else "") for i, m in enumerate(msgs))
                lines.append(
                    f"| {k} | {tl['cycle_ms']:.2f} | {sum(x['layers'] for x in st):.2f} ({layers}) "
                    f"| {sum(x['decode'] + x['encode'] for x in st):.2f} ({other}) | {hops} "
                    f"| {tl['head_ms']['take']:.2f} + {tl['head_ms']['launch']:.2f} |")
    p2 = res.get("part2")
    if p2 and "configs" in p2:
        lines += ["", f"**2. Two daemons pinned to one core each, {p2['streams']} concurrent streams** "
                      f"({p2['max_tokens']} tokens each, median of {p2['repeats']})", "",
                  "| --micro-batches | steady tok/s | tok/s incl. prefill | stage busy (compute s / wall s) "
                  "| stage ms per frame | frames per run | ITL p50 (ms) |",
                  "|---|---|---|---|---|---|---|"]
        for c in p2["configs"].values():
            busy = " / ".join(f"{b:.0%}" for b in c["stage_busy_fraction"])
            per_frame = " / ".join(f"{x:.1f}" for x in c["stage_ms_per_frame"])
            frames = " / ".join(f"{x:.0f}" for x in c["frames_per_run"])
            lines.append(f"| {c['micro_batches']}{' (' + ' '.join(c['flags']) + ')' if c.get('flags') else ''} "
                         f"| {c['steady_tokens_per_s_median']:.1f} "
                         f"| {c['wall_tokens_per_s_median']:.1f} | {busy} | {per_frame} | {frames} "
                         f"| {c['itl_ms_p50']:.1f} |")
        lines += ["", f"--micro-batches 2 / 1: **{p2['ratio_m2_vs_m1']:.2f}×** steady state "
                      f"({p2['ratio_m2_vs_m1_wall']:.2f}× including prefill) (goal ≥ 1.8×)."
                      + (f" Without KV replication: {p2['ratio_m2_vs_m1_norep']:.2f}×." if "ratio_m2_vs_m1_norep" in p2
                         else "")]
    elif p2 and "skipped" in p2:
        lines += ["", f"**2.** skipped: {p2['skipped']}"]
    p3 = res.get("part3")
    if p3 and "clusters" in p3:
        lines += ["", f"**3. Three namespace hosts, every link shaped to {p3['rate']}** (context {p3['context']}, "
                      f"{p3['max_tokens']} tokens, median of {p3['repeats']})", "",
                  "| --micro-batches | streams | measured tok/s | planner predicts | prediction | measured / predicted |",
                  "|---|---|---|---|---|---|"]
        for cl in p3["clusters"]:
            for r in cl["rows"]:
                lines.append(f"| {r['micro_batches']} | {r['streams']} | {r['measured_median']:.1f} "
                             f"| {r['predicted']:.1f} | `{r['predicted_from']}` | {r['ratio']:.2f} |")
        for c in p3["clusters"]:
            if c.get("final_epoch", c["epoch"]) != c["epoch"]:
                lines += ["", f"(--micro-batches {c['micro_batches']}: the coordinator replanned during the "
                              f"measurement, epoch {c['epoch']} → {c['final_epoch']}, same layers; predictions are "
                              f"those of epoch {c['epoch']}, in force when the measurement began.)"]
        cl = p3["clusters"][0]
        stages = " ".join(f"{s['name']}[{s['layers'][0]},{s['layers'][1]}) {s['ms_per_token']:.1f} ms"
                          for s in cl["plan"]["stages"])
        hops = ", ".join(f"{x['from']}→{x['to']} {x['ms']:.2f} ms" for x in cl["links"])
        lines += ["", f"Plan (epoch {cl['epoch']}, planned for batch 8): {stages}; hops {hops}; ms_per_token "
                      f"{cl['plan']['predicted']['ms_per_token']:.1f} ms (one step of a batch-8 micro-batch through "
                      f"every stage and hop); {cl['plan'].get('micro_batches')} micro-batches in flight fill the ring."]
    elif p3 and "skipped" in p3:
        lines += ["", f"**3.** skipped: {p3['skipped']}"]
    return "\n".join(lines)


def ensure_model(path: Path | None) -> Path:
    if path is not None:
        return path
    if not MODEL_CACHE.exists():
        MODEL_CACHE.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "p2pllm", "make-demo-model", str(MODEL_CACHE), "--size", "125m"],
                       check=True)
    return MODEL_CACHE


def _interrupt(*_):
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens and repeats (a smoke test)")
    ap.add_argument("--only", default="1,2,3", help="parts to run, e.g. 1,3")
    ap.add_argument("--model", type=Path, default=None, help="model (default: the 125m demo model, made once)")
    ap.add_argument("--insecure", action="store_true", help="plaintext peer traffic instead of a cluster secret")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--threads", type=int, default=None,
                    help="compute threads of part 1's daemons (default: the daemons' own: every core for "
                         "the one daemon's whole-model stage, cores - 1 for a stage of the ring)")
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        print(json.dumps(client_job(json.load(sys.stdin))))
        return 0

    signal.signal(signal.SIGTERM, _interrupt)  # a killed benchmark still stops its daemons
    only = {int(x) for x in args.only.split(",") if x.strip()}
    cfg = dict(tokens=64, tokens2=32, tokens3=32, repeats=3, pings=300, context3=256, mb3=[1, 3],
               streams3={1: [1, 8], 3: [24]}, threads1=args.threads)
    if args.quick:
        cfg.update(tokens=24, tokens2=12, tokens3=12, repeats=1, pings=50, mb3=[1], streams3={1: [1, 8]})
    model = ensure_model(args.model)
    secure = not args.insecure and join_supports("--secret")
    secret = secrets.token_urlsafe(24) if secure else None
    log_dir = Path(tempfile.mkdtemp(prefix="p2pllm-ring-bench-"))
    res = {"quick": args.quick, "model": model.name, "machine": machine(), "config": cfg,
           "security": "mutual TLS (cluster secret)" if secure else "plaintext (--insecure)",
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    t0 = time.monotonic()
    ok = True
    try:
        for part, fn in ((1, part1), (2, part2), (3, part3)):
            if part not in only:
                continue
            t = time.monotonic()
            print(f"part {part} ...", file=sys.stderr, flush=True)
            try:
                res[f"part{part}"] = fn(model, cfg, secret, log_dir)
                res[f"part{part}"]["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
            except Exception as e:  # report, keep the other parts
                ok = False
                res[f"part{part}"] = {"error": str(e)[-3000:]}
                print(f"part {part} failed: {e}", file=sys.stderr, flush=True)
            print(f"part {part}: {time.monotonic() - t:.0f}s", file=sys.stderr, flush=True)
    finally:
        res["seconds"] = time.monotonic() - t0
        res["cluster_restarts"] = RESTARTS
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")
        if ok:
            shutil.rmtree(log_dir, ignore_errors=True)
        else:
            print(f"daemon logs kept in {log_dir}", file=sys.stderr)
    print(markdown(res))
    print(f"\n({res['seconds']:.0f}s; raw numbers in {args.out})")
    return 0 if ok else 1



def stop_groups(procs: list[subprocess.Popen], timeout: float = 10) -> None:
    """SIGTERM each daemon's process group, then SIGKILL the ones still there after `timeout` s."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)

if __name__ == "__main__":
    sys.exit(main())
