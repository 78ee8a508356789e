"""What a new user's mistakes get: one clear line and exit 2, never a traceback or a misleading message."""

from __future__ import annotations

import pytest

from conftest import assert_one_line_error, run_cli


@pytest.mark.parametrize("command", ["run", "join"])
@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_a_device_this_machine_lacks_is_a_usage_error_naming_the_devices_it_has(demo_tiny_gguf, command, device):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip(f"this machine has {device}")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has mps")
    extra = ["--prompt", "hi"] if command == "run" else ["--insecure", "--no-mdns", "--port", "17799"]
    proc = run_cli(command, "--model", demo_tiny_gguf, "--device", device, *extra, timeout=60)
    line = assert_one_line_error(proc, 2, f"--device {device}", "this machine has: cpu")
    assert "internal error" not in line


@pytest.mark.parametrize("argv, unknown, suggestion", [
    (["run", "--modle", "x"], "--modle", "--model"),  # a required flag's typo: the typo is named, not --model
    (["run", "--model", "m.gguf", "--prompt", "hi", "--max-tokns", "3"], "--max-tokns", "--max-tokens"),
    (["status", "--hots", "127.0.0.1:1"], "--hots", "--host"),
    (["plan", "--model", "llama-3-8b", "--discovr"], "--discovr", "--discover"),
])
def test_an_unknown_flag_is_named_with_the_closest_real_one(argv, unknown, suggestion):
    proc = run_cli(*argv, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert f"unrecognized arguments: {unknown}" in last and f"did you mean {suggestion}?" in last, last
    assert "required" not in last


def test_a_missing_required_flag_is_still_reported_as_missing():
    proc = run_cli("run", "--prompt", "hi", timeout=60)
    assert proc.returncode == 2 and "the following arguments are required: --model" in proc.stderr
