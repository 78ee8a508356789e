"""Quantized-native stages vs llama.cpp: speed, memory and tokens on real GGUF files.

    python benchmarks/gguf_stages.py            # writes benchmarks/results/gguf_stages.json, prints markdown
    python benchmarks/gguf_stages.py --quick    # one repeat, fewer tokens (a smoke test, not a result)

Measured side by side in one run, 2 threads each, on this machine:

- SmolLM2-135M-Instruct.Q4_1.gguf (../shared/models) and the Q8_0 and Q4_K_M files llama.cpp's
  own `llama_model_quantize` makes from it (`allow_requantize`; cached in benchmarks/.cache):
  greedy decode of 128 tokens and the prefill of a 128-token prompt, `p2pllm run`'s code path
  (`LocalPipeline`: ggml stage, f16 KV) vs llama.cpp (llama-cpp-python, f16 KV, flash attention),
  measurements interleaved, best of N; the torch backend (f32 dequantization: what a stage did
  before) on the Q4_1 file for comparison;
- tokens: greedy ids for 64 tokens (or to the end of text) on 5 prompts (3 chat-formatted, 2
  raw), whole and split in 3 stages, against llama.cpp's; and, as the yardstick, llama.cpp
  against itself with flash attention off (its other default: llama-cpp-python's);
- max RSS of a `p2pllm run` process (and of a llama.cpp process doing the same) per file;
- max RSS of `p2pllm run` on a seeded-random ~1.1B Llama (`make-demo-model --size 1b`, written
  F16, quantized by llama.cpp to Q4_K_M; cached) against the file's size.
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
CACHE = ROOT / "benchmarks" / ".cache"
RESULTS = ROOT / "benchmarks" / "results" / "gguf_stages.json"
THREADS = 2
FTYPES = {"Q8_0": 7, "Q4_K_M": 15}  # llama_ftype
CHAT = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis in one sentence."]
RAW = ["Once upon a time, in a small town by the sea, there lived", "The three most important inventions are"]
SPLIT = [10, 20]


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

    def decode(self, ids: list[int], n: int) -> float:
        out, t_first = 0, 0.0
        for _ in self.llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, reset=True):
            out += 1
            if out == 1:
                t_first = time.perf_counter()
            if out == n:
                break
        return (n - 1) / (time.perf_counter() - t_first)

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(ids)
        return len(ids) / (time.perf_counter() - t)

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


def p2pllm_rss(path: Path, backend: str = "auto", tokens: int = 128) -> tuple[int, dict]:
    rss, out = run_measured([sys.executable, "-m", "p2pllm", "run", "--model", str(path), "--prompt", RAW[0],
                             "--max-tokens", str(tokens), "--threads", str(THREADS), "--backend", backend, "--json"])
    return rss, json.loads(out)


LLAMA_SCRIPT = """
import sys, time, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=1024, n_threads=2, n_threads_batch=2, type_k=1, type_v=1,
                      flash_attn=True, verbose=False)
ids = llm.tokenize(sys.argv[2].encode(), add_bos=True)
n, t0 = 0, 0.0
for _ in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0):
    n += 1
    if n == 1:
        t0 = time.perf_counter()
    if n == int(sys.argv[3]):
        break
print((n - 1) / (time.perf_counter() - t0))
"""


def llama_rss(path: Path, tokens: int = 128) -> tuple[int, float]:
    rss, out = run_measured([sys.executable, "-c", LLAMA_SCRIPT, str(path), RAW[0], str(tokens)])
    return rss, float(out.strip().splitlines()[-1])


def bench_file(path: Path, repeats: int, n_tokens: int, with_torch: bool) -> dict:
    from p2pllm.runtime.local import LocalPipeline

    pipe = LocalPipeline(str(path), threads=THREADS)
    ref = LlamaCpp(path)
    ids, long_ids = pipe.tokenizer.encode(RAW[0]), long_prompt(pipe.tokenizer, 128)
    pipe.generate(ids, max_tokens=4, ignore_eos=True)  # warm-up (graphs, page faults)
    ref.decode(ids, 4)
    r: dict = {"file": path.name, "file_bytes": path.stat().st_size, "llama_cpp_python": ref.version,
               "decode_tokens": n_tokens, "ours_decode": [], "llama_cpp_decode": [], "ours_prefill128": [],
               "llama_cpp_prefill128": []}
    for i in range(repeats):
        r["ours_decode"].append(pipe.generate(ids, max_tokens=n_tokens, ignore_eos=True).decode_tokens_per_s)
        r["llama_cpp_decode"].append(ref.decode(ids, n_tokens))
        r["ours_prefill128"].append(pipe.generate(long_ids, max_tokens=1, ignore_eos=True).prefill_tokens_per_s)
        r["llama_cpp_prefill128"].append(ref.prefill(long_ids))
        log(f"  {path.name} {i + 1}/{repeats}: decode ours {r['ours_decode'][-1]:.1f} vs llama.cpp "
            f"{r['llama_cpp_decode'][-1]:.1f} tok/s; prefill ours {r['ours_prefill128'][-1]:.0f} vs "
            f"{r['llama_cpp_prefill128'][-1]:.0f} tok/s")
    if with_torch:
        before = LocalPipeline(str(path), backend="torch", threads=THREADS)
        import torch

        torch.set_num_threads(THREADS)
        r["torch_backend_decode"] = [before.generate(ids, max_tokens=n_tokens, ignore_eos=True).decode_tokens_per_s
                                     for _ in range(max(1, repeats // 2))]
        del before
    # tokens: whole and split in 3, against llama.cpp
    split = LocalPipeline(str(path), SPLIT, threads=THREADS)
    other = LlamaCpp(path, flash_attn=False)
    r["fidelity"] = {"tokens": 64, "prompts": len(CHAT) + len(RAW), "equal_whole": 0, "equal_split": 0,
                     "llama_cpp_fa_off_equal_fa_on": 0, "first_difference": []}
    for p in prompts(pipe.tokenizer):
        want = ref.greedy(p, 64)
        r["fidelity"]["llama_cpp_fa_off_equal_fa_on"] += other.greedy(p, 64) == want
        for key, pl in (("equal_whole", pipe), ("equal_split", split)):
            got = pl.generate(p, max_tokens=64).ids
            got = got[:-1] if got and got[-1] == pipe.tokenizer.eos_id else got
            same = got == want
            r["fidelity"][key] += same
            if not same:
                at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                r["fidelity"]["first_difference"].append({"config": key, "prompt_tokens": len(p), "at": at})
    del pipe, split, ref, other
    rss, out = p2pllm_rss(path)
    r["ours_max_rss"], r["ours_run_decode"] = rss, out["decode_tokens_per_s"]
    r["llama_cpp_max_rss"], r["llama_cpp_run_decode"] = llama_rss(path)
    if with_torch:
        r["torch_backend_max_rss"] = p2pllm_rss(path, "torch")[0]
    r["best"] = {k: max(r[k]) for k in ("ours_decode", "llama_cpp_decode", "ours_prefill128", "llama_cpp_prefill128")}
    r["median"] = {k: statistics.median(r[k]) for k in r["best"]}
    r["ratios"] = {"decode": r["best"]["ours_decode"] / r["best"]["llama_cpp_decode"],
                   "prefill128": r["best"]["ours_prefill128"] / r["best"]["llama_cpp_prefill128"]}
    if with_torch:
        r["ratios"]["torch_backend_decode"] = max(r["torch_backend_decode"]) / r["best"]["llama_cpp_decode"]
    return r


def bench_1b(n_tokens: int) -> dict:
    path = random_1b()
    rss, out = p2pllm_rss(path, tokens=n_tokens)
    llama_rss_bytes, llama_tps = llama_rss(path, n_tokens)
    size = path.stat().st_size
    return {"file": path.name, "file_bytes": size, "ours_max_rss": rss, "ours_decode": out["decode_tokens_per_s"],
            "llama_cpp_max_rss": llama_rss_bytes, "llama_cpp_decode": llama_tps,
            "ours_rss_over_file_bytes": rss - size}


def markdown(res: dict) -> str:
    mb = 1e6
    rows = ["| file | decode tok/s: ours / llama.cpp | ratio (goal ≥ 0.8) | prefill-128 tok/s: ours / llama.cpp "
            "| ratio (goal ≥ 0.5) | tokens = llama.cpp: whole, split in 3 (goal ≥ 4/5); llama.cpp FA off = on "
            "| max RSS MB: ours / llama.cpp |",
            "|---|---|---|---|---|---|---|"]
    for r in res["files"]:
        b, q, f = r["best"], r["ratios"], r["fidelity"]
        rows.append(f"| {r['file']} ({r['file_bytes'] / mb:.0f} MB) | {b['ours_decode']:.1f} / {b['llama_cpp_decode']:.1f} "
                    f"| **{q['decode']:.2f}x** | {b['ours_prefill128']:.0f} / {b['llama_cpp_prefill128']:.0f} "
                    f"| **{q['prefill128']:.2f}x** | {f['equal_whole']}/{f['prompts']}, {f['equal_split']}/{f['prompts']}; "
                    f"{f['llama_cpp_fa_off_equal_fa_on']}/{f['prompts']} "
                    f"| {r['ours_max_rss'] / mb:.0f} / {r['llama_cpp_max_rss'] / mb:.0f} |")
    first = res["files"][0]
    if "torch_backend_decode" in first:
        rows.append(f"| {first['file']}, torch backend (f32 dequantization, before) | "
                    f"{max(first['torch_backend_decode']):.1f} / {first['best']['llama_cpp_decode']:.1f} "
                    f"| {first['ratios']['torch_backend_decode']:.2f}x | | | | {first['torch_backend_max_rss'] / mb:.0f} / – |")
    if "random_1b" in res:
        r = res["random_1b"]
        rows.append(f"| {r['file']} (seeded-random 1.1B, {r['file_bytes'] / mb:.0f} MB) | {r['ours_decode']:.1f} / "
                    f"{r['llama_cpp_decode']:.1f} | {r['ours_decode'] / r['llama_cpp_decode']:.2f}x | | | "
                    f"| {r['ours_max_rss'] / mb:.0f} / {r['llama_cpp_max_rss'] / mb:.0f} "
                    f"(file + **{r['ours_rss_over_file_bytes'] / mb:.0f}**; goal ≤ file + 600) |")
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
                       "load_average_1m_at_start": os.getloadavg()[0], "python": platform.python_version()},
           "files": []}
    files = [SMOL, quantized(SMOL, "Q8_0", FTYPES["Q8_0"]), quantized(SMOL, "Q4_K_M", FTYPES["Q4_K_M"])]
    for i, path in enumerate(files):
        log(f"{path.name} ...")
        res["files"].append(bench_file(path, repeats, n_tokens, with_torch=i == 0))
    if not args.quick:
        log("seeded-random 1b Q4_K_M: max RSS ...")
        res["random_1b"] = bench_1b(32)
    res["machine"]["load_average_1m_at_end"] = os.getloadavg()[0]
    if not args.quick or args.out != RESULTS:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
        log(f"wrote {args.out}")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
