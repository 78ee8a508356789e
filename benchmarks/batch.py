"""Batch benchmark: `p2pllm batch` tasks/s with --max-concurrent 1 vs 16 on a 2-peer loopback cluster.

    python benchmarks/batch.py            # writes benchmarks/results/batch.json, prints a markdown table
    python benchmarks/batch.py --quick    # fewer documents (a smoke test, not a result)

Two `p2pllm join` daemons on free loopback ports serve SmolLM2-135M-Instruct (Q4_1 GGUF, the shared
test model) with `--strategy even`, one stage each. The same folder of short documents x one
template goes through the real CLI (`python -m p2pllm batch`, greedy, the same --max-tokens) once
per concurrency, alternating, so both see the same machine. Greedy answers are the same at either
concurrency, so both runs do the same work; what changes is how full each ring step is: the
coordinator's scheduler puts every running sequence of a micro-batch into one frame, so with 16
requests in flight a stage computes many sequences per frame (stage frames per generated token
drops) instead of one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ring import machine, start_cluster  # noqa: E402  (the ring benchmark's loopback cluster)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "batch.json"
MODEL = ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEMPLATE = "Summarize {filename} in one sentence: {content}"
TOPICS = ["a bakery", "a river", "a library", "a train", "a garden", "a bridge", "a market", "a school",
          "a harbour", "a forest", "a museum", "a farm", "a lighthouse", "a castle", "a bicycle", "a kitchen"]


def write_documents(folder: Path, n: int) -> None:
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        (folder / f"note{i:02d}.txt").write_text(
            f"Note {i} is about {topic}. The town council visited {topic} on day {i + 1} and wrote down what they "
            f"saw: people at work, the weather, and a list of repairs that should be made before winter.\n")


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_batch(docs: Path, out: Path, gateway: int, concurrency: int, max_tokens: int) -> dict:
    for stale in (out, Path(str(out) + ".jsonl")):
        stale.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "p2pllm", "batch", "--input", str(docs), "--output", str(out),
                           "--host", f"127.0.0.1:{gateway}", "--prompt", TEMPLATE, "--max-tokens", str(max_tokens),
                           "--max-concurrent", str(concurrency)], capture_output=True, text=True, cwd=ROOT,
                          timeout=1800)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"batch --max-concurrent {concurrency} failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads(out.read_text())
    return {"max_concurrent": concurrency, "tasks": result["total_tasks"], "successful": result["successful"],
            "tasks_per_second": result["tasks_per_second"], "total_time_seconds": result["total_time_seconds"],
            "process_seconds": round(wall, 3),
            "completion_tokens": sum(r["completion_tokens"] for r in result["results"]),
            "prompt_tokens": sum(r["prompt_tokens"] for r in result["results"]),
            "responses": [r["response"] for r in result["results"]]}


def frames(cluster) -> float:
    return sum(m.get("frames", 0.0) for m in cluster.metrics())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 documents, 1 repeat")
    ap.add_argument("--documents", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    n_docs, repeats = (8, 1) if args.quick else (args.documents, args.repeats)
    if not MODEL.exists():
        print(f"{MODEL} is absent (the shared test models live beside the checkout)", file=sys.stderr)
        return 2
    load_before = uptime()
    with tempfile.TemporaryDirectory(prefix="p2pllm-batch-bench-") as tmp:
        tmp_path = Path(tmp)
        docs = tmp_path / "docs"
        docs.mkdir()
        write_documents(docs, n_docs)
        with start_cluster(MODEL, 2, extra=["--strategy", "even"], secret="batch-benchmark-secret-0123456789",
                           log_dir=tmp_path, tag="batch") as cluster:
            gateway = cluster.gw[1 - cluster.head]  # the non-coordinator's gateway: requests are forwarded
            runs: dict[int, list[dict]] = {1: [], 16: []}
            for _ in range(repeats):
                for c in (1, 16):
                    before, load = frames(cluster), os.getloadavg()[0]
                    run = run_batch(docs, tmp_path / f"out-{c}.json", gateway, c, args.max_tokens)
                    run["stage_frames"] = frames(cluster) - before
                    run["load_1min_before"] = round(load, 2)
                    runs[c].append(run)
                    print(f"--max-concurrent {c}: {run['tasks_per_second']:.3f} tasks/s "
                          f"({run['total_time_seconds']:.1f}s)", file=sys.stderr, flush=True)
    res = {"benchmark": "batch", "quick": args.quick, "model": MODEL.name, "peers": 2, "documents": n_docs,
           "template": TEMPLATE, "max_tokens": args.max_tokens, "repeats": repeats, "machine": machine(),
           "uptime_before": load_before, "uptime_after": uptime(), "configs": {}}
    for c, rs in runs.items():
        res["configs"][str(c)] = {
            "max_concurrent": c,
            "tasks_per_second_median": statistics.median(r["tasks_per_second"] for r in rs),
            "tasks_per_second_best": max(r["tasks_per_second"] for r in rs),
            "total_time_seconds_median": statistics.median(r["total_time_seconds"] for r in rs),
            "stage_frames_per_completion_token": round(
                statistics.median(r["stage_frames"] / max(r["completion_tokens"], 1) for r in rs), 3),
            "runs": [{k: v for k, v in r.items() if k != "responses"} for r in rs],
        }
    one, many = res["configs"]["1"], res["configs"]["16"]
    res["speedup_16_vs_1"] = round(many["tasks_per_second_median"] / one["tasks_per_second_median"], 2)
    res["speedup_16_vs_1_best"] = round(many["tasks_per_second_best"] / one["tasks_per_second_best"], 2)
    # batched and single-sequence kernels may round differently, which can flip a near-tie in greedy decoding
    res["answers_differing_16_vs_1"] = sum(a != b for a, b in zip(runs[1][0]["responses"], runs[16][0]["responses"]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    return 0


def markdown(res: dict) -> str:
    m = res["machine"]
    load = res["uptime_before"].split("load average:")[-1].strip()
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores; load before: `{load}` (1/5/15 min); {res['documents']} "
             f"documents x 1 template, {res['max_tokens']} max tokens, greedy, median of {res['repeats']}; "
             f"{res['model']} on {res['peers']} loopback peers (one stage each).", "",
             "| --max-concurrent | tasks/s (median) | tasks/s (best) | total s (median) | completion tokens "
             "| stage frames per token | 1-min load before each run |",
             "|---|---|---|---|---|---|---|"]
    for c in ("1", "16"):
        x = res["configs"][c]
        loads = ", ".join(f"{r['load_1min_before']:.1f}" for r in x["runs"])
        lines.append(f"| {c} | {x['tasks_per_second_median']:.3f} | {x['tasks_per_second_best']:.3f} | "
                     f"{x['total_time_seconds_median']:.1f} | {x['runs'][0]['completion_tokens']} | "
                     f"{x['stage_frames_per_completion_token']:.2f} | {loads} |")
    lines += ["", f"16 vs 1: **{res['speedup_16_vs_1']:.2f}x** tasks/s at the median, "
                  f"{res['speedup_16_vs_1_best']:.2f}x best against best; answers that differ between the two: "
                  f"{res['answers_differing_16_vs_1']} of {res['documents']}."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
