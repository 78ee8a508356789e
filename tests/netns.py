"""Several hosts on one machine: network namespaces on a private bridge (see TESTHOSTS.md).

    from netns import Hosts, hosts, netns_available

    with Hosts(3) as h:                      # hosts are numbered 1..N, like h1..h3 in TESTHOSTS.md
        proc = h.popen(1, [sys.executable, "-m", "p2pllm", "join", ...])
        h.run(2, ["ip", "addr"], timeout=5)
        h.link_down(3)                       # "cut the cable" of host 3
        print(h.addr(1), open(proc.log_path).read())

or the `hosts` fixture (three hosts; `@pytest.mark.parametrize("hosts", [2], indirect=True)` for
another count), which skips with the reason when namespaces cannot be used here.

Names carry the pid and a counter so parallel and crashed runs never collide: namespaces
`p2p-<pid>-<n>-h<i>`, bridge `pb<pid hex>-<n hex>`, host-side veths `pv<pid hex>-<n hex>-<i hex>` (at most
15 characters). Each run gets its own /24 in 10.0.0.0/8 that no interface of this machine uses.
Only these addresses are ever a target of traffic. `close()` (also run at exit) SIGKILLs every
process started here and removes the namespaces and the bridge; leftovers of dead runs (their pid
gone) are removed when a new `Hosts` is made.
"""

from __future__ import annotations

import atexit
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

import psutil
import pytest

_COUNTER = itertools.count()
_LIVE: set["Hosts"] = set()
_LOCK = threading.Lock()
_NS_RE = re.compile(r"p2p-(\d+)-(?:\d+|probe)-h\d+")
_LINK_RE = re.compile(r"p[bv]([0-9a-f]+)-[0-9a-f]+(?:-[0-9a-f]+)?")


def _ip(*args: str, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


_AVAILABLE: list[str | None] = []


def netns_available() -> str | None:
    """Why network namespaces cannot be used here, or None when they can (probed once)."""
    if not _AVAILABLE:
        _AVAILABLE.append(_probe_netns())
    return _AVAILABLE[0]


def _probe_netns() -> str | None:
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    probe = f"p2p-{os.getpid()}-probe-h0"
    try:
        added = _ip("netns", "add", probe, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns add` failed: {exc}"
    if added.returncode != 0:
        return f"`ip netns add` failed: {added.stderr.strip() or added.returncode}"
    _ip("netns", "del", probe, check=False)
    return None


def _pid_alive(pid: int) -> bool:
    return pid == os.getpid() or psutil.pid_exists(pid)


def remove_stale() -> None:
    """Remove namespaces and links left by runs whose process is gone (a crashed or killed run)."""
    names = _ip("netns", "list", check=False).stdout.split("\n")
    for line in names:
        name = line.split(" ", 1)[0]
        match = _NS_RE.fullmatch(name)
        if match and not _pid_alive(int(match.group(1))):
            _kill_namespace_pids(name)
            _ip("netns", "del", name, check=False)
    links = _ip("-o", "link", "show", check=False).stdout.splitlines()
    for line in links:
        parts = line.split(":")
        if len(parts) < 2:
            continue
        dev = parts[1].strip().split("@", 1)[0]
        match = _LINK_RE.fullmatch(dev)
        if match and not _pid_alive(int(match.group(1), 16)):
            _ip("link", "del", dev, check=False)


def _kill_namespace_pids(ns: str) -> None:
    pids = _ip("netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ValueError, ProcessLookupError, PermissionError):
            pass


def _used_networks() -> list[ipaddress.IPv4Network]:
    nets = []
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family.name == "AF_INET" and addr.netmask:
                nets.append(ipaddress.IPv4Interface(f"{addr.address}/{addr.netmask}").network)
    return nets


def _pick_subnet(pid: int, n: int) -> ipaddress.IPv4Network:
    """A /24 in 10.0.0.0/8 unique to (pid, n) among live runs, avoiding this machine's networks."""
    used = _used_networks()
    seq = pid * 16 + n
    for attempt in range(256):
        index = (seq + attempt * 7919) % (250 * 256)
        net = ipaddress.IPv4Network(f"10.{3 + index // 256}.{index % 256}.0/24")
        if not any(net.overlaps(other) for other in used):
            return net
    raise RuntimeError("no free 10.x.y.0/24 subnet for the test hosts")


class Hosts:
    """N network namespaces on one bridge: hosts 1..N at <subnet>.1 .. <subnet>.N.

    Process logs go to `log_dir`; without one, to a temporary folder that `close()` removes
    (read `proc.log_path` or `logs()` before leaving the `with` block).
    """

    def __init__(self, count: int = 3, *, log_dir: str | os.PathLike | None = None) -> None:
        reason = netns_available()
        if reason:
            raise RuntimeError(reason)
        remove_stale()
        pid = os.getpid()
        self.run_id = next(_COUNTER)
        self.tag = f"{pid:x}-{self.run_id:x}"
        self.subnet = _pick_subnet(pid, self.run_id)
        self.bridge = f"pb{self.tag}"
        self._ns_prefix = f"p2p-{pid}-{self.run_id}-h"
        self._count = 0
        self._procs: list[subprocess.Popen] = []
        self._closed = False
        self._own_log_dir = log_dir is None
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix=f"p2p-hosts-{self.tag}-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with _LOCK:
            _LIVE.add(self)
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("link", "set", self.bridge, "up")
            for _ in range(count):
                self.add_host()
        except BaseException:
            self.close()
            raise

    # -- topology -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._count

    @property
    def indices(self) -> range:
        return range(1, self._count + 1)

    def _check(self, i: int) -> None:
        if not 1 <= i <= self._count:
            raise IndexError(f"host {i} does not exist (hosts are 1..{self._count})")

    def ns(self, i: int) -> str:
        self._check(i)
        return f"{self._ns_prefix}{i}"

    def addr(self, i: int) -> str:
        self._check(i)
        return str(self.subnet.network_address + i)

    def veth(self, i: int) -> str:
        """The host-side end of host i's cable (on the bridge)."""
        self._check(i)
        return f"pv{self.tag}-{i:x}"

    def add_host(self) -> int:
        """Add one more host on the bridge; returns its number."""
        if self._count >= 250:
            raise RuntimeError("at most 250 hosts")
        self._count += 1
        i = self._count
        ns, veth = self.ns(i), self.veth(i)
        if len(veth) > 15 or len(self.bridge) > 15:
            raise RuntimeError(f"interface names {veth!r}/{self.bridge!r} exceed 15 characters")
        _ip("netns", "add", ns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", veth, "master", self.bridge, "up")
        _ip("-n", ns, "addr", "add", f"{self.addr(i)}/{self.subnet.prefixlen}", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        return i

    def link_down(self, i: int) -> None:
        """Cut host i's cable (its traffic to and from everyone stops)."""
        _ip("link", "set", self.veth(i), "down")

    def link_up(self, i: int) -> None:
        _ip("link", "set", self.veth(i), "up")

    def shape(self, i: int, rate: str) -> None:
        """Limit traffic towards host i to `rate` (tc's units: `16mbit`), like a slow Wi-Fi link."""
        subprocess.run(["tc", "qdisc", "replace", "dev", self.veth(i), "root", "tbf", "rate", rate, "burst", "64kb",
                        "latency", "100ms"], check=True, capture_output=True)

    def unshape(self, i: int) -> None:
        subprocess.run(["tc", "qdisc", "del", "dev", self.veth(i), "root"], check=False, capture_output=True)

    # -- processes ----------------------------------------------------------------------------

    def popen(self, i: int, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start argv inside host i in its own process group; output goes to `proc.log_path`
        unless stdout/stderr are given."""
        ns = self.ns(i)
        name = Path(str(argv[0])).name if argv else "proc"
        log_path = self.log_dir / f"h{i}-{len(self._procs)}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.log"
        log_file = None
        if "stdout" not in kw or "stderr" not in kw:
            log_file = open(log_path, "wb")
            kw.setdefault("stdout", log_file)
            kw.setdefault("stderr", subprocess.STDOUT if kw["stdout"] is log_file else log_file)
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw["start_new_session"] = True
        try:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *map(str, argv)], **kw)
        finally:
            if log_file is not None:
                log_file.close()
        proc.log_path = log_path  # type: ignore[attr-defined]
        self._procs.append(proc)
        return proc

    def run(self, i: int, argv: Sequence[str], timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        """Run argv inside host i to completion, capturing text output."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(["ip", "netns", "exec", self.ns(i), *map(str, argv)], timeout=timeout, **kw)

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL proc's whole process group (a lost peer) and reap it."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def logs(self, tail: int | None = 4000) -> str:
        """Every process's log: the last `tail` characters of each for an assertion message, all of it
        (tail=None) to assert on what a log says."""
        parts = []
        for proc in self._procs:
            path = getattr(proc, "log_path", None)
            if path and Path(path).exists():
                text = Path(path).read_text(errors="replace")
                parts.append(f"--- {Path(path).name} (rc={proc.poll()}) ---\n{text if tail is None else text[-tail:]}")
        return "\n".join(parts)

    # -- teardown -----------------------------------------------------------------------------

    def close(self) -> None:
        """Kill everything started here and remove the namespaces and the bridge. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            for proc in self._procs:
                if proc.poll() is None:
                    self.kill(proc)
            for i in range(1, self._count + 1):
                ns = f"{self._ns_prefix}{i}"
                _kill_namespace_pids(ns)
            deadline = time.monotonic() + 5
            for proc in self._procs:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            for i in range(1, self._count + 1):
                _ip("link", "del", f"pv{self.tag}-{i:x}", check=False)
                _ip("netns", "del", f"{self._ns_prefix}{i}", check=False)
            _ip("link", "del", self.bridge, check=False)
        finally:
            with _LOCK:
                _LIVE.discard(self)
            if self._own_log_dir:
                shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@atexit.register
def _close_all() -> None:
    with _LOCK:
        live = list(_LIVE)
    for hosts_ in live:
        hosts_.close()


@pytest.fixture
def hosts(request, tmp_path):
    """Three hosts (or `request.param` with indirect parametrization); skips when unavailable.
    Process logs stay under the test's tmp_path."""
    reason = netns_available()
    if reason:
        pytest.skip(reason)
    count = getattr(request, "param", 3)
    with Hosts(count, log_dir=tmp_path / "hosts") as h:
        yield h
