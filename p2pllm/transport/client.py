"""Calling other peers: one channel per peer address, explicit limits and keepalive."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Callable

import grpc

from ..errors import P2PError
from ..proto import p2pllm_pb2 as pb
from ..proto import p2pllm_pb2_grpc as pb_grpc
from .security import Security

# Explicit limits (a hostile peer cannot make us buffer more than this per message).
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 3000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 0),
    # after a peer's process died gRPC waits longer and longer between reconnects (up to 120 s), so
    # a daemon restarted at that address stayed unreachable from here for seconds (a flapping
    # member in CI); on a LAN a reconnect a second is cheap
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class PeerClient:
    """Control-plane calls to one peer. Every call has a deadline.

    With `on_dropped`, a watcher reports the moment the channel's connection drops (a killed
    process's kernel resets its sockets at once): the caller checks that peer now instead of at
    its next health tick. A drop is a hint, not a verdict; only the check decides."""

    def __init__(self, address: str, security: Security, on_dropped: Callable[[str], None] | None = None):
        self.address = address
        self.security = security
        self.channel = security.channel(address, CHANNEL_OPTIONS)
        self.stub = pb_grpc.PeerStub(self.channel)
        self._watcher = None
        if on_dropped is not None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(on_dropped),
                                                                   name=f"watch {address}")

    async def _watch(self, on_dropped: Callable[[str], None]) -> None:
        state = self.channel.get_state()
        while True:
            await self.channel.wait_for_state_change(state)
            new = self.channel.get_state()
            if state == grpc.ChannelConnectivity.READY and new != grpc.ChannelConnectivity.READY:
                on_dropped(self.address)
            state = new

    async def hello(self, me: pb.PeerInfo, timeout: float = 3.0) -> pb.HelloReply:
        try:
            return await self.stub.Hello(pb.HelloRequest(peer=me), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            self.security.note_failure(self.address, e)  # a peer without our secret: logged with its address
            raise

    async def health(self, my_id: str, timeout: float = 2.0) -> pb.HealthReply:
        return await self.stub.Health(pb.HealthRequest(from_id=my_id), timeout=timeout)

    async def propose(self, proposal: pb.PlanProposal, timeout: float = 1800.0) -> pb.PlanReply:
        # loading weights may take minutes; health checks keep flowing meanwhile
        return await self.stub.Propose(proposal, timeout=timeout)

    async def commit(self, epoch: int, coordinator: str, timeout: float = 5.0) -> pb.PlanReply:
        return await self.stub.Commit(pb.CommitRequest(epoch=epoch, coordinator=coordinator), timeout=timeout)

    async def status(self, timeout: float = 5.0) -> pb.StatusReply:
        return await self.stub.Status(pb.StatusRequest(), timeout=timeout)

    async def manage(self, action: str, target: str, *, forwarded: bool = False,
                     timeout: float = 10.0) -> pb.ManageReply:
        return await self.stub.Manage(pb.ManageRequest(action=action, target=target, forwarded=forwarded),
                                      timeout=timeout)

    async def rtt(self, pings: int = 3, timeout: float = 10.0) -> float:
        """Seconds of the fastest of a few empty pings."""
        rtts = []
        for _ in range(pings):
            t0 = time.perf_counter()
            await self.stub.Ping(pb.PingRequest(), timeout=timeout)
            rtts.append(time.perf_counter() - t0)
        return min(rtts)

    async def measure_link(self, payload_bytes: int = 2 * 1024 * 1024, timeout: float = 10.0) -> tuple[float, float]:
        """(rtt seconds, bytes per second): empty pings, then a few MiB each way."""
        rtt = await self.rtt(timeout=timeout)
        t0 = time.perf_counter()
        await self.stub.Ping(pb.PingRequest(payload=bytes(payload_bytes), reply_bytes=payload_bytes), timeout=timeout)
        elapsed = max(time.perf_counter() - t0 - rtt, 1e-6)
        return rtt, 2 * payload_bytes / elapsed

    async def model_manifest(self, timeout: float = 10.0) -> pb.Manifest:
        """The model this peer serves pieces of (cluster/fetch.py checks every field)."""
        return await self.stub.ModelManifest(pb.ManifestRequest(), timeout=timeout)

    def fetch_piece(self, fingerprint: str, piece: str, offset: int = 0, length: int = 0):
        """A stream of PieceChunk (no overall deadline: the caller times each chunk and cancels)."""
        return self.stub.FetchPiece(pb.FetchPieceRequest(fingerprint=fingerprint, piece=piece, offset=offset,
                                                         length=length))

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        await self.channel.close()


class ClientPool:
    """One PeerClient per address, reused."""

    def __init__(self, security: Security, on_dropped: Callable[[str], None] | None = None):
        self.security = security
        self.on_dropped = on_dropped
        self._clients: dict[str, PeerClient] = {}

    def get(self, address: str) -> PeerClient:
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = PeerClient(address, self.security, self.on_dropped)
        return client

    async def close(self) -> None:
        for client in list(self._clients.values()):
            await client.close()
        self._clients.clear()


async def fetch_status(address: str, security: Security) -> dict:
    """One peer's view of the cluster (`p2pllm status`), or a P2PError saying in one line why not."""
    reply = await _one_call(address, security, lambda client: client.status())
    try:
        return json.loads(reply.json)
    except json.JSONDecodeError:
        raise P2PError(f"{address} answered with a malformed status") from None


async def manage_peers(address: str, security: Security, action: str, target: str, timeout: float) -> pb.ManageReply:
    """`p2pllm peers ACTION TARGET` through the peer at `address` (cluster/management.py)."""
    return await _one_call(address, security, lambda client: client.manage(action, target, timeout=timeout))


async def _one_call(address: str, security: Security, call):
    """One RPC on a fresh channel (the CLI's), or a P2PError saying in one line why it failed."""
    from .security import explain_refusal

    client = PeerClient(address, security)
    try:
        return await call(client)
    except grpc.aio.AioRpcError as e:
        why = explain_refusal(address, e, security.enabled)
        if e.code() == grpc.StatusCode.UNIMPLEMENTED and "http2 header with status" in (e.details() or "").lower():
            # an HTTP/2 server that is no gRPC one (a web server, a proxy) answered with an HTTP status: no p2pllm,
            # old or new, is there
            why = f"{address} is an HTTP server, not a p2pllm peer ({e.details()})"
        elif e.code() == grpc.StatusCode.UNIMPLEMENTED:
            why = f"the peer at {address} runs an older p2pllm without this command"
        elif e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            why = f"the peer at {address} did not answer in time"
        raise P2PError(why or f"no p2pllm peer answers at {address} ({e.code().name.lower()})") from None
    finally:
        await client.close()
