"""Decode speed deep into a context: p2pllm's ggml stage against llama.cpp, token by token.

    python benchmarks/long_context.py         # writes benchmarks/results/long_context.json, prints markdown (~4 min)
    python benchmarks/long_context.py --quick # two positions, one repeat (a smoke test, not a result)

benchmarks/gguf_stages.py measures 128 tokens from a short prompt; a chat that runs long decodes
with thousands of cached positions, where attention, not the weights, takes most of a step.
For each position P: a fresh process prefills P tokens (the same fixed ids for every engine, in
chunks of 512), then times 32 greedy-free decode steps at positions P..P+31 (ms per step; no
sampling). Engines, 2 threads each, each in a process of its own (two ggml builds in one
process share OpenMP's threads), alternating position by position:

- p2pllm: the SmolLM2 Q4_1 file's whole model as one GGMLStage (`p2pllm run`'s stage), f16 KV,
  ggml's flash attention (the only attention our stages build);
- llama.cpp with flash attention (llama-cpp-python, f16 KV): the same ggml kernel;
- llama.cpp without it (llama-cpp-python's default): K·Q, softmax and V·KQ as matrix products
  over a transposed V cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOL = ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
RESULTS = ROOT / "benchmarks" / "results" / "long_context.json"
THREADS = 2
STEPS = 32
CONTEXT = 8192
ENGINES = ("p2pllm", "llama.cpp-fa", "llama.cpp")

# one engine at one position, in a process of its own: prints {"ms_per_token": ...}
CHILD = r"""
import json, sys, time
engine, path, P, steps, threads, context = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
prompt = [(i * 7919) % 40000 + 100 for i in range(P)]
if engine == "p2pllm":
    import torch
    from p2pllm.model.backends.ggml_stage import GGMLStage
    from p2pllm.model.batch import BatchMeta, SeqChunk
    from p2pllm.model.spec import read_spec
    st = GGMLStage(path, 0, read_spec(path).n_layers, threads=threads, max_context=context)
    st.kv.allocate(1, P + steps)
    ids = torch.tensor(prompt, dtype=torch.int32)
    for a in range(0, P, 512):
        st.forward_last(ids[a:a + 512], BatchMeta.build([SeqChunk(1, a, len(ids[a:a + 512]))]))
    def step(pos):
        st.forward_last(torch.tensor([1000], dtype=torch.int32), BatchMeta.build([SeqChunk(1, pos, 1)]))
else:
    import llama_cpp
    llm = llama_cpp.Llama(model_path=path, n_ctx=context, n_threads=threads, n_threads_batch=threads,
                          n_batch=512, flash_attn=engine == "llama.cpp-fa", verbose=False)
    llm.eval(prompt)
    def step(pos):
        llm.eval([1000])
step(P)  # (one warm step, then the timed ones)
t0 = time.perf_counter()
for i in range(steps):
    step(P + 1 + i)
print(json.dumps({"ms_per_token": 1000 * (time.perf_counter() - t0) / steps}))
"""


def measure(engine: str, model: Path, position: int, steps: int) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, engine, str(model), str(position), str(steps),
                          str(THREADS), str(CONTEXT)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{engine} at {position}: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["ms_per_token"]


def run(model: Path, positions: list[int], repeats: int) -> dict:
    ms = {e: {p: [] for p in positions} for e in ENGINES}
    for r in range(repeats):
        for p in positions:
            order = ENGINES if (r + positions.index(p)) % 2 == 0 else ENGINES[::-1]
            for e in order:
                ms[e][p].append(measure(e, model, p, STEPS))
                print(f"repeat {r + 1}: {e} at {p}: {ms[e][p][-1]:.2f} ms/token", file=sys.stderr, flush=True)
    best = {e: {p: min(v) for p, v in by.items()} for e, by in ms.items()}  # other load only slows a run
    return {"positions": positions, "ms_per_token": {e: {str(p): v for p, v in by.items()} for e, by in ms.items()},
            "best_ms_per_token": {e: {str(p): v for p, v in by.items()} for e, by in best.items()},
            "median_ms_per_token": {e: {str(p): statistics.median(v) for p, v in by.items()} for e, by in ms.items()}}


def markdown(res: dict) -> str:
    best = res["best_ms_per_token"]
    rows = ["| cached positions | p2pllm ms/token | llama.cpp, flash attention | llama.cpp, default (no flash attention) "
            "| p2pllm vs llama.cpp FA | p2pllm vs llama.cpp default |", "|---|---|---|---|---|---|"]
    for p in map(str, res["positions"]):
        ours, fa, default = best["p2pllm"][p], best["llama.cpp-fa"][p], best["llama.cpp"][p]
        rows.append(f"| {p} | {ours:.2f} | {fa:.2f} | {default:.2f} | {fa / ours:.2f}× | {default / ours:.2f}× |")
    m = res["machine"]
    return (f"**Decode deep into a context** ({res['model']}, {THREADS} threads, {STEPS} steps after each prefill, "
            f"best of {res['repeats']}; {m['cpu_count']} cores, load average {m['load_average_1m_at_start']:.1f} "
            f"at the start, {res['date']})\n\n" + "\n".join(rows) + "\n\n(speed ratios: above 1× p2pllm is faster)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=SMOL)
    ap.add_argument("--quick", action="store_true", help="two positions, one repeat (a smoke test)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not args.model.exists():
        raise SystemExit(f"no model at {args.model}")
    positions, repeats = ([256, 2048], 1) if args.quick else ([256, 1024, 2048, 4000], 2)
    t0 = time.perf_counter()
    machine = {"cpu_count": os.cpu_count(), "load_average_1m_at_start": os.getloadavg()[0],
               "python": platform.python_version(), "kernel": platform.release()}
    res = {"model": args.model.name, "quick": args.quick, "repeats": repeats, "threads": THREADS, "steps": STEPS,
           "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine, **run(args.model, positions, repeats)}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(markdown(res))
    print(f"\n({res['seconds']:.0f}s; raw numbers in {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
