"""Secure by default: the cluster secret, mutual TLS between peers, refused outsiders."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clusterutil import TEST_SECRET, join, status, wait_for_agreement
from conftest import REPO, assert_one_line_error, run_cli
from netns import hosts  # noqa: F401  (a fixture)
from p2pllm.cli import build_parser
from p2pllm.transport import security as sec

# ------------------------------------------------------------------------------ the secret on disk


@pytest.fixture
def config_home(tmp_path, monkeypatch):
    home = tmp_path / "config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    monkeypatch.delenv(sec.SECRET_ENV, raising=False)
    return home


def test_same_secret_same_certificate_other_secret_other_key():
    a, b = sec.derive_credentials("s3cret-for-the-lab-cluster"), sec.derive_credentials("s3cret-for-the-lab-cluster")
    assert a == b  # deterministic signature: every peer holds byte-identical certificates
    c = sec.derive_credentials("s3cret-for-the-lab-clusteR")
    assert c.key_pem != a.key_pem and c.cert_pem != a.cert_pem
    assert b"PRIVATE KEY" in a.key_pem and b"s3cret" not in a.cert_pem + a.key_pem


def test_a_made_secret_never_reads_as_a_flag(demo_tiny_gguf):
    # token_urlsafe starts with "-" once in 64 draws, and `join --secret -x...` then fails to parse
    made = [sec.generate_secret() for _ in range(2000)]
    assert not any(s.startswith("-") for s in made) and len(set(made)) == len(made)
    # a secret of the user's own may start with "-": the printed command's --secret=S form takes it
    args = build_parser().parse_args(["join", "--model", str(demo_tiny_gguf), "--secret=-own-secret-0123456789"])
    assert args.secret == "-own-secret-0123456789"


def test_secret_precedence_flag_env_file_new(config_home, monkeypatch):
    made = sec.resolve_secret("lab", None, False, create=True)
    assert made.source == "new" and len(made.secret) >= 32
    path = config_home / "p2pllm" / "secret-lab"
    assert made.path == path and path.read_text().strip() == made.secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = sec.resolve_secret("lab", None, False, create=True)
    assert (again.source, again.secret) == ("file", made.secret)  # reused, never replaced
    monkeypatch.setenv(sec.SECRET_ENV, "from-the-environment-0123")
    assert sec.resolve_secret("lab", None, False, create=True).secret == "from-the-environment-0123"
    assert sec.resolve_secret("lab", "from-the-flag-0123456", False, create=True).secret == "from-the-flag-0123456"
    assert sec.resolve_secret("lab", None, True, create=True).secret is None
    with pytest.raises(sec.UsageError):
        sec.resolve_secret("lab", "x" * 20, True, create=True)
    monkeypatch.delenv(sec.SECRET_ENV)
    with pytest.raises(sec.UsageError, match="no secret for cluster 'other'"):
        sec.resolve_secret("other", None, False, create=False)  # status never makes one
    assert sec.secret_path("a/../../b").name.startswith("secret-h-")  # odd names never escape the folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_until_ready(model: Path, env: dict, cluster: str, port: int) -> tuple[subprocess.Popen, str]:
    argv = [sys.executable, "-m", "p2pllm", "join", "--model", str(model), "--cluster", cluster, "--no-mdns",
            "--interface", "127.0.0.1", "--port", str(port), "--gateway-port", str(_free_port()), "--threads", "1"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env,
                            start_new_session=True)
    out = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        out.append(line)
        if "ready: epoch" in line:
            return proc, "".join(out)
    os.killpg(proc.pid, 9)
    pytest.fail("".join(out))


def test_first_join_makes_a_secret_prints_the_command_and_the_next_reuses_it(stories_gguf, tmp_path):
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "cfg"), PYTHONUNBUFFERED="1")
    env.pop(sec.SECRET_ENV, None)
    port = _free_port()
    commands = []
    for run in range(2):
        proc, out = _join_until_ready(stories_gguf, env, "office", port)
        try:
            line = next(l for l in out.splitlines() if l.strip().startswith("p2pllm join "))
            argv = shlex.split(line)
            assert argv[:6] == ["p2pllm", "join", "--model", str(stories_gguf), "--cluster", "office"]
            assert argv[6].startswith("--secret=") and len(argv) == 7
            commands.append(argv)
            assert ("made a new cluster secret" if run == 0 else "using the cluster secret") in out
            assert "peer traffic: mutual TLS" in out
            # status finds the stored secret of --cluster; the wrong one or none is one clear line
            ok = subprocess.run([sys.executable, "-m", "p2pllm", "status", "--json", "--cluster", "office", "--host",
                                 f"127.0.0.1:{port}"], capture_output=True, text=True, env=env, timeout=30)
            assert ok.returncode == 0 and json.loads(ok.stdout)["epoch"] >= 1, ok.stderr
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=20)
    assert commands[0] == commands[1]
    path = tmp_path / "cfg" / "p2pllm" / "secret-office"
    assert path.read_text().strip() == commands[0][6].removeprefix("--secret=")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_insecure_warns_loudly_and_contradictory_flags_are_refused(tmp_path, demo_tiny_gguf):
    proc = run_cli("join", "--model", demo_tiny_gguf, "--secret", "abc", "--insecure")
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr
    proc = run_cli("status", "--host", "127.0.0.1:1", "--secret", "abc", "--insecure")
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr
    env_home = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path))
    env_home.pop(sec.SECRET_ENV, None)
    nobody = subprocess.run([sys.executable, "-m", "p2pllm", "status", "--cluster", "nothing-here", "--host",
                             "127.0.0.1:1"], capture_output=True, text=True, env=env_home, cwd=REPO, timeout=60)
    assert_one_line_error(nobody, 2, "no secret for cluster 'nothing-here'", "--secret")


# ------------------------------------------------------------------------------ several hosts

_BROWSE = """
import json, sys, time
from zeroconf import ServiceBrowser, Zeroconf
zc = Zeroconf(interfaces=[sys.argv[1]])
found = {}
class L:
    def add_service(self, zc, t, name): found[name] = None
    def update_service(self, zc, t, name): pass
    def remove_service(self, zc, t, name): pass
ServiceBrowser(zc, "_p2pllm._tcp.local.", L())
time.sleep(3)
out = {}
for name in found:
    info = zc.get_service_info("_p2pllm._tcp.local.", name, timeout=3000)
    if info is not None:
        out[name] = {"text": info.text.hex(), "props": {k.decode(): (v or b"").decode("utf-8", "replace")
                                                        for k, v in info.properties.items()}}
zc.close()
print(json.dumps(out))
"""


@pytest.mark.parametrize("hosts", [4], indirect=True)
def test_peers_without_the_secret_are_refused_and_never_members(hosts, stories_gguf):
    join(hosts, 1, stories_gguf)
    join(hosts, 2, stories_gguf)
    join(hosts, 3, stories_gguf, "--secret", "a-wrong-secret-for-this-cluster")
    join(hosts, 4, stories_gguf, "--insecure")
    wait_for_agreement(hosts, [1, 2], n_layers=5)
    outsiders = {"host3", "host4"}
    deadline = time.monotonic() + 6  # mDNS found them long ago; give them every chance to get in
    while time.monotonic() < deadline:
        for i in (1, 2):
            s = status(hosts, i)
            assert s is not None and {p["name"] for p in s["peers"]} == {"host1", "host2"}, s
            assert s["epoch"] >= 1 and not outsiders & {p["name"] for p in s["peers"]}
        time.sleep(1)
    logs = hosts.logs(tail=None)
    for i in (3, 4):  # refused at the handshake, logged with their address by the peers that dialled them
        assert re.search(rf"refused peer at {re.escape(hosts.addr(i))}:7700", logs), logs[-5000:]
    assert "WARNING: --insecure" in logs

    # status with the wrong secret or none: one clear line each
    wrong = hosts.run(1, [sys.executable, "-m", "p2pllm", "status", "--host", f"{hosts.addr(1)}:7700",
                          "--secret", "guess-guess-guess-guess"], timeout=30)
    assert_one_line_error(wrong, 1, "refused the TLS handshake", "wrong cluster secret")
    plain = hosts.run(1, [sys.executable, "-m", "p2pllm", "status", "--host", f"{hosts.addr(1)}:7700", "--insecure"],
                      timeout=30)
    assert_one_line_error(plain, 1, "requires the cluster secret")
    to_insecure = hosts.run(1, [sys.executable, "-m", "p2pllm", "status", "--host", f"{hosts.addr(4)}:7700",
                                "--secret", TEST_SECRET], timeout=30)
    assert_one_line_error(to_insecure, 1, "does not speak TLS: a peer there runs without a secret (--insecure")
    to_gateway = hosts.run(1, [sys.executable, "-m", "p2pllm", "status", "--host", "127.0.0.1:8700",
                               "--secret", TEST_SECRET], timeout=30)  # the HTTP gateway's port, given by mistake
    assert_one_line_error(to_gateway, 1, "does not speak TLS", "a gateway's HTTP port? peers talk on their gRPC "
                          "--port, default 7700")

    # what mDNS carries: the documented keys, never the secret
    browsed = hosts.run(2, [sys.executable, "-c", _BROWSE, hosts.addr(2)], timeout=30)
    assert browsed.returncode == 0, browsed.stderr
    records = json.loads(browsed.stdout)
    assert len(records) >= 3, records
    for rec in records.values():
        assert set(rec["props"]) == {"id", "name", "cluster", "proto", "grpc", "gw", "fp", "mem", "flops", "bw"}
        raw = bytes.fromhex(rec["text"])
        for secret in (TEST_SECRET, "a-wrong-secret-for-this-cluster"):
            assert secret.encode() not in raw and secret[:12].encode() not in raw


_CONNECTS = """
import socket, sys
for addr in sys.argv[1:]:
    try:
        socket.create_connection((addr, 7700), timeout=2).close()
        print(addr, "open")
    except OSError:
        print(addr, "closed")
"""


@pytest.mark.parametrize("hosts", [1], indirect=True)
def test_with_interface_the_peer_port_listens_only_there_and_on_loopback(hosts, demo_tiny_gguf):
    """A machine with a second network (here a second address) keeps the peer port off it."""
    other = str(hosts.subnet.network_address + 251)
    subprocess.run(["ip", "-n", hosts.ns(1), "addr", "add", f"{other}/32", "dev", "eth0"], check=True)
    join(hosts, 1, demo_tiny_gguf, "--interface", hosts.addr(1), "--no-mdns")
    deadline = time.monotonic() + 60
    while True:
        seen = dict(line.split() for line in hosts.run(
            1, [sys.executable, "-c", _CONNECTS, hosts.addr(1), "127.0.0.1", other]).stdout.splitlines())
        if seen.get(hosts.addr(1)) == "open" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert seen == {hosts.addr(1): "open", "127.0.0.1": "open", other: "closed"}, (seen, hosts.logs())
