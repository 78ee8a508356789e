"""A peer that joins a running cluster and gets no layers still learns the committed plan (its
gateway forwards to the coordinator, its status shows the plan) and says why it holds none; and a
join whose gateway cannot bind stops with its one-line error only. Real daemons on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from p2pllm.transport.client import fetch_status
from p2pllm.transport.security import Security

from conftest import REPO, assert_one_line_error, run_cli

SECRET = "late-join-test-secret-0123456789abcdef"


def _free(port: int) -> None:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            pytest.fail(f"port {port} on 127.0.0.1 is taken (another test session?)")


class Peers:
    """`p2pllm join` daemons on loopback, each on (grpc, gateway) ports, all dialling the first."""

    def __init__(self, model: Path, logs: Path, home: Path, cluster: str, *extra: str):
        self.model, self.logs, self.home, self.cluster, self.extra = model, logs, home, cluster, extra
        self.procs: list[subprocess.Popen] = []
        self.ports: list[tuple[int, int]] = []

    def start(self, name: str, grpc: int, gateway: int, *extra: str) -> None:
        _free(grpc)
        _free(gateway)
        seed = self.ports[0][0] if self.ports else grpc + 1
        argv = [sys.executable, "-m", "p2pllm", "join", "--model", str(self.model), "--name", name,
                "--port", str(grpc), "--gateway-port", str(gateway), "--interface", "127.0.0.1", "--no-mdns",
                "--peer", f"127.0.0.1:{seed}", "--cluster", self.cluster, "--state-dir", str(self.logs / name),
                *self.extra, *extra]
        env = dict(os.environ, P2PLLM_SECRET=SECRET, HOME=str(self.home))
        self.procs.append(subprocess.Popen(argv, stdout=open(self.logs / f"{name}.log", "w"),
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO, env=env,
                                           start_new_session=True))
        self.ports.append((grpc, gateway))

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text()

    def all_logs(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in sorted(self.logs.glob("*.log")))

    def health(self, i: int) -> dict:
        try:
            return httpx.get(f"http://127.0.0.1:{self.ports[i][1]}/health", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return {}

    def wait(self, what, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert all(p.poll() is None for p in self.procs), self.all_logs()
            got = what()
            if got:
                return got
            time.sleep(0.3)
        pytest.fail(f"timed out after {timeout}s\n{self.all_logs()}")

    def status(self, i: int) -> dict:
        return asyncio.run(fetch_status(f"127.0.0.1:{self.ports[i][0]}", Security.from_secret(SECRET)))

    def chat(self, i: int) -> httpx.Response:
        return httpx.post(f"http://127.0.0.1:{self.ports[i][1]}/v1/chat/completions", timeout=60,
                          json={"model": self.model.name, "max_tokens": 4, "temperature": 0,
                                "messages": [{"role": "user", "content": "What is 2+2?"}]})

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, 15)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """One HOME for the module's daemons: the capability benchmarks run once, then are cached."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture
def peers(demo_tiny_gguf, tmp_path, home):
    made = []

    def make(cluster: str, *extra: str) -> Peers:
        made.append(Peers(demo_tiny_gguf, tmp_path, home, cluster, "--response-cache", "off", *extra))
        return made[-1]

    yield make
    for p in made:
        p.stop()


def _layers(s: dict) -> dict:
    return {p["name"]: p["layers"] and tuple(p["layers"]) for p in s["peers"]}


def test_a_late_peer_the_plan_does_not_need_learns_the_committed_plan_and_serves(peers):
    c = peers("late-opt")  # --strategy optimal: the model fits on the first peer, a second adds nothing
    c.start("late-1", 47611, 48611)
    c.wait(lambda: c.health(0).get("epoch") == 1 and c.health(0).get("stages") == 1)
    c.start("late-2", 47612, 48612)
    c.wait(lambda: c.health(1).get("status") == "ok")
    assert c.health(1)["epoch"] == 1  # the committed epoch, not a new one: nothing else changed

    reply = c.chat(1)  # forwarded to the coordinator (late-1)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"]

    mine, theirs = c.status(1), c.status(0)
    assert mine["epoch"] == theirs["epoch"] == 1 and mine["coordinator"] == theirs["coordinator"]
    assert _layers(mine) == _layers(theirs) == {"late-1": (0, 6), "late-2": None}
    assert mine["plan"]["stages"] == theirs["plan"]["stages"]
    assert re.search(r"plan epoch 1 committed: late-1\[0,6\); this peer holds no layers \(not used: ",
                     c.log("late-2")), c.log("late-2")
    assert "sent plan epoch 1 to late-2, which holds no layers: not used" in c.log("late-1")


def test_a_late_peer_too_small_for_an_even_share_serves_and_says_why(peers):
    c = peers("late-even", "--strategy", "even")
    c.start("even-1", 47621, 48621)
    c.start("even-2", 47622, 48622)
    c.wait(lambda: all(c.health(i).get("stages") == 2 for i in (0, 1)))
    epoch = c.health(0)["epoch"]
    c.start("even-3", 47623, 48623, "--max-memory", "1MiB")  # not enough for one layer
    c.wait(lambda: c.health(2).get("status") == "ok")
    assert c.health(2)["stages"] == 2 and c.health(2)["epoch"] == epoch  # the plan it joined, unchanged

    reply = c.chat(2)
    assert reply.status_code == 200, reply.text
    s = c.status(2)
    assert s["epoch"] == epoch and _layers(s)["even-3"] is None and all(
        _layers(s)[n] for n in ("even-1", "even-2"))
    assert re.search(r"this peer holds no layers \(no plan that gives it layers is feasible: needs .* more "
                     r"memory", c.log("even-3")), c.log("even-3")
    coordinator = next(p["name"] for p in s["peers"] if p["id"] == s["coordinator"])
    assert f"keeping plan epoch {epoch}: a plan with every peer is not feasible" in c.log(coordinator)


def test_peers_that_cannot_hold_the_model_say_why_in_the_503_and_health(peers):
    c = peers("too-small")
    c.start("small-1", 47641, 48641, "--max-memory", "1MiB")
    c.wait(lambda: "no feasible plan" in c.log("small-1"))
    health = c.wait(lambda: (h := c.health(0)) and "reason" in h and h)
    assert health["status"] == "unavailable" and "needs" in health["reason"] and "more memory" in health["reason"], \
        health
    reply = c.chat(0)
    assert reply.status_code == 503, reply.text
    message = reply.json()["error"]["message"]
    assert message.startswith("the cluster has no plan: with the peers here none is feasible: needs"), message
    assert "still meeting" not in message
    assert "more memory" in c.status(0)["not_serving"]  # and status says it (plan: null told nothing)
    table = run_cli("status", "--host", "127.0.0.1:47641", "--secret", SECRET, timeout=60)
    assert table.returncode == 0 and "not serving: the cluster has no plan" in table.stdout, table.stdout


@pytest.mark.parametrize("taken_port", ["gateway", "same", "grpc"])
def test_join_with_a_port_taken_prints_one_error_line(demo_tiny_gguf, tmp_path, home, taken_port):
    grpc, gateway = 47631, 47631 if taken_port == "same" else 48631
    _free(grpc)
    with socket.socket() as taken:
        if taken_port != "same":
            taken.bind(("127.0.0.1", gateway if taken_port == "gateway" else grpc))
            taken.listen()
        proc = run_cli("join", "--model", demo_tiny_gguf, "--name", "busy", "--port", grpc, "--gateway-port", gateway,
                       "--interface", "127.0.0.1", "--no-mdns", "--state-dir", tmp_path / "state",
                       "--cluster", f"busy-{taken_port}", timeout=60, env_extra={"HOME": str(home)})
    # refused before a secret is made and a join command printed for other machines
    assert not list(home.rglob(f"secret-busy-{taken_port}")) and "join" not in proc.stdout, proc.stdout
    if taken_port == "same":  # a usage error, before anything starts
        assert_one_line_error(proc, 2, f"--gateway-port {grpc} is this peer's gRPC --port too")
        return
    assert proc.returncode == 1, proc.stderr
    # the daemon's log lines aside, exactly the error line
    other = [line for line in proc.stderr.splitlines()
             if line.strip() and not re.match(r"\d{4}-\d\d-\d\d [\d:,]+ [A-Z]+ |WARNING: ", line)]
    # (gRPC's own "E... add_port.cc" line is not among them; --interface 127.0.0.1 is where gRPC listens)
    expected = f"cannot bind the gRPC server to 127.0.0.1:{grpc}" if taken_port == "grpc" else \
        f"cannot bind the gateway to 127.0.0.1:{gateway}"
    assert other == [f"p2pllm: error: {expected}: address already in use"], proc.stderr


def test_a_peer_told_to_stop_finishes_the_stream_its_gateway_forwards_and_takes_no_new_ones(tmp_path, home):
    """Ctrl-C on a peer whose gateway forwards a stream to the coordinator: the gateway was stopped
    under it, a 200 cut short with no error after a 5 s grace (and a traceback in the log). Now new
    requests get a 503 (and /health says why) while the stream runs to its end, then the peer exits.
    A second Ctrl-C ends the streams at once, each with an error event."""
    from conftest import shared_model

    model = shared_model("SmolLM2-135M-Instruct.Q4_1.gguf")  # ~80 tok/s here: 300 tokens outlast the signal
    c = Peers(model, tmp_path, home, "late-leave", "--response-cache", "off")
    try:
        c.start("leave-1", 47651, 48651)
        c.wait(lambda: c.health(0).get("epoch") == 1 and c.health(0).get("stages") == 1)
        c.start("leave-2", 47652, 48652)  # the model fits on leave-1: leave-2 holds no layers, forwards
        c.wait(lambda: c.health(1).get("status") == "ok")
        body = {"model": model.name, "prompt": "Once upon a time", "max_tokens": 300, "temperature": 0,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:48652/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            events = (line[6:] for line in r.iter_lines() if line.startswith("data: "))
            chunks = [json.loads(next(events))]
            os.killpg(c.procs[1].pid, signal.SIGINT)
            deadline = time.monotonic() + 10
            while c.health(1).get("status") != "unavailable" and time.monotonic() < deadline:
                time.sleep(0.1)
            health = c.health(1)
            assert health.get("status") == "unavailable" and "leaving" in health.get("reason", ""), health
            refused = c.chat(1)
            assert refused.status_code == 503 and "leaving" in refused.json()["error"]["message"], refused.text
            # status and metrics say so too (they counted it serving while its gateway refused)
            assert "leaving" in (c.status(1)["not_serving"] or "")
            metrics = httpx.get("http://127.0.0.1:48652/metrics", timeout=5).text
            assert "\np2pllm_engine_serving 0.0\n" in metrics, [m for m in metrics.splitlines() if "serving" in m]
            rest = list(events)
        assert rest[-1] == "[DONE]", rest[-3:]
        chunks += [json.loads(e) for e in rest[:-1]]
        assert not any("error" in ch for ch in chunks), [ch for ch in chunks if "error" in ch]
        assert [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]][-1] == "length"
        c.procs[1].wait(timeout=60)
        deadline = time.monotonic() + 15  # its peer forgets it once it is silent: not listed as LOST
        while len(c.status(0)["peers"]) != 1 and time.monotonic() < deadline:
            time.sleep(0.3)
        assert [p["name"] for p in c.status(0)["peers"]] == ["leave-1"], c.status(0)["peers"]
        log = c.log("leave-2")
        assert "waiting for 1 request through this peer's gateway to finish" in log, log[-3000:]
        assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]

        # a second Ctrl-C stops at once: the running streams end with an error event, never cut
        # short without one, on a peer that forwards them and on the coordinator that runs them
        c.procs.pop(), c.ports.pop()
        c.start("leave-3", 47652, 48652)
        c.wait(lambda: c.health(1).get("status") == "ok")
        for i, name, why in ((1, "leave-3", "this peer is shutting down"), (0, "leave-1", "shutting down")):
            with httpx.stream("POST", f"http://127.0.0.1:{c.ports[i][1]}/v1/completions", json=body,
                              timeout=60) as r:
                events = (line[6:] for line in r.iter_lines() if line.startswith("data: "))
                assert "error" not in json.loads(next(events))
                os.killpg(c.procs[i].pid, signal.SIGINT)
                assert "error" not in json.loads(next(events))  # told to stop: the stream goes on
                os.killpg(c.procs[i].pid, signal.SIGINT)
                rest = list(events)
            assert rest[-1] == "[DONE]" and why in json.loads(rest[-2])["error"]["message"], (name, rest[-3:])
            c.procs[i].wait(timeout=30)
            assert "Traceback" not in c.log(name) and "Exception in ASGI" not in c.log(name), c.log(name)[-3000:]
    finally:
        c.stop()
