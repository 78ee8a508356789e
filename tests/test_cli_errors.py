"""What a new user's mistakes get: one clear line and exit 2, never a traceback or a misleading message."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO, assert_one_line_error, run_cli


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


@pytest.mark.parametrize("flags, needle", [
    (["--max-memory", "5XB"], "bad size '5XB'"),
    (["--interface", "no-such-if0"], "no interface no-such-if0 (have: lo"),
    # was checked only when the daemon probed this machine: after the secret was made and printed
    (["--max-memory", "0"], "--max-memory must be positive, got 0"),
    # 8 bytes, not 8 GiB: the daemon started and waited forever for a plan that could give it no layer
    (["--max-memory", "8"], "--max-memory 8 is 8 bytes, less than any model needs: give a unit, e.g. 8GiB"),
    (["--max-memory", "100KiB"], "--max-memory 100KiB is 102400 bytes, less than any model needs: give at least 1MiB"),
    # the gateway failed to bind "address already in use" (the gRPC server held it) after the secret was made
    (["--port", "17731", "--gateway-port", "17731"], "--gateway-port 17731 is this peer's gRPC --port too"),
    # a context beyond the model's was clamped to it without a word (`plan` refuses it)
    (["--port", "17732", "--gateway-port", "17733", "--context", "999999"], "--context 999999 is beyond"),
    # `--api-key "$KEY"` with KEY unset: the gateway ran without a key, without a word
    (["--port", "17736", "--gateway-port", "17737", "--api-key", ""], "--api-key is empty"),
])
def test_a_bad_join_flag_is_refused_before_a_secret_is_made(demo_tiny_gguf, tmp_path, flags, needle):
    proc = run_cli("join", "--model", demo_tiny_gguf, "--cluster", "lab", "--no-mdns", *flags, timeout=60,
                   env_extra={"XDG_CONFIG_HOME": str(tmp_path), "P2PLLM_SECRET": ""})
    assert_one_line_error(proc, 2, needle)
    assert proc.stdout == "" and not (tmp_path / "p2pllm").exists()  # no secret made, no join command printed


def test_a_model_folder_without_its_tokenizer_is_refused_before_a_secret_is_made(demo_tiny_hf, tmp_path):
    """The daemon found it missing only after `join` had made a secret and printed the join command."""
    import shutil

    folder = tmp_path / "no-tokenizer"
    shutil.copytree(demo_tiny_hf, folder)
    for name in folder.glob("tokenizer*"):
        name.unlink()
    proc = run_cli("join", "--model", folder, "--cluster", "lab", "--no-mdns", "--port", "17734", "--gateway-port",
                   "17735", timeout=60, env_extra={"XDG_CONFIG_HOME": str(tmp_path), "P2PLLM_SECRET": ""})
    assert_one_line_error(proc, 2, f"{folder}: no tokenizer.json in this folder")
    assert proc.stdout == "" and not (tmp_path / "p2pllm").exists()


@pytest.mark.parametrize("command", ["run", "plan"])
def test_a_max_memory_without_a_unit_is_refused_by_run_and_plan_too(demo_tiny_gguf, command):
    extra = ["--prompt", "hi"] if command == "run" else ["--discover"]
    proc = run_cli(command, "--model", demo_tiny_gguf, *extra, "--max-memory", "8", timeout=60)
    assert_one_line_error(proc, 2, "--max-memory 8 is 8 bytes, less than any model needs: give a unit, e.g. 8GiB")


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


@pytest.mark.parametrize("fmt, name", [("gguf", "m.gguf"), ("hf", "m")])
def test_make_demo_model_where_it_cannot_write_is_one_line(tmp_path, fmt, name):
    """A file where its folder should be was "internal error: FileExistsError" / "NotADirectoryError"."""
    (tmp_path / "notes.txt").write_text("mine")
    target = tmp_path / "notes.txt" / name
    proc = run_cli("make-demo-model", target, "--format", fmt, timeout=60)
    line = assert_one_line_error(proc, 2, f"cannot write {target}")
    assert "internal error" not in line and (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("argv, needle", [
    (["make-demo-model", "x.gguf", "--seed", "99999999999999999999999"], "argument --seed: must be between 0 and 2^63-1"),
    (["demo", "--stop", "--keep"], "argument --keep: not allowed with argument --stop"),
    (["join", "--peer-timeout", "0", "--model", "m.gguf"],  # it said "must be between 0 and 3600", got 0
     "argument --peer-timeout: must be more than 0 and at most 3600 seconds, got 0"),
    (["batch", "--chunk-tokens", "1", "--input", ".", "--output", "o.json"],  # it blamed the template
     "argument --chunk-tokens: must be at least 64, the smallest piece a document is read in, got 1"),
    (["plan", "--model", "llama-3-8b", "--device", "name=a,mem=1e400GiB,tflops=1,bw=1GBps"], "bad size '1e400GiB': too large"),
    (["chat", "--host", "127.0.0.1:notaport", "--prompt", "hi"],  # it was "internal error: InvalidURL"
     "argument --host: '127.0.0.1:notaport' is not HOST:PORT or a URL"),
    (["chat", "--host", "127.0.0.1:99999", "--prompt", "hi"],  # it said "connection refused"
     "argument --host: '127.0.0.1:99999': port 99999 is outside 1-65535"),
    (["batch", "--input", ".", "--output", "o.json", "--host", "http://h:x/v1"],
     "argument --host: 'http://h:x/v1' is not HOST:PORT or a URL"),
])
def test_values_that_used_to_be_internal_errors_or_ignored_are_one_line(argv, needle):
    proc = run_cli(*argv, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert needle in proc.stderr.strip().splitlines()[-1], proc.stderr


def _free_port(first: int = 17900, last: int = 17999) -> int:
    import socket

    for candidate in range(first, last + 1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return candidate
    pytest.skip(f"no free port in {first}-{last}")


class _Http1Server:
    """A plain HTTP/1 server (what a gateway's port is to a gRPC client)."""

    def __enter__(self):
        import http.server
        import threading

        self.port = _free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), http.server.BaseHTTPRequestHandler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


class _Http2Server:
    """The least HTTP/2 server that is not gRPC: it answers every request with a bare 404 status, as a
    web server or proxy speaking HTTP/2 does."""

    def __enter__(self):
        import socket
        import threading

        self.port = _free_port()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen()
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self):
        import threading

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
        return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload

    def _serve(self, conn):
        def read(n: int) -> bytes:
            data = b""
            while len(data) < n:
                chunk = conn.recv(n - len(data))
                if not chunk:
                    raise OSError("closed")
                data += chunk
            return data

        try:
            read(24)  # the client preface
            conn.sendall(self._frame(4, 0, 0))  # our SETTINGS
            while True:
                head = read(9)
                length, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
                stream = int.from_bytes(head[5:], "big") & 0x7FFFFFFF
                read(length)
                if kind == 4 and not flags & 1:
                    conn.sendall(self._frame(4, 1, 0))  # SETTINGS ACK
                elif kind == 1:  # a request's HEADERS: answer ":status: 404" (HPACK static index 13), end of stream
                    conn.sendall(self._frame(1, 0x5, stream, b"\x8d"))
        except OSError:
            pass
        finally:
            conn.close()

    def __exit__(self, *exc):
        self.sock.close()


@pytest.mark.parametrize("argv", [["status"], ["peers", "drain", "a"]])
def test_an_http_server_at_the_peer_address_is_named_as_such(argv):
    """`status --host` given a gateway's port (HTTP/1) said "no p2pllm peer answers (unavailable)", as if
    nothing listened there; an HTTP/2 server that is no gRPC one was "a peer that runs an older p2pllm"."""
    with _Http1Server() as http1:
        proc = run_cli(*argv, "--host", f"127.0.0.1:{http1.port}", "--insecure", timeout=60)
    assert_one_line_error(proc, 1, f"127.0.0.1:{http1.port} answers, but it is not a p2pllm peer's gRPC port",
                          "a gateway's HTTP port? peers talk on their gRPC --port, default 7700")
    with _Http2Server() as http2:
        proc = run_cli(*argv, "--host", f"127.0.0.1:{http2.port}", "--insecure", timeout=60)
    line = assert_one_line_error(proc, 1, f"127.0.0.1:{http2.port} is an HTTP server, not a p2pllm peer")
    assert "older p2pllm" not in line


def test_a_peer_address_that_never_answers_is_named_in_the_log(stories_gguf, tmp_path):
    """`join --peer HOST:PORT` with a typo or a host that is down was retried every second in silence:
    the daemon served alone and never said why the cluster did not form."""
    import subprocess
    import sys
    import time

    from conftest import REPO, stop_daemon

    log = tmp_path / "join.log"
    silent = f"127.0.0.1:{_free_port(17700, 17730)}"  # nothing listens there
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "p2pllm", "join", "--model", str(stories_gguf), "--insecure", "--no-mdns",
             "--interface", "127.0.0.1", "--port", "17738", "--gateway-port", "17739", "--threads", "1",
             "--cluster", "silent-peer-test", "--state-dir", str(tmp_path / "state"), "--peer", silent],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and f"peer {silent} does not answer" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        text = log.read_text()
        assert f"WARNING p2pllm.daemon: peer {silent} does not answer (unavailable" in text, text[-3000:]
        assert "Connection refused" in text and "still trying it every 1 s" in text
        assert text.count(f"peer {silent} does not answer") == 1  # once a minute, not once a try
    finally:
        stop_daemon(proc)


def test_counts_in_messages_read_as_words():
    from p2pllm.wording import counted

    assert [counted(n, "request") for n in (0, 1, 2)] == ["0 requests", "1 request", "2 requests"]
    assert counted(1, "sequence recomputes", "sequences recompute") == "1 sequence recomputes"
    assert counted(3, "sequence recomputes", "sequences recompute") == "3 sequences recompute"


# Runs the CLI's main() and reports whether torch was imported: an error about a file or a flag
# should come back at once, not after torch's second of importing.
_TORCH_LOADED = """
import sys
from p2pllm.cli import main
code = main(sys.argv[1:])
print("torch" in sys.modules, code)
"""


@pytest.mark.parametrize("argv", [
    ["check-model", "{bad}"],
    ["run", "--model", "{bad}", "--prompt", "hi"],
    ["join", "--model", "{bad}", "--insecure", "--no-mdns", "--port", "17741", "--gateway-port", "17742"],
    ["join", "--model", "{good}", "--max-memory", "8", "--insecure", "--no-mdns"],
])
def test_a_bad_file_or_flag_is_refused_before_torch_is_imported(demo_tiny_gguf, tmp_path, argv):
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(demo_tiny_gguf.read_bytes()[:1000])
    argv = [a.format(bad=bad, good=demo_tiny_gguf) for a in argv]
    proc = subprocess.run([sys.executable, "-c", _TORCH_LOADED, *argv], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env=dict(os.environ, HOME=str(tmp_path)))
    assert proc.stdout.split() == ["False", "2"], (proc.stdout, proc.stderr)
    assert "p2pllm: error:" in proc.stderr
