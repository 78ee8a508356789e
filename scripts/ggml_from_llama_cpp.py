"""Point ggml-python's bindings at the ggml that llama-cpp-python ships, when it is installed.

    python scripts/ggml_from_llama_cpp.py          # link (scripts/setup.sh runs it after the test references)
    python scripts/ggml_from_llama_cpp.py --undo   # back to ggml-python's own build
    python scripts/ggml_from_llama_cpp.py --show   # which ggml the stages compute with

p2pllm's GGUF stages compute with whatever ggml library ggml-python loads from its `lib/` folder.
ggml-python 0.0.45 bundles ggml 0.15.3; llama-cpp-python 0.3.36 builds llama.cpp's own ggml
(0.25.3). Near-tied logits round apart between the two (Q4_K_M SmolLM2 greedy ids: 2 of 5 prompts
equal to llama.cpp's with the bundled ggml, 5 of 5 with llama.cpp's; docs/backends.md). The C API
that ggml-python binds and p2pllm calls is the same in both (the tensor struct, the graph, backend
and allocator calls), so this replaces the three libraries in ggml-python's `lib/` with links to
llama-cpp-python's, keeping the bundled ones beside them (`*.bundled`), then checks a small graph
in a fresh process and goes back to the bundled build if anything fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

LIBS = ("ggml", "ggml-base", "ggml-cpu")

# a fresh process: an f32 matrix times a vector through the backend calls a stage makes, against numpy
CHECK = """
import numpy as np
from p2pllm.model.backends import ggml_lib as gl
g = gl.ggml()
rng = np.random.default_rng(0)
w, x = rng.standard_normal((64, 256)).astype(np.float32), rng.standard_normal(256).astype(np.float32)
backend = gl.cpu_backend(1)
weights = gl.Context(1)
wt = weights.tensor("F32", (256, 64))
buf = gl.Buffer.for_context(weights, backend)
gl.view(wt, np.float32, (64, 256))[:] = w
ctx = gl.Context(8, 8)
xt = ctx.tensor("F32", (256, 1))
y = g.ggml_mul_mat(ctx.ptr, wt, xt)
gf = g.ggml_new_graph_custom(ctx.ptr, 8, False)
g.ggml_build_forward_expand(gf, y)
alloc = g.ggml_gallocr_new(g.ggml_backend_cpu_buffer_type())
assert g.ggml_gallocr_alloc_graph(alloc, gf)
gl.view(xt, np.float32, (256,))[:] = x
g.ggml_backend_graph_compute(backend, gf)
assert np.allclose(gl.view(y, np.float32, (64,)), w @ x, atol=1e-3)
print(g.ggml_version().decode())
"""


def package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(spec.origin).parent if spec is not None and spec.origin else None


def linked(lib_dir: Path) -> bool:
    return all((lib_dir / f"lib{n}.so").is_symlink() for n in LIBS)


def undo(lib_dir: Path) -> None:
    for n in LIBS:
        bundled = lib_dir / f"lib{n}.so.bundled"
        if bundled.exists():
            (lib_dir / f"lib{n}.so").unlink(missing_ok=True)
            bundled.rename(lib_dir / f"lib{n}.so")


def version() -> str:
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError((out.stderr.strip().splitlines() or ["no output"])[-1])
    return out.stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--undo", action="store_true", help="use ggml-python's own ggml build again")
    ap.add_argument("--show", action="store_true", help="say which ggml the stages compute with")
    args = ap.parse_args()
    ggml_dir = package_dir("ggml")
    if ggml_dir is None:
        print("ggml-python is not installed", file=sys.stderr)
        return 2
    lib_dir = ggml_dir / "lib"
    if args.show:
        where = "llama.cpp's (llama-cpp-python)" if linked(lib_dir) else "ggml-python's own"
        print(f"ggml {version()}: {where} build, {lib_dir}")
        return 0
    if args.undo:
        undo(lib_dir)
        print(f"ggml {version()}: ggml-python's own build")
        return 0
    llama_dir = package_dir("llama_cpp")
    source = llama_dir / "lib" if llama_dir is not None else None
    if source is None or not all((source / f"lib{n}.so").exists() for n in LIBS):
        print("llama-cpp-python (with its ggml libraries) is not installed: the stages use ggml-python's own ggml")
        return 0
    if not linked(lib_dir):
        for n in LIBS:
            own = lib_dir / f"lib{n}.so"
            if own.exists():
                own.rename(lib_dir / f"lib{n}.so.bundled")
            # the file llama.cpp's own libraries load (their soname): one copy in a process that has both
            target = source / f"lib{n}.so.0" if (source / f"lib{n}.so.0").exists() else source / f"lib{n}.so"
            os.symlink(target.resolve(), own)
    try:
        print(f"ggml {version()}: llama.cpp's build from llama-cpp-python ({source})")
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        undo(lib_dir)
        print(f"llama.cpp's ggml does not work with these bindings ({e}); kept ggml-python's own", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
