"""Replan load benchmark: what a survivor pays to load its new layer range after a plan change,
taking the layers it holds from its old stage (what the daemon does) against loading the whole
range again (what it did before).

    python benchmarks/replan_load.py                 # writes benchmarks/results/replan_load.json, prints a table
    python benchmarks/replan_load.py --model FILE.gguf --repeats 1

Cases, for a model of n layers split evenly: the first survivor of a 3 -> 2 replan ([0, n/3) ->
[0, n/2)), the last one ([2n/3, n) -> [n/2, n)), and a peer whose range shrinks when a third
rejoins ([0, n/2) -> [0, n/3)). Each measurement is a fresh process: it opens the old stage with
`open_stage` (the daemon's code path), drops the file's page cache (`posix_fadvise DONTNEED`;
pages the old stage maps stay), then opens the new stage, either `shared=layers_to_share(old,
...)` or from scratch, and reports the load's seconds, the bytes it read, how much the process's
resident memory grew while both stages exist, and what it holds once the old one is closed.
Modes alternate within each repeat so that the machine's background load hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ring import machine  # after the path: the ring benchmark's helper

RESULTS = Path(__file__).resolve().parent / "results" / "replan_load.json"
MODELS = [Path.home() / ".cache" / "p2pllm" / "demo-3b.Q4_K_M.gguf",  # benchmarks/mission.py makes it
          Path(__file__).resolve().parents[1].parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"]
MiB = 2**20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def one(model: Path, old: tuple[int, int], new: tuple[int, int], mode: str) -> dict:
    """One measurement, in this (fresh) process."""
    import gc

    from p2pllm.model.backends import layers_to_share, open_stage
    from p2pllm.model.spec import read_spec

    spec = read_spec(model)
    drop_cache(model)
    before = rss()
    stage = open_stage(model, *old, spec=spec)
    serving = rss() - before
    drop_cache(model)
    shared = layers_to_share(stage, *new) if mode == "shared" else None
    t0 = time.perf_counter()
    fresh = open_stage(model, *new, spec=spec, shared=shared)
    seconds = time.perf_counter() - t0
    both = rss() - before
    del shared
    stage.close()
    del stage
    gc.collect()
    after = rss() - before
    return {"mode": mode, "old": old, "new": new, "seconds": round(seconds, 3), "read_bytes": fresh.loaded_bytes,
            "weight_bytes": fresh.weight_bytes, "old_rss": serving, "both_rss": both, "after_rss": after}


def cases(n: int) -> list[tuple[str, tuple[int, int], tuple[int, int]]]:
    third, half = n // 3, n // 2
    return [("first survivor, 3 -> 2 peers", (0, third), (0, half)),
            ("last survivor, 3 -> 2 peers", (n - third, n), (half, n)),
            ("shrinks, 2 -> 3 peers", (0, half), (0, third))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=next((m for m in MODELS if m.exists()), MODELS[-1]))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        job = json.loads(args.one)
        print(json.dumps(one(Path(job["model"]), tuple(job["old"]), tuple(job["new"]), job["mode"])))
        return 0
    if not args.model.exists():
        print(f"replan_load: no model at {args.model} (python benchmarks/mission.py --make-model makes the default)",
              file=sys.stderr)
        return 2
    from p2pllm.model.spec import read_spec

    n = read_spec(args.model).n_layers
    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(), "model": args.model.name,
           "model_bytes": args.model.stat().st_size, "n_layers": n, "load_at_start": os.getloadavg(), "runs": []}
    for name, old, new in cases(n):
        for r in range(args.repeats):
            for mode in (("shared", "whole") if r % 2 == 0 else ("whole", "shared")):
                job = json.dumps({"model": str(args.model), "old": old, "new": new, "mode": mode})
                out = subprocess.run([sys.executable, __file__, "--one", job], capture_output=True, text=True,
                                     check=True, timeout=600)
                run = {"case": name, **json.loads(out.stdout.strip().splitlines()[-1])}
                res["runs"].append(run)
                print(f"{name} [{mode}]: {run['seconds']:.2f} s, read {run['read_bytes'] / MiB:.0f} MiB", flush=True)
    res["load_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(table(res))
    return 0


def table(res: dict) -> str:
    rows = ["| case | layers: old -> new | load s: kept / whole (median) | MiB read: kept / whole | "
            "resident MiB while both exist: kept / whole | resident MiB after: kept / whole |",
            "|---|---|---|---|---|---|"]
    for name, old, new in cases(res["n_layers"]):
        by = {m: [r for r in res["runs"] if r["case"] == name and r["mode"] == m] for m in ("shared", "whole")}

        def med(key: str, mode: str, scale: float = 1.0) -> float:
            return statistics.median(r[key] for r in by[mode]) / scale

        rows.append(f"| {name} | [{old[0]}, {old[1]}) -> [{new[0]}, {new[1]}) | "
                    f"**{med('seconds', 'shared'):.2f}** / {med('seconds', 'whole'):.2f} | "
                    f"{med('read_bytes', 'shared', MiB):.0f} / {med('read_bytes', 'whole', MiB):.0f} | "
                    f"{med('both_rss', 'shared', MiB):.0f} / {med('both_rss', 'whole', MiB):.0f} | "
                    f"{med('after_rss', 'shared', MiB):.0f} / {med('after_rss', 'whole', MiB):.0f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
