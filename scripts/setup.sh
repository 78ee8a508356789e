#!/usr/bin/env bash
# Install p2pllm into .venv (idempotent).
# Usage: scripts/setup.sh             runtime + test + bench extras (what the tests need)
#        scripts/setup.sh --runtime   the runtime only (what the demo needs: no llama.cpp build)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="[test,bench]"
case "${1:-}" in
  --runtime) EXTRAS="" ;;
  "") ;;
  *) echo "usage: scripts/setup.sh [--runtime]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
step() { echo "setup: $*" >&2; }
if [ ! -x .venv/bin/python ]; then
  step "creating the virtual environment .venv"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned: the CPU build on local disk, never a multi-GB CUDA download.
step "installing torch (CPU build)"
pip install -q -c scripts/constraints.txt torch
# ggml (our GGUF stages' kernels, from ggml-python, ~40 s) and llama.cpp (the reference the tests
# compare with, ~4 min) build from source once; pip caches the wheels. Portable flags (AVX2, no
# -march=native) so a cached wheel runs on any x86-64 of the fleet, and both get the same kernels;
# ggml also gets llamafile's tinyBLAS GEMM (prefill 1.2-1.4x faster; llama.cpp has its own tiled GEMM).
if ! python -c "import ggml" 2>/dev/null; then
  step "building ggml (the quantized kernels; about 40 s the first time)"
fi
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF} -DGGML_LLAMAFILE=ON" \
  pip install -q -c scripts/constraints.txt --no-binary ggml-python ggml-python
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"
if [ -n "$EXTRAS" ] && ! python -c "import llama_cpp" 2>/dev/null; then
  step "installing the test references (llama.cpp builds from source: about 4 minutes the first time)"
else
  step "installing p2pllm${EXTRAS}"
fi
pip install -q -c scripts/constraints.txt -e ".${EXTRAS}"
# with llama.cpp installed (the test references), the stages compute with its own ggml build: the
# same kernels and rounding as the reference (docs/backends.md, "Which ggml")
python scripts/ggml_from_llama_cpp.py >&2
echo "p2pllm installed in $(pwd)/.venv" >&2
