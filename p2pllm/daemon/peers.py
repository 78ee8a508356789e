"""Control plane, who is here: discovery -> membership, the hello and health loops, link
measurement. It keeps the membership table current and says when peers are lost; what a loss
means for the ring and the plan is the daemon's to decide (`on_lost`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from ..cluster.discovery import Announcement
from ..cluster.membership import Membership
from ..proto import p2pllm_pb2 as pb
from ..transport.client import ClientPool

log = logging.getLogger(__package__)  # "p2pllm.daemon": one logger for the whole peer

HEALTH_INTERVAL = 0.5
HELLO_INTERVAL = 1.0
SILENT_PEER_WARN_AFTER = 5.0  # seconds a --peer / `peers add` address may stay silent before a warning (peers
SILENT_PEER_WARN_EVERY = 60.0  # started together come up within this); then once a minute while it stays so
LINK_REMEASURE_SECONDS = 60.0


class PeerLoops:
    """Hello, health and link loops over one Membership. `on_lost(ids)`: peers just marked lost;
    `on_epoch(n)`: the epoch a health reply carried (the newest one seen matters to agreement)."""

    def __init__(self, info: pb.PeerInfo, membership: Membership, clients: ClientPool, dial: list[str],
                 on_lost: Callable[[list[str]], None], on_epoch: Callable[[int], None]):
        self.info = info
        self.id = info.id
        self.address = info.address
        self.membership = membership
        self.clients = clients
        self.on_lost = on_lost
        self.on_epoch = on_epoch
        self.links: dict[str, tuple[float, float]] = {}  # peer id -> (rtt s, bytes/s), this peer's measurements
        self._link_measured_at: dict[str, float] = {}
        self._dial: set[str] = set(dial)
        # the addresses the user named (--peer, `peers add`): a typo or a host that is down was retried in silence
        self._static: set[str] = set(dial)
        self._silent: dict[str, tuple[float, float]] = {}  # address -> (first failure, last warning)
        self._health_now = asyncio.Event()
        self._dropped: set[str] = set()  # addresses whose connection dropped since they last answered

    def dial(self, address: str) -> None:
        """Say hello to `address` in the next round (and again while it is away)."""
        self._dial.add(address)

    def add_static_peer(self, address: str) -> None:
        """Dial `address` from now on, like `join --peer` (the hello loop retries it while it is away)."""
        self._dial.add(address)
        self._static.add(address)
        asyncio.get_running_loop().create_task(self._hello(address))

    # ------------------------------------------------------------------ discovery -> membership
    def on_found(self, ann: Announcement) -> None:
        if ann.id != self.id:
            self._dial.add(ann.address)

    def on_goodbye(self, peer_id: str) -> None:
        member = self.membership.members.get(peer_id)
        if member is not None:
            log.info("peer %s (%s) said goodbye", member.info.name, peer_id[:8])
            member.last_seen = -1e9  # silent from now on: the next expiry marks it lost

    def _met(self, info: pb.PeerInfo):
        """A peer said who it is (its hello, or its answer to ours): it is live."""
        new = info.id not in self.membership.members
        member = self.membership.upsert(info)
        if new:  # a drop seen at its address was the connection of whoever was there before
            self._dropped.discard(info.address)
        self.membership.heard_from(info.id)
        return member

    async def on_hello(self, req: pb.HelloRequest, peer: str) -> pb.HelloReply:
        member = self._met(req.peer)
        known = [m.info for m in self.membership.members.values() if m.info.id not in (self.id, req.peer.id)]
        return pb.HelloReply(peer=self.info, compatible=member.compatible, reason=member.reason, known=known)

    async def _hello(self, address: str) -> None:
        try:
            reply = await self.clients.get(address).hello(self.info)
        except Exception as e:  # an unreachable or refusing peer: try again later
            log.debug("hello %s failed: %s", address, e)
            self._note_silent(address, e)
            return
        self._silent.pop(address, None)
        self._met(reply.peer)
        for known in reply.known:
            if known.id != self.id and known.id not in self.membership.members:
                self._dial.add(known.address)

    def _note_silent(self, address: str, error: Exception) -> None:
        """Warn (after SILENT_PEER_WARN_AFTER, then once a minute) about a peer address the user named that
        does not answer; a refused handshake is logged by the security layer already."""
        if address not in self._static:
            return
        if isinstance(error, grpc.aio.AioRpcError):
            from ..transport.security import refusal_reason

            if refusal_reason(error, self.clients.security.enabled) is not None:
                return
            details = (error.details() or "").split("; last error: ")[-1]
            why = f"{error.code().name.lower()}: {details}" if details else error.code().name.lower()
        else:
            why = f"{type(error).__name__}: {error}"
        now = time.monotonic()
        first, warned = self._silent.setdefault(address, (now, -1e9))
        if now - first >= SILENT_PEER_WARN_AFTER and now - warned >= SILENT_PEER_WARN_EVERY:
            self._silent[address] = (first, now)
            log.warning("peer %s does not answer (%s) for %.0f s; still trying it every %.0f s", address, why,
                        now - first, HELLO_INTERVAL)

    async def hello_loop(self) -> None:
        while True:
            targets = set(self._dial)
            for m in self.membership.members.values():
                if m.info.id != self.id and not self.membership.is_live(m.info.id):
                    targets.add(m.info.address)
            known = {m.info.address for m in self.membership.members.values() if self.membership.is_live(m.info.id)}
            await asyncio.gather(*(self._hello(a) for a in targets - known - {self.address}))
            await asyncio.sleep(HELLO_INTERVAL)

    # ------------------------------------------------------------------ health
    async def _health_one(self, member) -> None:
        try:
            reply = await self.clients.get(member.info.address).health(self.id)
        except Exception as e:
            log.debug("health %s failed: %s", member.info.address, e)
            unavailable = isinstance(e, grpc.aio.AioRpcError) and e.code() == grpc.StatusCode.UNAVAILABLE
            if member.info.address in self._dropped and unavailable:
                # its connection dropped and a new one fails at once (refused, reset): the process is
                # gone (a restart comes back as a new identity), no need to wait for the timeout
                self.membership.refused(member.info.id, after=1, why="its connection dropped and it is unreachable")
                self._expire()
            elif "refused" in str(e).lower():  # nothing listens there: lost after two in a row
                self.membership.refused(member.info.id)
                self._expire()
            return
        self._dropped.discard(member.info.address)
        if reply.id == member.info.id:
            self.membership.heard_from(member.info.id, reply)
            self.on_epoch(reply.epoch)
            known = {m.info.address for m in self.membership.members.values()}
            self._dial.update(a for a in reply.peers[:256] if a not in known and a != self.address)

    async def health_loop(self) -> None:
        checks: dict[str, asyncio.Task] = {}  # one check in flight per peer: a silent one holds up no other
        try:
            while True:
                self.membership.touch_self()
                for m in list(self.membership.members.values()):
                    task = checks.get(m.info.id)
                    if m.info.id != self.id and (task is None or task.done()):
                        checks[m.info.id] = asyncio.create_task(self._health_one(m))
                for pid in [p for p in checks if p not in self.membership.members]:
                    checks.pop(pid).cancel()  # forgotten
                try:  # a dropped connection checks at once; otherwise twice a second
                    await asyncio.wait_for(self._health_now.wait(), HEALTH_INTERVAL)
                except asyncio.TimeoutError:
                    pass
                self._health_now.clear()
                self._expire()
        finally:
            for task in checks.values():
                task.cancel()

    def _expire(self) -> None:
        """Mark peers silent past the timeout (or refusing) lost; a lost stage parks the ring's
        sequences at once and wakes the coordinator's loop to replan (the daemon's `on_lost`)."""
        lost = self.membership.expire()
        if lost:
            self.on_lost(lost)

    def connection_dropped(self, address: str) -> None:
        """A peer's connection dropped or its ring stream broke: check it now, not at the next tick."""
        member = self.membership.by_address(address)
        if member is not None and member.info.id != self.id:
            self._dropped.add(address)
            self._health_now.set()

    # ------------------------------------------------------------------ links
    async def link_loop(self) -> None:
        while True:
            now = time.monotonic()
            for m in self.membership.live_compatible():
                pid = m.info.id
                if pid == self.id or now - self._link_measured_at.get(pid, -1e9) < LINK_REMEASURE_SECONDS:
                    continue
                try:
                    rtt, bw = await self.clients.get(m.info.address).measure_link()
                except Exception as e:
                    log.debug("link to %s not measured: %s", m.info.address, e)
                    continue
                self.links[pid] = (rtt, bw)
                self._link_measured_at[pid] = now
                log.info("link to %s: rtt %.2f ms, %.0f MB/s", m.info.name, rtt * 1e3, bw / 1e6)
            self.membership.members[self.id].links = dict(self.links)
            await asyncio.sleep(1.0)
