"""The mission, measured: a model no single peer can hold, served by three peers that together can.

    python benchmarks/mission.py             # writes benchmarks/results/mission.json, prints markdown
    python benchmarks/mission.py --quick     # fewer tokens, shorter bounds (a smoke test, not a result)
    python benchmarks/mission.py --only 2,3  # some parts only (2 and 3 share one cluster)

Root only (memory cgroups, network namespaces, tc). The model: a seeded-random Llama of 3.2B
parameters (`p2pllm make-demo-model --size 3b --qtype f16`, then llama.cpp's own
`llama_model_quantize` to Q4_K_M), cached in ~/.cache/p2pllm/demo-3b.Q4_K_M.gguf. Every peer's
memory limit is the model file's size / 1.5 (`--limit-ratio`), so the model is 1.5x larger than
what any one peer may hold.

0. The ceiling: llama.cpp (llama-cpp-python, its own process) with the whole model and no limit,
   2 threads and 1 (its best is the ceiling), before and after the cluster (the machine is shared);
   and p2pllm's ggml stage with the whole model in one process (`p2pllm run`'s path).
1. One peer alone under the limit (a cgroup v1 memory child of this process's cgroup):
   `p2pllm run` refuses in one line (exit 3); `p2pllm join` (host 1, alone for a while) never
   gets a plan and logs why; llama.cpp under the same limit, given a bounded time: killed by the
   kernel's OOM killer, or its tokens/s while it pages the mmap'ed file from disk.
2. Three network-namespace hosts (tests/netns.py), each daemon in its own cgroup with the limit,
   every link shaped to 1 Gbit/s (tc tbf), `--threads 2 --context 128`: time to ready,
   single-stream and 8-stream decode tokens/s, each peer's memory against its limit (peak charge
   `memory.max_usage_in_bytes`, which counts page cache; sampled working set and resident
   memory), OOM kills. A daemon enters its cgroup first, then its namespace with `nsenter --net`:
   `ip netns exec` remounts /sys, which hides /sys/fs/cgroup from the daemon.
3. kill -9 of one peer (not the coordinator) mid-stream, the two survivors cannot hold the model:
   the running request ends with an error naming the reason, new requests get 503 naming the
   shortfall; the peer is started again (fresh cgroup, same limit), any peer that dies meanwhile is
   recorded (OOM kill or not) and started again like a supervisor would, and the time until a
   request succeeds is measured, then single-stream tokens/s once more.

Before each limited process the model file's page cache is dropped (posix_fadvise DONTNEED):
cgroup v1 charges a page to the cgroup that first read it, so pages left in the cache by an
earlier process would let a limited one read the file without paying for it.

How tokens are timed: as in benchmarks/ring.py, the coordinator's streaming `Generate` RPC, one
event per token, greedy with `ignore_eos`; decode tokens/s = tokens after the first over their time.
The load average (`uptime`) is recorded at the start of every part; the machine is shared.
Every cgroup, namespace and process made here is removed at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

RESULTS = ROOT / "benchmarks" / "results" / "mission.json"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "p2pllm"
MODEL = CACHE / "demo-3b.Q4_K_M.gguf"
Q4_K_M = 15  # llama_ftype
GRPC_PORT, GATEWAY_PORT = 7740, 8740  # inside the namespaces (no test uses these)
THREADS = 2
MiB, GiB = 1 << 20, 1 << 30


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# =========================================================================== the model


def ensure_model(path: Path = MODEL) -> Path:
    """The 3.2B seeded-random Llama as Q4_K_M (llama.cpp's quantizer), made once and cached."""
    if path.exists():
        return path
    import llama_cpp

    path.parent.mkdir(parents=True, exist_ok=True)
    f16 = path.with_name("demo-3b.f16.gguf.tmp")
    need = 6.5 * GiB + 2.2 * GiB
    free = shutil.disk_usage(path.parent).free
    if free < need:
        raise SystemExit(f"making the 3b model needs {need / GiB:.1f} GiB of disk in {path.parent}; "
                         f"{free / GiB:.1f} GiB free")
    try:
        t0 = time.monotonic()
        log(f"writing the seeded-random 3b model (f16, ~6.4 GB) to {f16} ...")
        subprocess.run([sys.executable, "-m", "p2pllm", "make-demo-model", str(f16), "--size", "3b", "--qtype", "f16",
                        "--force"],
                       check=True, cwd=ROOT)
        log(f"  written in {time.monotonic() - t0:.0f}s; quantizing to Q4_K_M with llama.cpp ...")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = Q4_K_M
        params.nthread = THREADS
        tmp = path.with_suffix(".tmp")
        if llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {f16} to Q4_K_M")
        tmp.rename(path)
        log(f"  {path} ({path.stat().st_size / 1e9:.2f} GB) made in {time.monotonic() - t0:.0f}s")
    finally:
        f16.unlink(missing_ok=True)
        path.with_suffix(".tmp").unlink(missing_ok=True)
    return path



# =========================================================================== memory cgroups


class Cgroups:
    """cgroup v1 memory children of this process's own memory cgroup (as tests/test_memory_limits.py)."""

    def __init__(self) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("memory cgroups need root")
        base = Path("/sys/fs/cgroup/memory")
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        path = next((line.split(":", 2)[2] for line in lines if "memory" in line.split(":", 2)[1].split(",")), None)
        if path is None or not (base / "memory.limit_in_bytes").exists():
            raise RuntimeError("no cgroup v1 memory controller at /sys/fs/cgroup/memory")
        own = base / path.lstrip("/")
        self.own = own if own.is_dir() else base
        self.made: list[Path] = []

    def make(self, name: str, limit: int) -> Path:
        d = self.own / f"p2pllm-mission-{os.getpid()}-{name}"
        d.mkdir()
        self.made.append(d)
        (d / "memory.limit_in_bytes").write_text(str(limit))
        return d

    @staticmethod
    def wrap(cg: Path, argv: list) -> list[str]:
        """argv run inside cg: the shell moves itself in, then becomes the command (same pid)."""
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cg / "cgroup.procs"), *map(str, argv)]

    @staticmethod
    def stats(cg: Path) -> dict:
        def num(name: str) -> int:
            return int((cg / name).read_text().split()[0])

        stat = dict(line.split() for line in (cg / "memory.stat").read_text().splitlines())
        oom = dict(line.split() for line in (cg / "memory.oom_control").read_text().splitlines())
        return {"limit": num("memory.limit_in_bytes"), "max_usage": num("memory.max_usage_in_bytes"),
                "usage": num("memory.usage_in_bytes"), "failcnt": num("memory.failcnt"),
                "oom_kill": int(oom.get("oom_kill", 0)), "rss": int(stat["rss"]), "cache": int(stat["cache"]),
                "mapped_file": int(stat["mapped_file"]), "inactive_file": int(stat["total_inactive_file"])}

    def remove(self, d: Path) -> None:
        """SIGKILL what is left in it (only processes this benchmark started), then remove it."""
        deadline = time.monotonic() + 15
        while d.exists():
            try:
                for pid in (d / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
                d.rmdir()
            except OSError:
                if time.monotonic() > deadline:
                    log(f"could not remove {d}")
                    return
                time.sleep(0.2)
        if d in self.made:
            self.made.remove(d)

    def close(self) -> None:
        for d in list(self.made):
            self.remove(d)


class Sampler:
    """Samples each cgroup twice a second: the largest working set (usage less inactive page
    cache) and the largest anonymous + mapped-file resident memory seen."""

    def __init__(self, cgroups: dict[str, Path]) -> None:
        import threading

        self.cgroups, self.peak = cgroups, {k: {"working_set": 0, "rss_plus_mapped": 0} for k in cgroups}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            for k, cg in list(self.cgroups.items()):
                try:
                    st = Cgroups.stats(cg)
                except (OSError, KeyError, ValueError):
                    continue
                p = self.peak.setdefault(k, {"working_set": 0, "rss_plus_mapped": 0})
                p["working_set"] = max(p["working_set"], st["usage"] - st["inactive_file"])
                p["rss_plus_mapped"] = max(p["rss_plus_mapped"], st["rss"] + st["mapped_file"])

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.peak


def drop_file_cache(path: Path) -> None:
    """Evict the file's pages from the page cache (those no process maps), so the next process
    that reads it is charged for what it reads."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# =========================================================================== machine state


def load_now() -> dict:
    """`uptime`'s load averages, and the busiest other processes (the machine is shared)."""
    ps = subprocess.run(["ps", "-eo", "pid,pcpu,rss,etimes,args", "--sort=-pcpu"], capture_output=True, text=True)
    mine = {os.getpid()}
    top = []
    for line in ps.stdout.splitlines()[1:]:
        parts = line.split(None, 4)
        if len(parts) < 5 or int(parts[0]) in mine or parts[4].startswith("ps "):
            continue
        if float(parts[1]) < 5.0 and len(top) >= 3:
            break
        top.append({"pid": int(parts[0]), "cpu_percent": float(parts[1]), "rss_mb": int(parts[2]) // 1024,
                    "seconds": int(parts[3]), "command": parts[4][:160]})
        if len(top) >= 8:
            break
    return {"time": time.strftime("%H:%M:%S"), "load": [round(x, 2) for x in os.getloadavg()],
            "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), "busiest": top}


def wait_for_quiet(limit: float, max_wait: float) -> dict:
    t0 = time.monotonic()
    while os.getloadavg()[0] >= limit and time.monotonic() - t0 < max_wait:
        log(f"load {os.getloadavg()[0]:.2f} >= {limit}: waiting (up to {max_wait - (time.monotonic() - t0):.0f}s more)")
        time.sleep(15)
    return {"waited_s": round(time.monotonic() - t0, 1), "load_then": round(os.getloadavg()[0], 2),
            "target": limit}


# =========================================================================== llama.cpp


LLAMA = r"""
import json, sys, time
path, n, prompt, progress, ctx = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4], int(sys.argv[5])
out = open(progress, "a", buffering=1)
def note(**kw):
    out.write(json.dumps({"t": time.time(), **kw}) + "\n")
note(event="start")
import llama_cpp
t0 = time.perf_counter()
th = int(sys.argv[7])
llm = llama_cpp.Llama(model_path=path, n_ctx=ctx, n_batch=512, n_threads=th, n_threads_batch=th, type_k=1, type_v=1,
                      flash_attn=True, verbose=False)
note(event="loaded", seconds=time.perf_counter() - t0)
def decode(k, tag):
    got, first = 0, 0.0
    for _ in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, reset=True):
        got += 1
        note(event="token", run=tag, i=got)
        if got == 1:
            first = time.perf_counter()
        if got == k:
            return (k - 1) / (time.perf_counter() - first)
warm = decode(4, "warmup")
rates = [decode(n, f"run{i}") for i in range(int(sys.argv[6]))]
note(event="done", rates=rates)
print(json.dumps({"decode": rates, "warmup": warm}))
"""


def llama_cpp_run(model: Path, prompt: list[int], n: int, repeats: int, *, cgroup: Path | None, bound_s: float,
                  work: Path, ctx: int = 512, threads: int = THREADS) -> dict:
    """llama.cpp in its own process (optionally inside a cgroup), killed after bound_s seconds.
    Returns its decode rates, or what it managed before it was killed or ran out of time."""
    progress = work / f"llama-{time.monotonic_ns()}.jsonl"
    argv = [sys.executable, "-c", LLAMA, str(model), str(n), json.dumps(prompt), str(progress), str(ctx), str(repeats),
            str(threads)]
    if cgroup is not None:
        argv = Cgroups.wrap(cgroup, argv)
    t0 = time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=bound_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        timed_out = True
    events = [json.loads(line) for line in progress.read_text().splitlines()] if progress.exists() else []
    progress.unlink(missing_ok=True)
    res: dict = {"threads": threads, "returncode": proc.returncode, "timed_out": timed_out, "bound_s": bound_s,
                 "wall_s": round(time.time() - t0, 2), "stderr_tail": err[-600:] if proc.returncode else ""}
    loaded = next((e for e in events if e["event"] == "loaded"), None)
    res["load_s"] = round(loaded["seconds"], 2) if loaded else None
    tokens = [e for e in events if e["event"] == "token"]
    res["tokens"] = len(tokens)
    if proc.returncode == 0 and out.strip():
        res.update(json.loads(out.strip().splitlines()[-1]))
    else:  # killed or out of time: the rate of the tokens it did make, after the first of its run
        runs: dict = {}
        for e in tokens:
            runs.setdefault(e["run"], []).append(e["t"])
        rates = [(len(ts) - 1) / (ts[-1] - ts[0]) for ts in runs.values() if len(ts) > 1 and ts[-1] > ts[0]]
        res["partial_rates"] = rates
        last = max((e["t"] for e in events), default=t0)
        res["seconds_since_last_event"] = round(time.time() - last, 1)
        if tokens:
            res["seconds_per_token_overall"] = round((tokens[-1]["t"] - (loaded["t"] if loaded else t0)) / len(tokens), 2)
    if cgroup is not None:
        res["cgroup"] = Cgroups.stats(cgroup)
        res["oom_killed"] = res["cgroup"]["oom_kill"] > 0  # (a -9 of ours at the bound is not one)
    return res


# =========================================================================== client (inside a namespace host)


def _generate_events(address: str, secret: str | None, streams: int, max_tokens: int, progress: str | None = None,
                     timeout: float = 600) -> dict:
    """`streams` concurrent greedy requests of exactly max_tokens; per stream the arrival time of
    every token and the error it ended with (none: finished)."""
    import asyncio
    import uuid

    from ring import PROMPT_IDS, _channel

    from p2pllm.proto import p2pllm_pb2 as pb
    from p2pllm.proto import p2pllm_pb2_grpc as pb_grpc

    async def main():
        channel = _channel(address, secret)
        stub = pb_grpc.PeerStub(channel)
        note = open(progress, "a", buffering=1) if progress else None

        async def one(i: int) -> dict:
            prompt = [PROMPT_IDS[0]] + [(t + 37 * i) % 1000 + 3 for t in PROMPT_IDS[1:]]
            req = pb.GenerateRequest(request_id=f"mission-{uuid.uuid4().hex[:12]}", prompt_ids=prompt,
                                     max_tokens=max_tokens, temperature=0.0, top_p=1.0, ignore_eos=True)
            times, finish, error = [], "", ""
            try:
                async for ev in stub.Generate(req, timeout=timeout):
                    if ev.error or ev.status:
                        error = f"status {ev.status} {ev.code}: {ev.error}"
                        break
                    if ev.has_token:
                        times.append(time.time())
                        if note:
                            note.write(json.dumps({"t": times[-1], "n": len(times)}) + "\n")
                    if ev.finish_reason:
                        finish = ev.finish_reason
                        break
            except Exception as e:  # the RPC itself failed
                details = e.details() if hasattr(e, "details") else str(e)
                error = f"{type(e).__name__}: {details}"
            return {"times": times, "finish": finish, "error": error}

        try:
            t0 = time.time()
            out = await asyncio.gather(*(one(i) for i in range(streams)))
            return {"t0": t0, "wall": time.time() - t0, "streams": out}
        finally:
            await channel.close()

    return asyncio.run(main())


def _wait_ready(addresses: list[str], secret: str | None, n_placed: int, seconds: float) -> dict:
    """Poll every peer's Status until they agree on one plan epoch with n_placed stages, all
    serving, for 2 s; give up after `seconds` (the caller checks its processes and asks again)."""
    import asyncio

    from ring import _status

    deadline, stable, last = time.monotonic() + seconds, None, ""
    while time.monotonic() < deadline:
        try:
            views = [asyncio.run(_status(a, secret)) for a in addresses]
        except Exception as e:
            last = str(e)[:200]
            time.sleep(0.5)
            continue
        placed = [p for p in views[0]["peers"] if p["layers"]]
        serving = all(p.get("state") == "serving" for v in views for p in v["peers"] if p["id"] == v["id"])
        if len({v["epoch"] for v in views}) == 1 and views[0]["epoch"] > 0 and len(placed) == n_placed and serving:
            if stable is None or stable[0] != views[0]["epoch"]:
                stable = (views[0]["epoch"], time.time())
            elif time.time() - stable[1] >= 2.0:
                return {"ready": True, "at": stable[1], "view": views[0]}
        else:
            stable = None
            last = f"epochs {[v['epoch'] for v in views]}, {len(placed)} placed"
        time.sleep(0.5)
    return {"ready": False, "last": last}


def _http(path: str, body: dict | None, timeout: float = 120) -> dict:
    import httpx

    t0 = time.time()
    try:
        r = (httpx.post(f"http://127.0.0.1:{GATEWAY_PORT}{path}", json=body, timeout=timeout) if body is not None
             else httpx.get(f"http://127.0.0.1:{GATEWAY_PORT}{path}", timeout=timeout))
        return {"status": r.status_code, "body": r.text[:1500], "t": t0, "seconds": time.time() - t0}
    except httpx.HTTPError as e:
        return {"status": 0, "body": f"{type(e).__name__}: {e}", "t": t0, "seconds": time.time() - t0}


def client_job(job: dict):
    kind, secret = job["kind"], job.get("secret")
    if kind == "status":
        import asyncio

        from ring import _status

        return asyncio.run(_status(job["address"], secret))
    if kind == "wait_ready":
        return _wait_ready(job["addresses"], secret, job["placed"], job["seconds"])
    if kind == "generate":
        return _generate_events(job["address"], secret, job["streams"], job["max_tokens"], job.get("progress"))
    if kind == "http":
        return _http(job["path"], job.get("body"), job.get("timeout", 120))
    if kind == "recover":  # a small completion every second until one succeeds
        tries, t0 = [], time.time()
        while time.time() - t0 < job["seconds"]:
            r = _http("/v1/completions", job["body"], timeout=60)
            tries.append({k: r[k] for k in ("status", "t", "seconds")} | {"body": r["body"][:300]})
            if r["status"] == 200:
                return {"ok": True, "tries": tries}
            time.sleep(1.0)
        return {"ok": False, "tries": tries}
    raise SystemExit(f"unknown job {kind}")


# =========================================================================== the cluster


class Mission:
    """Three namespace hosts, each daemon in its own memory cgroup, links shaped."""

    def __init__(self, model: Path, limit: int, cgroups: Cgroups, secret: str | None, log_dir: Path, cfg: dict):
        from netns import Hosts

        self.model, self.limit, self.cg, self.secret, self.cfg = model, limit, cgroups, secret, cfg
        self.h = Hosts(3, log_dir=log_dir / "hosts")
        self.procs: dict[int, subprocess.Popen] = {}
        self.groups: dict[str, Path] = {}
        for i in self.h.indices:
            subprocess.run(["tc", "qdisc", "add", "dev", self.h.veth(i), "root", "tbf", "rate", cfg["rate"], "burst",
                            "1mb", "latency", "20ms"], check=True, capture_output=True, text=True)
        self.sampler = Sampler(self.groups)

    def address(self, i: int) -> str:
        return f"{self.h.addr(i)}:{GRPC_PORT}"

    def client(self, i: int, job: dict, timeout: float = 900) -> dict:
        proc = self.h.run(i, [sys.executable, str(Path(__file__).resolve()), "--client"],
                          input=json.dumps({**job, "secret": self.secret}), timeout=timeout, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"client in host {i} failed: {proc.stderr[-2000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def client_bg(self, i: int, job: dict) -> subprocess.Popen:
        return self.h.popen(i, [sys.executable, str(Path(__file__).resolve()), "--client", "--job",
                                json.dumps({**job, "secret": self.secret})], cwd=ROOT)

    def start(self, i: int, tag: str = "") -> float:
        name = f"host{i}{tag}"
        cg = self.cg.make(name, self.limit)
        self.groups[name] = cg
        security = [f"--secret={self.secret}"] if self.secret else ["--insecure"]
        argv = [sys.executable, "-m", "p2pllm", "join", "--model", self.model, "--name", f"host{i}",
                "--interface", self.h.addr(i), "--port", GRPC_PORT, "--gateway-port", GATEWAY_PORT, "--no-mdns",
                "--peer", self.address(1), "--cluster", f"mission-{os.getpid()}", "--context", self.cfg["context"],
                "--threads", self.cfg["threads"], *security, *self.cfg["daemon_args"]]
        # into the cgroup first, then into the host's network namespace with nsenter: `ip netns exec`
        # (what Hosts.popen uses) remounts /sys, which hides /sys/fs/cgroup, so a daemon started that
        # way cannot see its own memory limit
        argv = Cgroups.wrap(cg, ["nsenter", f"--net=/var/run/netns/{self.h.ns(i)}", *map(str, argv)])
        log_path = self.h.log_dir / f"h{i}-{name}.log"
        t = time.time()
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                                    env=dict(os.environ, PYTHONUNBUFFERED="1", **self.cfg["daemon_env"]),
                                    start_new_session=True)
        proc.log_path = log_path  # type: ignore[attr-defined]
        proc.cgroup_name = name  # type: ignore[attr-defined]
        self.h._procs.append(proc)  # Hosts.close() kills it with the rest
        self.procs[i] = proc
        return t

    def log_text(self, i: int) -> str:
        return Path(self.procs[i].log_path).read_text(errors="replace")

    def check_alive(self) -> None:
        for i, p in self.procs.items():
            if p.poll() is not None:
                st = Cgroups.stats(self.groups[p.cgroup_name])
                raise RuntimeError(f"daemon host{i} exited (rc {p.returncode}; cgroup {st})\n{self.h.logs()[-6000:]}")

    def wait_ready(self, placed: int, timeout: float, hosts: list[int] | None = None) -> dict:
        deadline = time.monotonic() + timeout
        hosts = hosts or list(self.h.indices)
        while time.monotonic() < deadline:
            self.check_alive()
            r = self.client(hosts[0], {"kind": "wait_ready", "addresses": [self.address(i) for i in hosts],
                                       "placed": placed, "seconds": 10})
            if r["ready"]:
                return r
        raise RuntimeError(f"no {placed}-stage plan within {timeout:.0f}s ({r.get('last')})\n{self.h.logs()[-6000:]}")

    def kill(self, i: int) -> None:
        self.h.kill(self.procs[i])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.sampler.stop()
        self.h.close()


def _rows(view: dict) -> list[dict]:
    names = {p["id"]: p["name"] for p in view["peers"]}
    return [{"peer": names.get(s["peer"], s["peer"][:8]), "layers": s["layers"], "memory": s.get("memory"),
             "ms_per_token": s.get("ms_per_token")} for s in view["plan"]["stages"]]


def measure_cluster(m: Mission, res: dict, cfg: dict, work: Path, failover: bool = True) -> None:
    """Part 1's join-alone and part 2: ready, speed, memory; then part 3: failover."""
    # --- a peer alone: it cannot hold the model, so it waits for more peers and says why
    t_alone = m.start(1)
    line, deadline = "", time.monotonic() + cfg["alone_s"]
    while time.monotonic() < deadline:
        m.check_alive()
        line = next((ln for ln in m.log_text(1).splitlines() if "no feasible plan" in ln), "")
        if line:
            break
        time.sleep(0.5)
    cap = next((ln for ln in m.log_text(1).splitlines() if "usable (bound:" in ln), "")
    res["part1"]["join_alone"] = {"log_line": line.strip()[:600], "capability_line": cap.strip()[:400],
                                  "seconds_to_line": round(time.time() - t_alone, 1) if line else None,
                                  "cgroup": Cgroups.stats(m.groups["host1"])}
    log(f"  join alone: {line.strip()[:300] or '(no line within the bound)'}")

    # --- part 2: the other two peers arrive
    res["part2"] = p2 = {"load_at_start": load_now()}
    t_start = time.time()
    m.start(2)
    m.start(3)
    ready = m.wait_ready(3, cfg["ready_timeout"])
    view = ready["view"]
    p2["time_to_ready_s"] = round(ready["at"] - t_start, 1)
    p2["time_to_ready_note"] = (f"from starting peers 2 and 3 (peer 1 had been up, alone, for "
                                f"{t_start - t_alone:.0f}s) until all three served one plan epoch")
    p2["epoch"], p2["plan_stages"] = view["epoch"], _rows(view)
    p2["predicted"] = view["plan"].get("predicted")
    coord = next(p for p in view["peers"] if p["id"] == view["coordinator"])
    head = next(i for i in m.h.indices if coord["address"].startswith(m.h.addr(i) + ":"))
    p2["coordinator"] = f"host{head}"
    log(f"  ready in {p2['time_to_ready_s']}s: " + ", ".join(f"{r['peer']} {r['layers']}" for r in p2["plan_stages"]))
    address = m.address(head)
    m.client(head, {"kind": "generate", "address": address, "streams": 1, "max_tokens": 8})  # warm-up
    from ring import aggregate, decode_rate

    single = []
    for _ in range(cfg["repeats"]):
        r = m.client(head, {"kind": "generate", "address": address, "streams": 1, "max_tokens": cfg["tokens"]})
        if r["streams"][0]["error"]:
            raise RuntimeError(f"single stream failed: {r['streams'][0]['error']}")
        single.append(decode_rate(r["streams"][0]))
        log(f"  single stream: {single[-1]:.2f} tok/s")
    p2["single_stream_tokens_per_s"] = single
    p2["single_stream_median"] = statistics.median(single)
    m.client(head, {"kind": "generate", "address": address, "streams": 8, "max_tokens": 8})  # warm-up, batch 8
    multi = []
    for _ in range(cfg["repeats8"]):
        r = m.client(head, {"kind": "generate", "address": address, "streams": 8, "max_tokens": cfg["tokens8"]})
        errors = [s["error"] for s in r["streams"] if s["error"]]
        if errors:
            raise RuntimeError(f"8 streams failed: {errors[:2]}")
        for s in r["streams"]:
            s["times"] = [t - r["t0"] for t in s["times"]]
        multi.append(aggregate(r))
        log(f"  8 streams: {multi[-1]['steady_tokens_per_s']:.2f} tok/s steady, {multi[-1]['wall_tokens_per_s']:.2f} "
            f"incl. prefill")
    p2["eight_stream"] = multi
    p2["eight_stream_steady_median"] = statistics.median(a["steady_tokens_per_s"] for a in multi)
    p2["eight_stream_wall_median"] = statistics.median(a["wall_tokens_per_s"] for a in multi)
    final = m.client(head, {"kind": "status", "address": address})
    p2["final_epoch"] = final["epoch"]
    p2["memory"] = {name: {**Cgroups.stats(cg), **m.sampler.peak.get(name, {})} for name, cg in m.groups.items()}
    p2["load_at_end"] = load_now()
    if not failover:
        return

    # --- part 3: kill -9 a peer that is not the coordinator, mid-stream
    res["part3"] = p3 = {"load_at_start": load_now()}
    # the last host that holds layers and is not the coordinator (not host 1, which the others --peer to)
    victim = max(i for i in m.h.indices if i != head and any(r["peer"] == f"host{i}" for r in p2["plan_stages"]))
    p3["killed"] = f"host{victim}"
    progress = work / "stream-progress.jsonl"
    progress.unlink(missing_ok=True)
    stream = m.client_bg(head, {"kind": "generate", "address": address, "streams": 1,
                                "max_tokens": cfg["long_tokens"], "progress": str(progress)})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        n = len(progress.read_text().splitlines()) if progress.exists() else 0
        if n >= cfg["kill_after"]:
            break
        if stream.poll() is not None:
            raise RuntimeError(f"the long stream ended early: {Path(stream.log_path).read_text()[-2000:]}")
        time.sleep(0.2)
    t_kill = time.time()
    m.kill(victim)
    log(f"  killed host{victim} (kill -9) after {n} tokens")
    try:
        stream.wait(timeout=120)
    except subprocess.TimeoutExpired:
        m.h.kill(stream)
    out = Path(stream.log_path).read_text(errors="replace").strip().splitlines()
    got = json.loads(out[-1]) if out and out[-1].startswith("{") else {"streams": [{"error": "\n".join(out[-5:])}]}
    s = got["streams"][0]
    p3["stream"] = {"tokens_before_kill": n, "tokens": len(s.get("times", [])), "error": s.get("error", ""),
                    "finish": s.get("finish", ""),
                    "error_after_kill_s": round(max(s["times"][-1] if s.get("times") else t_kill, t_kill) - t_kill, 2)
                    if s.get("times") is not None else None}
    log(f"  the running request ended: {p3['stream']['error'][:300] or s.get('finish')}")
    ended = time.time()
    p3["stream"]["ended_after_kill_s"] = round(ended - t_kill, 1)
    body = {"model": m.model.name, "prompt": "Hello there", "max_tokens": 4, "temperature": 0}
    time.sleep(1.0)
    new = m.client(head, {"kind": "http", "path": "/v1/completions", "body": body})
    p3["new_request"] = {"status": new["status"], "body": new["body"][:800], "after_kill_s": round(new["t"] - t_kill, 1)}
    log(f"  a new request: HTTP {new['status']} {new['body'][:300]}")
    health = m.client(head, {"kind": "http", "path": "/health", "body": None})
    p3["health"] = {"status": health["status"], "body": health["body"][:600]}
    p3["coordinator_log"] = [ln.strip()[:400] for ln in m.log_text(head).splitlines()
                             if "lost capacity" in ln or "no feasible plan" in ln][-3:]
    survivors = [f"host{i}" for i in m.h.indices if i != victim]
    p3["survivors_memory"] = {k: {**Cgroups.stats(m.groups[k]), **m.sampler.peak.get(k, {})} for k in survivors}
    p3["victim_memory"] = {**Cgroups.stats(m.groups[f"host{victim}"]), **m.sampler.peak.get(f"host{victim}", {})}
    m.cg.remove(m.groups.pop(f"host{victim}"))  # its page cache must not count against the new one

    # the peer comes back (a fresh cgroup with the same limit). Any peer that dies meanwhile (the
    # kernel's OOM killer during the replan, say) is recorded and started again, like a supervisor would.
    t_restart = m.start(victim, tag="-r1")
    events: list[dict] = [{"t": 0.0, "event": f"host{victim} started again"}]
    restarts, tries, p3["died"] = {victim: 1}, [], {}
    deadline = time.monotonic() + cfg["recover_timeout"]
    p3["recovered"] = False
    while time.monotonic() < deadline:
        for i, proc in list(m.procs.items()):
            if proc.poll() is None:
                continue
            name = proc.cgroup_name
            st = {**Cgroups.stats(m.groups[name]), **m.sampler.peak.get(name, {})}
            tail = [ln.strip()[:300] for ln in Path(proc.log_path).read_text(errors="replace").splitlines()[-3:]]
            p3["died"][name] = {**st, "returncode": proc.returncode, "log_tail": tail}
            events.append({"t": round(time.time() - t_restart, 1), "event": f"{name} died (rc {proc.returncode}, "
                           f"{st['oom_kill']} OOM kills in its cgroup, peak {st['max_usage'] / GiB:.2f} GiB)"})
            log(f"  {events[-1]['event']}; last log line: {tail[-1] if tail else ''}")
            m.cg.remove(m.groups.pop(name))
            if restarts.get(i, 0) >= 3:
                raise RuntimeError(f"host{i} died 3 times while recovering")
            restarts[i] = restarts.get(i, 0) + 1
            m.start(i, tag=f"-r{restarts[i]}")
            events.append({"t": round(time.time() - t_restart, 1), "event": f"host{i} started again"})
        ask = head if m.procs[head].poll() is None else min(i for i, pr in m.procs.items() if pr.poll() is None)
        r = m.client(ask, {"kind": "http", "path": "/v1/completions", "body": body, "timeout": 60}, timeout=120)
        tries.append({"host": ask, "status": r["status"], "t": round(r["t"] - t_restart, 1), "body": r["body"][:200]})
        if r["status"] == 200:
            p3["recovered"] = True
            p3["time_to_recover_s"] = round(r["t"] + r["seconds"] - t_restart, 1)
            break
        time.sleep(1.0)
    p3["events"], p3["restarts"] = events, restarts
    p3["tries"] = tries[:5] + tries[-10:] if len(tries) > 15 else tries
    p3["statuses_while_recovering"] = sorted({t["status"] for t in tries})
    if p3["recovered"]:
        log(f"  recovered {p3['time_to_recover_s']}s after the restart ({len(tries)} tries; events {events})")
        ready = m.wait_ready(3, 120)
        view = ready["view"]
        p3["epoch_after"], p3["plan_after"] = view["epoch"], _rows(view)
        coord = next(p for p in view["peers"] if p["id"] == view["coordinator"])
        head = next(i for i in m.h.indices if coord["address"].startswith(m.h.addr(i) + ":"))
        r = m.client(head, {"kind": "generate", "address": m.address(head), "streams": 1, "max_tokens": cfg["tokens"]})
        p3["single_stream_after_tokens_per_s"] = decode_rate(r["streams"][0]) if not r["streams"][0]["error"] else None
        p3["single_stream_after_error"] = r["streams"][0]["error"]
    else:
        log(f"  NOT recovered within {cfg['recover_timeout']}s: {tries[-1:]}")
    p3["memory"] = {name: {**Cgroups.stats(cg), **m.sampler.peak.get(name, {})} for name, cg in m.groups.items()}
    p3["load_at_end"] = load_now()


# =========================================================================== the parts


def part0_ceiling(model: Path, prompt: list[int], cfg: dict, work: Path, tag: str) -> list[dict]:
    """llama.cpp with the whole model, no limit: 2 threads (one per core), and 1 thread (its spinning
    thread pool suffers most when other processes share the two cores)."""
    runs = []
    for threads in (2, 1):
        log(f"ceiling ({tag}): llama.cpp, no limit, {threads} thread(s) ...")
        r = llama_cpp_run(model, prompt, cfg["tokens"], cfg["ceiling_repeats"], cgroup=None, bound_s=600, work=work,
                          threads=threads)
        r["load"], r["when"] = load_now(), tag
        if r.get("decode"):
            log(f"  llama.cpp, {threads} thread(s): {', '.join(f'{x:.2f}' for x in r['decode'])} tok/s")
        runs.append(r)
    return runs


OURS = r"""
import json, sys, time, torch
from p2pllm.runtime.local import LocalPipeline
path, n, prompt = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
torch.set_num_threads(2)
t0 = time.perf_counter()
pipe = LocalPipeline(path, threads=2)  # `p2pllm run`'s code path: the ggml stage a peer runs
load = time.perf_counter() - t0
pipe.generate(prompt, max_tokens=4, ignore_eos=True)
rates = [pipe.generate(prompt, max_tokens=n, ignore_eos=True).decode_tokens_per_s for _ in range(int(sys.argv[4]))]
print(json.dumps({"decode": rates, "load_seconds": load}))
"""


def ours_one_process(model: Path, prompt: list[int], cfg: dict) -> dict:
    """The whole model in one unlimited process through `p2pllm run`'s code path (the same ggml
    stage a peer runs): how fast the kernels are alone, without the ring."""
    proc = subprocess.run([sys.executable, "-c", OURS, str(model), str(cfg["tokens"]), json.dumps(prompt),
                           str(cfg["ceiling_repeats"])], capture_output=True, text=True, cwd=ROOT, timeout=600)
    if proc.returncode != 0:
        return {"error": proc.stderr[-800:]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**out, "median": statistics.median(out["decode"])}


def part1_alone(model: Path, prompt: list[int], limit: int, cg: Cgroups, cfg: dict, work: Path) -> dict:
    out: dict = {"limit": limit, "load_at_start": load_now()}
    log(f"alone under {limit / GiB:.2f} GiB: p2pllm run ...")
    g = cg.make("run", limit)
    drop_file_cache(model)
    t0 = time.time()
    proc = subprocess.run(Cgroups.wrap(g, [sys.executable, "-m", "p2pllm", "run", "--model", model, "--prompt",
                                           "Once upon a time", "--max-tokens", str(cfg["tokens"]),
                                           "--threads", str(THREADS)]),
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    out["p2pllm_run"] = {"returncode": proc.returncode, "seconds": round(time.time() - t0, 2),
                         "stderr": proc.stderr.strip()[-800:], "stdout_bytes": len(proc.stdout),
                         "cgroup": Cgroups.stats(g)}
    cg.remove(g)
    log(f"  exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
    log(f"alone under {limit / GiB:.2f} GiB: llama.cpp, bounded to {cfg['llama_bound_s']}s ...")
    g = cg.make("llama", limit)
    drop_file_cache(model)
    out["llama_cpp"] = llama_cpp_run(model, prompt, cfg["tokens_limited"], 1, cgroup=g, bound_s=cfg["llama_bound_s"],
                                     work=work)
    cg.remove(g)
    r = out["llama_cpp"]
    log(f"  llama.cpp: rc {r['returncode']}, timed out {r['timed_out']}, {r['tokens']} tokens, "
        f"rates {r.get('decode') or r.get('partial_rates')}, oom kills {r['cgroup']['oom_kill']}, "
        f"peak {r['cgroup']['max_usage'] / GiB:.2f} GiB")
    return out


# =========================================================================== report


def markdown(res: dict) -> str:
    gb = 1e9
    L = []
    mdl = res.get("model", {})
    lim = res.get("limit", 0)
    L.append(f"Model: {mdl.get('file')} ({mdl.get('bytes', 0) / gb:.2f} GB, {mdl.get('params_b')}B parameters, "
             f"seeded-random Llama, Q4_K_M by llama.cpp); every peer's memory cgroup limit "
             f"{lim / gb:.2f} GB ({lim / GiB:.2f} GiB; the model is {mdl.get('bytes', 0) / max(lim, 1):.2f}x that); "
             f"machine: {res['machine']['cpu']}, {res['machine']['cores']} cores, {res['machine']['ram_gib']} GiB; "
             f"{'quick run' if res.get('quick') else 'full run'}; load at start {res['load_at_start']['load']}.")
    c = res.get("ceiling", {})
    p1, p2, p3 = res.get("part1", {}), res.get("part2", {}), res.get("part3", {})
    L += ["", "| what | result |", "|---|---|"]
    if c.get("rates"):
        for t, v in sorted(c["by_threads"].items(), reverse=True):
            L.append(f"| llama.cpp, whole model, one unlimited process, {t} thread{'s' if t != '1' else ''}"
                     f"{' (**the ceiling**: its best)' if int(t) == c['threads'] else ''} | "
                     f"{'**' if int(t) == c['threads'] else ''}{v['median']:.2f} tok/s"
                     f"{'**' if int(t) == c['threads'] else ''} (median of {len(v['rates'])}, before and after the "
                     f"cluster: {', '.join(f'{x:.2f}' for x in v['rates'])}) |")
    if res.get("ours_one_process", {}).get("median"):
        o = res["ours_one_process"]
        L.append(f"| p2pllm's ggml stage, whole model, one unlimited process (`p2pllm run`'s path), 2 threads "
                 f"| {o['median']:.2f} tok/s (median of {len(o['decode'])}) |")
    if "p2pllm_run" in p1:
        r = p1["p2pllm_run"]
        L.append(f"| one peer alone under the limit: `p2pllm run` | exit {r['returncode']} in {r['seconds']:.1f} s, "
                 f"peak {r['cgroup']['max_usage'] / gb:.2f} GB: \"{r['stderr'].splitlines()[-1][:400] if r['stderr'] else ''}\" |")
    if p1.get("join_alone"):
        j = p1["join_alone"]
        L.append(f"| one peer alone under the limit: `p2pllm join` | no plan; logs "
                 f"\"{j['log_line'].split('] ')[-1][:300]}\" |")
    if "llama_cpp" in p1:
        r = p1["llama_cpp"]
        if r.get("oom_killed"):
            what = f"OOM-killed (SIGKILL) after {r['wall_s']:.0f} s, {r['tokens']} tokens"
        elif r.get("decode"):
            what = f"{statistics.median(r['decode']):.3f} tok/s (finished)"
        elif r["timed_out"]:
            rate = r["partial_rates"][0] if r.get("partial_rates") else None
            what = (f"stopped at the {r['bound_s']:.0f} s bound: load {r['load_s'] or 'not finished'} s, "
                    f"{r['tokens']} tokens" + (f", {rate:.3f} tok/s while paging" if rate else "")
                    + (f" ({r['seconds_per_token_overall']} s per token overall)"
                       if r.get("seconds_per_token_overall") else ""))
        else:
            what = f"exit {r['returncode']}: {r['stderr_tail'][-200:]}"
        L.append(f"| one peer alone under the limit: llama.cpp (mmap) | {what}; peak {r['cgroup']['max_usage'] / gb:.2f} "
                 f"GB, {r['cgroup']['failcnt']} limit hits, {r['cgroup']['oom_kill']} OOM kills |")
    if p2.get("single_stream_median"):
        L.append(f"| 3 peers under the limit, {res['config']['rate']} links: time to ready | {p2['time_to_ready_s']:.1f} s |")
        ratio = (f" = **{p2['single_stream_median'] / c['median']:.2f}x** the ceiling (goal ≥ 0.7x)" if c.get("median")
                 else "")
        L.append(f"| 3 peers (`--threads {res['threads']}`): single-stream decode | "
                 f"**{p2['single_stream_median']:.2f} tok/s**{ratio} |")
        L.append(f"| 3 peers: 8 streams, aggregate | {p2['eight_stream_steady_median']:.2f} tok/s steady "
                 f"({p2['eight_stream_wall_median']:.2f} incl. prefill) |")
        mem = "; ".join(f"{k}: charged {v['max_usage'] / gb:.2f} GB ({v['max_usage'] / v['limit']:.0%}), working set "
                        f"{v.get('working_set', 0) / gb:.2f} GB, resident {v.get('rss_plus_mapped', 0) / gb:.2f} GB, "
                        f"{v['oom_kill']} OOM kills" for k, v in p2["memory"].items())
        L.append(f"| 3 peers: peak memory against the {lim / gb:.2f} GB limit | {mem} |")
        L.append("| plan | " + ", ".join(f"{r['peer']} layers [{r['layers'][0]}, {r['layers'][1]})"
                                          + (f" {r['memory']['total'] / gb:.2f} GB planned" if r.get("memory") else "")
                                          for r in p2["plan_stages"]) + " |")
    if p3.get("stream"):
        s = p3["stream"]
        L.append(f"| kill -9 of {p3['killed']} mid-stream: the running request | ended {s['ended_after_kill_s']:.1f} s "
                 f"after the kill, {s['tokens_before_kill']}+ tokens in: \"{s['error'][:300]}\" |")
        L.append(f"| a new request while 2 peers are left | HTTP {p3['new_request']['status']}: "
                 f"\"{p3['new_request']['body'][:300]}\" |")
        died = "; ".join(e["event"] for e in p3.get("events", [])[1:])
        if p3.get("recovered"):
            L.append(f"| the peer restarted: first successful request | {p3['time_to_recover_s']:.1f} s after the restart; "
                     f"then {p3.get('single_stream_after_tokens_per_s') or 0:.2f} tok/s single stream"
                     + (f" (meanwhile: {died})" if died else "") + " |")
        else:
            L.append(f"| the peer restarted | no successful request within {res['config']['recover_timeout']} s"
                     + (f" ({died})" if died else "") + " |")
        mem = "; ".join(f"{k}: {v['max_usage'] / gb:.2f} GB peak, {v['oom_kill']} OOM kills"
                        for k, v in p3.get("memory", {}).items())
        L.append(f"| peak memory through failover and rejoin | {mem} |")
    for part in ("ceiling", "part1", "part2", "part3"):
        if "error" in res.get(part, {}):
            L.append(f"| {part} | FAILED: {res[part]['error'][-300:]} |")
    return "\n".join(L)


def _interrupt(*_):
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--make-model", action="store_true", help="only make (or find) the cached model")
    ap.add_argument("--quick", action="store_true", help="fewer tokens, shorter bounds (a smoke test)")
    ap.add_argument("--only", default="0,1,2,3", help="parts: 0 ceiling, 1 alone, 2 three peers, 3 failover")
    ap.add_argument("--limit-ratio", type=float, default=1.5, help="model size / each peer's limit (default 1.5)")
    ap.add_argument("--threads", type=int, default=THREADS, help="--threads of every daemon (default 2)")
    ap.add_argument("--wait-load", type=float, default=1.5, help="wait (a while) for the 1-minute load to drop below")
    ap.add_argument("--wait-max", type=float, default=300, help="seconds to wait for that at most")
    ap.add_argument("--insecure", action="store_true", help="plaintext peer traffic instead of a cluster secret")
    ap.add_argument("--daemon-env", action="append", default=[], metavar="KEY=VALUE",
                    help="an environment variable for every daemon (e.g. OMP_WAIT_POLICY=PASSIVE); repeatable")
    ap.add_argument("--daemon-arg", action="append", default=[], metavar="ARG",
                    help="an extra `join` argument for every daemon (e.g. --daemon-arg=--kv-replicas --daemon-arg=0)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        print(json.dumps(client_job(json.loads(args.job) if args.job else json.load(sys.stdin))), flush=True)
        return 0
    if args.make_model:
        print(ensure_model())
        return 0

    signal.signal(signal.SIGTERM, _interrupt)  # a killed benchmark still cleans up
    only = {int(x) for x in args.only.split(",") if x.strip()}
    cfg = dict(tokens=64, tokens_limited=16, ceiling_repeats=3, repeats=3, tokens8=32, repeats8=2, long_tokens=100,
               kill_after=24, llama_bound_s=180, alone_s=60, ready_timeout=420, recover_timeout=300, context=128,
               threads=args.threads, rate="1gbit", limit_ratio=args.limit_ratio,
               daemon_env=dict(kv.split("=", 1) for kv in args.daemon_env), daemon_args=args.daemon_arg)
    if args.quick:
        cfg.update(tokens=16, ceiling_repeats=1, repeats=1, tokens8=8, repeats8=1, llama_bound_s=45, kill_after=8)
    model = ensure_model()
    size = model.stat().st_size
    limit = int(size / args.limit_ratio) // MiB * MiB
    from p2pllm.model.spec import read_spec
    from p2pllm.model.tokenizer import load_tokenizer

    spec = read_spec(model)
    prompt = load_tokenizer(model).encode("Once upon a time")
    import psutil
    from ring import machine

    res: dict = {"quick": args.quick, "config": cfg, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                 "machine": {**machine(), "ram_gib": round(psutil.virtual_memory().total / GiB, 1)},
                 "model": {"file": model.name, "bytes": size, "n_layers": spec.n_layers,
                           "params_b": round(_params(spec) / 1e9, 2)},
                 "limit": limit, "threads": args.threads,
                 "security": "plaintext (--insecure)" if args.insecure else "mutual TLS (cluster secret)"}
    res["wait"] = wait_for_quiet(args.wait_load, args.wait_max)
    res["load_at_start"] = load_now()
    log(f"model {model.name}: {size / 1e9:.2f} GB; each peer's limit {limit / GiB:.2f} GiB; load {res['load_at_start']['load']}")
    work = Path(tempfile.mkdtemp(prefix="p2pllm-mission-"))
    secret = None if args.insecure else secrets.token_urlsafe(24)
    cg = Cgroups()
    ok, t0 = True, time.monotonic()
    mission = None
    try:
        if 0 in only:
            try:
                res["ceiling_runs"] = part0_ceiling(model, prompt, cfg, work, "before")
                res["ours_one_process"] = ours_one_process(model, prompt, cfg)
                log(f"  p2pllm run, one process: {res['ours_one_process']}")
            except Exception as e:
                ok = False
                res["ceiling"] = {"error": str(e)[-2000:]}
        if 1 in only:
            try:
                res["part1"] = part1_alone(model, prompt, limit, cg, cfg, work)
            except Exception as e:
                ok = False
                res["part1"] = {"error": str(e)[-3000:]}
                log(f"part 1 failed: {e}")
        if only & {2, 3}:
            res.setdefault("part1", {})
            try:
                drop_file_cache(model)
                mission = Mission(model, limit, cg, secret, work, cfg)
                measure_cluster(mission, res, cfg, work, failover=3 in only)
            except Exception as e:
                ok = False
                key = "part3" if "part3" in res else "part2"
                res[key] = {**res.get(key, {}), "error": str(e)[-4000:]}
                log(f"{key} failed: {e}")
            finally:
                if mission is not None:
                    mission.close()
                    mission = None
        if 0 in only:
            res.setdefault("ceiling_runs", []).extend(part0_ceiling(model, prompt, cfg, work, "after"))
            by_threads = {}
            for r in res["ceiling_runs"]:
                by_threads.setdefault(r["threads"], []).extend(r.get("decode") or [])
            by_threads = {t: rates for t, rates in by_threads.items() if rates}
            if by_threads:
                # the ceiling: llama.cpp's best thread count on this machine (median of its runs before and after)
                best = max(by_threads, key=lambda t: statistics.median(by_threads[t]))
                res["ceiling"] = {"threads": best, "rates": by_threads[best],
                                  "median": statistics.median(by_threads[best]), "best": max(by_threads[best]),
                                  "by_threads": {str(t): {"rates": v, "median": statistics.median(v)}
                                                 for t, v in by_threads.items()}}
                if res.get("part2", {}).get("single_stream_median"):
                    res["ratio_single_stream_vs_ceiling"] = res["part2"]["single_stream_median"] / res["ceiling"]["median"]
    except KeyboardInterrupt:
        ok = False
        res["interrupted"] = True
    finally:
        if mission is not None:
            mission.close()
        cg.close()
        res["load_at_end"] = load_now()
        res["seconds"] = round(time.monotonic() - t0, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1, default=str) + "\n")
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"logs kept in {work}")
    print(markdown(res))
    print(f"\n({res['seconds']:.0f}s; raw numbers in {args.out})")
    return 0 if ok else 1


def _params(spec) -> float:
    per_layer = (2 * spec.hidden * spec.n_heads * spec.head_dim + 2 * spec.hidden * spec.n_kv_heads * spec.head_dim
                 + 3 * spec.hidden * spec.ffn + 2 * spec.hidden)
    return spec.n_layers * per_layer + 2 * spec.vocab * spec.hidden + spec.hidden


if __name__ == "__main__":
    sys.exit(main())
