"""`p2pllm join --from-peers` with a Hugging Face folder: the owner serves its config, tokenizer,
shard headers and tensors as pieces; a peer without the folder learns the model, fetches only its
layers into a partial folder of sparse shards, and the two-stage ring answers as the owner alone.
Real daemons on loopback, real gRPC with the cluster secret."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO, assert_one_line_error, run_cli, stop_daemon
from test_fetch_hf import make_hf
from test_from_peers import answer, wait_stages

from p2pllm.model.pieces import check_partial
from p2pllm.model.spec import read_spec

OWNER, FETCHER = (7901, 8901), (7902, 8902)
SECRET = "from-peers-hf-test-secret-0123456789"


def join(tmp: Path, name: str, ports: tuple[int, int], *source: str) -> subprocess.Popen:
    env = dict(os.environ, P2PLLM_SECRET=SECRET, HOME=str(tmp / name))
    argv = [sys.executable, "-m", "p2pllm", "join", *source, "--name", name, "--port", str(ports[0]),
            "--gateway-port", str(ports[1]), "--interface", "127.0.0.1", "--no-mdns", "--strategy", "even",
            "--cluster", "from-peers-hf-test", "--response-cache", "off", "--prefix-cache", "0"]
    log = open(tmp / f"{name}.log", "a")  # noqa: SIM115 (the daemon writes it until stopped)
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO, env=env,
                            start_new_session=True)


def test_a_peer_without_the_folder_fetches_only_its_layers_and_answers_the_same(tmp_path):
    model = make_hf(tmp_path / "model" / "tiny-hf")
    cache = tmp_path / "cache"
    owner = join(tmp_path, "owner", OWNER, "--model", str(model))
    fetcher = None
    try:
        wait_stages(OWNER[1], 1, [owner], [tmp_path / "owner.log"])
        alone = answer(OWNER[1])

        fetcher = join(tmp_path, "fetcher", FETCHER, "--from-peers", "--peer", f"127.0.0.1:{OWNER[0]}",
                       "--model-cache", str(cache))
        logs = [tmp_path / "owner.log", tmp_path / "fetcher.log"]
        wait_stages(FETCHER[1], 2, [owner, fetcher], logs)
        assert answer(FETCHER[1]) == alone  # the fetched layers compute what the folder's do

        log = logs[1].read_text()
        fetched = re.search(r"fetched layers \[(\d+), (\d+)\): \d+ pieces, [\d.]+ MiB in [\d.]+ s", log)
        assert fetched and "ready to be planned" in log, log[-3000:]
        copy = next(p for p in cache.glob("*/*") if p.is_dir())
        assert copy.name == model.name
        shards = sorted(p.name for p in model.glob("*.safetensors"))
        assert sorted(p.name for p in copy.glob("*.safetensors")) == shards
        assert (copy / "tokenizer.json").read_bytes() == (model / "tokenizer.json").read_bytes()
        assert not (copy / "README.md").exists()
        stored = sum((copy / s).stat().st_blocks * 512 for s in shards)
        assert stored < 0.9 * sum((model / s).stat().st_size for s in shards)  # only its share
        assert check_partial(copy, (int(fetched[1]), int(fetched[2])))[0].fingerprint == read_spec(model).fingerprint
        other = "0:1" if fetched[1] != "0" else "5:6"
        assert_one_line_error(run_cli("check-model", str(copy), "--layers", other), 2, "which this partial model does not hold")
    finally:
        for proc in (fetcher, owner):
            if proc is not None:
                stop_daemon(proc)
