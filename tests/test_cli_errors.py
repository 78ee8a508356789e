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


@pytest.mark.parametrize("flag, value, needle", [
    ("--max-memory", "5XB", "bad size '5XB'"),
    ("--interface", "no-such-if0", "no interface no-such-if0 (have: lo"),
])
def test_a_bad_join_flag_is_refused_before_a_secret_is_made(demo_tiny_gguf, tmp_path, flag, value, needle):
    proc = run_cli("join", "--model", demo_tiny_gguf, "--cluster", "lab", "--no-mdns", flag, value, timeout=60,
                   env_extra={"XDG_CONFIG_HOME": str(tmp_path), "P2PLLM_SECRET": ""})
    assert_one_line_error(proc, 2, needle)
    assert proc.stdout == "" and not (tmp_path / "p2pllm").exists()  # no secret made, no join command printed


@pytest.mark.parametrize("argv, unknown, suggestion", [
    (["run", "--modle", "x"], "--modle", "--model"),  # a required flag's typo: the typo is named, not --model
    (["run", "--model", "m.gguf", "--prompt", "hi", "--max-tokns", "3"], "--max-tokns", "--max-tokens"),
    (["status", "--hots", "127.0.0.1:1"], "--hots", "--host"),
    (["plan", "--model", "llama-3-8b", "--discovr"], "--discovr", "--discover"),
    (["run", "-m", "m.gguf", "--prompt", "hi"], "-m", "--model"),  # short flags were not considered at all
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


def test_a_thread_count_far_beyond_the_cores_is_refused():
    """torch.set_num_threads(100000) segfaulted `run` (exit 139, no message); 10000 took minutes."""
    import os

    most = 4 * (os.cpu_count() or 1)
    proc = run_cli("run", "--threads", "100000", "--model", "m.gguf", "--prompt", "hi", timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(
        f"argument --threads: at most {most} on this machine (4 per core), got 100000")


@pytest.mark.parametrize("argv", [
    ["run", "--prompt", "\udcff\udcfe bad", "--model", "m.gguf"],  # how Python reads argv bytes 0xff 0xfe
    ["chat", "--prompt", "\udcff bad"],
    ["batch", "--prompt", "\udcff {content}", "--input", ".", "--output", "o.json"],
])
def test_a_prompt_that_is_not_utf8_is_one_line(argv):
    """It was "internal error: UnicodeEncodeError" when the text was first encoded."""
    proc = run_cli(*argv, timeout=60)  # subprocess writes the surrogates back as the raw bytes
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("argument --prompt: not valid UTF-8 text")


def test_make_demo_model_does_not_replace_a_file_unless_forced(tmp_path):
    """It wrote over any file it was given (a text file became 5.8 MB of GGUF)."""
    victim = tmp_path / "notes.txt"
    victim.write_text("mine")
    assert_one_line_error(run_cli("make-demo-model", victim, timeout=60), 2, f"{victim} exists; pass --force")
    assert victim.read_text() == "mine"
    assert run_cli("make-demo-model", victim, "--force", timeout=120).returncode == 0
    assert victim.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("argv, needle", [
    (["make-demo-model", "x.gguf", "--seed", "99999999999999999999999"], "argument --seed: must be between 0 and 2^63-1"),
    (["demo", "--stop", "--keep"], "argument --keep: not allowed with argument --stop"),
    (["join", "--peer-timeout", "0", "--model", "m.gguf"],  # it said "must be between 0 and 3600", got 0
     "argument --peer-timeout: must be more than 0 and at most 3600 seconds, got 0"),
    (["batch", "--chunk-tokens", "1", "--input", ".", "--output", "o.json"],  # it blamed the template
     "argument --chunk-tokens: must be at least 64, the smallest piece a document is read in, got 1"),
    (["plan", "--model", "llama-3-8b", "--device", "name=a,mem=1e400GiB,tflops=1,bw=1GBps"], "bad size '1e400GiB': too large"),
])
def test_values_that_used_to_be_internal_errors_or_ignored_are_one_line(argv, needle):
    proc = run_cli(*argv, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert needle in proc.stderr.strip().splitlines()[-1], proc.stderr
