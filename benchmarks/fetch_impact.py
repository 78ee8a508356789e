"""Fetch impact benchmark: decode latency of running requests while a peer fetches the model's
layers from the ring's peers (`join --from-peers`), against the same requests without a fetch.

    python benchmarks/fetch_impact.py            # writes benchmarks/results/fetch_impact.json, prints a table
    python benchmarks/fetch_impact.py --quick    # 1 round of each (a smoke test, not a result)
    python benchmarks/fetch_impact.py --serve-rate 0 --fetch nice19,nice19+ext
        # the daemons serving fetches unpaced (added to the results file beside the default run)

Two `p2pllm join` daemons on loopback (SmolLM2-135M-Instruct Q4_1, the shared test model;
`--strategy even`, one stage of 15 layers each; mutual TLS from a secret; no response or prefix
cache) on gRPC ports 7911-7912 and gateways 8911-8912. A round streams `--requests` greedy
completions of exactly `--max-tokens` tokens (`ignore_eos`), one after the other, through the
non-coordinator's OpenAI gateway (`stream: true`) and stamps every content chunk on arrival; the
inter-token gaps are the differences between consecutive chunks (the time to first token is left
out). Rounds alternate: baseline, fetch, baseline, fetch, ... so that the machine's background load
hits both alike.

In a fetch round a separate process (this script with `--fetcher`, started under `nice -n
--fetcher-nice`, 19 by default) runs `fetch_layers(pool, [peer 1, peer 2], 0, n_layers, cache)`
again and again, each time into a fresh cache under /dev/shm (so that the fetcher's disk is not
this machine's: in reality the fetcher is another machine), from before the first request until
after the last one. Each daemon serves at most 2 fetch streams (PieceSource's default) and the
fetcher opens 2 per source (its default): both sources serve 2 streams the whole round. The
fetcher reports the bytes it received, its rate and its own CPU time, which on this machine
competes with the daemons (said in the result).

Fetch variants (`--fetch`, each alternating with the baseline; default nice19,nice19+ext,nice19@8):
`niceN` / `idle` say how the fetcher is scheduled (`nice -n N`, or SCHED_IDLE); `+ext` is the
control: the same fetch from two PieceSource processes outside the ring (ports 7913-7914), the same
CPU load on the machine with nothing served inside the daemons; `@MBPS` paces the fetcher (its
writes wait, so gRPC flow control holds the sources to that rate). Before the rounds: one whole
fetch (the sources hash every piece once, on first request), then the daemons' CPU per MB served
with no request running. The daemons serve fetches as `join` does by default: at most 4 MB/s in
all while requests run through them (`--fetch-serve-rate`); `--serve-rate RATE` starts them with
another (`0`: unpaced).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch import uptime  # after the path: the batch benchmark's helper
from ring import stop_groups

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "fetch_impact.json"
MODEL = ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
GRPC_PORTS = (7911, 7912)
GATEWAY_PORTS = (8911, 8912)
EXTERNAL_PORTS = (7913, 7914)  # PieceSource processes outside the ring (variants with +ext)
SECRET = "fetch-impact-benchmark-secret-0123456789"
PROMPTS = ["Write a long story about a lighthouse keeper who finds a message in a bottle.",
           "Explain, step by step and at length, how a steam engine works.",
           "Describe a walk through a busy market in a city by the sea.",
           "Tell the history of a small mountain village over three hundred years.",
           "Write a detailed travel diary of a journey by train across a continent."]
READY_TIMEOUT = 120.0
DEFAULT_VARIANTS = ["nice19", "nice19+ext", "nice19@8"]


# =========================================================================== the fetcher process


def fetcher_main(args) -> int:
    """Fetch the whole model from `--sources` again and again (a fresh cache each time) until SIGTERM;
    print `fetching` once bytes flow, and at the end one JSON line: rounds, bytes, seconds, CPU."""
    from p2pllm.cluster.fetch import fetch_layers
    from p2pllm.transport.client import ClientPool
    from p2pllm.transport.security import Security

    sources = args.sources.split(",")
    root = Path(args.cache_root)
    if args.rate:  # pace: every chunk's write waits until the bytes so far fit the rate; gRPC's flow
        # control then holds the source back (the source sends at this rate, as source-side pacing would)
        from p2pllm.cluster.fetch import ModelFetcher

        write, pace = ModelFetcher._write, {"t0": None, "bytes": 0}

        def paced_write(self, offset, data, *rest):
            write(self, offset, data, *rest)
            if pace["t0"] is None:
                pace["t0"] = time.monotonic()
            pace["bytes"] += len(data)
            ahead = pace["bytes"] / (args.rate * 1e6) - (time.monotonic() - pace["t0"])
            if ahead > 0:
                time.sleep(ahead)

        ModelFetcher._write = paced_write

    async def main() -> dict:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        pool = ClientPool(Security.from_secret(os.environ["P2PLLM_SECRET"]))
        state = {"done": 0, "announced": False}
        rounds: list[dict] = []

        def progress(done: int, total: int, rate: float) -> None:
            state["done"] = done
            if not state["announced"] and done > 0:
                state["announced"] = True
                print("fetching", flush=True)

        t_start = time.monotonic()
        bytes_total = 0
        try:
            while not stop.is_set():
                cache = Path(tempfile.mkdtemp(prefix="round-", dir=root))
                state["done"] = 0
                t0 = time.monotonic()
                job = asyncio.ensure_future(fetch_layers(pool, sources, 0, args.layers, cache, progress=progress))
                halt = asyncio.ensure_future(stop.wait())
                await asyncio.wait({job, halt}, return_when=asyncio.FIRST_COMPLETED)
                if job.done():
                    halt.cancel()
                    part = job.result()
                    got = sum(p.nbytes for p in part.layout.pieces if part.holds(p.name))
                    rounds.append({"bytes": got, "seconds": round(time.monotonic() - t0, 3)})
                    bytes_total += got
                    print(f"round {len(rounds)}", flush=True)
                else:
                    job.cancel()
                    await asyncio.gather(job, return_exceptions=True)
                    bytes_total += state["done"]  # the interrupted round's pieces so far
                shutil.rmtree(cache, ignore_errors=True)
        finally:
            await pool.close()
        seconds = time.monotonic() - t_start
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {"rounds": rounds, "bytes": bytes_total, "seconds": round(seconds, 3),
                "mb_per_s": round(bytes_total / seconds / 1e6, 1), "cpu_user": ru.ru_utime, "cpu_sys": ru.ru_stime}

    print(json.dumps(asyncio.run(main())), flush=True)
    return 0


def source_main(args) -> int:
    """A PieceSource of the model file alone on 127.0.0.1:PORT (no ring): the control for serving
    inside the ring's daemons."""
    from p2pllm.cluster.fetch import PieceSource
    from p2pllm.transport.security import Security
    from p2pllm.transport.server import start_server

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        source = PieceSource(MODEL)
        server = await start_server(source, "127.0.0.1", args.source,
                                    Security.from_secret(os.environ["P2PLLM_SECRET"]))
        print("serving", flush=True)
        await stop.wait()
        await server.stop(1)
        source.close()

    asyncio.run(main())
    return 0


# =========================================================================== the cluster


def port_taken(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def health_stages(port: int) -> int:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json().get("stages") or 0
    except (httpx.HTTPError, ValueError):
        return 0


def status(port: int) -> dict:
    from p2pllm.transport.client import fetch_status
    from p2pllm.transport.security import Security

    return asyncio.run(fetch_status(f"127.0.0.1:{port}", Security.from_secret(SECRET)))


class Cluster:
    def __init__(self, log_dir: Path, env: dict, serve_rate: str | None = None):
        self.procs: list[subprocess.Popen] = []
        self.log_dir = log_dir
        for i, (rpc, gw) in enumerate(zip(GRPC_PORTS, GATEWAY_PORTS)):
            argv = [sys.executable, "-m", "p2pllm", "join", "--model", str(MODEL), "--name", f"fetch-bench-{i + 1}",
                    "--port", str(rpc), "--gateway-port", str(gw), "--interface", "127.0.0.1", "--no-mdns",
                    "--peer", f"127.0.0.1:{GRPC_PORTS[0]}", "--strategy", "even", "--cluster", "fetch-bench",
                    "--response-cache", "off", "--prefix-cache", "0"]
            if serve_rate is not None:  # else the daemon's default
                argv += ["--fetch-serve-rate", serve_rate]
            log = open(log_dir / f"peer-{i + 1}.log", "w")
            self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                               cwd=ROOT, env=env, start_new_session=True))
            log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _tail(self) -> str:
        return "\n".join((self.log_dir / f"peer-{i + 1}.log").read_text(errors="replace")[-1500:]
                         for i in range(len(self.procs)))

    def _wait_ready(self) -> None:
        deadline, stable = time.monotonic() + READY_TIMEOUT, None
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a daemon exited\n{self._tail()}")
            if all(health_stages(gw) == len(self.procs) for gw in GATEWAY_PORTS):
                st = status(GRPC_PORTS[0])
                if stable is None or stable[0] != st["epoch"]:
                    stable = (st["epoch"], time.monotonic())
                elif time.monotonic() - stable[1] >= 2.0:  # the plan stays put for a moment
                    self.status = st
                    coord = next(p["address"] for p in st["peers"] if p["id"] == st["coordinator"])
                    self.coordinator = int(coord.rsplit(":", 1)[1])
                    # the gateway of the peer that is not the coordinator: requests are forwarded
                    self.gateway = next(gw for rpc, gw in zip(GRPC_PORTS, GATEWAY_PORTS) if rpc != self.coordinator)
                    return
            time.sleep(0.5)
        raise RuntimeError(f"the cluster was not ready within {READY_TIMEOUT:.0f} s\n{self._tail()}")

    def cpu_seconds(self) -> list[float]:
        """user + system CPU seconds of each daemon so far (all threads)."""
        tick = os.sysconf("SC_CLK_TCK")
        out = []
        for p in self.procs:
            fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
            out.append((int(fields[11]) + int(fields[12])) / tick)
        return out

    def close(self) -> None:
        stop_groups(self.procs, timeout=15)


# =========================================================================== the requests


def stream_completion(gateway: int, prompt: str, max_tokens: int) -> dict:
    """One streamed greedy completion of exactly max_tokens tokens: arrival time of each content chunk."""
    body = {"model": MODEL.name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, usage = [], None
    with httpx.stream("POST", f"http://127.0.0.1:{gateway}/v1/completions", json=body, timeout=300) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if any(c.get("text") for c in chunk.get("choices", [])):
                times.append(time.perf_counter() - t0)
    tokens = (usage or {}).get("completion_tokens", len(times))
    return {"ttft": times[0] if times else None, "seconds": times[-1] if times else None, "chunks": len(times),
            "tokens": tokens, "gaps": [b - a for a, b in itertools.pairwise(times)],
            # decode rate: the tokens after the first over the time from the first chunk to the last
            "tok_s": (tokens - 1) / (times[-1] - times[0]) if len(times) > 1 else None}


def one_round(cluster: Cluster, requests: int, max_tokens: int) -> dict:
    cpu0, t0 = cluster.cpu_seconds(), time.perf_counter()
    reqs = [stream_completion(cluster.gateway, PROMPTS[i % len(PROMPTS)], max_tokens) for i in range(requests)]
    wall = time.perf_counter() - t0
    cpu = [b - a for a, b in zip(cpu0, cluster.cpu_seconds())]
    return {"wall": round(wall, 3), "daemon_cpu_s": [round(c, 2) for c in cpu], "requests": reqs}


def serving_cost(cluster: Cluster, env: dict, cache_root: Path, layers: int, seconds: float = 6.0) -> dict:
    """The daemons' CPU while they serve a fetch and no request: idle for `seconds`, then serving an
    unpaced fetcher (SCHED_IDLE) for `seconds`; CPU seconds per MB served, net of the idle CPU. First
    one whole fetch, so that the sources have hashed every piece (they do once, on first request) and
    no round below pays for it."""
    warm = start_fetcher(env, cache_root, layers, parse_variant("nice0"))  # the sources hash every piece once
    warm.stdout.readline()  # "round 1": one whole model fetched
    stop_fetcher(warm)
    cpu0 = cluster.cpu_seconds()
    time.sleep(seconds)
    idle = [b - a for a, b in zip(cpu0, cluster.cpu_seconds())]
    fetcher = start_fetcher(env, cache_root, layers, parse_variant("idle"))
    cpu0, t0 = cluster.cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    busy, wall = [b - a for a, b in zip(cpu0, cluster.cpu_seconds())], time.monotonic() - t0
    f = stop_fetcher(fetcher)
    net = sum(busy) - sum(idle) * wall / seconds
    return {"idle_cpu_s": [round(x, 2) for x in idle], "serving_cpu_s": [round(x, 2) for x in busy],
            "seconds": round(wall, 2), "mb_per_s": f["mb_per_s"],
            "daemon_cpu_s_per_mb": round(net / (f["mb_per_s"] * wall), 4),
            "fetcher_cpu_share": round((f["cpu_user"] + f["cpu_sys"]) / f["seconds"], 3)}


def parse_variant(spec: str) -> dict:
    """`nice19` / `nice0` / `idle` (SCHED_IDLE: runs only on an otherwise idle core), then optionally
    `+ext` (fetch from two PieceSource processes outside the ring, EXTERNAL_PORTS, instead of the
    daemons) and `@RATE` (MB/s the fetcher accepts, which paces the sources through gRPC flow control)."""
    head, _, rate = spec.partition("@")
    sched, _, ext = head.partition("+")
    if sched != "idle" and not (sched.startswith("nice") and sched[4:].lstrip("-").isdigit()) or ext not in ("", "ext"):
        raise SystemExit(f"fetch variant {spec!r}: expected niceN or idle, optionally +ext, optionally @MBPS")
    return {"name": spec, "sched": sched, "external": ext == "ext", "rate": float(rate or 0)}


def start_sources(env: dict, log_dir: Path) -> list[subprocess.Popen]:
    procs = []
    for port in EXTERNAL_PORTS:
        p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--source", str(port)],
                             stdout=subprocess.PIPE, stderr=open(log_dir / f"source-{port}.log", "w"), text=True,
                             cwd=ROOT, env=env, start_new_session=True)
        procs.append(p)
        if p.stdout.readline().strip() != "serving":
            raise RuntimeError(f"the source on port {port} did not start: "
                               f"{(log_dir / f'source-{port}.log').read_text()[-2000:]}")
    return procs


def start_fetcher(env: dict, cache_root: Path, layers: int, variant: dict) -> subprocess.Popen:
    argv = [sys.executable, str(Path(__file__).resolve()), "--fetcher", "--layers", str(layers), "--cache-root",
            str(cache_root), "--sources",
            ",".join(f"127.0.0.1:{p}" for p in (EXTERNAL_PORTS if variant.get("external") else GRPC_PORTS)),
            "--rate", str(variant["rate"])]
    if variant["sched"] == "idle":
        argv = ["chrt", "--idle", "0", *argv]
    elif variant["sched"] != "nice0":
        argv = ["nice", "-n", variant["sched"][4:], *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=open(cache_root / "fetcher.log", "a"), text=True,
                            cwd=ROOT, env=env)
    line = proc.stdout.readline().strip()  # "fetching": bytes flow
    if line != "fetching":
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the fetcher did not start: {line!r}\n{(cache_root / 'fetcher.log').read_text()[-3000:]}")
    return proc


def stop_fetcher(proc: subprocess.Popen) -> dict:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    return json.loads(out.strip().splitlines()[-1])


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def gaps_of(r: dict) -> list[float]:
    return [g for q in r["requests"] for g in q["gaps"]]


def summarize(rounds: list[dict]) -> dict:
    gaps = [g for r in rounds for g in gaps_of(r)]
    rates = [q["tok_s"] for r in rounds for q in r["requests"]]
    out = {"gaps": len(gaps), "gap_median_ms": round(statistics.median(gaps) * 1e3, 2),
           "gap_p90_ms": round(pct(gaps, 0.9) * 1e3, 2), "gap_p99_ms": round(pct(gaps, 0.99) * 1e3, 2),
           "gap_mean_ms": round(statistics.mean(gaps) * 1e3, 2),
           "tok_s_median": round(statistics.median(rates), 2),
           "ttft_median_s": round(statistics.median(q["ttft"] for r in rounds for q in r["requests"]), 3),
           "daemon_cpu_s_per_round": [round(statistics.mean(r["daemon_cpu_s"][i] for r in rounds), 2)
                                      for i in range(len(rounds[0]["daemon_cpu_s"]))],
           "wall_s_per_round": round(statistics.mean(r["wall"] for r in rounds), 2),
           "load1_before_rounds": [r["load1"] for r in rounds]}
    fetches = [r["fetch"] for r in rounds if "fetch" in r]
    if fetches:
        total_bytes, total_s = sum(x["bytes"] for x in fetches), sum(x["seconds"] for x in fetches)
        cpu = sum(x["cpu_user"] + x["cpu_sys"] for x in fetches)
        out["fetch"] = {"mb_per_s": round(total_bytes / total_s / 1e6, 1), "bytes": total_bytes,
                        "seconds": round(total_s, 2), "whole_models": sum(len(x["rounds"]) for x in fetches),
                        "fetcher_cpu_s": round(cpu, 2), "fetcher_cpu_share": round(cpu / total_s, 3)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 round of each")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each kind, alternating (default 3)")
    ap.add_argument("--requests", type=int, default=3, help="streamed requests per round, one after the other")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--fetch", default=",".join(DEFAULT_VARIANTS),
                    help="fetch variants, comma-separated, each alternating with the baseline: niceN or idle "
                         "(how the fetcher process is scheduled), optionally @MBPS (paced to that rate); "
                         f"default {','.join(DEFAULT_VARIANTS)}")
    ap.add_argument("--serve-rate", default=None, metavar="RATE",
                    help="the daemons' --fetch-serve-rate (default: theirs, 4MB/s while requests run); a run with "
                         "another value goes into the results file's `sources_serve_rate_RATE` (the rest is kept)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    # the fetcher process (internal)
    ap.add_argument("--fetcher", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sources", help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cache-root", help=argparse.SUPPRESS)
    ap.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--source", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fetcher:
        return fetcher_main(args)
    if args.source:
        return source_main(args)
    variants = [parse_variant(v) for v in args.fetch.split(",") if v]
    if not MODEL.exists():
        print(f"skipped: {MODEL} is absent (the shared test models live beside the checkout)", file=sys.stderr)
        return 0
    taken = [p for p in (*GRPC_PORTS, *GATEWAY_PORTS, *EXTERNAL_PORTS) if port_taken(p)]
    if taken:
        print(f"ports {taken} on 127.0.0.1 are taken (another run?)", file=sys.stderr)
        return 2
    rounds = 1 if args.quick else args.rounds
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    load_before = uptime()
    print(f"before: {load_before}", file=sys.stderr, flush=True)
    kinds = [None, *variants]
    runs: dict[str, list[dict]] = {"baseline" if v is None else v["name"]: [] for v in kinds}
    with tempfile.TemporaryDirectory(prefix="p2pllm-fetch-bench-") as tmp, \
            tempfile.TemporaryDirectory(prefix="p2pllm-fetch-bench-", dir=shm) as cache_root:
        env = dict(os.environ, P2PLLM_SECRET=SECRET, HOME=tmp, PYTHONUNBUFFERED="1")
        env.pop("P2PLLM_DEBUG", None)
        cluster = Cluster(Path(tmp), env, args.serve_rate)
        sources: list[subprocess.Popen] = []
        try:
            if any(v["external"] for v in variants):
                sources = start_sources(env, Path(tmp))
            n_layers = sum(e - s for p in cluster.status["peers"] if p["layers"] for s, e in [p["layers"]])
            stream_completion(cluster.gateway, PROMPTS[0], 16)  # warm-up
            serve_cost = serving_cost(cluster, env, Path(cache_root), n_layers)  # also warms the sources' hashes
            if sources:  # the sources outside the ring hash every piece once too
                warm = start_fetcher(env, Path(cache_root), n_layers, parse_variant("nice0+ext"))
                warm.stdout.readline()
                stop_fetcher(warm)
            print(f"serving alone: {serve_cost}", file=sys.stderr, flush=True)
            for i in range(rounds):
                for v in kinds:
                    name = "baseline" if v is None else v["name"]
                    load1 = round(os.getloadavg()[0], 2)
                    fetcher = None if v is None else start_fetcher(env, Path(cache_root), n_layers, v)
                    try:
                        r = one_round(cluster, args.requests, args.max_tokens)
                    finally:
                        if fetcher is not None:
                            r_fetch = stop_fetcher(fetcher)
                    r["load1"] = load1
                    if fetcher is not None:
                        r["fetch"] = r_fetch
                    runs[name].append(r)
                    gaps = gaps_of(r)
                    print(f"round {i + 1} {name}: gap median {statistics.median(gaps) * 1e3:.1f} ms, p90 "
                          f"{pct(gaps, 0.9) * 1e3:.1f} ms, load {load1}"
                          + (f", fetch {r_fetch['mb_per_s']} MB/s ({len(r_fetch['rounds'])} whole models)"
                             if fetcher else ""), file=sys.stderr, flush=True)
        finally:
            for p in sources:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
            cluster.close()
    from ring import machine

    res = {"benchmark": "fetch_impact", "quick": args.quick, "model": MODEL.name, "peers": 2, "n_layers": n_layers,
           "rounds": rounds, "sources_serve_rate": args.serve_rate or "default (4MB/s while requests run)",
           "requests_per_round": args.requests, "max_tokens": args.max_tokens,
           "fetcher": {"variants": variants, "streams_per_source": 2, "source_max_streams": 2, "cache": str(shm)},
           "machine": machine(), "uptime_before": load_before, "uptime_after": uptime(), "serving_alone": serve_cost,
           "configs": {k: summarize(rs) for k, rs in runs.items()}}
    b = res["configs"]["baseline"]
    for v in variants:
        f = res["configs"][v["name"]]
        f["ratio_gap_median"] = round(f["gap_median_ms"] / b["gap_median_ms"], 3)
        f["ratio_gap_p90"] = round(f["gap_p90_ms"] / b["gap_p90_ms"], 3)
        f["ratio_tok_s"] = round(f["tok_s_median"] / b["tok_s_median"], 3)
        # per pair of neighbouring rounds (baseline i, this variant's i): how steady the ratio is
        f["pair_ratios_gap_median"] = [round(statistics.median(gaps_of(fr)) / statistics.median(gaps_of(br)), 3)
                                       for br, fr in zip(runs["baseline"], runs[v["name"]])]
        f["target_met"] = f["ratio_gap_median"] <= 1.10 and f["ratio_gap_p90"] <= 1.10
    res["runs"] = {kind: [{"wall": r["wall"], "load1": r["load1"], "daemon_cpu_s": r["daemon_cpu_s"],
                           **({"fetch": r["fetch"]} if "fetch" in r else {}),
                           "requests": [{"ttft": round(q["ttft"], 4), "chunks": q["chunks"], "tokens": q["tokens"],
                                         "tok_s": round(q["tok_s"], 2),
                                         "gaps_ms": [round(g * 1e3, 2) for g in q["gaps"]]} for q in r["requests"]]}
                          for r in rs] for kind, rs in runs.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.serve_rate is not None and args.out.exists():  # beside the default run's result
        whole = json.loads(args.out.read_text())
        whole[f"sources_serve_rate_{args.serve_rate}"] = res
        args.out.write_text(json.dumps(whole, indent=1) + "\n")
    else:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(markdown(res))
    return 0


def describe(v: dict) -> str:
    how = "SCHED_IDLE (`chrt --idle 0`)" if v["sched"] == "idle" else f"`nice -n {v['sched'][4:]}`"
    return (f"fetching{' from 2 sources outside the ring' if v.get('external') else ''}, fetcher under {how}"
            + (f", paced to {v['rate']:g} MB/s" if v["rate"] else ""))


def markdown(res: dict) -> str:
    m, b = res["machine"], res["configs"]["baseline"]
    load = res["uptime_before"].split("load average:")[-1].strip()
    after = res["uptime_after"].split("load average:")[-1].strip()
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores; load before: `{load}`, after: `{after}` (1/5/15 min); "
             f"{res['model']} on {res['peers']} loopback peers (one stage each); {res['rounds']} rounds of each "
             f"kind, alternating, each {res['requests_per_round']} streamed greedy completions of "
             f"{res['max_tokens']} tokens one after the other"
             + f"; the daemons serve fetches at --fetch-serve-rate {res['sources_serve_rate']}.", "",
             ("| | inter-token gap median | p90 | p99 | decode tok/s (median) | gap median / baseline | p90 / baseline "
             "| fetch rate | fetcher CPU (of one core) | daemons' CPU s per round |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for v in [None, *res["fetcher"]["variants"]]:
        c = b if v is None else res["configs"][v["name"]]
        fx = c.get("fetch")
        lines.append(f"| {'baseline' if v is None else describe(v)} | {c['gap_median_ms']} ms | {c['gap_p90_ms']} ms | "
                     f"{c['gap_p99_ms']} ms | {c['tok_s_median']} | "
                     + (f"**{c['ratio_gap_median']}x** | **{c['ratio_gap_p90']}x** | {fx['mb_per_s']} MB/s | "
                        f"{fx['fetcher_cpu_share']:.0%} | " if fx else "| | | | ")
                     + f"{' + '.join(str(x) for x in c['daemon_cpu_s_per_round'])} |")
    sc = res["serving_alone"]
    lines += ["", (f"Serving alone (no request running, fetcher under SCHED_IDLE): {sc['mb_per_s']} MB/s from both "
                  f"daemons, which used {' + '.join(map(str, sc['serving_cpu_s']))} CPU s in {sc['seconds']} s "
                  f"(idle: {' + '.join(map(str, sc['idle_cpu_s']))}): **{sc['daemon_cpu_s_per_mb'] * 1e3:.1f} ms of "
                  f"CPU per MB served**; the fetcher used {sc['fetcher_cpu_share']:.0%} of a core.")]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
