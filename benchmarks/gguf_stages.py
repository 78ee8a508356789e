"""Quantized-native stages vs llama.cpp: speed, memory and tokens on real GGUF files.

    python benchmarks/gguf_stages.py            # writes benchmarks/results/gguf_stages.json, prints markdown
    python benchmarks/gguf_stages.py --quick    # one repeat, fewer tokens (a smoke test, not a result)

Measured side by side in one run, 2 threads each, on this machine:

- SmolLM2-135M-Instruct.Q4_1.gguf (../shared/models) and the Q8_0 and Q4_K_M files llama.cpp's
  own `llama_model_quantize` makes from it (`allow_requantize`; cached in benchmarks/.cache):
  greedy decode of 128 tokens and the prefill of a 128-token prompt, `p2pllm run`'s code path
  (`LocalPipeline`: ggml stage, f16 KV) vs llama.cpp (llama-cpp-python, f16 KV, flash attention),
  each in a fresh process (two ggml builds in one process share OpenMP's threads and slow each
  other down), ours and llama.cpp's alternating, best of N (other processes only slow a run
  down; medians in the JSON); the torch backend (f32 dequantization: what a stage did before)
  on the Q4_1 file for comparison;
- tokens: greedy ids for 64 tokens (or to the end of text) on 5 prompts (3 chat-formatted, 2
  raw), whole and split in 3 stages, against llama.cpp's; and, as the yardstick, llama.cpp
  against itself with flash attention off (its other default: llama-cpp-python's);
- max RSS of those processes (GNU time), ours and llama.cpp's;
- max RSS (the largest of N runs) and decode speed of `p2pllm run`'s path on a seeded-random
  ~1.1B Llama (`make-demo-model --size 1b`, written F16, quantized by llama.cpp to Q4_K_M;
  cached) against the file's size, and llama.cpp's on the same file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOL = ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = ROOT / "benchmarks" / ".cache"
RESULTS = ROOT / "benchmarks" / "results" / "gguf_stages.json"
THREADS = 2
FTYPES = {"Q8_0": 7, "Q4_K_M": 15}  # llama_ftype
CHAT = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis in one sentence."]
RAW = ["Once upon a time, in a small town by the sea, there lived", "The three most important inventions are"]
SPLIT = [10, 20]


def ggml_build() -> str:
    """Which ggml the stages computed with (scripts/ggml_from_llama_cpp.py links llama.cpp's)."""
    from p2pllm.model.backends import ggml_lib

    return ggml_lib.version()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def quantized(src: Path, name: str, ftype: int) -> Path:
    """A file llama.cpp quantizes from `src` (cached)."""
    import llama_cpp

    out = CACHE / f"{src.stem.split('.')[0]}.{name}.gguf"
    if not out.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.allow_requantize = True
        params.nthread = THREADS
        tmp = out.with_suffix(".tmp")
        log(f"quantizing {src.name} to {name} ...")
        if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {src} to {name}")
        tmp.rename(out)
    return out


def random_1b() -> Path:
    """A seeded-random ~1.1B Llama, F16 by our writer, Q4_K_M by llama.cpp (cached)."""
    f16 = CACHE / "demo-1b.f16.gguf"
    if not (CACHE / "demo-1b.Q4_K_M.gguf").exists():
        from p2pllm.model.demo import make_demo_model

        CACHE.mkdir(parents=True, exist_ok=True)
        log("writing the seeded-random 1b model (f16) ...")
        make_demo_model(f16, "gguf", "1b", qtype="f16")
    out = quantized(f16, "Q4_K_M", FTYPES["Q4_K_M"]) if not (CACHE / "demo-1b.Q4_K_M.gguf").exists() else None
    f16.unlink(missing_ok=True)
    return out or CACHE / "demo-1b.Q4_K_M.gguf"


class LlamaCpp:
    def __init__(self, path: Path, flash_attn: bool = True):
        import llama_cpp

        self.version = llama_cpp.__version__
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_threads=THREADS,
                                   n_threads_batch=THREADS, type_k=1, type_v=1, flash_attn=flash_attn, verbose=False)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        """Up to n greedy tokens (top-1 sampling), stopping at the end of text."""
        out: list[int] = []
        for tok in self.llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, reset=True):
            if tok == self.llm.token_eos() or len(out) == n:
                break
            out.append(int(tok))
        return out


def prompts(tokenizer) -> list[list[int]]:
    chat = [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in CHAT]
    return chat + [tokenizer.encode(p) for p in RAW]


def long_prompt(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(RAW[0])
    while len(ids) < n:
        ids += tokenizer.encode(" " + RAW[0] + " and then", add_bos=False)
    return ids[:n]


def run_measured(cmd: list[str]) -> tuple[int, str]:
    """Run a child under GNU time and return (its max RSS in bytes, its stdout). (The child of a
    fork of this big process would count this process's pages until it execs.)"""
    rss_path = CACHE / f"rss-{os.getpid()}.txt"
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss_path), *cmd], capture_output=True, text=True,
                          cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:6]))} failed: {proc.stderr[-2000:]}")
    rss_kb = int(rss_path.read_text().split()[-1])
    rss_path.unlink()
    return rss_kb * 1024, proc.stdout


OURS = """
import json, sys, time, torch
from p2pllm.runtime.local import LocalPipeline
path, backend, n, short, long = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]), json.loads(sys.argv[5])
torch.set_num_threads(2)
t0 = time.perf_counter()
pipe = LocalPipeline(path, backend=backend, threads=2)  # `p2pllm run`'s code path
load = time.perf_counter() - t0
pipe.generate(short, max_tokens=4, ignore_eos=True)
decode = pipe.generate(short, max_tokens=n, ignore_eos=True).decode_tokens_per_s
prefill = pipe.generate(long, max_tokens=1, ignore_eos=True).prefill_tokens_per_s if long else 0.0
print(json.dumps({"decode": decode, "prefill": prefill, "load_seconds": load}))
"""

LLAMA = """
import json, sys, time, llama_cpp
path, n, short, long = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
t0 = time.perf_counter()
llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_batch=512, n_threads=2, n_threads_batch=2, type_k=1, type_v=1,
                      flash_attn=True, verbose=False)
load = time.perf_counter() - t0
def decode(k):
    got, t = 0, 0.0
    for _ in llm.generate(short, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, reset=True):
        got += 1
        if got == 1:
            t = time.perf_counter()
        if got == k:
            return (k - 1) / (time.perf_counter() - t)
decode(4)
rate = decode(n)
prefill = 0.0
if long:
    llm.reset()
    t = time.perf_counter()
    llm.eval(long)
    prefill = len(long) / (time.perf_counter() - t)
print(json.dumps({"decode": rate, "prefill": prefill, "load_seconds": load}))
"""


def ours_run(path: Path, short: list[int], long: list[int], n: int, backend: str = "auto") -> dict:
    """One fresh process on our side: max RSS, load time, decode and prefill rates."""
    rss, out = run_measured([sys.executable, "-c", OURS, str(path), backend, str(n), json.dumps(short), json.dumps(long)])
    return {**json.loads(out.strip().splitlines()[-1]), "max_rss": rss}


def llama_run(path: Path, short: list[int], long: list[int], n: int) -> dict:
    """The same in a fresh llama.cpp process (f16 KV, flash attention, 2 threads)."""
    rss, out = run_measured([sys.executable, "-c", LLAMA, str(path), str(n), json.dumps(short), json.dumps(long)])
    return {**json.loads(out.strip().splitlines()[-1]), "max_rss": rss}


def bench_file(path: Path, repeats: int, n_tokens: int, with_torch: bool) -> dict:
    """Speed and memory from fresh processes, ours and llama.cpp's alternating (two ggml builds in
    one process would share OpenMP's threads); tokens in this process."""
    from p2pllm.model.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    short, long = tok.encode(RAW[0]), long_prompt(tok, 128)
    r: dict = {"file": path.name, "file_bytes": path.stat().st_size, "decode_tokens": n_tokens, "ours": [],
               "llama_cpp": []}
    for i in range(repeats):
        r["ours"].append(ours_run(path, short, long, n_tokens))
        r["llama_cpp"].append(llama_run(path, short, long, n_tokens))
        o, ll = r["ours"][-1], r["llama_cpp"][-1]
        log(f"  {path.name} {i + 1}/{repeats}: decode ours {o['decode']:.1f} vs llama.cpp {ll['decode']:.1f} tok/s; "
            f"prefill ours {o['prefill']:.0f} vs {ll['prefill']:.0f} tok/s; RSS {o['max_rss'] / 1e6:.0f} vs "
            f"{ll['max_rss'] / 1e6:.0f} MB")
    if with_torch:
        r["torch_backend"] = ours_run(path, short, [], n_tokens, backend="torch")
    r["fidelity"] = fidelity(path, tok)
    best = {side: {k: max(run[k] for run in r[side]) for k in ("decode", "prefill")} for side in ("ours", "llama_cpp")}
    for side in ("ours", "llama_cpp"):
        best[side]["max_rss"] = max(run["max_rss"] for run in r[side])  # the worst run: a ceiling
    r["best"] = best
    r["median"] = {side: {k: statistics.median(run[k] for run in r[side]) for k in ("decode", "prefill")}
                   for side in ("ours", "llama_cpp")}
    r["ratios"] = {"decode": best["ours"]["decode"] / best["llama_cpp"]["decode"],
                   "prefill128": best["ours"]["prefill"] / best["llama_cpp"]["prefill"],
                   "decode_median": r["median"]["ours"]["decode"] / r["median"]["llama_cpp"]["decode"]}
    if with_torch:
        r["ratios"]["torch_backend_decode"] = r["torch_backend"]["decode"] / best["llama_cpp"]["decode"]
    return r


def fidelity(path: Path, tok) -> dict:
    """Greedy ids of 64 tokens on every prompt, whole and split in 3, against llama.cpp's."""
    from p2pllm.runtime.local import LocalPipeline

    whole, split = LocalPipeline(str(path), threads=THREADS), LocalPipeline(str(path), SPLIT, threads=THREADS)
    ref, other = LlamaCpp(path), LlamaCpp(path, flash_attn=False)
    f = {"tokens": 64, "prompts": len(CHAT) + len(RAW), "equal_whole": 0, "equal_split": 0,
         "llama_cpp_fa_off_equal_fa_on": 0, "first_difference": []}
    for p in prompts(tok):
        want = ref.greedy(p, 64)
        f["llama_cpp_fa_off_equal_fa_on"] += other.greedy(p, 64) == want
        for key, pipe in (("equal_whole", whole), ("equal_split", split)):
            got = pipe.generate(p, max_tokens=64).ids
            got = got[:-1] if got and got[-1] == tok.eos_id else got
            f[key] += got == want
            if got != want:
                at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                f["first_difference"].append({"config": key, "prompt_tokens": len(p), "at": at})
    return f


def bench_1b(n_tokens: int, repeats: int) -> dict:
    from p2pllm.model.tokenizer import load_tokenizer

    path = random_1b()
    short = load_tokenizer(path).encode(RAW[0])
    runs = {"ours": [], "llama_cpp": []}
    for i in range(repeats):
        runs["ours"].append(ours_run(path, short, [], n_tokens))
        runs["llama_cpp"].append(llama_run(path, short, [], n_tokens))
        log(f"  {path.name} {i + 1}/{repeats}: decode ours {runs['ours'][-1]['decode']:.1f} vs llama.cpp "
            f"{runs['llama_cpp'][-1]['decode']:.1f} tok/s; RSS {runs['ours'][-1]['max_rss'] / 1e6:.0f} vs "
            f"{runs['llama_cpp'][-1]['max_rss'] / 1e6:.0f} MB")
    size = path.stat().st_size
    best = {side: {"decode": max(r["decode"] for r in rs), "max_rss": max(r["max_rss"] for r in rs),
                   "load_seconds": min(r["load_seconds"] for r in rs)} for side, rs in runs.items()}
    return {"file": path.name, "file_bytes": size, "runs": runs, "ours": best["ours"], "llama_cpp": best["llama_cpp"],
            "ours_rss_over_file_bytes": best["ours"]["max_rss"] - size}


def markdown(res: dict) -> str:
    mb = 1e6
    rows = ["| file | decode tok/s: ours / llama.cpp | ratio (goal ≥ 0.8) | prefill-128 tok/s: ours / llama.cpp "
            "| ratio (goal ≥ 0.5) | tokens = llama.cpp: whole, split in 3 (goal ≥ 4/5); llama.cpp FA off = on "
            "| max RSS MB: ours / llama.cpp |",
            "|---|---|---|---|---|---|---|"]
    for r in res["files"]:
        b, q, f = r["best"], r["ratios"], r["fidelity"]
        rows.append(f"| {r['file']} ({r['file_bytes'] / mb:.0f} MB) | {b['ours']['decode']:.1f} / "
                    f"{b['llama_cpp']['decode']:.1f} | **{q['decode']:.2f}x** | {b['ours']['prefill']:.0f} / "
                    f"{b['llama_cpp']['prefill']:.0f} | **{q['prefill128']:.2f}x** | {f['equal_whole']}/{f['prompts']}, "
                    f"{f['equal_split']}/{f['prompts']}; {f['llama_cpp_fa_off_equal_fa_on']}/{f['prompts']} "
                    f"| {b['ours']['max_rss'] / mb:.0f} / {b['llama_cpp']['max_rss'] / mb:.0f} |")
    first = res["files"][0]
    if "torch_backend" in first:
        t = first["torch_backend"]
        rows.append(f"| {first['file']}, torch backend (f32 dequantization: before) | {t['decode']:.1f} / "
                    f"{first['best']['llama_cpp']['decode']:.1f} | {first['ratios']['torch_backend_decode']:.2f}x "
                    f"| | | | {t['max_rss'] / mb:.0f} / – |")
    if "random_1b" in res:
        r = res["random_1b"]
        rows.append(f"| {r['file']} (seeded-random 1.1B, {r['file_bytes'] / mb:.0f} MB) | {r['ours']['decode']:.1f} / "
                    f"{r['llama_cpp']['decode']:.1f} | {r['ours']['decode'] / r['llama_cpp']['decode']:.2f}x | | | "
                    f"| {r['ours']['max_rss'] / mb:.0f} / {r['llama_cpp']['max_rss'] / mb:.0f} "
                    f"(file + **{r['ours_rss_over_file_bytes'] / mb:.0f}**; goal ≤ file + 600; loaded in "
                    f"{r['ours']['load_seconds']:.1f} s) |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one repeat, 32 tokens, no 1b model (a smoke test)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not SMOL.exists():
        print(f"{SMOL} is absent (the shared test models live beside the checkout)", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(THREADS)
    repeats, n_tokens = (1, 32) if args.quick else (args.repeats, 128)
    res = {"quick": args.quick, "repeats": repeats, "threads": THREADS, "statistic": "best",
           "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "load_average_1m_at_start": os.getloadavg()[0], "python": platform.python_version(),
                       "ggml": ggml_build()},
           "files": []}
    files = [SMOL, quantized(SMOL, "Q8_0", FTYPES["Q8_0"]), quantized(SMOL, "Q4_K_M", FTYPES["Q4_K_M"])]
    for i, path in enumerate(files):
        log(f"{path.name} ...")
        res["files"].append(bench_file(path, repeats, n_tokens, with_torch=i == 0))
    if not args.quick:
        log("seeded-random 1b Q4_K_M: max RSS ...")
        res["random_1b"] = bench_1b(64, repeats)
    res["machine"]["load_average_1m_at_end"] = os.getloadavg()[0]
    if not args.quick or args.out != RESULTS:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
        log(f"wrote {args.out}")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
