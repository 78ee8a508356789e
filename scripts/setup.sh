#!/usr/bin/env bash
# Install p2pllm and its test/benchmark dependencies into .venv (idempotent).
# Usage: scripts/setup.sh            (runtime + test + bench extras)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned: the CPU build on local disk, never a multi-GB CUDA download.
pip install -q -c scripts/constraints.txt torch
# ggml (our GGUF stages' kernels, from ggml-python, ~40 s) and llama.cpp (the reference the tests
# compare with, ~4 min) build from source once; pip caches the wheels. Portable flags (AVX2, no
# -march=native) so a cached wheel runs on any x86-64 of the fleet, and both get the same kernels;
# ggml also gets llamafile's tinyBLAS GEMM (prefill 1.2-1.4x faster; llama.cpp has its own tiled GEMM).
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF} -DGGML_LLAMAFILE=ON" \
  pip install -q -c scripts/constraints.txt --no-binary ggml-python ggml-python
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"
pip install -q -c scripts/constraints.txt -e ".[test,bench]"
echo "p2pllm installed in $(pwd)/.venv" >&2
