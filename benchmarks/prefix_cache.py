"""Cache benchmark: time to first token of a chat's second turn over a ~1,000-token history, with
the prefix cache (the default) and without (`--prefix-cache 0`); and a question asked again (the
gateway's response cache).

    python benchmarks/prefix_cache.py           # writes benchmarks/results/prefix_cache.json, prints a table
    python benchmarks/prefix_cache.py --quick   # 2 conversations (a smoke test, not a result)

Two 2-peer loopback clusters (`p2pllm join --strategy even`, one stage each) serve
SmolLM2-135M-Instruct (Q4_1 GGUF, the shared test model); they take turns conversation by
conversation so both see the same machine. A conversation: a system prompt and a user message
holding a story of ~1,000 tokens (a different part of the demo corpus each time, so no earlier
conversation helps), a greedy answer, then a short follow-up question with the whole history. Every
request streams through the non-coordinator's gateway (forwarded to the coordinator, as a user on
another peer would be); TTFT is from sending the request to the first content chunk; the usage
chunk says how many prompt tokens came from the cache. Then each conversation's first request is
sent again, unchanged: the response cache (on in both clusters, `join`'s default) answers it
without the ring; its time is compared with the first asking's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch import uptime  # noqa: E402
from ring import machine, start_cluster  # noqa: E402  (the ring benchmark's loopback cluster)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "prefix_cache.json"
MODEL = ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS = ROOT / "p2pllm" / "model" / "data" / "demo_corpus.txt"
STORY_CHARS = 3500  # ~970 SmolLM2 tokens: with the chat template and the answer, a ~1,000-token history
SYSTEM = "You are a careful reader. Answer questions about the story in one or two sentences."


def chat(base: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed greedy chat completion: its text, TTFT, total time and usage."""
    body = {"model": MODEL.name, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, text, usage = None, [], None
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=300) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
        cache = r.headers.get("x-p2pllm-cache")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    ttft = ttft or time.perf_counter() - t0
                    text.append(piece)
    return {"ttft": ttft, "seconds": time.perf_counter() - t0, "text": "".join(text), "usage": usage,
            "response_cache": cache}


def conversation(base: str, story: str, max_tokens: int) -> dict:
    history = [{"role": "system", "content": SYSTEM},
               {"role": "user", "content": f"Here is a story.\n\n{story}\n\nWho is the story about?"}]
    first = chat(base, history, max_tokens)
    history += [{"role": "assistant", "content": first["text"]},
                {"role": "user", "content": "What happens at the end of the story?"}]
    second = chat(base, history, max_tokens)
    again = chat(base, history[:2], max_tokens)  # the first question once more: the response cache's
    if again["text"] != first["text"] or again["response_cache"] != "hit":
        raise RuntimeError(f"the question asked again was not a response-cache hit ({again['response_cache']})")
    return {"first": first, "second": second, "again": again}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 conversations per configuration")
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    n = 2 if args.quick else args.conversations
    if not MODEL.exists():
        print(f"{MODEL} is absent (the shared test models live beside the checkout)", file=sys.stderr)
        return 2
    corpus = CORPUS.read_text()
    stories = [corpus[i * STORY_CHARS: (i + 1) * STORY_CHARS] for i in range(len(corpus) // STORY_CHARS)]
    if n > len(stories):
        print(f"at most {len(stories)} conversations (the corpus has that many distinct stories)", file=sys.stderr)
        return 2
    load_before = uptime()
    runs: dict[str, list[dict]] = {"cache": [], "no cache": []}
    with tempfile.TemporaryDirectory(prefix="p2pllm-prefix-bench-") as tmp:
        clusters = {}
        try:
            for tag, extra in (("cache", []), ("no cache", ["--prefix-cache", "0"])):
                clusters[tag] = start_cluster(MODEL, 2, extra=["--strategy", "even", *extra],
                                              secret="prefix-benchmark-secret-0123456789", log_dir=Path(tmp),
                                              tag=tag.replace(" ", "-"))
            for i in range(n):
                for tag, c in clusters.items():
                    base = f"http://127.0.0.1:{c.gw[1 - c.head]}"
                    run = conversation(base, stories[i], args.max_tokens)
                    runs[tag].append(run)
                    print(f"{tag} #{i + 1}: turn 2 TTFT {run['second']['ttft']:.3f}s, cached "
                          f"{run['second']['usage']['prompt_tokens_details']['cached_tokens']} of "
                          f"{run['second']['usage']['prompt_tokens']}", file=sys.stderr, flush=True)
        finally:
            for c in clusters.values():
                c.close()
    res = {"benchmark": "prefix_cache", "quick": args.quick, "model": MODEL.name, "peers": 2,
           "conversations": n, "max_tokens": args.max_tokens, "machine": machine(), "uptime_before": load_before,
           "uptime_after": uptime(), "configs": {}}
    for tag, rs in runs.items():
        res["configs"][tag] = {
            "turn1_ttft_median": round(statistics.median(r["first"]["ttft"] for r in rs), 4),
            "turn2_ttft_median": round(statistics.median(r["second"]["ttft"] for r in rs), 4),
            "turn2_prompt_tokens_median": statistics.median(r["second"]["usage"]["prompt_tokens"] for r in rs),
            "turn2_cached_tokens_median": statistics.median(
                r["second"]["usage"]["prompt_tokens_details"]["cached_tokens"] for r in rs),
            "first_seconds_median": round(statistics.median(r["first"]["seconds"] for r in rs), 4),
            "again_seconds_median": round(statistics.median(r["again"]["seconds"] for r in rs), 4),
            "runs": [{turn: {"ttft": round(r[turn]["ttft"], 4), "seconds": round(r[turn]["seconds"], 4),
                             "usage": r[turn]["usage"], "text": r[turn]["text"]}
                      for turn in ("first", "second", "again")} for r in rs],
        }
    on, off = res["configs"]["cache"], res["configs"]["no cache"]
    res["turn2_ttft_speedup"] = round(off["turn2_ttft_median"] / on["turn2_ttft_median"], 2)
    res["asked_again_speedup"] = round(on["first_seconds_median"] / on["again_seconds_median"], 1)
    res["answers_differing"] = sum(a[t]["text"] != b[t]["text"] for a, b in zip(runs["cache"], runs["no cache"])
                                   for t in ("first", "second"))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    return 0


def markdown(res: dict) -> str:
    m, on = res["machine"], res["configs"]["cache"]
    load = res["uptime_before"].split("load average:")[-1].strip()
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores; load before: `{load}` (1/5/15 min); {res['model']} on "
             f"{res['peers']} loopback peers (one stage each); {res['conversations']} conversations per "
             f"configuration, greedy, {res['max_tokens']} tokens per answer, medians.", "",
             "| | turn 1 TTFT | turn 2 prompt tokens | of them cached | turn 2 TTFT |", "|---|---|---|---|---|"]
    for tag, x in res["configs"].items():
        lines.append(f"| {tag} | {x['turn1_ttft_median']:.3f} s | {x['turn2_prompt_tokens_median']:.0f} | "
                     f"{x['turn2_cached_tokens_median']:.0f} | {x['turn2_ttft_median']:.3f} s |")
    lines += ["", f"Second turn's time to first token, without / with the cache: **{res['turn2_ttft_speedup']:.1f}x** "
                  f"(goal >= 5x). Answers that differ between the two: {res['answers_differing']} of "
                  f"{2 * res['conversations']}.", "",
              f"The first question asked again (a response-cache hit, every time): "
              f"{on['again_seconds_median'] * 1000:.1f} ms for the whole answer against "
              f"{on['first_seconds_median']:.2f} s the first time (**{res['asked_again_speedup']:.0f}x**)."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
