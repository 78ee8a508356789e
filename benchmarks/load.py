"""Load benchmark: 64 concurrent streams through one gateway for 2 minutes, on 3 namespace hosts.

    python benchmarks/load.py                 # writes benchmarks/results/load.json, prints markdown (~5 min)
    python benchmarks/load.py --quick         # 16 streams for 20 s (a smoke test, not a result)

Three network-namespace hosts (tests/netns.py), one `p2pllm join --strategy even` daemon each,
SmolLM2-135M-Instruct Q4_1 (../shared/models). A client inside the coordinator's namespace keeps
STREAMS streams busy through its gateway: each stream sends a greedy streaming `/v1/completions`
(one of 8 counting prompts, max_tokens 48) and the next as soon as one ends, for DURATION seconds. Every
chunk is stamped on arrival: time to first token (request sent -> first chunk) and the gaps
between chunks (inter-token latency). An answer must start as its prompt's solo answer (measured
first, one at a time) does: a mixed-up sequence would start as another's. Each daemon's peak
resident memory (VmHWM) is read at the end.

Then a burst: BURST requests at once (more than the engine runs plus its queue of 256): the ones
beyond the queue must be answered 429 with a Retry-After header, the rest 200.
Every namespace and process is removed at the end. Root only (network namespaces).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
RESULTS = ROOT / "benchmarks" / "results" / "load.json"
MODEL = ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
# counting: a continuation with wide margins (a story's first words can tip with the batch a step
# ran in), and each prompt's numbers are its own, so a token from another sequence would show
PROMPTS = [", ".join(str(a + k) for k in range(4)) + "," for a in (10, 200, 3000, 40, 500, 6000, 70, 800)]
MAX_TOKENS = 48
PREFIX = 40  # characters an answer must share with its prompt's solo answer


# =========================================================================== client (in a namespace)

def client_main(job: dict) -> None:
    import asyncio

    import httpx

    base = "http://127.0.0.1:8700/v1/completions"

    def body(prompt: str, max_tokens: int, stream: bool) -> dict:
        return {"model": job["model"], "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "stream": stream}

    async def one(http, prompt: str) -> dict:
        sent, times, text, status = time.time(), [], "", None
        async with http.stream("POST", base, json=body(prompt, MAX_TOKENS, True)) as r:
            status = r.status_code
            if status != 200:
                return {"prompt": prompt, "status": status, "error": (await r.aread()).decode()[:300]}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"prompt": prompt, "status": 200, "error": json.dumps(chunk["error"])[:300]}
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    times.append(time.time())
                    text += chunk["choices"][0]["text"]
        return {"prompt": prompt, "status": status, "sent": sent, "times": times, "text": text, "error": None}

    async def main() -> dict:
        limits = httpx.Limits(max_connections=job["burst"] + 16)
        async with httpx.AsyncClient(timeout=600, limits=limits) as http:
            solo = {}
            for p in PROMPTS:
                solo[p] = (await one(http, p))["text"]
            deadline = time.time() + job["duration"]
            results: list[dict] = []

            async def stream(k: int) -> None:
                i = k
                while time.time() < deadline:
                    results.append(await one(http, PROMPTS[i % len(PROMPTS)]))
                    i += job["streams"]

            t0 = time.time()
            await asyncio.gather(*(stream(k) for k in range(job["streams"])))
            wall = time.time() - t0

            async def burst_one(k: int) -> dict:
                r = await http.post(base, json=body(PROMPTS[k % len(PROMPTS)], 8, False))
                return {"status": r.status_code, "retry_after": r.headers.get("retry-after")}

            burst = await asyncio.gather(*(burst_one(k) for k in range(job["burst"])))
        return {"solo": solo, "results": results, "wall": wall, "burst": burst}

    print(json.dumps(asyncio.run(main())), flush=True)


# =========================================================================== cluster side

def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run(streams: int, duration: float, burst: int, log_dir: Path) -> dict:
    from clusterutil import join, wait_for_agreement
    from netns import Hosts
    from test_recovery import daemon_of, host_of

    with Hosts(3, log_dir=log_dir) as h:
        for i in (1, 2, 3):
            join(h, i, MODEL)
        view = wait_for_agreement(h, [1, 2, 3], n_layers=30, timeout=120)[0]
        head = host_of(h, view, view["coordinator"])
        job = {"model": MODEL.name, "streams": streams, "duration": duration, "burst": burst}
        proc = h.popen(head, [sys.executable, str(Path(__file__).resolve()), "--client", json.dumps(job)],
                       stderr=open(os.devnull, "w"))
        proc.wait(timeout=duration + 900)
        lines = Path(proc.log_path).read_text().strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"client failed: {lines[-5:]}")
        out = json.loads(lines[-1])
        rss = {f"h{i}": peak_rss_mb(daemon_of(h, i).pid) for i in (1, 2, 3)}
        layers = {f"h{host_of(h, view, p['id'])}": p["layers"] for p in view["peers"] if p["layers"]}
        logs = h.logs(tail=None)
    results = out["results"]
    ok = [r for r in results if r["status"] == 200 and not r["error"]]
    ttft = [r["times"][0] - r["sent"] for r in ok if r["times"]]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    mixed = [r for r in ok if r["text"][:PREFIX] != out["solo"][r["prompt"]][:PREFIX]]
    burst_codes: dict[str, int] = {}
    for b in out["burst"]:
        burst_codes[str(b["status"])] = burst_codes.get(str(b["status"]), 0) + 1
    return {
        "streams": streams, "duration_s": duration, "head": f"h{head}", "layers": layers,
        "requests": len(results), "answered": len(ok), "errors": len(results) - len(ok),
        "error_samples": [r.get("error") for r in results if r not in ok][:5],
        "mixed": len(mixed), "mixed_samples": [(r["prompt"], r["text"][:60]) for r in mixed[:3]],
        "solo": out["solo"],
        "tokens": sum(len(r["times"]) for r in ok), "tokens_per_s": sum(len(r["times"]) for r in ok) / out["wall"],
        "ttft_ms": {"p50": pct(ttft, 50) * 1e3, "p99": pct(ttft, 99) * 1e3, "n": len(ttft)},
        "itl_ms": {"p50": pct(itl, 50) * 1e3, "p99": pct(itl, 99) * 1e3, "n": len(itl)},
        "peak_rss_mb": rss,
        "burst": {"requests": burst, "status": burst_codes,
                  "retry_after_on_429": sorted({b["retry_after"] for b in out["burst"] if b["status"] == 429} - {None}),
                  "429_without_retry_after": sum(1 for b in out["burst"] if b["status"] == 429 and not b["retry_after"])},
        "lost_peers_logged": logs.count(") lost: "),
    }


def markdown(r: dict) -> str:
    rss = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["peak_rss_mb"].items()) if v)
    return "\n".join([
        "| streams | seconds | requests | errors | mixed | tok/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) "
        "| peak RSS per peer (MB) | burst: 200 / 429 |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {r['streams']} | {r['duration_s']:.0f} | {r['requests']} | {r['errors']} | {r['mixed']} "
        f"| {r['tokens_per_s']:.1f} | {r['ttft_ms']['p50']:.0f} / {r['ttft_ms']['p99']:.0f} "
        f"| {r['itl_ms']['p50']:.0f} / {r['itl_ms']['p99']:.0f} | {rss} "
        f"| {r['burst']['status'].get('200', 0)} / {r['burst']['status'].get('429', 0)} "
        f"(of {r['burst']['requests']}; Retry-After {', '.join(r['burst']['retry_after_on_429']) or '–'}) |",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="16 streams for 20 s (a smoke test)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--keep-logs", type=Path, default=None)
    ap.add_argument("--client", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        client_main(json.loads(args.client))
        return 0
    from netns import netns_available

    reason = netns_available()
    if reason or not MODEL.exists():
        print(f"skipped: {reason or f'{MODEL} is absent'}", file=sys.stderr)
        return 2
    import tempfile

    log_dir = args.keep_logs or Path(tempfile.mkdtemp(prefix="p2p-load-"))
    load_before = os.getloadavg()
    r = run(16 if args.quick else 64, 20 if args.quick else 120, 400, log_dir)
    r.update(when=time.strftime("%Y-%m-%d %H:%M:%S"), quick=args.quick, load_before=load_before,
             load_after=os.getloadavg(), cores=os.cpu_count())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(r, indent=1) + "\n")
    print(markdown(r))
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0 if r["errors"] == 0 and r["mixed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
