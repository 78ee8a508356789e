"""Shared fixtures: the shared test models, generated demo models, and running the CLI for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
REPO = Path(__file__).resolve().parents[1]


def shared_model(name: str) -> Path:
    path = SHARED_MODELS / name
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared test models live beside the checkout)")
    return path


@pytest.fixture(scope="session")
def stories_gguf() -> Path:
    return shared_model("stories260K.gguf")


@pytest.fixture(scope="session")
def demo_tiny_gguf(tmp_path_factory) -> Path:
    from p2pllm.model.demo import make_demo_model

    return make_demo_model(tmp_path_factory.mktemp("demo") / "tiny.gguf", "gguf", "tiny")


@pytest.fixture(scope="session")
def demo_tiny_hf(tmp_path_factory) -> Path:
    from p2pllm.model.demo import make_demo_model

    return make_demo_model(tmp_path_factory.mktemp("demo-hf") / "tiny", "hf", "tiny")


def run_cli(*args: str, timeout: float = 300, input: str | None = None) -> subprocess.CompletedProcess:
    """`p2pllm ARGS...` in a fresh process, as a user would run it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("P2PLLM_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "p2pllm", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env, input=input,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int = 2, *needles: str) -> str:
    """A clear error: the expected exit code, one line on stderr, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="session")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is the reference; scripts/setup.sh installs it")


LLAMA_CPP_KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}


def llama_cpp_model(llama_cpp, path, n_ctx=512, kv="f32"):
    # f32 KV cache by default: llama.cpp's default f16 cache can flip near-ties in random models;
    # compare like with like (our ggml stages keep f16 by default, as llama.cpp does)
    t = LLAMA_CPP_KV_TYPES[kv]
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, logits_all=True, verbose=False,
                           seed=0, type_k=t, type_v=t, flash_attn=kv == "q8_0")


def llama_cpp_greedy(llm, prompt_ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt_ids)
    out = []
    for _ in range(n):
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
        if tok == llm.token_eos():
            break
        out.append(tok)
        llm.eval([tok])
    return out
