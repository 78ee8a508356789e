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
# llama.cpp (the reference implementation the tests compare with) builds from source (~4 min once;
# pip caches the wheel). Portable flags so a cached wheel runs on any x86-64 of the fleet.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"
pip install -q -c scripts/constraints.txt -e ".[test,bench]"
echo "p2pllm installed in $(pwd)/.venv" >&2
