"""`p2pllm join --from-peers`: a peer without the model file (GGUF, or a Hugging Face folder) learns
it from a peer, fetches only the layers it will hold (ahead of the plan that gives them to it),
serves them, and reuses its cache on the next start. Real daemons on loopback, real gRPC with the
cluster secret; then the issue's setting on namespace hosts."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from clusterutil import TEST_SECRET, client, join as join_host, status, wait_for_agreement
from conftest import REPO, assert_one_line_error, llama_cpp_greedy, llama_cpp_model, run_cli, shared_model, stop_daemon
from netns import hosts  # noqa: F401  (a fixture)
from test_fetch_hf import make_hf

from p2pllm.model.pieces import check_partial
from p2pllm.model.spec import read_spec

OWNER, FETCHER = (7868, 8868), (7869, 8869)
HF_OWNER, HF_FETCHER = (7901, 8901), (7902, 8902)
SECRET = "from-peers-test-secret-0123456789"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def join(tmp: Path, name: str, ports: tuple[int, int], *source: str) -> subprocess.Popen:
    env = dict(os.environ, P2PLLM_SECRET=SECRET, HOME=str(tmp / name))
    argv = [sys.executable, "-m", "p2pllm", "join", *source, "--name", name, "--port", str(ports[0]),
            "--gateway-port", str(ports[1]), "--interface", "127.0.0.1", "--no-mdns", "--strategy", "even",
            "--cluster", "from-peers-test", "--response-cache", "off", "--prefix-cache", "0"]
    log = open(tmp / f"{name}.log", "a")
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO, env=env,
                            start_new_session=True)


def wait_stages(gateway: int, n: int, procs: list, logs: list[Path], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [log.read_text()[-3000:] for log in logs]
        try:
            if httpx.get(f"http://127.0.0.1:{gateway}/health", timeout=5).json().get("stages") == n:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    pytest.fail(f"no {n}-stage plan within {timeout}s: {[log.read_text()[-3000:] for log in logs]}")


def answer(gateway: int) -> str:
    reply = httpx.post(f"http://127.0.0.1:{gateway}/v1/chat/completions", timeout=120,
                       json={"messages": QUESTION, "max_tokens": 16, "temperature": 0})
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


def join_fetcher(tmp_path: Path, owner, owner_ports, ports, cache: Path, alone: str):
    """A --from-peers peer joining `owner` (which answered `alone` by itself): the two-stage ring
    must answer the same. The fetcher, its log and the log's `fetched layers [a, b)` match."""
    fetcher = join(tmp_path, "fetcher", ports, "--from-peers", "--peer", f"127.0.0.1:{owner_ports[0]}",
                   "--model-cache", str(cache))
    logs = [tmp_path / "owner.log", tmp_path / "fetcher.log"]
    wait_stages(ports[1], 2, [owner, fetcher], logs)
    assert answer(ports[1]) == alone  # the fetched layers compute what the owner's do
    log = logs[1].read_text()
    fetched = re.search(r"fetched layers \[(\d+), (\d+)\): \d+ pieces, [\d.]+ MiB in [\d.]+ s", log)
    assert fetched and "ready to be planned" in log, log[-3000:]
    return fetcher, log, fetched


def test_a_peer_without_the_file_fetches_only_its_layers_and_serves_them(tmp_path):
    model = shared_model("SmolLM2-135M-Instruct.Q4_1.gguf")
    cache = tmp_path / "cache"
    owner = join(tmp_path, "owner", OWNER, "--model", str(model))
    fetcher = None
    try:
        wait_stages(OWNER[1], 1, [owner], [tmp_path / "owner.log"])
        alone = answer(OWNER[1])
        other = run_cli("join", "--model", "another-model", "--peer", f"127.0.0.1:{OWNER[0]}", "--secret", SECRET,
                        "--model-cache", str(cache))  # the peer answers, with another model: no wait
        assert_one_line_error(other, 2, "no model 'another-model' here or on the cluster's peers (they serve ")
        assert model.name in other.stderr

        fetcher, log, fetched = join_fetcher(tmp_path, owner, OWNER, FETCHER, cache, alone)
        # fetched before it was given layers (while it fetches it is sent the committed plan, with none)
        assert log.index("ready to be planned") < log.index("this peer holds layers")
        copy = next(cache.glob("*/*.gguf"))
        assert copy.name == model.name and copy.stat().st_size == model.stat().st_size
        assert copy.stat().st_blocks * 512 < 0.9 * model.stat().st_size  # only its share (and the header) stored
        held = run_cli("check-model", str(copy), "--layers", f"{fetched[1]}:{fetched[2]}")
        assert held.returncode == 0 and "partial copy holding" in held.stdout, held.stderr
        other = "0:1" if fetched[1] != "0" else "29:30"
        assert_one_line_error(run_cli("check-model", str(copy), "--layers", other), 2, "which this partial model does not hold")

        stop_daemon(fetcher)  # the next start reads the header and the layers it holds from its cache
        fetcher = join(tmp_path, "fetcher", FETCHER, "--from-peers", "--peer", f"127.0.0.1:{OWNER[0]}",
                       "--model-cache", str(cache))
        wait_stages(FETCHER[1], 2, [owner, fetcher], [tmp_path / "owner.log", tmp_path / "fetcher.log"])
        second = (tmp_path / "fetcher.log").read_text()[len(log):]
        assert re.search(r"learned from 127\.0\.0\.1:\d+: layers \[", second), second[-3000:]  # resumed
        assert answer(FETCHER[1]) == alone
    finally:
        for proc in (fetcher, owner):
            if proc is not None:
                stop_daemon(proc)


def test_a_peer_without_the_hf_folder_fetches_only_its_layers_and_answers_the_same(tmp_path):
    """The same with a Hugging Face folder: the owner serves its config, tokenizer, shard headers
    and tensors as pieces; the copy is a partial folder of sparse shards."""
    model = make_hf(tmp_path / "model" / "tiny-hf")
    cache = tmp_path / "cache"
    owner = join(tmp_path, "owner", HF_OWNER, "--model", str(model))
    fetcher = None
    try:
        wait_stages(HF_OWNER[1], 1, [owner], [tmp_path / "owner.log"])
        fetcher, log, fetched = join_fetcher(tmp_path, owner, HF_OWNER, HF_FETCHER, cache, answer(HF_OWNER[1]))
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


def test_from_peers_errors_are_one_line(tmp_path, monkeypatch):
    assert_one_line_error(run_cli("join", "--from-peers", "--insecure", "--no-mdns"), 2, "with --no-mdns, give --peer")
    # a name found nowhere here is asked of peers: the line says both why not here and why not there
    nowhere = run_cli("join", "--model", "no-such-model", "--insecure", "--no-mdns")
    assert_one_line_error(nowhere, 2, "no model 'no-such-model'")
    assert "give --peer" in nowhere.stderr
    path = run_cli("join", "--model", "./no-such-file.gguf", "--insecure")  # a path is never asked of peers
    assert path.returncode == 2 and "no file or folder" in path.stderr.splitlines()[-1]
    both = run_cli("join", "--from-peers", "--model", str(Path(REPO) / "pyproject.toml"))  # argparse: usage, then the line
    assert both.returncode == 2 and "not allowed with argument --from-peers" in both.stderr.splitlines()[-1]
    monkeypatch.setenv("P2PLLM_FROM_PEERS_WAIT", "2")  # how long it waits for a peer to serve the model
    unreachable = run_cli("join", "--from-peers", "--peer", "127.0.0.1:9", "--insecure", "--model-cache",
                          str(tmp_path))
    assert unreachable.returncode == 1 and "no peer serves the model" in unreachable.stderr.splitlines()[-1]


def test_a_model_cache_that_cannot_be_a_folder_is_one_line(tmp_path, stories_gguf):
    """--model-cache naming a file was "internal error: NotADirectoryError" once the header was learned."""
    ports = (17741, 17742)
    owner = join(tmp_path, "owner", ports, "--model", str(stories_gguf))
    try:
        wait_stages(ports[1], 1, [owner], [tmp_path / "owner.log"])
        not_a_folder = tmp_path / "cache-file"
        not_a_folder.write_text("mine")
        proc = run_cli("join", "--from-peers", "--peer", f"127.0.0.1:{ports[0]}", "--secret", SECRET,
                       "--model-cache", str(not_a_folder), "--no-mdns", "--port", "17743", "--gateway-port", "17744",
                       timeout=120, env_extra={"HOME": str(tmp_path / "fetcher")})
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]  # after the INFO line saying whom it learns the model from
        assert last.startswith(f"p2pllm: error: cannot keep the fetched model under {not_a_folder}: Not a directory"), last
        assert last.endswith("(pass another --model-cache)") and not_a_folder.read_text() == "mine"
    finally:
        stop_daemon(owner)


def join_from_peers(hosts, i: int, tmp_path: Path, *source: str):
    """A host with an empty home but for the cluster's stored secret that learns the model from
    peers (`source`: how it finds them); its copy goes to the default cache,
    home/.cache/p2pllm/models/ (`home_cache`). With the secret read from its file, it prints the
    command that adds the next machine (`printed_join`)."""
    home = tmp_path / f"home-{i}"
    stored = home / ".config" / "p2pllm" / "secret-default"
    stored.parent.mkdir(mode=0o700, parents=True)
    stored.write_text(TEST_SECRET + "\n")
    stored.chmod(0o600)
    drop = ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_STATE_HOME", "P2PLLM_SECRET")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["HOME"] = str(home)
    return hosts.popen(i, [sys.executable, "-m", "p2pllm", "join", *source, "--name", f"host{i}", "--strategy", "even",
                           "--response-cache", "off", "--prefix-cache", "0"], env=env)


def printed_join(proc) -> list[str]:
    """How the command `join` printed for the next machine finds the model (its arguments before
    --cluster and --secret=S)."""
    line = next(line for line in Path(proc.log_path).read_text().splitlines() if line.strip().startswith("p2pllm join "))
    argv = shlex.split(line)
    assert argv[-3:-1] == ["--cluster", "default"] and argv[-1] == f"--secret={TEST_SECRET}", argv
    return argv[2:-3]


def home_cache(tmp_path: Path, i: int) -> Path:
    return tmp_path / f"home-{i}" / ".cache" / "p2pllm" / "models"


def peer_named(view: dict, name: str) -> dict:
    return next(p for p in view["peers"] if p["name"] == name)


def test_three_hosts_one_file_two_fetch_and_all_answer_like_llama_cpp(hosts, llama_cpp, tmp_path):
    """The issue's setting: namespace hosts, one holds the file, two start without it and with
    empty caches (one `--from-peers`, one `--model NAME`, both finding peers by mDNS); all three
    serve within two minutes, and the 3-stage ring answers as llama.cpp.
    Then a fourth host fetches over a slow link and the peer it fetches most from is killed
    mid-fetch: the fetch finishes from the others and the ring answers the same."""
    model = shared_model("SmolLM2-135M-Instruct.Q4_1.gguf")
    t0 = time.monotonic()
    join_host(hosts, 1, model)
    # host2 finds its peers by mDNS; host3 names the model (its file's stem), which no file here has
    fetchers = {2: join_from_peers(hosts, 2, tmp_path, "--from-peers"),
                3: join_from_peers(hosts, 3, tmp_path, "--model", model.stem)}
    views = wait_for_agreement(hosts, [1, 2, 3], n_layers=30, timeout=120)
    assert time.monotonic() - t0 < 120 and all(p["layers"] for p in views[0]["peers"])
    for i in (2, 3):
        copy = next(home_cache(tmp_path, i).glob("*/*.gguf"))
        assert copy.stat().st_blocks * 512 < 0.9 * model.stat().st_size  # its share, not the file
        # its own view: what another peer shows of its holdings is its last health reply, which a
        # fetch that has just finished may not have reached yet
        me = peer_named(views[i - 1], f"host{i}")
        a, b = me["layers"]
        assert any(h[0] <= a and b <= h[1] for h in me["holds"]["layers"]), me  # planned onto what it holds
    assert peer_named(views[0], "host1")["holds"] is None  # the whole file
    # the next machine is told the model as typed here (mDNS; the cluster's model name), never this
    # host's partial copy in its cache
    assert printed_join(fetchers[2]) == ["--from-peers"]
    assert printed_join(fetchers[3]) == ["--model", model.stem]

    llm = llama_cpp_model(llama_cpp, model, kv="f16")
    ids = llm.tokenize(b"The capital of France is", add_bos=False)
    # 12 tokens: the 16th is a near-tie ("321" vs "311") that ggml-python's bundled ggml rounds apart
    # from llama.cpp's (with llama.cpp's own ggml, which setup.sh links, 32 tokens agree; docs/backends.md)
    want = llm.detokenize(llama_cpp_greedy(llm, ids, 12)).decode("utf-8", "replace")
    for i in (1, 3):  # from the file's host and from a fetching one
        got = client(hosts, i, {"kind": "complete", "model": model.name, "prompts": [ids], "max_tokens": 12})
        assert got[0]["text"] == want, (got, want)
    assert "fetched layers" in hosts.logs(tail=None)

    # a fourth host behind a 16 Mbit/s link: its fetch takes seconds, long enough to kill a source
    four = hosts.add_host()
    hosts.shape(four, "16mbit")
    newcomer = join_from_peers(hosts, four, tmp_path, "--from-peers", "--peer", f"{hosts.addr(1)}:7700")
    victim = None
    deadline = time.monotonic() + 90
    while victim is None and time.monotonic() < deadline:
        view = status(hosts, four)
        fetch = view and peer_named(view, f"host{four}")["fetch"]
        if fetch and fetch["done"] > 0.1 * fetch["total"]:
            a, b = fetch["layers"]  # the source holding most of what it fetches dies
            victim = max((2, 3), key=lambda i: sum(max(0, min(b, h[1]) - max(a, h[0]))
                                                   for h in peer_named(view, f"host{i}")["holds"]["layers"]))
        time.sleep(0.2)
    assert victim is not None, hosts.logs()
    hosts.kill(fetchers[victim])
    survivors = [1, 5 - victim, four]
    hosts.unshape(four)
    views = wait_for_agreement(hosts, survivors, n_layers=30, timeout=120)
    assert len([p for p in views[0]["peers"] if p["layers"]]) == 3
    log = Path(newcomer.log_path).read_text()
    assert f"source {hosts.addr(victim)}:7700 failed while sending" in log, log[-3000:]
    assert re.search(r"fetched layers \[\d+, \d+\): \d+ pieces", log), log[-3000:]
    got = client(hosts, four, {"kind": "complete", "model": model.name, "prompts": [ids], "max_tokens": 12})
    assert got[0]["text"] == want, (got, want)
