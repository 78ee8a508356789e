"""What splitting a model into three processes costs on this machine before any of p2pllm's ring
runs: the floor under benchmarks/ring.py's "3 daemons vs 1".

    python benchmarks/split_floor.py     # writes benchmarks/results/split_floor.json, prints markdown (~1 min)
    GOMP_SPINCOUNT=10000 python benchmarks/split_floor.py --model ~/.cache/p2pllm/demo-3b.Q4_K_M.gguf \
        --threads 2 --tokens 24 --repeats 3 --out ...   # the mission's model, 2 OpenMP threads a stage

1. **Stages over OS pipes.** The SmolLM2 file's 30 layers as 1 ggml stage in one process, and as
   3 stages [0,10) [10,20) [20,30) in 3 processes linked by pipes (a driver sends the token, each
   stage computes and writes its activations to the next, the last returns the greedy token):
   the same GGMLStage a daemon runs, 1 compute thread each (`--threads`), no gRPC, no TLS, no
   event loop, no frame checks. A third configuration is the 3 stages polling: a stage waiting
   for its next input polls its pipe (`sched_yield` between polls, up to 50 ms) instead of
   sleeping in `recv`, as llama.cpp's threadpool polls for work. The configurations alternate
   repeat by repeat. OpenMP's settings (GOMP_SPINCOUNT, OMP_WAIT_POLICY) come from the
   environment and are recorded.
2. **Code run after a pause.** The same small piece of Python (a 50-entry dict comprehension; a
   decode frame's `transport.frames.decode`) timed in a tight loop and right after 5 ms of
   something else (spinning in Python; sleeping): a ring stage's per-token Python always runs
   after a pause (the other stages' compute), never in a loop.
3. **A stage's step after a pause.** One GGMLStage [10,20) (22 MB of Q4_1 weights), 1 thread,
   decode steps with something before each, the kinds drawn at random step by step so that the
   machine's drift hits all alike: nothing (back to back), 8 ms asleep, 8 ms spinning, 64 MB of
   other memory traffic (what the other stages' weights are to this one's in the shared L3), and
   that traffic followed by 8 ms asleep or spinning. A ring stage on this machine always meets
   the last: the other stages compute while it sleeps.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "split_floor.json"
MODEL = ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WARMUP = 8
POLL_SECONDS = 0.05  # how long a polling stage polls before it sleeps in recv (llama.cpp's --poll 50)


def _next_input(inbox, poll_seconds: float):
    """The next message: after polling the pipe for up to poll_seconds (yielding the core between
    polls to anything else runnable), or at once sleeping in recv."""
    end = time.perf_counter() + poll_seconds
    while poll_seconds and not inbox.poll(0) and time.perf_counter() < end:
        os.sched_yield()
    return inbox.recv()


def _stage_process(path: str, start: int, end: int, threads: int, inbox, outbox, report, poll_seconds: float) -> None:
    """One stage: take (position, token id or activations), compute, pass on; report step times."""
    import torch

    from p2pllm.model.backends.ggml_stage import GGMLStage
    from p2pllm.model.batch import BatchMeta, SeqChunk

    stage = GGMLStage(path, start, end, threads=threads, max_context=512)
    stage.kv.allocate(1, 512)
    steps: list[float] = []
    report.send("ready")
    while (msg := _next_input(inbox, poll_seconds)) is not None:
        pos, x = msg
        if pos == 0:
            stage.kv.truncate(1, 0)  # a new repeat starts the sequence again
        t0 = time.perf_counter()
        inp = torch.tensor([x], dtype=torch.int32) if stage.is_first else torch.from_numpy(x)
        out = stage.forward(inp, BatchMeta.build([SeqChunk(1, pos, 1)]))
        steps.append(time.perf_counter() - t0)
        outbox.send((pos + 1, int(out[0].argmax())) if stage.is_last else (pos, out.numpy()))
    report.send(steps)


class PipeRing:
    """n stage processes in a pipe ring with this process as the driver."""

    def __init__(self, path: Path, n: int, n_layers: int, threads: int, poll_seconds: float = 0.0):
        ctx = mp.get_context("spawn")
        bounds = [round(i * n_layers / n) for i in range(n + 1)]
        self.pipes = [ctx.Pipe(duplex=False) for _ in range(n + 1)]  # [i]: into stage i; [n]: back here
        self.reports, self.procs = [], []
        for i in range(n):
            recv_report, send_report = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_stage_process, args=(str(path), bounds[i], bounds[i + 1], threads,
                                                         self.pipes[i][0], self.pipes[i + 1][1], send_report,
                                                         poll_seconds))
            p.start()
            self.procs.append(p)
            self.reports.append(recv_report)
        for r in self.reports:
            if r.recv() != "ready":
                raise RuntimeError("a stage process failed to start")
        self.n, self.layers = n, [[bounds[i], bounds[i + 1]] for i in range(n)]

    def decode(self, tokens: int) -> list[float]:
        """Seconds per token of a greedy run of `tokens` tokens (warm-up tokens left out)."""
        token, pos, times = 1, 0, []
        for k in range(tokens + WARMUP):
            t0 = time.perf_counter()
            self.pipes[0][1].send((pos, token))
            pos, token = self.pipes[self.n][0].recv()
            if k >= WARMUP:
                times.append(time.perf_counter() - t0)
        return times

    def close(self) -> list[list[float]]:
        for i in range(self.n):
            self.pipes[i][1].send(None)
        steps = [r.recv() for r in self.reports]
        for p in self.procs:
            p.join(timeout=30)
        return steps


def part1(path: Path, tokens: int, repeats: int, threads: int) -> dict:
    from p2pllm.model.spec import read_spec

    n_layers = read_spec(path).n_layers
    rings = {"1": PipeRing(path, 1, n_layers, threads), "3": PipeRing(path, 3, n_layers, threads),
             "3 polling": PipeRing(path, 3, n_layers, threads, POLL_SECONDS)}
    runs = {k: [] for k in rings}
    try:
        for _ in range(repeats):
            for k, ring in rings.items():
                runs[k].append(ring.decode(tokens))
    finally:
        steps = {k: ring.close() for k, ring in rings.items()}
    out = {"tokens": tokens, "repeats": repeats, "threads": threads, "poll_seconds": POLL_SECONDS, "configs": {}}
    for k, ring in rings.items():
        per_token = [statistics.median(r) for r in runs[k]]
        stage_ms = [statistics.median(s) * 1e3 for s in steps[k]]  # includes warm-up steps: a median
        out["configs"][k] = {
            "processes": ring.n, "layers": ring.layers,
            "tokens_per_s": [1 / t for t in per_token], "tokens_per_s_median": 1 / statistics.median(per_token),
            "ms_per_token_median": statistics.median(per_token) * 1e3,
            "stage_ms_median": stage_ms, "stage_ms_sum": sum(stage_ms),
        }
    one = out["configs"]["1"]["tokens_per_s_median"]
    out["ratio_3_vs_1"] = out["configs"]["3"]["tokens_per_s_median"] / one
    out["ratio_3_polling_vs_1"] = out["configs"]["3 polling"]["tokens_per_s_median"] / one
    out["outside_compute_ms"] = {k: c["ms_per_token_median"] - c["stage_ms_sum"] for k, c in out["configs"].items()}
    return out


def _timed_after(fn, pause, n: int = 300) -> float:
    """Median microseconds of fn() right after `pause()` (or in a tight loop: pause None)."""
    times = []
    for _ in range(n):
        if pause is not None:
            pause()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[20:]) * 1e6


def part2(path: Path) -> dict:
    import torch

    from p2pllm.model.spec import read_spec
    from p2pllm.proto import p2pllm_pb2 as pb
    from p2pllm.runtime.frames import Chunk, MicroBatch
    from p2pllm.transport import frames

    spec = read_spec(path)
    frame = frames.encode(MicroBatch(1, 2, [Chunk(1, 5, 1, True)], [0]), torch.randn(1, spec.hidden))
    frame = pb.Frame.FromString(frame.SerializeToString())

    def spin():
        end = time.perf_counter() + 0.005
        while time.perf_counter() < end:
            pass

    pieces = {
        "dict comprehension (50 entries)": lambda: {i: i for i in range(50)},
        "frames.decode of a decode frame": lambda: frames.decode(frame, spec, 1, 512, False, known={1}, live=1),
    }
    pauses = {"tight loop": None, "after 5 ms spinning": spin, "after 5 ms asleep": lambda: time.sleep(0.005)}
    return {name: {p: round(_timed_after(fn, pause), 1) for p, pause in pauses.items()} for name, fn in pieces.items()}


def part3(path: Path, steps: int = 1800) -> dict:
    import random

    import torch

    from p2pllm.model.backends.ggml_stage import GGMLStage
    from p2pllm.model.batch import BatchMeta, SeqChunk

    stage = GGMLStage(path, 10, 20, threads=1, max_context=512)
    stage.kv.allocate(1, 512)
    x, junk = torch.randn(1, stage.spec.hidden), bytearray(64 << 20)

    def spin():
        end = time.perf_counter() + 0.008
        while time.perf_counter() < end:
            pass

    def traffic():
        junk[::64] = b"\1" * (len(junk) // 64)

    before = {"back to back": lambda: None, "8 ms asleep": lambda: time.sleep(0.008), "8 ms spinning": spin,
              "64 MB of other traffic": traffic,
              "64 MB of traffic, then 8 ms asleep (a ring stage)": lambda: (traffic(), time.sleep(0.008)),
              "64 MB of traffic, then 8 ms spinning": lambda: (traffic(), spin())}
    times: dict[str, list[float]] = {k: [] for k in before}
    rng, pos = random.Random(0), 0
    try:
        for _ in range(steps):
            kind = rng.choice(list(before))
            if pos == 300:  # the context stays short: a new sequence
                stage.kv.truncate(1, 0)
                pos = 0
            before[kind]()
            t0 = time.perf_counter()
            stage.forward(x, BatchMeta.build([SeqChunk(1, pos, 1)]))
            times[kind].append(time.perf_counter() - t0)
            pos += 1
    finally:
        stage.close()
    return {k: {"steps": len(v), "ms_median": round(statistics.median(v) * 1e3, 3)} for k, v in times.items()}


def markdown(res: dict) -> str:
    p1, lines = res["part1"], []
    lines.append(f"**1. 1 vs 3 ggml stages over OS pipes** ({res['model']}, {p1['tokens']} tokens, median of "
                 f"{p1['repeats']} alternating repeats, {p1['threads']} compute thread(s) per process; "
                 f"OpenMP: {res['openmp'] or 'defaults'})\n")
    lines.append("| processes | layers | tok/s (median) | ms/token | stage compute ms/token | outside compute, ms/token |")
    lines.append("|---|---|---|---|---|---|")
    for k, c in p1["configs"].items():
        lines.append(f"| {k} | {' '.join(f'[{a},{b})' for a, b in c['layers'])} | {c['tokens_per_s_median']:.1f} | "
                     f"{c['ms_per_token_median']:.2f} | {c['stage_ms_sum']:.2f} "
                     f"({' + '.join(f'{x:.2f}' for x in c['stage_ms_median'])}) | {p1['outside_compute_ms'][k]:.2f} |")
    lines.append(f"\n3 processes / 1: **{p1['ratio_3_vs_1']:.2f}×**; polling for their input "
                 f"(up to {p1['poll_seconds'] * 1e3:.0f} ms): **{p1['ratio_3_polling_vs_1']:.2f}×**\n")
    lines.append("**2. The same Python in a loop and after a pause** (median µs)\n")
    pauses = list(next(iter(res["part2"].values())))
    lines.append("| code | " + " | ".join(pauses) + " |")
    lines.append("|---|" + "---|" * len(pauses))
    for name, row in res["part2"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[p]:.1f}" for p in pauses) + " |")
    p3 = res["part3"]
    base = p3["back to back"]["ms_median"]
    lines.append("\n**3. A 10-layer stage's decode step after a pause** (median ms; steps drawn at random)\n")
    lines.append("| before each step | steps | ms (median) | vs back to back |")
    lines.append("|---|---|---|---|")
    for name, row in p3.items():
        lines.append(f"| {name} | {row['steps']} | {row['ms_median']:.2f} | {row['ms_median'] / base:.2f}× |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1, help="compute threads per stage process (default 1)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not args.model.exists():
        print(f"split_floor: {args.model} not found (the shared SmolLM2 file)", file=sys.stderr)
        return 2
    t0 = time.time()
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "model": args.model.name, "load_at_start": os.getloadavg(),
           "openmp": {k: os.environ[k] for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY") if k in os.environ},
           "part1": part1(args.model, args.tokens, args.repeats, args.threads), "part2": part2(args.model), "part3": part3(args.model)}
    res["load_at_end"], res["seconds"] = os.getloadavg(), round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(markdown(res))
    print(f"\n({res['seconds']:.0f}s; raw numbers in {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
