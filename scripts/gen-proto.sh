#!/usr/bin/env bash
# Regenerate p2pllm/proto/ from protos/p2pllm.proto (the generated code is committed).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-p2pllm/proto}
mkdir -p "$out"
python -m grpc_tools.protoc -Iprotos --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" protos/p2pllm.proto
# generated grpc code imports its sibling absolutely; make it package-relative
sed -i 's/^import p2pllm_pb2 as p2pllm__pb2/from . import p2pllm_pb2 as p2pllm__pb2/' "$out/p2pllm_pb2_grpc.py"
touch "$out/__init__.py"
