"""What constrained decoding costs: decode tokens/s of SmolLM2-135M-Instruct (Q4_1, one process,
the ggml backend) with and without a JSON schema on the answer.

    python benchmarks/structured.py          # writes benchmarks/results/structured.json, prints markdown
    python benchmarks/structured.py --quick  # fewer rounds (a smoke test, not a result)

The schema asks for a string of at least 2000 characters, so neither run can end before 128
tokens (the unconstrained one ignores end-of-text): both decode exactly 128. Runs alternate, best
of N per arm: other processes only slow a run down.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from p2pllm.model.grammar import grammar_for_response_format
from p2pllm.model.sampling import SamplingParams
from p2pllm.runtime.local import LocalPipeline

RESULTS = Path(__file__).resolve().parent / "results" / "structured.json"
MODEL = Path(__file__).resolve().parents[2] / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SCHEMA = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40},
                                           "story": {"type": "string", "minLength": 2000}},
          "required": ["title", "story"], "additionalProperties": False}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    rounds = 2 if args.quick else args.rounds
    pipe = LocalPipeline(str(MODEL))
    prompt = pipe.tokenizer.encode_chat([{"role": "user", "content": "Write a short story about a lighthouse."}])
    grammar = grammar_for_response_format({"type": "json_schema", "json_schema": {"name": "story", "schema": SCHEMA}})
    constrained = SamplingParams(grammar=grammar)
    n = 128
    first = pipe.generate(prompt, max_tokens=n, sampling=constrained)  # warm-up
    assert first.text.startswith('{"title": "'), first.text
    best = {"schema": 0.0, "none": 0.0}
    t0 = time.time()
    for _ in range(rounds):
        for arm, sampling in (("schema", constrained), ("none", SamplingParams())):
            res = pipe.generate(prompt, max_tokens=n, sampling=sampling, ignore_eos=arm == "none")
            assert len(res.ids) == n, (arm, len(res.ids), n)
            best[arm] = max(best[arm], res.decode_tokens_per_s)
    result = {
        "model": MODEL.name, "tokens": n, "rounds": rounds, "seconds": round(time.time() - t0, 1),
        "decode_tokens_per_s": {k: round(v, 2) for k, v in best.items()},
        "ratio_schema_vs_none": round(best["schema"] / best["none"], 3),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_avg_1m": round(os.getloadavg()[0], 2)},
    }
    if not args.quick:
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print("| decode, greedy, %d tokens | tok/s (best of %d) |\n|---|---|" % (n, rounds))
    print(f"| no schema | {best['none']:.1f} |\n| JSON schema (llguidance mask) | {best['schema']:.1f} |")
    print(f"| ratio | {result['ratio_schema_vs_none']:.2f}x |")


if __name__ == "__main__":
    main()
