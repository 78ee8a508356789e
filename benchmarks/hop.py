"""The floor under one ring hop: a decode frame's round trip between two processes on loopback.

    python benchmarks/hop.py          # writes benchmarks/results/hop.json, prints markdown (~20 s)

Two processes, mutual TLS with a cluster secret as the daemons use it. The client sends a decode
frame (one sequence, SmolLM2's 576 float32 activations: 2.3 KB) and waits for the answer, 2,000
times after 200 warm-up round trips; one hop is half a round trip. Three transports:

- `grpc`: a `Ring` bidirectional stream with the daemons' own channel and server options
  (`transport/client.py`, `transport/server.py`), the server answering each frame with its ack:
  what every ring message costs before our code runs;
- `grpc + thread`: the same, with the server handing each frame to a one-thread executor and back
  (as a stage does with its compute thread) before it answers;
- `tls`: length-prefixed protobuf over asyncio's own TLS stream: what a transport without gRPC
  would cost.

What a real hop adds on top (decoding and checking the frame, encoding the next one) shows in
benchmarks/ring.py as each message's "not computing" time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "hop.json"
SECRET = "hop-benchmark-secret-0123456789"
WARMUP, N = 200, 2000


def _frame():
    from p2pllm.proto import p2pllm_pb2 as pb

    return pb.Frame(epoch=1, micro_batch=7, chunks=[pb.Chunk(seq_id=1, start=5, length=1, sample=True)],
                    hidden=pb.Tensor(dtype="float32", shape=[1, 576], data=bytes(576 * 4)))


# --------------------------------------------------------------------------- gRPC

async def grpc_server(port: int, thread: bool) -> None:
    import grpc

    from p2pllm.proto import p2pllm_pb2 as pb
    from p2pllm.proto import p2pllm_pb2_grpc as pb_grpc
    from p2pllm.transport.security import Security
    from p2pllm.transport.server import SERVER_OPTIONS

    pool = ThreadPoolExecutor(1)

    class Echo(pb_grpc.PeerServicer):
        async def Ring(self, frames, context):
            async for f in frames:
                if thread:
                    await asyncio.get_running_loop().run_in_executor(pool, f.ByteSize)
                yield pb.FrameAck(micro_batch=f.micro_batch)

    server = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_PeerServicer_to_server(Echo(), server)
    Security.from_secret(SECRET).add_port(server, f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def grpc_client(port: int) -> list[float]:
    from p2pllm.proto import p2pllm_pb2_grpc as pb_grpc
    from p2pllm.transport.client import CHANNEL_OPTIONS
    from p2pllm.transport.security import Security

    channel = Security.from_secret(SECRET).channel(f"127.0.0.1:{port}", CHANNEL_OPTIONS)
    call = pb_grpc.PeerStub(channel).Ring()
    frame, times = _frame(), []
    for _ in range(WARMUP + N):
        t0 = time.perf_counter()
        await call.write(frame)
        await call.read()
        times.append(time.perf_counter() - t0)
    await call.done_writing()
    await channel.close()
    return times[WARMUP:]


# --------------------------------------------------------------------------- plain TLS

def _tls_context(server: bool) -> ssl.SSLContext:
    from p2pllm.transport.security import derive_credentials

    creds, folder = derive_credentials(SECRET), tempfile.mkdtemp()
    Path(folder, "key.pem").write_bytes(creds.key_pem)
    Path(folder, "cert.pem").write_bytes(creds.cert_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(f"{folder}/cert.pem", f"{folder}/key.pem")
    ctx.load_verify_locations(f"{folder}/cert.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED
    if not server:
        ctx.check_hostname = False  # the cluster certificate names CERT_NAME, not the address
    return ctx


async def _read_message(reader: asyncio.StreamReader) -> bytes:
    n = struct.unpack("<I", await reader.readexactly(4))[0]
    return await reader.readexactly(n)


async def tls_server(port: int) -> None:
    from p2pllm.proto import p2pllm_pb2 as pb

    async def serve(reader, writer):
        try:
            while True:
                f = pb.Frame.FromString(await _read_message(reader))
                ack = pb.FrameAck(micro_batch=f.micro_batch).SerializeToString()
                writer.write(struct.pack("<I", len(ack)) + ack)
        except asyncio.IncompleteReadError:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", port, ssl=_tls_context(True))
    await server.serve_forever()


async def tls_client(port: int) -> list[float]:
    from p2pllm.proto import p2pllm_pb2 as pb

    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_tls_context(False))
    frame, times = _frame(), []
    for _ in range(WARMUP + N):
        t0 = time.perf_counter()
        data = frame.SerializeToString()
        writer.write(struct.pack("<I", len(data)) + data)
        pb.FrameAck.FromString(await _read_message(reader))
        times.append(time.perf_counter() - t0)
    writer.close()
    return times[WARMUP:]


# --------------------------------------------------------------------------- driver

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(kind: str) -> dict:
    port = _free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", kind, str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:  # until the server listens
            try:
                times = asyncio.run((tls_client if kind == "tls" else grpc_client)(port))
                break
            except (OSError, ConnectionError, ssl.SSLError) as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{kind} server never answered: {e}") from None
                time.sleep(0.2)
            except Exception as e:  # noqa: BLE001 - grpc's "unavailable" while the server starts
                if time.monotonic() > deadline or "UNAVAILABLE" not in repr(e).upper():
                    raise
                time.sleep(0.2)
    finally:
        server.kill()
        server.wait()
    times.sort()
    q = lambda p: times[int(p / 100 * (len(times) - 1))] * 1e3  # noqa: E731
    return {"round_trip_ms": {"p50": q(50), "p90": q(90), "p99": q(99), "mean": statistics.fmean(times) * 1e3},
            "hop_ms_p50": q(50) / 2, "n": len(times)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        kind, port = args.serve[0], int(args.serve[1])
        asyncio.run(tls_server(port) if kind == "tls" else grpc_server(port, kind == "grpc+thread"))
        return 0
    load = os.getloadavg()
    results = {kind: measure(kind) for kind in ("grpc", "grpc+thread", "tls")}
    out = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "load_before": load, "load_after": os.getloadavg(),
           "cores": os.cpu_count(), "frame_bytes": _frame().ByteSize(), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print("| transport | round trip p50 / p90 / p99 (ms) | one hop, p50 (ms) |\n|---|---|---|")
    for kind, r in results.items():
        rt = r["round_trip_ms"]
        print(f"| {kind} | {rt['p50']:.3f} / {rt['p90']:.3f} / {rt['p99']:.3f} | {r['hop_ms_p50']:.3f} |")
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
