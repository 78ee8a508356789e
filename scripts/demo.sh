#!/usr/bin/env bash
# Install p2pllm, then start a local 3-peer cluster on the embedded demo model, ask it one question
# through the OpenAI gateway, print the answer, the plan and tokens/s, and stop it (--keep leaves it up).
# The demo model has random weights: its answer is random text, by design (no download needed).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
exec p2pllm demo "$@"
