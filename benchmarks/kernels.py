"""Kernel benchmark: one decode GEMV (a 4096 x 4096 weight matrix times one activation row) per
weight encoding, ggml (the GGUF stage's kernels) vs torch, on this machine's CPU threads.

    python benchmarks/kernels.py            # writes benchmarks/results/kernels.json, prints markdown
    python benchmarks/kernels.py --quick    # fewer repeats (a smoke test, not a result)

This is the measurement behind the ggml backend (docs/performance.md, "Choosing the kernels"):
decoding multiplies one row by every weight matrix, so it is bound by how many bytes each
encoding streams and how well its kernel uses SIMD. ggml: `ggml_mul_mat` on a tensor in the
encoding, through `ggml_backend_graph_compute` (the path a stage takes). torch: `torch.mm` on
f32 and bf16 weights, and its int4 kernel (`_weight_int4pack_mm_for_cpu`, bf16 activations),
the only quantized CPU matmul it has that a Q4 file could map to.
Each timing is the best of many calls (other processes only slow a call down).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from p2pllm.model.backends import ggml_lib as gl

RESULTS = Path(__file__).resolve().parent / "results" / "kernels.json"
N = 4096
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K", "IQ4_XS")


def best_of(fn, seconds: float, at_least: int = 5) -> float:
    best, n, deadline = float("inf"), 0, time.perf_counter() + seconds
    while n < at_least or time.perf_counter() < deadline:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        n += 1
    return best


def ggml_gemv(type_name: str, w: np.ndarray, threads: int, seconds: float) -> float:
    g = gl.ggml()
    backend = gl.cpu_backend(threads)
    wctx = gl.Context(2)
    wt = wctx.tensor(type_name, (N, N))
    wbuf = gl.Buffer.for_context(wctx, backend)
    nbytes = gl.row_bytes(type_name, N) * N
    if type_name in ("F32", "F16", "BF16"):
        import gguf

        data = gguf.quants.quantize(w, gguf.GGMLQuantizationType[type_name]).tobytes()
    else:
        out = (ctypes.c_uint8 * nbytes)()
        imatrix = np.ones(N, dtype=np.float32)
        f32p = ctypes.POINTER(ctypes.c_float)
        g.ggml_quantize_chunk(gl.type_id(type_name), w.ctypes.data_as(f32p), out, 0, N, N, imatrix.ctypes.data_as(f32p))
        data = bytes(out)
    gl.view(wt, np.uint8, (nbytes,))[:] = np.frombuffer(data, dtype=np.uint8)
    ctx = gl.Context(8, 8)
    x = ctx.tensor("F32", (N, 1))
    y = g.ggml_mul_mat(ctx.ptr, wt, x)
    gf = g.ggml_new_graph_custom(ctx.ptr, 8, False)
    g.ggml_build_forward_expand(gf, y)
    alloc = g.ggml_gallocr_new(g.ggml_backend_cpu_buffer_type())
    g.ggml_gallocr_alloc_graph(alloc, gf)
    gl.view(x, np.float32, (N,))[:] = np.random.default_rng(1).standard_normal(N).astype(np.float32)
    seconds_per_call = best_of(lambda: g.ggml_backend_graph_compute(backend, gf), seconds)
    g.ggml_gallocr_free(alloc)
    ctx.free()
    wbuf.free()
    wctx.free()
    g.ggml_backend_free(backend)
    return seconds_per_call


def torch_gemv(dtype, w: np.ndarray, seconds: float) -> float:
    wt = torch.from_numpy(w).to(dtype).t().contiguous()  # in-major: the layout our torch backend uses
    x = torch.randn(1, N, dtype=dtype)
    return best_of(lambda: torch.mm(x, wt), seconds)


def torch_int4(w: np.ndarray, seconds: float) -> float | None:
    try:
        wt = torch.from_numpy(w)
        q = torch.randint(0, 16, (N, N), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8)
        scales = torch.randn(N // 32, N, 2, dtype=torch.bfloat16)
        x = torch.randn(1, N, dtype=torch.bfloat16)
        del wt
        return best_of(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, scales), seconds)
    except (RuntimeError, AttributeError) as e:
        print(f"torch int4 kernel unavailable: {e}", file=sys.stderr)
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    seconds = 0.3 if args.quick else 2.0
    torch.set_num_threads(args.threads)
    w = np.random.default_rng(0).standard_normal((N, N)).astype(np.float32) * 0.02
    res = {"matrix": [N, N], "threads": args.threads, "statistic": "best call", "ms": {},
           "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "load_average_1m_at_start": os.getloadavg()[0], "torch": torch.__version__}}
    for t in TYPES:
        res["ms"][f"ggml {t}"] = 1e3 * ggml_gemv(t, w, args.threads, seconds)
        print(f"ggml {t}: {res['ms'][f'ggml {t}']:.3f} ms", file=sys.stderr)
    res["ms"]["torch f32"] = 1e3 * torch_gemv(torch.float32, w, seconds)
    res["ms"]["torch bf16"] = 1e3 * torch_gemv(torch.bfloat16, w, seconds)
    int4 = torch_int4(w, seconds)
    if int4 is not None:
        res["ms"]["torch int4 (bf16 activations)"] = 1e3 * int4
    res["bytes"] = {f"ggml {t}": gl.row_bytes(t, N) * N for t in TYPES}
    res["bytes"] |= {"torch f32": 4 * N * N, "torch bf16": 2 * N * N,
                     "torch int4 (bf16 activations)": N * N // 2 + (N // 32) * N * 2 * 2}  # nibbles + bf16 scale/zero
    if not args.quick or args.out != RESULTS:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    print(markdown(res))
    return 0


def markdown(res: dict) -> str:
    base = res["ms"]["torch f32"]
    rows = ["| kernel | MB streamed | ms per GEMV | GB/s | vs torch f32 |", "|---|---|---|---|---|"]
    for name, ms in sorted(res["ms"].items(), key=lambda kv: kv[1]):
        nbytes = res["bytes"][name]
        rows.append(f"| {name} | {nbytes / 1e6:.1f} | {ms:.3f} | {nbytes / ms / 1e6:.1f} | {base / ms:.1f}x |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
