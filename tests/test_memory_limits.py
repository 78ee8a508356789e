"""Memory limits are capabilities: free memory, the cgroup's limit and --max-memory, whichever is
smallest, bound what a peer offers; `p2pllm run` refuses in one line what cannot fit; the planner
never gives a peer more layers than its cgroup allows.

The cgroup parsing is tested on fake trees (v1, v2, nested, namespaced, unlimited); the rest in
real cgroup v1 memory children of this process's own cgroup (root only; skipped otherwise).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import REPO, assert_one_line_error, run_cli, shared_model

from p2pllm.cluster import capability as C
from p2pllm.cluster.cgroup_memory import UNLIMITED, cgroup_memory
from p2pllm.cluster.planner import PlanOptions, peers_needed, stage_memory

MiB, GiB = 1 << 20, 1 << 30
V1_UNLIMITED = 9223372036854771712  # what v1 writes for "no limit" (PAGE_COUNTER_MAX pages)


# --------------------------------------------------------------------------- fake cgroup trees


def _write(d: Path, **files) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, value in files.items():
        (d / name.replace("__", ".")).write_text(f"{value}\n")
    return d


def _v1(d: Path, limit: int, usage: int, inactive: int = 0) -> Path:
    _write(d, memory__limit_in_bytes=limit, memory__usage_in_bytes=usage)
    (d / "memory.stat").write_text(f"cache 0\ninactive_file {inactive}\ntotal_inactive_file {inactive}\n")
    return d


def _v2(d: Path, max_: str | int, current: int, high: str | int = "max", inactive: int = 0) -> Path:
    _write(d, memory__max=max_, memory__high=high, memory__current=current)
    (d / "memory.stat").write_text(f"anon {current}\ninactive_file {inactive}\n")
    return d


def _proc(tmp_path: Path, cgroup: str, mounts: list[tuple[str, str, str, str]]) -> tuple[Path, Path]:
    """Fake /proc/self/cgroup and /proc/self/mountinfo; mounts are (root, mount point, fstype, options)."""
    cg = tmp_path / "proc-cgroup"
    cg.write_text(cgroup)
    lines = [f"{30 + i} 23 0:{40 + i} {root} {point.replace(' ', chr(92) + '040')} rw,relatime - {fs} {fs} rw,{opts}"
             for i, (root, point, fs, opts) in enumerate(mounts)]
    mi = tmp_path / "proc-mountinfo"
    mi.write_text("\n".join(["22 1 0:21 / /proc rw - proc proc rw", *lines]) + "\n")
    return cg, mi


def test_v1_own_cgroup_limit_less_usage_and_reclaimable_cache(tmp_path):
    mem = tmp_path / "memory"
    _v1(mem, V1_UNLIMITED, 5 * GiB)
    _v1(mem / "a", V1_UNLIMITED, 2 * GiB)
    _v1(mem / "a" / "b", GiB, 300 * MiB, inactive=100 * MiB)
    cg, mi = _proc(tmp_path, "5:cpu:/\n4:memory:/a/b\n0::/\n", [("/", str(mem), "cgroup", "memory")])
    found = cgroup_memory(cg, mi)
    assert found is not None and found.version == 1 and found.path == str(mem / "a" / "b")
    assert found.limit == GiB and found.usage == 200 * MiB  # inactive page cache is reclaimed before an OOM kill
    assert found.available == GiB - 200 * MiB


def test_v1_parent_limit_binds_a_child_without_one(tmp_path):
    mem = tmp_path / "memory"
    _v1(mem, V1_UNLIMITED, 5 * GiB)
    _v1(mem / "a", 800 * MiB, 700 * MiB)  # siblings use most of the parent's limit
    _v1(mem / "a" / "b", V1_UNLIMITED, 10 * MiB)
    cg, mi = _proc(tmp_path, "4:memory,blkio:/a/b\n", [("/", str(mem), "cgroup", "blkio,memory")])
    found = cgroup_memory(cg, mi)
    assert found.path == str(mem / "a") and found.available == 100 * MiB


def test_v1_without_any_limit_is_none(tmp_path):
    mem = tmp_path / "memory"
    _v1(mem, V1_UNLIMITED, GiB)
    _v1(mem / "a", V1_UNLIMITED, GiB)
    cg, mi = _proc(tmp_path, "4:memory:/a\n", [("/", str(mem), "cgroup", "memory")])
    assert cgroup_memory(cg, mi) is None
    assert UNLIMITED < V1_UNLIMITED


def test_v2_max_means_unlimited_and_the_tightest_ancestor_binds(tmp_path):
    root = _write(tmp_path / "unified", cgroup__controllers="cpu memory", cgroup__subtree_control="memory")
    _v2(root / "user.slice", 2 * GiB, 1536 * MiB, inactive=512 * MiB)
    _v2(root / "user.slice" / "app", "max", 100 * MiB)
    cg, mi = _proc(tmp_path, "0::/user.slice/app\n", [("/", str(root), "cgroup2", "nsdelegate")])
    found = cgroup_memory(cg, mi)
    assert found.version == 2 and found.path == str(root / "user.slice")
    assert found.limit == 2 * GiB and found.available == 2 * GiB - 1024 * MiB
    # a lower memory.high binds too: above it the kernel throttles the process into reclaim
    _v2(root / "user.slice" / "app", "max", 100 * MiB, high=512 * MiB)
    found = cgroup_memory(cg, mi)
    assert found.path == str(root / "user.slice" / "app") and found.limit == 512 * MiB
    assert found.available == 412 * MiB


def test_v2_all_max_is_none(tmp_path):
    root = _write(tmp_path / "unified", cgroup__subtree_control="memory")
    _v2(root / "svc", "max", 100 * MiB)
    cg, mi = _proc(tmp_path, "0::/svc\n", [("/", str(root), "cgroup2", "")])
    assert cgroup_memory(cg, mi) is None


def test_hybrid_host_reads_v1_memory_beside_a_v2_tree_without_it(tmp_path):
    """This machine's layout: cgroup v1 memory controller, a v2 tree without the memory controller."""
    mem = tmp_path / "memory"
    _v1(mem, V1_UNLIMITED, GiB)
    _v1(mem / "job", 3 * GiB, GiB)
    unified = _write(tmp_path / "unified", cgroup__controllers="hugetlb", memory__pressure="some avg10=0.00")
    cg, mi = _proc(tmp_path, "4:memory:/job\n0::/\n",
                   [("/", str(mem), "cgroup", "memory"), ("/", str(unified), "cgroup2", "")])
    found = cgroup_memory(cg, mi)
    assert found.version == 1 and found.available == 2 * GiB
    # and a v2 tree without the memory controller (no memory.max anywhere) limits nothing
    cg2, mi2 = _proc(tmp_path, "0::/\n", [("/", str(unified), "cgroup2", "")])
    assert cgroup_memory(cg2, mi2) is None


def test_namespaced_cgroup_is_the_mount_point_itself(tmp_path):
    """A container: its cgroup is mounted at the root of the mount (cgroup namespace or bind mount)."""
    point = tmp_path / "sys fs cgroup"  # mountinfo escapes the spaces as \040
    _v2(point, 768 * MiB, 256 * MiB)
    (point / "cgroup.subtree_control").write_text("")
    for cgroup, root in (("0::/\n", "/"), ("0::/docker/abc\n", "/docker/abc"), ("0::/../other\n", "/docker/abc")):
        cg, mi = _proc(tmp_path, cgroup, [(root, str(point), "cgroup2", "")])
        found = cgroup_memory(cg, mi)
        assert found is not None and found.path == str(point) and found.available == 512 * MiB, cgroup


def test_no_proc_files_means_no_cgroup(tmp_path):
    assert cgroup_memory(tmp_path / "missing", tmp_path / "missing-too") is None
    cg, mi = _proc(tmp_path, "garbage\n1:\n", [])
    assert cgroup_memory(cg, mi) is None


# --------------------------------------------------------------------------- which bound applies


def _caps(free: int, cgroup: int | None = None, cap: int | None = None) -> C.Capabilities:
    return C.Capabilities("cpu", "test cpu", 16 * GiB, free, cap, 4, 4, {"f32": 1e11}, 2e10,
                          cgroup_memory=cgroup, cgroup_limit=None if cgroup is None else cgroup + GiB,
                          cgroup_path=None if cgroup is None else "/sys/fs/cgroup/memory/job")


@pytest.mark.parametrize("free, cgroup, cap, usable, bound", [
    (8 * GiB, None, None, 8 * GiB, "free"),
    (8 * GiB, 2 * GiB, None, 2 * GiB, "cgroup"),
    (8 * GiB, 2 * GiB, GiB, GiB, "--max-memory"),
    (8 * GiB, GiB, 2 * GiB, GiB, "cgroup"),
    (GiB, 2 * GiB, 4 * GiB, GiB, "free"),
    (2 * GiB, 2 * GiB, None, 2 * GiB, "cgroup"),  # a tie names the deliberate bound
])
def test_usable_memory_is_the_smallest_bound_and_says_which(free, cgroup, cap, usable, bound):
    caps = _caps(free, cgroup, cap)
    assert caps.usable_memory == usable and caps.memory_bound == bound
    assert caps.to_peer_caps("me", "me", net_bw=1e8).mem_bytes == usable
    d = caps.to_dict()
    assert d["usable_memory"] == usable and d["memory_bound"] == bound
    text = caps.describe_memory()
    assert text.startswith(f"{usable / GiB:.2f} GiB usable (bound: ")
    expect = {"free": f"free memory, {free / GiB:.2f} of 16.00 GiB", "--max-memory": f"--max-memory {(cap or 0) / GiB:.2f} GiB",
              "cgroup": f"cgroup limit {(cgroup or 0) / GiB + 1:.2f} GiB of /sys/fs/cgroup/memory/job, 1.00 GiB in use"}
    assert expect[bound] in text, text


def test_peers_needed_counts_machines_like_this_one(demo_tiny_gguf):
    from p2pllm.model.spec import read_spec

    spec = read_spec(demo_tiny_gguf)
    opts = PlanOptions(context=256, batch=1, backend="ggml")
    whole = stage_memory(spec, 0, spec.n_layers, opts).total
    assert peers_needed(spec, whole, opts) == 1
    half = max(stage_memory(spec, 0, 3, opts).total, stage_memory(spec, 3, 6, opts).total)
    assert peers_needed(spec, half, opts) == 2
    assert peers_needed(spec, 1, opts) is None


def test_run_refuses_a_model_over_max_memory_in_one_line(demo_tiny_gguf):
    proc = run_cli("run", "--model", demo_tiny_gguf, "--prompt", "hi", "--max-memory", "100MiB", timeout=120)
    line = assert_one_line_error(proc, 3, "needs", "GiB", "0.10 GiB usable (bound: --max-memory", "p2pllm join --model")
    assert "a cluster can serve it" in line and proc.stdout == ""
    proc = run_cli("run", "--model", demo_tiny_gguf, "--prompt", "hi", "--max-memory", "lots", timeout=120)
    assert_one_line_error(proc, 2, "bad size 'lots'")


# --------------------------------------------------------------------------- real cgroups (root)


def _own_memory_cgroup() -> Path:
    """This process's cgroup v1 memory directory, writable; skips the test where there is none."""
    if os.geteuid() != 0:
        pytest.skip("creating memory cgroups needs root")
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        pytest.skip("no /proc/self/cgroup (not Linux)")
    path = next((line.split(":", 2)[2] for line in lines if "memory" in line.split(":", 2)[1].split(",")), None)
    base = Path("/sys/fs/cgroup/memory")
    if path is None or not (base / "memory.limit_in_bytes").exists():
        pytest.skip("no cgroup v1 memory controller at /sys/fs/cgroup/memory (these tests make v1 cgroups)")
    own = base / path.lstrip("/")
    if not own.is_dir():
        own = base  # a cgroup namespace: our cgroup is the mount's root
    if not os.access(own, os.W_OK):
        pytest.skip(f"the memory cgroup {own} is not writable")
    return own


def _remove_cgroup(d: Path) -> None:
    """Move anything left in it to the parent (our processes were stopped first), then remove it."""
    deadline = time.monotonic() + 10
    while d.exists():
        try:
            for pid in (d / "cgroup.procs").read_text().split():
                try:
                    (d.parent / "cgroup.procs").write_text(pid)
                except OSError:
                    pass
            d.rmdir()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture
def make_cgroup():
    own = _own_memory_cgroup()
    made: list[Path] = []

    def make(limit: int) -> Path:
        d = own / f"p2pllm-test-{os.getpid()}-{secrets.token_hex(3)}"
        try:
            d.mkdir()
        except OSError as e:
            pytest.skip(f"cannot create a memory cgroup under {own}: {e}")
        made.append(d)
        (d / "memory.limit_in_bytes").write_text(str(limit))
        return d

    yield make
    for d in made:
        _remove_cgroup(d)


def _in(cgroup: Path, argv: list) -> list[str]:
    """argv run inside `cgroup`: the shell moves itself in, then becomes the command (same pid)."""
    return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup / "cgroup.procs"), *map(str, argv)]


def _stat(cgroup: Path, name: str) -> int:
    return int((cgroup / name).read_text().split()[0])


def _oom_kills(cgroup: Path) -> int:
    for line in (cgroup / "memory.oom_control").read_text().splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return 0


def _env(home: Path) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HOME=str(home))  # its own capability cache and secrets
    env.pop("XDG_CACHE_HOME", None)
    env.pop("P2PLLM_DEBUG", None)
    return env


def test_probe_inside_a_cgroup_reports_the_cgroup_bound(make_cgroup, tmp_path):
    import psutil

    if psutil.virtual_memory().available < 3 * GiB:
        pytest.skip("needs 3 GiB free for the cgroup's 1 GiB limit to be the tighter bound")
    cg = make_cgroup(GiB)
    script = ("import json, sys; from p2pllm.cluster import capability as C; "
              "caps = C.probe(cache_dir=sys.argv[1]); low = C.probe(cache_dir=sys.argv[1], max_memory='256MiB'); "
              "print(json.dumps([caps.to_dict(), caps.describe_memory(), low.memory_bound]))")
    proc = subprocess.run(_in(cg, [sys.executable, "-c", script, tmp_path / "cache"]), capture_output=True, text=True,
                          timeout=120, cwd=REPO, check=False, env=_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    caps, text, low = json.loads(proc.stdout)
    assert caps["memory_bound"] == "cgroup" and caps["cgroup_limit"] == GiB and caps["cgroup_path"] == str(cg)
    assert 0 < caps["usable_memory"] == caps["cgroup_memory"] < GiB < caps["free_memory"]
    assert f"bound: cgroup limit 1.00 GiB of {cg}" in text
    assert low == "--max-memory"  # a cap below the cgroup's room binds instead


def test_run_in_a_too_small_cgroup_refuses_instead_of_being_killed(make_cgroup, tmp_path):
    from p2pllm.model.demo import make_demo_model

    model = make_demo_model(tmp_path / "big.gguf", "gguf", "125m")  # 0.46 GiB of f32 weights
    limit = 400 * MiB  # room for the interpreter, not for the weights
    cg = make_cgroup(limit)
    proc = subprocess.run(_in(cg, [sys.executable, "-m", "p2pllm", "run", "--model", model, "--prompt", "Hello"]),
                          capture_output=True, text=True, timeout=180, cwd=REPO, env=_env(tmp_path), check=False)
    line = assert_one_line_error(proc, 3, "big.gguf needs", "GiB usable (bound: cgroup limit 0.39 GiB of",
                                 "a cluster can serve it: run `p2pllm join --model")
    need = float(line.split(" needs ")[1].split(" GiB")[0])
    assert need * GiB > limit, line
    assert _oom_kills(cg) == 0 and _stat(cg, "memory.max_usage_in_bytes") < limit


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return s.connect_ex(("127.0.0.1", port)) != 0


def _health_stages(port: int) -> int:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json().get("stages") or 0
    except (httpx.HTTPError, ValueError):
        return 0


def _status(port: int, secret: str) -> dict:
    from p2pllm.transport.client import fetch_status
    from p2pllm.transport.security import Security

    return asyncio.run(fetch_status(f"127.0.0.1:{port}", Security.from_secret(secret)))


def _most_layers(spec, options: PlanOptions, limit: int) -> int:
    """The most layers any stage of the model (first, middle or last) could hold within `limit`."""
    L, best = spec.n_layers, 0
    for k in range(1, L + 1):
        starts = {0, L - k} | ({1} if 1 + k < L else set())
        if min(stage_memory(spec, a, a + k, options).total for a in starts) <= limit:
            best = k
    return best


def test_planner_never_gives_a_peer_more_than_its_cgroup_allows(make_cgroup, tmp_path):
    """Two daemons: A in a cgroup with room for a few layers, B capped below the whole model. The
    plan must split, give A no more than its cgroup holds, and A stays under its limit through
    requests and B's loss (after which no plan fits: A must not take everything)."""
    import httpx

    from p2pllm.daemon import DaemonConfig
    from p2pllm.model.spec import read_spec

    path = shared_model("SmolLM2-135M-Instruct.Q4_1.gguf")
    ports = {"a": (7791, 8791), "b": (7792, 8792)}
    for port in (p for pair in ports.values() for p in pair):
        if not _port_free(port):
            pytest.fail(f"port {port} on 127.0.0.1 is taken (another test session's cluster?)")
    spec = read_spec(path)
    L = spec.n_layers
    # the daemon's own planning options: the whole context for its default batch, f16 KV, ggml
    options = PlanOptions(context=spec.context, batch=DaemonConfig.__dataclass_fields__["batch"].default,
                          kv_dtype_bytes=2.0, backend="ggml")
    def most_of(k):
        return max(stage_memory(spec, 0, k, options).total, stage_memory(spec, L - k, L, options).total)
    b_cap = most_of(L - 4) + MiB  # B holds all but 4 layers, so A must take some
    assert b_cap < min(stage_memory(spec, 0, L - 3, options).total, stage_memory(spec, 3, L, options).total)
    limit = most_of(8) + 200 * MiB  # the interpreter (~170 MiB) and about 8 layers
    cap_a = _most_layers(spec, options, limit)  # no plan may give A more, whatever A has in use
    assert 4 <= cap_a < L

    cg = make_cgroup(limit)
    secret = "memory-limits-test-secret-0123456789"
    env = dict(_env(tmp_path), P2PLLM_SECRET=secret)
    logs = {name: tmp_path / f"{name}.log" for name in ports}
    procs = {}

    def join(name: str, *extra) -> subprocess.Popen:
        grpc_port, gw = ports[name]
        argv = [sys.executable, "-m", "p2pllm", "join", "--model", path, "--name", f"mem-{name}", "--port", grpc_port,
                "--gateway-port", gw, "--interface", "127.0.0.1", "--no-mdns", "--peer", "127.0.0.1:7791",
                "--cluster", "memlimit-test", *extra]
        return subprocess.Popen(_in(cg, argv) if name == "a" else list(map(str, argv)), cwd=REPO, env=env,
                                stdout=open(logs[name], "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)

    def tails() -> str:
        return "\n".join(f"--- {n}\n{logs[n].read_text()[-3000:]}" for n in logs if logs[n].exists())

    try:
        procs["a"] = join("a")
        procs["b"] = join("b", "--max-memory", str(b_cap))
        deadline = time.monotonic() + 150
        while not all(_health_stages(gw) == 2 for _, gw in ports.values()):
            assert all(p.poll() is None for p in procs.values()), tails()
            assert time.monotonic() < deadline, f"no 2-stage plan within 150 s\n{tails()}"
            time.sleep(1)
        assert f"bound: cgroup limit {limit / GiB:.2f} GiB of {cg}" in logs["a"].read_text(), tails()
        assert "bound: --max-memory" in logs["b"].read_text(), tails()

        status = _status(7791, secret)
        a_id = next(p["id"] for p in status["peers"] if p["name"] == "mem-a")
        plan = status["plan"]
        assert plan["feasible"], plan
        stage = next(s for s in plan["stages"] if s["peer"] == a_id)
        n_a = stage["layers"][1] - stage["layers"][0]
        assert 4 <= n_a <= cap_a, (stage, cap_a)  # B cannot hold more than L-4; A's cgroup no more than cap_a
        assert stage["memory"]["total"] <= stage["memory"]["limit"] < limit, stage

        def ask(i: int) -> str:
            r = httpx.post(f"http://127.0.0.1:{ports['a'][1]}/v1/completions", timeout=120, json={
                "model": path.name, "prompt": f"Count to {i + 3}:", "max_tokens": 16, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(ask, range(3)))
        assert all(answers), answers
        assert procs["a"].poll() is None, tails()
        peak = _stat(cg, "memory.max_usage_in_bytes")
        assert peak < limit and _oom_kills(cg) == 0, (peak, limit, tails())

        # B dies: A and its few layers cannot hold the model, so no plan may hand A the rest
        os.killpg(procs["b"].pid, signal.SIGKILL)
        procs["b"].wait(timeout=10)
        deadline = time.monotonic() + 20
        while True:
            view = _status(7791, secret)
            b_lost = any(p["name"] == "mem-b" and not p["healthy"] for p in view["peers"])
            if view["plan"]:
                held = [s["layers"][1] - s["layers"][0] for s in view["plan"]["stages"] if s["peer"] == a_id]
                assert all(k <= cap_a for k in held), view["plan"]
            if b_lost or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert b_lost, json.dumps(view)[:2000]
        time.sleep(3)  # a replan (which must find nothing that fits) happens at once on a lost stage
        view = _status(7791, secret)
        assert view["epoch"] == status["epoch"], (view["plan"], tails())  # no new plan: none fits
        assert procs["a"].poll() is None, tails()
        peak = _stat(cg, "memory.max_usage_in_bytes")
        assert peak < limit and _oom_kills(cg) == 0, (peak, limit, tails())
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
