"""The live peer table: who is here, whether they can serve with us, whether they answer."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from .. import PROTOCOL_VERSION
from ..proto import p2pllm_pb2 as pb

log = logging.getLogger(__name__)


def incompatibility(me: pb.PeerInfo, other: pb.PeerInfo) -> str:
    """Why `other` cannot serve in our cluster, or '' when it can."""
    if other.protocol != PROTOCOL_VERSION:
        return f"protocol version {other.protocol} (ours is {PROTOCOL_VERSION})"
    if other.cluster != me.cluster:
        return f"cluster {other.cluster!r} (ours is {me.cluster!r})"
    if other.model_fingerprint != me.model_fingerprint:
        return f"another model (fingerprint {other.model_fingerprint[:12]}, ours is {me.model_fingerprint[:12]})"
    return ""


@dataclass
class Member:
    info: pb.PeerInfo
    reason: str = ""  # why excluded; '' when compatible
    last_seen: float = 0.0
    state: str = "unknown"
    epoch: int = 0
    coordinator: str = ""
    links: dict[str, tuple[float, float]] = field(default_factory=dict)  # peer id -> (rtt s, bytes/s)
    refusals: int = 0  # health checks in a row whose connection was refused
    refused_why: str = ""  # set when refusals made it lost: the reason the log gives
    lost_at: float = 0.0  # when it was marked lost
    mem_used: int = 0  # its resident bytes, from its last health reply
    head: pb.HeadLoad | None = None  # the ring's load, when it is the head (coordinator)
    holds: pb.Holding | None = None  # what its partial copy holds (--from-peers); None: the whole file
    fetch: pb.FetchProgress | None = None  # its fetch from peers, while one runs

    @property
    def compatible(self) -> bool:
        return not self.reason


FORGET_AFTER = 120.0  # seconds: a lost peer silent this long leaves the table (its address is still dialled)


class Membership:
    def __init__(self, me: pb.PeerInfo, peer_timeout: float = 3.0, clock=time.monotonic,
                 forget_after: float = FORGET_AFTER):
        self.me = me
        self.peer_timeout = peer_timeout
        self.forget_after = max(forget_after, 4 * peer_timeout)
        self.clock = clock
        self.members: dict[str, Member] = {me.id: Member(me, last_seen=clock())}
        self.changed_at = clock()
        self._ticking = False  # touch_self runs (the daemon's health loop): this process's own gaps are seen

    # ---- learning about peers
    def upsert(self, info: pb.PeerInfo) -> Member:
        """Record a peer's self-description (from Hello); returns its entry."""
        if info.id == self.me.id:
            return self.members[self.me.id]
        reason = incompatibility(self.me, info)
        member = self.members.get(info.id)
        if member is None:
            self._replace_ghosts(info)
            member = self.members[info.id] = Member(info, reason, last_seen=self.clock())
            self._changed()
            if reason:
                log.warning("peer %s (%s) at %s excluded: %s", info.name, info.id[:8], info.address, reason)
            else:
                log.info("peer %s (%s) joined at %s", info.name, info.id[:8], info.address)
        else:
            if member.info.address != info.address or member.reason != reason:
                self._changed()
            member.info, member.reason = info, reason
            member.last_seen = self.clock()
        return member

    def heard_from(self, peer_id: str, reply: pb.HealthReply | None = None) -> None:
        member = self.members.get(peer_id)
        if member is None:
            return
        was_live = self.is_live(peer_id)
        member.last_seen = self.clock()
        member.refusals, member.refused_why = 0, ""
        if reply is not None:
            member.state, member.epoch, member.coordinator = reply.state, reply.epoch, reply.coordinator
            member.links = {link.peer_id: (link.rtt_s, link.bw) for link in reply.links}
            member.mem_used = reply.mem_used
            member.head = reply.head if reply.HasField("head") else None
            member.holds = reply.holds if reply.HasField("holds") else None
            member.fetch = reply.fetch if reply.HasField("fetch") else None
        if not was_live:
            log.info("peer %s (%s) is answering again", member.info.name, peer_id[:8])
            self._changed()

    def refused(self, peer_id: str, after: int = 2, why: str = "connections refused") -> None:
        """A refused connection is proof nobody listens: `after` in a row and the peer is lost at
        once, without waiting for the timeout (a cut cable still takes the timeout)."""
        member = self.members.get(peer_id)
        if member is None:
            return
        member.refusals += 1
        if member.refusals >= after:
            member.last_seen, member.refused_why = -1e9, why

    def _replace_ghosts(self, info: pb.PeerInfo) -> None:
        """A new identity at an address we know: the daemon there restarted (one address holds one
        daemon), so its old entry is a ghost and goes, rather than staying listed as lost."""
        for old in [m for m in self.members.values() if m.info.address == info.address and m.info.id != self.me.id]:
            log.info("peer %s (%s) at %s replaces %s (%s), which was there before", info.name, info.id[:8],
                     info.address, old.info.name, old.info.id[:8])
            self.forget(old.info.id)

    def forget(self, peer_id: str) -> None:
        if peer_id != self.me.id and self.members.pop(peer_id, None) is not None:
            self._changed()

    def touch_self(self) -> None:
        """This process is running (the health loop, every half second). After a gap longer than
        half the timeout it was not (kill -STOP, a starved machine): it heard nobody because it did
        not listen, so every peer's silence is moved on by the gap instead of counting against it
        (a resumed coordinator declared every peer lost and proposed a plan of itself alone)."""
        me, now = self.members[self.me.id], self.clock()
        gap = now - me.last_seen
        if self._ticking and gap > self.peer_timeout / 2:
            log.warning("this process did not run for %.1fs (stopped or starved): peers' silence in that time "
                        "is not held against them", gap)
            for m in self.members.values():
                if m is not me and m.state != "lost":
                    m.last_seen += gap
        me.last_seen, self._ticking = now, True

    def _own_gap(self) -> float:
        """How long this process has not run (0 until touch_self runs, and while it runs on time)."""
        gap = self.clock() - self.members[self.me.id].last_seen
        return gap if self._ticking and gap > self.peer_timeout / 2 else 0.0

    # ---- views
    def is_live(self, peer_id: str) -> bool:
        if peer_id == self.me.id:
            return True
        member = self.members.get(peer_id)
        return member is not None and self.clock() - member.last_seen - self._own_gap() <= self.peer_timeout

    def live_compatible(self) -> list[Member]:
        return sorted(
            (m for m in self.members.values() if m.compatible and self.is_live(m.info.id)),
            key=lambda m: m.info.id,
        )

    def by_address(self, address: str) -> Member | None:
        for m in self.members.values():
            if m.info.address == address:
                return m
        return None

    def coordinator_id(self) -> str:
        """The deterministic election: the smallest id among live, compatible peers."""
        return self.live_compatible()[0].info.id

    def expire(self) -> list[str]:
        """Ids of compatible peers that just went silent past the timeout (logged once). One that
        said it was leaving is gone as announced: forgotten at once, not listed as lost."""
        lost, left = [], []
        for m in self.members.values():
            if m.info.id != self.me.id and m.compatible and m.state != "lost" and not self.is_live(m.info.id):
                lost.append(m.info.id)
                if m.state == "leaving":
                    log.info("peer %s (%s) left (it was stopping)", m.info.name, m.info.id[:8])
                    left.append(m.info.id)
                    continue
                m.state, m.lost_at = "lost", self.clock()
                why = m.refused_why or f"silent for {self.peer_timeout:.1f}s"
                log.warning("peer %s (%s) lost: %s", m.info.name, m.info.id[:8], why)
        for peer_id in left:
            self.forget(peer_id)
        now = self.clock()
        for m in [m for m in self.members.values() if m.info.id != self.me.id and not self.is_live(m.info.id)]:
            if m.state == "lost" and now - m.lost_at > self.forget_after:
                log.info("forgetting peer %s (%s): lost for over %.0f s", m.info.name, m.info.id[:8],
                         self.forget_after)
                self.forget(m.info.id)
            elif not m.compatible and now - m.last_seen > self.forget_after:  # at once when it refused us
                log.info("forgetting excluded peer %s (%s): %s", m.info.name, m.info.id[:8],
                         m.refused_why or f"silent for over {self.forget_after:.0f} s")
                self.forget(m.info.id)
        if lost:
            self._changed()
        return lost

    def _changed(self) -> None:
        self.changed_at = self.clock()
