#!/usr/bin/env bash
# Install p2pllm, write the embedded demo model and generate text with it.
# The demo model has random weights: its output is random text, by design (no download needed).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
model=${P2PLLM_DEMO_MODEL:-.demo/demo-tiny.gguf}
[ -f "$model" ] || p2pllm make-demo-model "$model" --size tiny
p2pllm run --model "$model" --prompt "Once upon a time" --max-tokens 48 --split 2,4
