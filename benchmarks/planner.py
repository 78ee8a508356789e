"""Planner benchmark: predicted ms/token of optimal vs proportional (exo) vs even on simulated
heterogeneous laptop clusters, and how far the >8-peer heuristic is from exhaustive search.

    python benchmarks/planner.py            # writes benchmarks/results/planner.json, prints markdown

Everything is seeded; the numbers are the planner's own predictions (its cost model), so this
measures the search and the split, not the cost model's accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from pathlib import Path

from p2pllm.cluster.planner import GiB, Links, PeerCaps, PlanOptions, plan
from p2pllm.model.spec import resolve_spec

# link kinds: (name, bytes/s, round trip to the switch / access point in seconds)
LINKS = [
    ("wifi-100M", 100e6 / 8, 6e-3),
    ("wifi-500M", 500e6 / 8, 3e-3),
    ("gbe", 1e9 / 8, 0.5e-3),
    ("10gbe", 10e9 / 8, 0.2e-3),
]
RAM_GIB = [8, 16, 16, 24, 32, 32, 36, 48, 64]
USABLE = 0.75  # what a laptop can give a model after the OS and the user's apps
MODELS = [("llama-3-8b", "q4_0"), ("llama-3-8b", "f16"), ("llama-3-70b", "q4_0"), ("llama-3-70b", "f16")]
OBJECTIVES = ("latency", "throughput")


def log_uniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def random_cluster(seed: int, n: int) -> list[PeerCaps]:
    rng = random.Random(seed)
    peers = []
    for i in range(n):
        link = rng.choice(LINKS)
        peers.append(
            PeerCaps(
                id=f"c{seed}p{i}",
                name=f"laptop{i}-{link[0]}",
                mem_bytes=int(rng.choice(RAM_GIB) * GiB * USABLE),
                flops=log_uniform(rng, 0.5e12, 20e12),
                mem_bw=log_uniform(rng, 50e9, 400e9),
                net_bw=link[1],
                rtt_s=link[2],
            )
        )
    return peers


def geomean(xs: list[float]) -> float | None:
    return math.exp(statistics.fmean(math.log(x) for x in xs)) if xs else None


def compare_strategies(clusters: dict[int, list[PeerCaps]]) -> dict:
    specs = {name: resolve_spec(name) for name, _ in MODELS}
    rows = []
    for seed, peers in clusters.items():
        for name, dtype in MODELS:
            for objective in OBJECTIVES:
                row = {"cluster": seed, "peers": len(peers), "model": name, "dtype": dtype, "objective": objective}
                for strategy in ("optimal", "proportional", "even"):
                    t = time.perf_counter()
                    p = plan(specs[name], peers, Links(), PlanOptions(dtype=dtype, objective=objective, strategy=strategy))
                    row[strategy] = {
                        "feasible": p.feasible,
                        "objective_ms": p.objective_ms if p.feasible else None,
                        "ms_per_token": p.ms_per_token if p.feasible else None,
                        "tokens_per_s_pipelined": p.tokens_per_s_pipelined if p.feasible else None,
                        "stages": len(p.stages) if p.feasible else 0,
                        "seconds": time.perf_counter() - t,
                    }
                rows.append(row)
    summary = []
    for name, dtype in MODELS:
        for objective in OBJECTIVES:
            sel = [r for r in rows if r["model"] == name and r["dtype"] == dtype and r["objective"] == objective]
            entry = {"model": name, "dtype": dtype, "objective": objective, "instances": len(sel),
                     "optimal_feasible": sum(r["optimal"]["feasible"] for r in sel)}
            for base in ("proportional", "even"):
                both = [r for r in sel if r["optimal"]["feasible"] and r[base]["feasible"]]
                ratios = [r[base]["objective_ms"] / r["optimal"]["objective_ms"] for r in both]
                entry[base] = {
                    "feasible": sum(r[base]["feasible"] for r in sel),
                    "compared": len(both),
                    "geomean_ratio": geomean(ratios),
                    "min_ratio": min(ratios) if ratios else None,
                    "max_ratio": max(ratios) if ratios else None,
                    "infeasible_but_optimal_fits": sum(r["optimal"]["feasible"] and not r[base]["feasible"] for r in sel),
                }
            entry["optimal_stages_mean"] = statistics.fmean(r["optimal"]["stages"] for r in sel if r["optimal"]["feasible"]) if entry["optimal_feasible"] else None
            summary.append(entry)
    overall = {}
    for base in ("proportional", "even"):
        for objective in OBJECTIVES:
            ratios = [r[base]["objective_ms"] / r["optimal"]["objective_ms"] for r in rows
                      if r["objective"] == objective and r["optimal"]["feasible"] and r[base]["feasible"]]
            overall[f"{base}/{objective}"] = {"geomean_ratio": geomean(ratios), "compared": len(ratios)}
    return {"rows": rows, "summary": summary, "overall": overall}


def heuristic_gap(clusters: dict[int, list[PeerCaps]]) -> dict:
    """Force the heuristic (exhaustive_limit=0) where exhaustive search is still computable."""
    spec = resolve_spec("llama-3-70b")
    rows = []
    for seed, peers in clusters.items():
        for dtype in ("q4_0", "f16"):
            for objective in OBJECTIVES:
                t = time.perf_counter()
                exact = plan(spec, peers, None, PlanOptions(dtype=dtype, objective=objective))
                t_exact = time.perf_counter() - t
                t = time.perf_counter()
                heur = plan(spec, peers, None, PlanOptions(dtype=dtype, objective=objective, exhaustive_limit=0))
                t_heur = time.perf_counter() - t
                if not exact.feasible:
                    assert not heur.feasible
                    continue
                rows.append({"cluster": seed, "peers": len(peers), "dtype": dtype, "objective": objective,
                             "gap": heur.objective_ms / exact.objective_ms - 1, "exact_s": t_exact, "heuristic_s": t_heur})
    gaps = [r["gap"] for r in rows]
    return {
        "rows": rows,
        "instances": len(rows),
        "identical": sum(g <= 1e-9 for g in gaps),
        "mean_gap": statistics.fmean(gaps) if gaps else None,
        "max_gap": max(gaps) if gaps else None,
        "exact_s_median": statistics.median(r["exact_s"] for r in rows) if rows else None,
        "exact_s_max": max(r["exact_s"] for r in rows) if rows else None,
        "heuristic_s_median": statistics.median(r["heuristic_s"] for r in rows) if rows else None,
    }


def large_clusters(clusters: dict[int, list[PeerCaps]]) -> dict:
    """9-10 peers: the heuristic runs for real; report its time and its edge over the baselines."""
    spec = resolve_spec("llama-3-70b")
    rows = []
    for seed, peers in clusters.items():
        for objective in OBJECTIVES:
            t = time.perf_counter()
            best = plan(spec, peers, None, PlanOptions(dtype="q4_0", objective=objective))
            seconds = time.perf_counter() - t
            prop = plan(spec, peers, None, PlanOptions(dtype="q4_0", objective=objective, strategy="proportional"))
            rows.append({"cluster": seed, "peers": len(peers), "objective": objective, "seconds": seconds,
                         "stages": len(best.stages),
                         "proportional_ratio": prop.objective_ms / best.objective_ms if prop.feasible and best.feasible else None})
    return {"rows": rows, "seconds_max": max(r["seconds"] for r in rows),
            "proportional_geomean": geomean([r["proportional_ratio"] for r in rows if r["proportional_ratio"]])}


def fmt(x, spec="{:.2f}") -> str:
    return "–" if x is None else spec.format(x)


def ratio(geo, worst) -> str:
    return "–" if geo is None else f"{geo:.2f}× ({worst:.2f}×)"


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"{cfg['small_clusters']} seeded clusters of 2–6 laptops, context {cfg['context']}, batch 1; "
        "ratio = baseline's predicted cost / optimal's (ms per token for latency, bottleneck ms for throughput; "
        "> 1 means optimal is faster), geo-mean over the instances where both fit.",
        "",
        "| model | dtype | objective | optimal fits | proportional fits | proportional / optimal (geo-mean, max) "
        "| even fits | even / optimal (geo-mean, max) | optimal stages (mean) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in result["strategies"]["summary"]:
        n = e["instances"]
        p, v = e["proportional"], e["even"]
        lines.append(
            f"| {e['model']} | {e['dtype']} | {e['objective']} | {e['optimal_feasible']}/{n} | {p['feasible']}/{n} "
            f"| {ratio(p['geomean_ratio'], p['max_ratio'])} | {v['feasible']}/{n} "
            f"| {ratio(v['geomean_ratio'], v['max_ratio'])} | {fmt(e['optimal_stages_mean'], '{:.1f}')} |"
        )
    o = result["strategies"]["overall"]
    lines += [
        "",
        "Overall geo-mean (all models and dtypes): proportional / optimal "
        f"{fmt(o['proportional/latency']['geomean_ratio'])}× for latency ({o['proportional/latency']['compared']} instances), "
        f"{fmt(o['proportional/throughput']['geomean_ratio'])}× for throughput ({o['proportional/throughput']['compared']}); "
        f"even / optimal {fmt(o['even/latency']['geomean_ratio'])}× and {fmt(o['even/throughput']['geomean_ratio'])}×.",
    ]
    h = result["heuristic_gap"]
    lines += [
        "",
        f"Heuristic vs exhaustive (forced on {cfg['gap_clusters']} clusters of 6–8 peers, llama-3-70b q4_0/f16, both "
        f"objectives, {h['instances']} feasible instances): identical plan cost in {h['identical']}, mean gap "
        f"{fmt(100 * h['mean_gap'] if h['mean_gap'] is not None else None)}%, worst {fmt(100 * h['max_gap'] if h['max_gap'] is not None else None)}%; "
        f"exhaustive search median {fmt(h['exact_s_median'], '{:.3f}')} s (max {fmt(h['exact_s_max'], '{:.2f}')} s), "
        f"heuristic median {fmt(h['heuristic_s_median'], '{:.3f}')} s.",
    ]
    big = result["large_clusters"]
    lines += [
        f"9–10 peers ({cfg['large_clusters']} clusters, llama-3-70b q4_0, heuristic): slowest plan "
        f"{fmt(big['seconds_max'], '{:.2f}')} s; proportional / optimal geo-mean {fmt(big['proportional_geomean'])}×.",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clusters", type=int, default=36, help="clusters of 2-6 peers")
    ap.add_argument("--gap-clusters", type=int, default=12, help="clusters of 6-8 peers for the heuristic gap")
    ap.add_argument("--large-clusters", type=int, default=6, help="clusters of 9-10 peers")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "planner.json"))
    args = ap.parse_args()

    small = {seed: random_cluster(seed, 2 + seed % 5) for seed in range(args.clusters)}
    gap = {1000 + s: random_cluster(1000 + s, 6 + s % 3) for s in range(args.gap_clusters)}
    large = {2000 + s: random_cluster(2000 + s, 9 + s % 2) for s in range(args.large_clusters)}
    t = time.perf_counter()
    result = {
        "config": {"small_clusters": args.clusters, "gap_clusters": args.gap_clusters,
                   "large_clusters": args.large_clusters, "context": PlanOptions.context, "links": LINKS,
                   "ram_gib": RAM_GIB, "usable_fraction": USABLE, "tflops": [0.5, 20], "mem_bw_gbs": [50, 400]},
        "strategies": compare_strategies(small),
        "heuristic_gap": heuristic_gap(gap),
        "large_clusters": large_clusters(large),
    }
    result["seconds"] = time.perf_counter() - t
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    print(f"\n(wrote {out} in {result['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
