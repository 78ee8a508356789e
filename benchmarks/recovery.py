"""Recovery benchmark: kill -9 a ring peer mid-stream; how long until the next token, with and
without KV-delta replicas, and what the replicas cost.

    python benchmarks/recovery.py            # writes benchmarks/results/recovery.json, prints markdown
    python benchmarks/recovery.py --quick    # one repeat, fewer tokens (a smoke test, not a result)
    python benchmarks/recovery.py --keep-logs DIR   # keep every daemon's log for a look

Three network-namespace hosts (tests/netns.py), one `p2pllm join --strategy even --threads 1`
daemon each, on the 8-layer `small` demo model. For each context (64 and 512 tokens) and each
`--kv-replicas` (1 and 0), every repeat uses a fresh cluster and:

1. runs 4 concurrent greedy streams with no fault (the reference text, the replica bytes the
   peers send per KV position, and the replica memory held mid-stream, from each peer's /metrics);
2. runs the same 4 streams again and, once every stream has its first KEEP tokens (so the
   context at the fault is prompt + ~KEEP = 64 or 512 tokens), SIGKILLs the middle peer (neither
   the head nor the first layers); the streams must finish with the same text;
3. reads the daemons' log timestamps to split the stall: detection (kill -> "lost"), replan
   (-> "proposing plan epoch"), load + KV rebuild (-> the last "KV for layers ..." line),
   commit (-> "resuming the ring"), and the first token (-> the first token after the kill,
   stamped by the client; with replicas 0 this includes replaying the histories).

The client runs inside the head's namespace (this file with --client): the official openai client
streaming /v1/completions, stamping every chunk with the wall clock (the daemons' log clock).
Prompts are token ids, so their lengths are exact. Every namespace and process is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
RESULTS = ROOT / "benchmarks" / "results" / "recovery.json"

STREAMS = 4
KEEP = 8  # tokens every stream has before the kill
N_LAYERS = 8
MODEL_NAME = "small.gguf"


# =========================================================================== client (in a namespace)

def client_main(job: dict) -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import openai

    api = openai.OpenAI(base_url="http://127.0.0.1:8700/v1", api_key="none", timeout=300, max_retries=0)
    started = threading.Barrier(len(job["prompts"]), action=lambda: print('{"streaming": true}', flush=True))

    def stream(prompt: list[int]) -> dict:
        pieces, times, finish, error, usage = [], [], None, None, None
        try:
            for c in api.completions.create(model=job["model"], prompt=prompt, max_tokens=job["max_tokens"],
                                            temperature=0, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}):
                if c.usage:
                    usage = c.usage.model_dump()
                if c.choices:
                    pieces.append(c.choices[0].text)
                    times.append(time.time())
                    finish = c.choices[0].finish_reason or finish
                if len(times) == job["keep"] and not started.broken:
                    try:
                        started.wait(timeout=120)
                    except threading.BrokenBarrierError:
                        pass
        except openai.APIError as e:
            error = str(e)
        return {"text": "".join(pieces), "pieces": pieces, "finish_reason": finish, "error": error, "times": times,
                "usage": usage}

    with ThreadPoolExecutor(len(job["prompts"])) as pool:
        out = list(pool.map(stream, job["prompts"]))
    print(json.dumps(out), flush=True)


# =========================================================================== cluster side

def prompts_for(context: int) -> list[list[int]]:
    """STREAMS distinct token-id prompts of context - KEEP tokens (BOS first)."""
    n = context - KEEP
    return [[1] + [(37 * j + 101 * i) % 1000 + 20 for j in range(n - 1)] for i in range(STREAMS)]


def metrics(h, i: int) -> dict[str, float]:
    proc = h.run(i, ["curl", "-s", "--max-time", "5", "http://127.0.0.1:8700/metrics"], timeout=10)
    out = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"p2pllm_engine_(ring_bytes_sent|kv_replica_bytes_sent|kv_replica_bytes_held)(?:_total)?\s+(\S+)", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def start_client(h, i: int, job: dict, timeout: float = 120):
    proc = h.popen(i, [sys.executable, str(Path(__file__).resolve()), "--client", json.dumps(job)],
                   stderr=open(os.devnull, "w"))
    deadline = time.monotonic() + timeout
    while '"streaming"' not in Path(proc.log_path).read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"client never got under way: {Path(proc.log_path).read_text()[-2000:]}")
        time.sleep(0.01)
    return proc


def finish_client(proc, timeout: float = 300) -> list[dict]:
    proc.wait(timeout=timeout)
    lines = Path(proc.log_path).read_text().strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"client failed: {lines[-5:]}")
    return json.loads(lines[-1])


_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) ([\w.]+): (.*)$")


def log_events(path: Path, since: float) -> list[tuple[float, str]]:
    out = []
    for line in Path(path).read_text(errors="replace").splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if t >= since - 0.001:  # log stamps are truncated to the millisecond
            out.append((t, m.group(4)))
    return out


def first(events, pattern: str) -> tuple[float, str] | None:
    rx = re.compile(pattern)
    return next(((t, msg) for t, msg in events if rx.search(msg)), None)


def _most(lines: list[str], pattern: str) -> int:
    """The largest count `pattern` finds in any of the lines (0 where none)."""
    return max((int(m.group(1)) for line in lines if (m := re.search(pattern, line))), default=0)


def breakdown(h, daemons: dict[int, object], head: int, victim: int, t_kill: float, t_next: float) -> dict:
    """Split kill -> next token using the survivors' log timestamps (seconds from the kill)."""
    coord = log_events(daemons[head].log_path, t_kill)
    lost = first(coord, r"\) lost: ")
    pause = first(coord, r"pausing the ring")
    propose = first(coord, r"proposing plan epoch")
    resume = first(coord, r"resuming the ring")
    kv_lines, loads, kv_done = [], [], None
    for i, proc in daemons.items():
        if i == victim:
            continue
        ev = log_events(proc.log_path, t_kill)
        for t, msg in ev:
            if msg.startswith("KV for layers") and "carried over" in msg:
                kv_lines.append(msg)
                kv_done = t if kv_done is None else max(kv_done, t)
            m = re.match(r"loaded layers \[(\d+), (\d+)\) in ([\d.]+)s", msg)
            if m:
                loads.append({"host": i, "layers": [int(m.group(1)), int(m.group(2))], "seconds": float(m.group(3))})
    rel = lambda e: None if e is None else round(e[0] - t_kill, 3)  # noqa: E731
    out = {
        "lost_at": rel(lost), "paused_at": rel(pause), "proposed_at": rel(propose),
        "kv_rebuilt_at": None if kv_done is None else round(kv_done - t_kill, 3), "resumed_at": rel(resume),
        "next_token_at": round(t_next - t_kill, 3),
        "kv_lines": kv_lines, "loads": loads,
        # per survivor's "KV for layers ...: N carried over, M partly (...), K to replay" line
        "replayed": _most(kv_lines, r"(\d+) to replay") if resume else None,
        "partly": _most(kv_lines, r"(\d+) partly") if resume else None,
        "proposal": propose[1] if propose else None,
    }
    marks = [("detection", 0.0, out["lost_at"]), ("replan", out["lost_at"], out["proposed_at"]),
             ("load_and_kv", out["proposed_at"], out["kv_rebuilt_at"]), ("commit", out["kv_rebuilt_at"], out["resumed_at"]),
             ("first_token", out["resumed_at"], out["next_token_at"])]
    out["phases"] = {name: (None if a is None or b is None else round(b - a, 3)) for name, a, b in marks}
    return out


def stall_end(times: list[float], t_kill: float) -> float | None:
    """When a stream got its next token after the kill: the end of its longest pause that ends
    after the kill (a token already on its way to the head when the peer died can land just after
    the kill; it is not the recovered stream's next token)."""
    gaps = [(b - a, b) for a, b in zip(times, times[1:]) if b > t_kill]
    if not gaps:
        return None
    return max(gaps)[1]


def one_run(model: Path, context: int, replicas: str, max_tokens: int, log_dir: Path, fault: str = "kill") -> dict:
    from clusterutil import join, wait_for_agreement
    from netns import Hosts
    from test_recovery import daemon_of, host_of, middle_host

    job = {"model": MODEL_NAME, "prompts": prompts_for(context), "max_tokens": max_tokens, "keep": KEEP}
    with Hosts(3, log_dir=log_dir) as h:
        for i in (1, 2, 3):
            join(h, i, model, "--threads", "1", "--kv-replicas", replicas)
        try:
            view = wait_for_agreement(h, [1, 2, 3], n_layers=N_LAYERS, timeout=60)[0]
        except BaseException as e:  # pytest.fail raises a BaseException
            raise RuntimeError(f"no agreement: {e}") from None
        head, victim = host_of(h, view, view["coordinator"]), middle_host(h, view)
        daemons = {i: daemon_of(h, i) for i in (1, 2, 3)}
        layers = {host_of(h, view, p["id"]): p["layers"] for p in view["peers"] if p["layers"]}

        # 1. no fault: reference text, replica bytes per KV position, replica memory mid-stream
        before = {i: metrics(h, i) for i in (1, 2, 3)}
        proc = start_client(h, head, job)
        held = {i: metrics(h, i).get("kv_replica_bytes_held", 0.0) for i in (1, 2, 3)}
        baseline = finish_client(proc)
        after = {i: metrics(h, i) for i in (1, 2, 3)}
        # each position's KV is computed (and replicated) once; the last sampled token's never is
        positions = sum(r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] - 1 for r in baseline)
        generated = sum(r["usage"]["completion_tokens"] for r in baseline)
        sent = sum(after[i].get("kv_replica_bytes_sent", 0) - before[i].get("kv_replica_bytes_sent", 0) for i in after)
        ring = sum(after[i].get("ring_bytes_sent", 0) - before[i].get("ring_bytes_sent", 0) for i in after)

        # 2. the same streams; once every stream has KEEP tokens, kill -9 the middle peer (or cut its link)
        proc = start_client(h, head, job)
        t_kill = time.time()
        if fault == "kill":
            h.kill(daemons[victim])
        else:
            h.link_down(victim)
        faulted = finish_client(proc)
        rejoin = link_returns(h, head, victim, view, t_kill) if fault == "link-down" else {}

        # 3. where the time went
        differ_at = [next((k for k, (x, y) in enumerate(zip(a["text"], b["text"])) if x != y),
                          min(len(a["text"]), len(b["text"]))) if a["text"] != b["text"] else None
                     for a, b in zip(faulted, baseline)]
        fault_at = [len("".join(p for p, t in zip(r["pieces"], r["times"]) if t <= t_kill)) for r in faulted]
        after_kill = [stall_end(r["times"], t_kill) for r in faulted]
        before_kill = [sum(1 for t in r["times"] if t <= t_kill) for r in faulted]
        gaps = [max((b - a for a, b in zip(r["times"], r["times"][1:])), default=0.0) for r in faulted]
        ok = [t for t in after_kill if t is not None]
        t_next = min(ok) if ok else t_kill
        steps = breakdown(h, daemons, head, victim, t_kill, t_next)
        base_gap = max(max((b - a for a, b in zip(r["times"], r["times"][1:])), default=0.0) for r in baseline)
        return {
            "fault": fault, "context": context, "kv_replicas": int(replicas), "max_tokens": max_tokens,
            "layers": {f"h{i}": v for i, v in sorted(layers.items())}, "head": f"h{head}", "killed": f"h{victim}",
            "killed_layers": layers.get(victim),
            "context_at_kill": [len(p) + n for p, n in zip(job["prompts"], before_kill)],
            "identical": [r["text"] for r in faulted] == [r["text"] for r in baseline],
            "differ_at": differ_at,
            # a stream whose answer already differed before the fault was not changed by it: four
            # prompts sent at once are prefilled in batches that can differ from run to run, and the
            # random model's near-tied logits can tip with the batch (docs/performance.md, "Recovery")
            "diverged_before_fault": [i for i, (d, f) in enumerate(zip(differ_at, fault_at)) if d is not None and d < f],
            "changed_by_fault": [i for i, (d, f) in enumerate(zip(differ_at, fault_at)) if d is not None and d >= f],
            "mismatched_texts": [(a["text"], b["text"]) for a, b in zip(faulted, baseline) if a["text"] != b["text"]],
            "errors": [r["error"] for r in faulted if r["error"]],
            "finish_reasons": [r["finish_reason"] for r in faulted],
            "kill_to_next_token_s": round(max(t - t_kill for t in ok), 3) if len(ok) == len(faulted) else None,
            "kill_to_first_token_s": round(t_next - t_kill, 3) if ok else None,
            "client_max_gap_s": round(max(gaps), 3),
            "no_fault_max_gap_s": round(base_gap, 3),
            "replica_bytes_sent": int(sent), "ring_bytes_sent": int(ring),
            "kv_positions": positions, "generated_tokens": generated,
            "replica_bytes_per_position": round(sent / positions, 1) if positions else None,
            "replica_bytes_per_generated_token": round(sent / generated, 1) if generated else None,
            "replica_bytes_held_mid_stream": int(sum(held.values())),
            **steps, **rejoin,
        }


def link_returns(h, head: int, victim: int, view: dict, t_cut: float, timeout: float = 60) -> dict:
    """The cut-off host while its link was down (did it serve a plan of its own?), then the link
    back up: seconds until the head lists it healthy again, and until it holds layers again."""
    from clusterutil import status

    victim_id = next(p["id"] for p in view["peers"] if p["address"].startswith(h.addr(victim) + ":"))
    t_up = time.time()
    h.link_up(victim)
    healthy_at = placed_at = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and placed_at is None:
        s = status(h, head)
        me = next((p for p in (s or {}).get("peers", []) if p["id"] == victim_id), None)
        if me and me["healthy"]:
            healthy_at = healthy_at or time.time()
            if me["layers"]:
                placed_at = time.time()
        time.sleep(0.2)
    cut_off = [msg for t, msg in log_events(daemon_of_host(h, victim).log_path, t_cut) if t < t_up
               and re.search(r"plan epoch \d+ committed|proposing plan epoch|ready: epoch", msg)]
    return {"rejoin": {"healthy_after_s": None if healthy_at is None else round(healthy_at - t_up, 3),
                       "holds_layers_after_s": None if placed_at is None else round(placed_at - t_up, 3),
                       "plans_while_cut_off": cut_off}}


def daemon_of_host(h, i: int):
    from test_recovery import daemon_of

    return daemon_of(h, i)


def coordinator_run(model: Path, log_dir: Path, timeout: float = 30) -> dict:
    """kill -9 the coordinator (the head); seconds until another peer's gateway answers a
    completion again (a new coordinator elected, a plan committed, its ring serving)."""
    from clusterutil import client, join, wait_for_agreement
    from netns import Hosts
    from test_recovery import daemon_of, host_of

    with Hosts(3, log_dir=log_dir) as h:
        for i in (1, 2, 3):
            join(h, i, model, "--threads", "1")
        view = wait_for_agreement(h, [1, 2, 3], n_layers=N_LAYERS, timeout=60)[0]
        head = host_of(h, view, view["coordinator"])
        other = next(i for i in (1, 2, 3) if i != head)
        job = {"kind": "raw", "method": "POST", "path": "/completions",
               "body": json.dumps({"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4, "temperature": 0}),
               "headers": {"content-type": "application/json"}}
        t_kill = time.time()
        h.kill(daemon_of(h, head))
        attempts, answered, r = 0, None, {}
        while time.time() - t_kill < timeout:
            attempts += 1
            r = client(h, other, job, timeout=timeout)
            if r.get("status") == 200:
                answered = time.time()
                break
            time.sleep(0.1)
        ev = log_events(daemon_of(h, other).log_path, t_kill)
        committed = first(ev, r"plan epoch \d+ committed")
        return {"fault": "coordinator", "killed": f"h{head}", "asked": f"h{other}", "attempts": attempts,
                "kill_to_serving_s": None if answered is None else round(answered - t_kill, 3),
                "kill_to_commit_s": None if committed is None else round(committed[0] - t_kill, 3),
                "last_answer": json.dumps(r)[:300]}


def kv_bytes_per_token_layer(kv_heads: int, head_dim: int, dtype_bytes: float) -> float:
    return 2 * kv_heads * head_dim * dtype_bytes


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for fault, context, replicas in sorted({(r.get("fault", "kill"), r["context"], r["kv_replicas"]) for r in runs
                                            if "context" in r}, key=lambda k: (k[0] != "kill", k[1], -k[2])):
        rs = [r for r in runs if r.get("fault", "kill") == fault and r["context"] == context
              and r["kv_replicas"] == replicas and "error" not in r]
        if not rs:
            continue
        med = lambda key: _median([r.get(key) for r in rs])  # noqa: E731
        phase = lambda name: _median([r["phases"].get(name) for r in rs])  # noqa: E731
        rejoined = [r["rejoin"] for r in rs if r.get("rejoin")]
        rows.append({
            "fault": fault, "context": context, "kv_replicas": replicas, "repeats": len(rs),
            "kill_to_next_token_s": med("kill_to_next_token_s"), "client_max_gap_s": med("client_max_gap_s"),
            "no_fault_max_gap_s": med("no_fault_max_gap_s"),
            "identical": f"{sum(r['identical'] and not r['errors'] for r in rs)}/{len(rs)}",
            "unchanged_by_fault": f"{sum(not r['changed_by_fault'] and not r['errors'] for r in rs)}/{len(rs)}",
            "diverged_before_fault": sum(len(r["diverged_before_fault"]) for r in rs),
            "detection_s": phase("detection"), "replan_s": phase("replan"), "load_and_kv_s": phase("load_and_kv"),
            "commit_s": phase("commit"), "first_token_s": phase("first_token"),
            "replayed": med("replayed"), "partly": med("partly"),
            "replica_bytes_per_position": med("replica_bytes_per_position"),
            "replica_bytes_per_generated_token": med("replica_bytes_per_generated_token"),
            "replica_bytes_held_mid_stream": med("replica_bytes_held_mid_stream"),
            "ring_bytes_per_position": statistics.median([r["ring_bytes_sent"] / r["kv_positions"] for r in rs]),
            "max_kill_to_next_token_s": max((r["kill_to_next_token_s"] for r in rs
                                             if r["kill_to_next_token_s"] is not None), default=None),
            "rejoin_healthy_s": _median([x["healthy_after_s"] for x in rejoined]),
            "rejoin_layers_s": _median([x["holds_layers_after_s"] for x in rejoined]),
            "plans_while_cut_off": sum(len(x["plans_while_cut_off"]) for x in rejoined),
        })
    return rows


def _median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def markdown(rows: list[dict], coordinator: list[dict]) -> str:
    head = ("| fault | context | kv-replicas | fault → next token, s (worst) | client max gap (s) | detect | replan | "
            "load + KV | commit | first token | replayed (last token only) | unchanged by the fault (identical) | replica B / KV position | "
            "replica B / generated token |")
    out = [head, "|" + "---|" * 14]
    f = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    g = lambda v: "–" if v is None else f"{v:g}"  # noqa: E731
    for r in rows:
        out.append(f"| {r['fault']} | {r['context']} | {r['kv_replicas']} | **{f(r['kill_to_next_token_s'])}** ({f(r.get('max_kill_to_next_token_s'))}) | {f(r['client_max_gap_s'])} | "
                   f"{f(r['detection_s'])} | {f(r['replan_s'])} | {f(r['load_and_kv_s'])} | {f(r['commit_s'])} | "
                   f"{f(r['first_token_s'])} | {g(r['replayed'])} ({g(r.get('partly'))}) | {r['unchanged_by_fault']} ({r['identical']}) | {r['replica_bytes_per_position']:,.0f} | "
                   f"{r['replica_bytes_per_generated_token']:,.0f} |")
    before = sum(r["diverged_before_fault"] for r in rows)
    if before:
        out.append(f"\n{before} stream(s) answered differently from the no-fault run before the fault came (four "
                   "prompts sent at once prefill in batches that differ from run to run, and the random model's "
                   "near-tied logits tip with the batch): such a run is not identical, yet not changed by the fault.")
    for r in rows:
        if r["fault"] == "link-down":
            out.append(f"\nLink down (context {r['context']}, kv-replicas {r['kv_replicas']}): after `ip link set ... up` "
                       f"the head lists the cut-off peer healthy in {f(r['rejoin_healthy_s'])} s and it holds layers "
                       f"again in {f(r['rejoin_layers_s'])} s (median); plans it committed or proposed while cut "
                       f"off: {r['plans_while_cut_off']}.")
    ok = [c["kill_to_serving_s"] for c in coordinator if c.get("kill_to_serving_s") is not None]
    if coordinator:
        out.append(f"\nCoordinator kill -9: another peer's gateway answers a completion again after "
                   f"{', '.join(f'{x:.2f}' for x in ok) or '–'} s ({len(ok)}/{len(coordinator)} runs served within "
                   "30 s; each attempt is a fresh client process, so this includes ~0.3 s of client start).")
    return "\n".join(out)


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "kernel": platform.release()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one repeat, fewer tokens (a smoke test)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--contexts", default="64,512")
    ap.add_argument("--faults", default="kill,link-down,coordinator",
                    help="kill (SIGKILL of the middle peer), link-down (its link cut, then restored), "
                         "coordinator (SIGKILL of the head)")
    ap.add_argument("--model", type=Path, default=None, help="a GGUF file (default: the 8-layer small demo model)")
    ap.add_argument("--keep-logs", type=Path, default=None, help="keep every daemon's log under this folder")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--client", help=argparse.SUPPRESS)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)  # a killed benchmark still removes its namespaces and daemons
    if args.client:
        client_main(json.loads(args.client))
        return 0

    from netns import netns_available

    reason = netns_available()
    if reason:
        print(f"skipped: {reason}", file=sys.stderr)
        return 2
    from p2pllm.model.demo import make_demo_model
    from p2pllm.model.spec import read_spec

    load_at_start = os.getloadavg()[0]
    repeats = args.repeats or (1 if args.quick else 3)
    max_tokens = 24 if args.quick else 48
    work = Path(tempfile.mkdtemp(prefix="p2p-recovery-"))
    global MODEL_NAME, N_LAYERS
    if args.model is not None:
        model = args.model.resolve()
        MODEL_NAME = model.name
    else:
        model = make_demo_model(work / MODEL_NAME, "gguf", "small")
    spec = read_spec(model)
    N_LAYERS = spec.n_layers
    faults = args.faults.split(",")
    runs, coordinator = [], []
    for rep in range(repeats):
        for fault in [f for f in faults if f in ("kill", "link-down")]:
            for context in [int(c) for c in args.contexts.split(",")]:
                for replicas in ("1", "0") if fault == "kill" else ("1",):
                    log_dir = (args.keep_logs or work) / f"{fault}-ctx{context}-r{replicas}-{rep}"
                    t0 = time.monotonic()
                    try:
                        r = one_run(model, context, replicas, max_tokens, log_dir, fault)
                    except Exception as e:  # noqa: BLE001 - one failed case must not lose the others
                        r = {"fault": fault, "context": context, "kv_replicas": int(replicas),
                             "error": f"{type(e).__name__}: {e}"[:2000]}
                    r["repeat"] = rep
                    runs.append(r)
                    print(f"{fault}, context {context}, kv-replicas {replicas}, repeat {rep}: "
                          f"{json.dumps({k: r.get(k) for k in ('kill_to_next_token_s', 'client_max_gap_s', 'phases', 'identical', 'replayed', 'partly', 'rejoin', 'error')})}"
                          f" ({time.monotonic() - t0:.0f}s)", file=sys.stderr, flush=True)
        if "coordinator" in faults:
            try:
                c = coordinator_run(model, (args.keep_logs or work) / f"coordinator-{rep}")
            except Exception as e:  # noqa: BLE001
                c = {"fault": "coordinator", "error": f"{type(e).__name__}: {e}"[:2000]}
            c["repeat"] = rep
            coordinator.append(c)
            print(f"coordinator, repeat {rep}: {json.dumps(c)}", file=sys.stderr, flush=True)
    if args.keep_logs is None:
        shutil.rmtree(work, ignore_errors=True)
    rows = summarize(runs)
    # replicas travel in the stage's KV format: f16 by default on GGUF stages, q8_0 at 34/32 bytes
    computed = {
        "demo-small (8 layers, 2 kv heads x 64, f16)": {
            "per_token_per_layer": kv_bytes_per_token_layer(spec.n_kv_heads, spec.head_dim, 2),
            "per_token_all_layers": kv_bytes_per_token_layer(spec.n_kv_heads, spec.head_dim, 2) * spec.n_layers},
        "llama-3-8b (32 layers, 8 kv heads x 128, f16)": {
            "per_token_per_layer": kv_bytes_per_token_layer(8, 128, 2),
            "per_token_all_layers": kv_bytes_per_token_layer(8, 128, 2) * 32},
        "llama-3-8b (q8_0 KV)": {
            "per_token_per_layer": kv_bytes_per_token_layer(8, 128, 34 / 32),
            "per_token_all_layers": kv_bytes_per_token_layer(8, 128, 34 / 32) * 32},
    }
    result = {
        "machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": {"hosts": 3, "model": MODEL_NAME if args.model else "demo small (8 layers, hidden 256)",
                     "streams": STREAMS, "keep": KEEP, "max_tokens": max_tokens, "threads": 1, "strategy": "even",
                     "faults": faults, "repeats": repeats, "quick": args.quick,
                     "load1_at_start": load_at_start, "load1_at_end": os.getloadavg()[0]},
        "summary": rows, "coordinator": coordinator, "computed_replica_bytes": computed, "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(rows, coordinator))
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0 if all("error" not in r for r in runs + coordinator) else 1


def _interrupt(*_):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
