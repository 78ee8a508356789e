"""Fuzzing a real two-peer cluster on loopback (mutual TLS on, like every cluster).

Thousands of hostile inputs go to the peers' gRPC ports (garbage bytes on raw sockets, garbage
HTTP/2 after a valid TLS handshake, garbage protobuf, frames with the wrong epoch, wrong shapes,
huge lengths, unknown sequences, mutated fields of a frame the head would send) and hundreds of
malformed HTTP requests to a peer's gateway; afterwards both peers are still members of the same
plan, hold no leftover sequences, answer health checks and give the same greedy completion as
one process running the whole model. A client without the secret never gets past TLS.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import socket
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
import torch

from conftest import REPO
from p2pllm.transport.client import fetch_status
from p2pllm.errors import P2PError
from p2pllm.model.sampling import SamplingParams
from p2pllm.model.spec import read_spec
from p2pllm.proto import p2pllm_pb2 as pb
from p2pllm.proto import p2pllm_pb2_grpc as pb_grpc
from p2pllm.runtime.frames import Chunk, MicroBatch, SeqStart
from p2pllm.transport import frames
from p2pllm.transport.client import CHANNEL_OPTIONS
from p2pllm.transport.security import CERT_NAME, Security, refusal_reason

SECRET = "fuzz-secret-" + os.urandom(12).hex()
PROMPT = "Once upon a time"
RING = "/p2pllm.v1.Peer/Ring"


def _free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all held open while choosing, so none comes twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class PortTaken(Exception):
    pass


class Cluster:
    def __init__(self, model: Path, tmp: Path):
        self.model = model
        self.spec = read_spec(model)
        self.security = Security.from_secret(SECRET)
        self.ports, self.gateways = (lambda p: (p[:2], p[2:]))(_free_ports(4))
        self.logs = [tmp / f"peer{i}.log" for i in range(2)]
        env = dict(os.environ, P2PLLM_SECRET=SECRET, XDG_CONFIG_HOME=str(tmp / "config"), PYTHONUNBUFFERED="1")
        env.pop("P2PLLM_DEBUG", None)
        self.procs = []
        for i in range(2):
            argv = [sys.executable, "-m", "p2pllm", "join", "--model", str(model), "--name", f"fuzz{i}",
                    "--port", str(self.ports[i]), "--gateway-port", str(self.gateways[i]), "--interface", "127.0.0.1",
                    "--no-mdns", "--peer", f"127.0.0.1:{self.ports[0]}", "--strategy", "even",
                    "--cluster", f"fuzz-{os.getpid()}", "--threads", "1",
                    "--response-cache", "off"]  # a repeated request after fuzzing must reach the ring
            with open(self.logs[i], "w") as log:
                self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                                   stdin=subprocess.DEVNULL, start_new_session=True))

    def status(self, i: int = 0) -> dict:
        return asyncio.run(fetch_status(f"127.0.0.1:{self.ports[i]}", self.security))

    def wait_ready(self, timeout: float = 40) -> dict:
        deadline, last = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                if "in use" in self.tail():
                    raise PortTaken()
                pytest.fail(f"a peer exited\n{self.tail()}")
            try:
                s = self.status()
                if s["epoch"] > 0 and sum(1 for p in s["peers"] if p["layers"]) == 2:
                    return s
                last = json.dumps(s)[:500]
            except P2PError as e:
                last = str(e)
            time.sleep(0.3)
        pytest.fail(f"the cluster was not ready: {last}\n{self.tail()}")

    def tail(self) -> str:
        """The end of both peers' logs (for a failure message)."""
        return "\n".join(f"--- peer {i} ---\n{p.read_text(errors='replace')[-3000:]}" for i, p in enumerate(self.logs))

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
            p.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster(stories_gguf, tmp_path_factory):
    for attempt in range(3):  # a port chosen here may be taken by another process before the daemon binds it
        c = Cluster(stories_gguf, tmp_path_factory.mktemp("fuzz"))
        try:
            status = c.wait_ready()
            break
        except PortTaken:
            c.close()
        except BaseException:
            c.close()
            raise
    else:
        pytest.fail(f"no free ports for the fuzzed cluster\n{c.tail()}")
    try:
        by_id = {p["id"]: p["address"] for p in status["peers"]}
        c.epoch = status["epoch"]
        c.stages = [by_id[st["peer"]] for st in sorted(status["plan"]["stages"], key=lambda st: st["layers"][0])]
        yield c
    finally:
        c.close()


def _complete(c: Cluster, port_index: int = 0) -> httpx.Response:
    body = {"model": c.model.name, "prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    return httpx.post(f"http://127.0.0.1:{c.gateways[port_index]}/v1/completions", json=body, timeout=60)


# ------------------------------------------------------------------------------ frame makers
class Frames:
    """Hostile and valid frames for one cluster; remembers every sequence id it started."""

    def __init__(self, c: Cluster, rng: random.Random):
        self.c, self.rng, self.spec = c, rng, c.spec
        self.seq_ids: set[int] = set()
        self.mb = 10**9

    def valid(self, first: bool, n: int = 3) -> pb.Frame:
        seq = self.rng.randrange(10**6, 10**7)
        self.seq_ids.add(seq)
        self.mb += 1
        tokens = [self.rng.randrange(self.spec.vocab) for _ in range(n)]
        mb = MicroBatch(self.c.epoch, self.mb, [Chunk(seq, 0, n, True)], tokens, [SeqStart(seq, 32, SamplingParams())],
                        [seq])  # started, run and finished in one frame: nothing stays behind
        return frames.encode(mb) if first else frames.encode(mb, torch.randn(n, self.spec.hidden))

    def wrong_epoch(self, first: bool) -> pb.Frame:
        f = self.valid(first)
        f.epoch = self.rng.choice([0, self.c.epoch + 1, self.c.epoch + 1000, 2**64 - 1])
        return f

    def wrong_shape(self) -> pb.Frame:
        f = self.valid(first=False)
        n, h = len(f.hidden.shape) and f.hidden.shape[0], self.spec.hidden
        choice = self.rng.randrange(8)
        if choice == 0:
            f.hidden.shape[:] = [n, h + 1]
        elif choice == 1:
            f.hidden.shape[:] = [n + 1, h]
        elif choice == 2:
            f.hidden.shape[:] = [n * h]
        elif choice == 3:
            f.hidden.shape[:] = [n, h, 1]
        elif choice == 4:
            f.hidden.data = f.hidden.data[:-4]
        elif choice == 5:
            f.hidden.dtype = self.rng.choice(["float64", "int64", "uint8", "pickle", "", "float32\x00", "q4_0"])
        elif choice == 6:
            f.ClearField("hidden")
        else:
            f.hidden.data = struct.pack("<f", math.nan) * (n * h)
        return f

    def huge(self, first: bool) -> pb.Frame:
        f = self.valid(first)
        choice = self.rng.randrange(10)
        big32, big64 = 2**32 - 1, 2**63 - 1
        if choice == 0:
            f.chunks[0].length = big32
        elif choice == 1:
            f.chunks[0].start = big32
        elif choice == 2:
            f.starts[0].capacity = big32
        elif choice == 3:
            f.hidden.shape[:] = [2**40, self.spec.hidden]
        elif choice == 4:
            f.hidden.shape[:] = [big64, big64]
        elif choice == 5:
            f.finished.extend(range(5000))
        elif choice == 6:
            f.chunks.extend(pb.Chunk(seq_id=i, start=0, length=1) for i in range(1100))
        elif choice == 7:
            f.tokens[:] = [big64, -big64 - 1, self.spec.vocab]
        elif choice == 8:
            f.starts.extend(pb.SequenceStart(seq_id=i, capacity=2048) for i in range(1, 1100))
        else:
            f.starts[0].top_k = big32
            f.starts[0].temperature = math.inf
        return f

    def unknown_sequence(self, first: bool) -> pb.Frame:
        f = self.valid(first)
        del f.starts[:]
        f.chunks[0].seq_id = self.rng.randrange(10**7, 10**8)
        f.chunks[0].start = self.rng.choice([0, 5])
        return f

    def mutated(self, first: bool) -> pb.Frame:
        f = self.valid(first)
        r = self.rng
        for _ in range(r.randint(1, 3)):
            field = r.randrange(14)
            if field == 0:
                f.epoch = r.choice([f.epoch, 0, 2**64 - 1, r.randrange(2**64)])
            elif field == 1:
                f.micro_batch = r.randrange(2**64)
            elif field == 2 and f.chunks:
                f.chunks[0].seq_id = r.randrange(2**64)
            elif field == 3 and f.chunks:
                f.chunks[0].length = r.choice([0, 1, 2, 4, 2047, 2048, 2**32 - 1])
            elif field == 4 and f.chunks:
                f.chunks[0].start = r.choice([0, 1, 2045, 2046, 2047, 2048, 2**31])
            elif field == 5:
                f.tokens.append(r.choice([-1, 0, 511, 512, 2**62]))
            elif field == 6 and f.starts:
                s = f.starts[0]
                setattr(s, r.choice(["temperature", "top_p"]), r.choice([math.nan, -1.0, 0.0, 1e-30, 0.5, 101.0]))
                s.top_k = r.choice([0, 1, 511, 512, 2**32 - 1])
            elif field == 7 and f.starts:
                f.starts[0].seed = r.randrange(2**64)
                f.starts[0].has_seed = True
                f.starts[0].temperature = 0.7
            elif field == 8:
                f.finished[:] = [r.randrange(2**64) for _ in range(r.randint(0, 4))]
            elif field == 9:
                f.hidden.CopyFrom(pb.Tensor(dtype="float32", shape=[3, self.spec.hidden],
                                            data=os.urandom(3 * self.spec.hidden * 4)))
            elif field == 10:
                f.sampled.extend([1, 2]) if r.random() < 0.5 else setattr(f, "error", "boom" * r.randint(1, 100))
            elif field == 11:
                f.chunks.add(seq_id=next(iter(f.chunks)).seq_id if f.chunks else 1, start=0, length=1)
            elif field == 12:
                del f.chunks[:]
            else:
                f.starts.add(seq_id=f.starts[0].seq_id if f.starts else 7, capacity=8)
        for s in f.starts:
            self.seq_ids.add(s.seq_id)
        return f

    def garbage_bytes(self) -> bytes:
        r = self.rng
        if r.random() < 0.5:
            return bytes(r.randrange(256) for _ in range(r.choice([0, 1, 5, 40, 300, 3000])))
        data = bytearray(self.valid(r.random() < 0.5).SerializeToString())
        for _ in range(r.randint(1, 6)):
            op = r.randrange(3)
            at = r.randrange(len(data))
            if op == 0:
                data[at] = r.randrange(256)
            elif op == 1:
                del data[at:at + r.randint(1, 8)]
            else:
                data[at:at] = bytes(r.randrange(256) for _ in range(r.randint(1, 8)))
        return bytes(data)


async def _ring_call(channel: grpc.aio.Channel, messages: list[pb.Frame]) -> list[pb.FrameAck]:
    """Send frames on one Ring stream; the acks (one per refused frame; the stream must end cleanly)."""
    call = pb_grpc.PeerStub(channel).Ring(iter(messages), timeout=120)
    return [ack async for ack in call]


async def _fuzz_grpc(c: Cluster, rng: random.Random) -> dict[str, int]:
    counts: dict[str, int] = {}
    make = Frames(c, rng)
    opts = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", CERT_NAME)]
    for stage, address in enumerate(c.stages):
        first = stage == 0
        async with c.security.channel(address, CHANNEL_OPTIONS) as channel:
            # frames that must be refused, each with an error ack; the stream itself goes on
            bad = ([make.wrong_epoch(first) for _ in range(60)] + [make.huge(first) for _ in range(120)]
                   + [make.unknown_sequence(first) for _ in range(60)]
                   + ([make.wrong_shape() for _ in range(150)] if not first else []))
            acks = await _ring_call(channel, bad)
            refused = {a.micro_batch for a in acks if a.error}
            accepted = [f for f in bad if f.micro_batch not in refused]
            assert not accepted, f"accepted a bad frame: {accepted[0]}"[:2000]
            assert len(acks) == len(bad)
            assert not [a for a in acks if a.error.startswith("internal error")], [a.error for a in acks][:20]
            counts["refused frames"] = counts.get("refused frames", 0) + len(bad)
            # valid frames still go through on the same kind of stream
            good = [make.valid(first) for _ in range(20)]
            acks = await _ring_call(channel, good)
            assert acks == []  # accepted frames are not answered
            counts["valid frames"] = counts.get("valid frames", 0) + len(good)
            # mutated frames: accepted or refused, the stream never breaks
            mutated = [make.mutated(first) for _ in range(350)]
            acks = []
            for i in range(0, len(mutated), 50):
                acks += await _ring_call(channel, mutated[i:i + 50])
            assert len(acks) <= len(mutated) and all(a.error for a in acks)
            counts["mutated frames"] = counts.get("mutated frames", 0) + len(mutated)
            counts["mutated frames refused"] = counts.get("mutated frames refused", 0) + len(acks)
        # garbage protobuf, one stream each (an undecodable message ends its stream with a status)
        async with c.security.channel(address, CHANNEL_OPTIONS) as channel:
            raw = channel.stream_stream(RING, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            codes: dict[str, int] = {}
            for _ in range(300):
                try:
                    async for _ack in raw(iter([make.garbage_bytes()]), timeout=30):
                        pass
                    codes["ok"] = codes.get("ok", 0) + 1
                except grpc.aio.AioRpcError as e:
                    assert e.code() != grpc.StatusCode.UNAVAILABLE, e.details()
                    codes[e.code().name] = codes.get(e.code().name, 0) + 1
            counts["garbage protobuf"] = counts.get("garbage protobuf", 0) + 300
            counts.setdefault("garbage protobuf outcomes", {})  # type: ignore[arg-type]
            for k, v in codes.items():
                counts["garbage protobuf outcomes"][k] = counts["garbage protobuf outcomes"].get(k, 0) + v  # type: ignore
            for method in ("Ping", "Health", "Status"):
                unary = channel.unary_unary(f"/p2pllm.v1.Peer/{method}", request_serializer=lambda b: b,
                                            response_deserializer=lambda b: b)
                for _ in range(20):
                    try:
                        await unary(make.garbage_bytes(), timeout=10)
                    except grpc.aio.AioRpcError as e:
                        assert e.code() != grpc.StatusCode.UNAVAILABLE, e.details()
                counts["garbage unary calls"] = counts.get("garbage unary calls", 0) + 20
    # clean-up a member would do: free every sequence the mutated frames may have started
    ids = sorted(make.seq_ids)
    for address in c.stages:
        async with c.security.channel(address, CHANNEL_OPTIONS) as channel:
            await _ring_call(channel, [pb.Frame(epoch=c.epoch, micro_batch=1, finished=ids[i:i + 1000])
                                       for i in range(0, len(ids), 1000)])
        await asyncio.sleep(0.5)  # what stage 0 forwarded reaches stage 1 before stage 1's own clean-up
    del opts
    return counts


def _tls_context(c: Cluster, tmp: Path) -> ssl.SSLContext:
    (tmp / "key.pem").write_bytes(c.security.credentials.key_pem)
    (tmp / "cert.pem").write_bytes(c.security.credentials.cert_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=c.security.credentials.cert_pem.decode())
    ctx.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    ctx.set_alpn_protocols(["h2"])
    return ctx


def _h2_garbage(rng: random.Random) -> bytes:
    out = bytearray(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" if rng.random() < 0.8 else b"")
    for _ in range(rng.randint(1, 6)):
        payload = bytes(rng.randrange(256) for _ in range(rng.choice([0, 4, 6, 8, 30, 200])))
        length = len(payload) if rng.random() < 0.7 else rng.randrange(2**24)
        out += length.to_bytes(3, "big") + bytes([rng.randrange(11), rng.randrange(256)])
        out += struct.pack(">I", rng.choice([0, 1, 3, 2**31 - 1, rng.randrange(2**32)])) + payload
    return bytes(out)


def _fuzz_sockets(c: Cluster, rng: random.Random, tmp: Path) -> dict[str, int]:
    ctx = _tls_context(c, tmp)
    counts = {"raw garbage connections": 0, "HTTP/2 garbage after TLS": 0, "TLS handshakes completed": 0}
    for i in range(300):
        port = c.ports[i % 2]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.settimeout(0.3)
            if i % 2:  # plaintext garbage: it never gets past TLS
                sock.sendall(bytes(rng.randrange(256) for _ in range(rng.choice([1, 16, 200, 5000]))))
                counts["raw garbage connections"] += 1
            else:
                try:
                    tls = ctx.wrap_socket(sock, server_hostname=CERT_NAME)
                except (ssl.SSLError, OSError) as e:
                    pytest.fail(f"a secret holder's TLS handshake failed: {e}")
                counts["TLS handshakes completed"] += 1
                try:
                    tls.sendall(_h2_garbage(rng))
                    counts["HTTP/2 garbage after TLS"] += 1
                except OSError:
                    pass
                sock = tls
            try:
                sock.recv(4096)
            except (OSError, ssl.SSLError):
                pass
    return counts


def _fuzz_gateway(c: Cluster, rng: random.Random) -> dict[str, int]:
    base = f"http://127.0.0.1:{c.gateways[1]}"
    values = [None, True, False, 0, -1, 1, 2, 3.5, -1e308, 1e308, 2**64, "", "x", "\u0000", "\ud800", [], [1],
              ["a"], [[1, 2]], {}, {"role": "user"}, [{"role": "user", "content": "hi"}], "Once", 10**9]
    fields = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
              "seed", "stop", "n", "stream", "logprobs", "echo", "tools"]
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=base, timeout=60) as http:
        for i in range(320):
            path = rng.choice(["/v1/chat/completions", "/v1/completions"])
            body: dict = {"max_tokens": 2, "model": c.model.name}
            body.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "Once"})
            for _ in range(rng.randint(1, 3)):
                body[rng.choice(fields)] = rng.choice(values)
            raw = json.dumps(body).encode()
            if i % 7 == 0:
                cut = rng.randrange(len(raw))
                raw = raw[:cut] + bytes([rng.randrange(256)]) + raw[cut + 1:]
            headers = {"content-type": rng.choice(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                                   "multipart/form-data; boundary=x"])}
            if i % 40 == 0:
                raw = b'{"prompt": "' + b"x" * (9 << 20) + b'"}'
            method = "POST" if i % 11 else rng.choice(["GET", "PUT", "DELETE", "PATCH"])
            reply = http.request(method, path + rng.choice(["", "?x=1", "/../../etc/passwd", "%00"]),
                                 content=raw, headers=headers)
            statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1
            assert reply.status_code < 500, (reply.status_code, raw[:300], reply.text[:300])
            if reply.status_code >= 400:
                assert "error" in reply.json(), reply.text[:300]
    raw_requests = [
        b"GARBAGE\r\n\r\n", b"GET\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"\x00\x01\x02\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{}",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nxx\r\n0\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 9\r\n\r\n{}",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Bad: " + b"a" * 70000 + b"\r\n\r\n",
        b"GET /health HTTP/1.1\r\nBad Header Line\r\n\r\n",
        b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    for i in range(200):
        req = bytearray(rng.choice(raw_requests))
        if i % 2:
            for _ in range(rng.randint(1, 4)):
                req[rng.randrange(len(req))] = rng.randrange(256)
        with socket.create_connection(("127.0.0.1", c.gateways[1]), timeout=5) as sock:
            sock.settimeout(5)
            try:
                sock.sendall(bytes(req))
                sock.shutdown(socket.SHUT_WR)
                head = sock.recv(64)
            except OSError:
                head = b""
        if head.startswith(b"HTTP/1."):
            code = int(head.split()[1])
            statuses[code] = statuses.get(code, 0) + 1
            assert code < 500, (bytes(req[:200]), head)
    return {f"HTTP {k}": v for k, v in sorted(statuses.items())} | {"HTTP requests": 520}


def _prefix_cache_entries(c: Cluster) -> int:
    """The finished sequences whose KV the head's prefix cache keeps (from its gateway's /metrics)."""
    for gateway in c.gateways:
        for line in httpx.get(f"http://127.0.0.1:{gateway}/metrics", timeout=10).text.splitlines():
            if line.startswith("p2pllm_engine_prefix_cache_entries "):
                return int(float(line.split()[1]))
    raise AssertionError("no gateway reports p2pllm_engine_prefix_cache_entries")


def test_fuzzed_ports_leave_the_cluster_serving_the_same_tokens(cluster, stories_gguf, tmp_path):
    from p2pllm.runtime.local import LocalPipeline

    pipe = LocalPipeline(str(stories_gguf))
    expected = pipe.tokenizer.decode(pipe.generate(pipe.tokenizer.encode(PROMPT), max_tokens=24).ids,
                                     continuation=True)
    before = _complete(cluster)
    assert before.status_code == 200 and before.json()["choices"][0]["text"] == expected, before.text
    rng = random.Random(6)
    t0 = time.monotonic()
    counts = asyncio.run(_fuzz_grpc(cluster, rng))
    counts |= _fuzz_sockets(cluster, rng, tmp_path)
    counts |= _fuzz_gateway(cluster, rng)
    elapsed = time.monotonic() - t0
    print(json.dumps(counts, indent=1), f"{elapsed:.1f}s")
    grpc_inputs = sum(v for k, v in counts.items() if isinstance(v, int) and not k.startswith(("HTTP", "TLS")))
    assert grpc_inputs >= 2000 and counts["HTTP requests"] >= 500
    assert all(p.poll() is None for p in cluster.procs), cluster.tail()
    for i in (0, 1):
        assert httpx.get(f"http://127.0.0.1:{cluster.gateways[i]}/health", timeout=10).status_code == 200
    kept = _prefix_cache_entries(cluster)
    for i in (0, 1):
        s = cluster.status(i)
        assert s["epoch"] == cluster.epoch, s  # the hostile frames never moved the plan
        assert all(p["healthy"] for p in s["peers"]) and len(s["peers"]) == 2, s
        # refused frames were never half-applied; nothing leaked: a stage holds just what the head keeps
        assert s["kv_sequences"] == kept, (s, kept)
    for i in (0, 1):
        after = _complete(cluster, i)
        assert after.status_code == 200 and after.json()["choices"][0]["text"] == expected, after.text
    logs = "".join(p.read_text(errors="replace") for p in cluster.logs)
    assert "refused micro-batch" in logs and "failed" not in logs.split("refused micro-batch")[0][-200:]


def test_a_client_without_the_secret_is_refused_at_the_handshake(cluster):
    async def attempt(security: Security, address: str) -> grpc.aio.AioRpcError:
        async with security.channel(address, CHANNEL_OPTIONS) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _ring_call(channel, [pb.Frame(epoch=cluster.epoch)])
            return e.value

    for address in cluster.stages:
        for security in (Security.insecure(), Security.from_secret("not-the-cluster-secret-at-all")):
            err = asyncio.run(attempt(security, address))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert refusal_reason(err, security.enabled), err.details()
