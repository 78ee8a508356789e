"""The committed generated code is exactly what scripts/gen-proto.sh makes from protos/."""

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_generated_code_is_current(tmp_path):
    subprocess.run(["bash", "scripts/gen-proto.sh", str(tmp_path)], cwd=REPO, check=True)
    for name in ("p2pllm_pb2.py", "p2pllm_pb2.pyi", "p2pllm_pb2_grpc.py"):
        assert (tmp_path / name).read_text() == (REPO / "p2pllm/proto" / name).read_text(), (
            f"p2pllm/proto/{name} is stale: run scripts/gen-proto.sh"
        )
