"""Node management: test or add a static peer, drain a peer out of the plan, admit it back.

`p2pllm peers` and the dashboard send a ManageRequest to any peer; that peer tests and adds
addresses itself and forwards a drain/admit to the peer it names. Being drained is the named
peer's own state ("drained", advertised in its health replies like "leaving"), so the coordinator
sees one membership change and makes one plan change, whoever coordinates, and a coordinator
change cannot lose it. A drained peer stays up, in the cluster and listed, with no layers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING

import grpc

from . import coordinator as coord
from .membership import Member, incompatibility
from ..proto import p2pllm_pb2 as pb

if TYPE_CHECKING:
    from ..daemon import Daemon

log = logging.getLogger(__name__)

ACTIONS = ("describe", "test", "add", "drain", "admit")
PLAN_CHANGE_SECONDS = 90.0  # a drain waits this long for the plan without the peer (weights may load)
ADMIT_SETTLE_SECONDS = 10.0  # an admit waits this long for a plan with the peer (the planner may keep the old one)
JOIN_SECONDS = 6.0  # an added peer should answer hello and health within a few health intervals


class ManageError(Exception):
    """A request that cannot be done; `status` is the HTTP status the gateway answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class PeerManager:
    """The Manage RPC of one daemon (it reads the daemon's membership, plan and clients)."""

    def __init__(self, daemon: Daemon):
        self.d = daemon

    async def handle(self, req: pb.ManageRequest) -> pb.ManageReply:
        try:
            details = await self.run(req.action, req.target, forwarded=req.forwarded)
        except ManageError as e:
            return pb.ManageReply(ok=False, message=str(e), json=json.dumps({"status": e.status}))
        return pb.ManageReply(ok=True, message=details.pop("message"), json=json.dumps(details))

    async def run(self, action: str, target: str, *, forwarded: bool = False) -> dict:
        """The action's details (with a one-line 'message'), or a ManageError."""
        if action not in ACTIONS:
            raise ManageError(400, f"unknown action {action!r} (one of {', '.join(ACTIONS[1:])})")
        if action == "describe":
            return {"message": "this peer", **_describe(self.d.info)}
        if action in ("test", "add"):
            return await self.test(target, add=action == "add")
        if forwarded:
            if target != self.d.id:
                raise ManageError(400, f"a forwarded {action} names peer {target[:8]}, not this one")
            return await (self.drain_self() if action == "drain" else self.admit_self())
        member = self.find(target)
        if member.info.id == self.d.id:
            return await (self.drain_self() if action == "drain" else self.admit_self())
        try:
            reply = await self.d.clients.get(member.info.address).manage(action, member.info.id, forwarded=True,
                                                                        timeout=PLAN_CHANGE_SECONDS + 10)
        except grpc.aio.AioRpcError as e:
            raise ManageError(502, f"peer {member.info.name} at {member.info.address} did not answer "
                                   f"({e.code().name.lower()})") from None
        details = _details(reply)
        if not reply.ok:
            raise ManageError(details.get("status", 409), reply.message)
        return {"message": reply.message, **details}

    # ------------------------------------------------------------------ test / add
    async def test(self, address: str, *, add: bool) -> dict:
        """Reachability, RTT and compatibility of the peer at `address`; with `add`, also dial it
        as a static peer (like `join --peer`) and wait until it is a member."""
        report = {"address": address, "reachable": False, "rtt_ms": None, "compatible": None, "reason": None,
                  "name": None, "cluster": None, "protocol": None, "model_fingerprint": None, "added": False}
        if address == self.d.address:
            raise ManageError(400, f"{address} is this peer")
        client = self.d.clients.get(address)
        pinged = False
        try:
            report.update(reachable=True, rtt_ms=round(await client.rtt(timeout=3.0) * 1e3, 3))
            pinged = True
            described = _details(await client.manage("describe", "", timeout=3.0))
        except grpc.aio.AioRpcError as e:
            from ..transport.security import explain_refusal

            unimplemented = e.code() == grpc.StatusCode.UNIMPLEMENTED
            why = "its protocol has no node management (an older p2pllm)" if unimplemented and pinged else \
                "a gRPC server that is not a p2pllm peer answers there (it has no Ping)" if unimplemented else \
                explain_refusal(address, e, self.d.security.enabled) or f"no p2pllm peer answers ({e.code().name.lower()})"
            report.update(compatible=False, reason=why)
            report["message"] = f"{address}: {why}"
            if add:
                raise ManageError(502, f"not added: {report['message']}")
            return report
        if described.get("id") == self.d.id:  # this peer under another of its addresses (127.0.0.1, say)
            raise ManageError(400, f"{address} is this peer")
        report.update({k: described.get(k) for k in ("name", "cluster", "protocol", "model_fingerprint")})
        other = pb.PeerInfo(name=described.get("name", ""), cluster=described.get("cluster", ""),
                            protocol=int(described.get("protocol") or 0),
                            model_fingerprint=described.get("model_fingerprint", ""))
        reason = incompatibility(self.d.info, other)
        report.update(compatible=not reason, reason=reason or None)
        verdict = f"incompatible: {reason}" if reason else "compatible"
        report["message"] = f"{address} ({other.name}): reachable, rtt {report['rtt_ms']:.2f} ms, {verdict}"
        if add and not reason:
            self.d.add_static_peer(address)
            deadline = time.monotonic() + JOIN_SECONDS
            while time.monotonic() < deadline:  # by id: a peer advertises its own address, not the one typed
                member = self.d.membership.members.get(described.get("id", "")) or self.d.membership.by_address(address)
                if member is not None and self.d.membership.is_live(member.info.id):
                    report["added"] = True
                    break
                await asyncio.sleep(0.2)
            report["message"] += "; added" if report["added"] else "; dialling it (not a member yet)"
        elif add:
            raise ManageError(409, f"not added: {report['message']}")
        return report

    # ------------------------------------------------------------------ drain / admit
    def find(self, target: str) -> Member:
        """The member named `target` (its name, or its id or an id prefix of at least 4)."""
        members = list(self.d.membership.members.values())
        found = [m for m in members if m.info.name == target] or \
            [m for m in members if len(target) >= 4 and m.info.id.startswith(target)]
        if not found:
            given = [m.info.name for m in members]
            names = ", ".join(sorted(n if given.count(n) == 1 else f"{n} (id {m.info.id[:8]})"
                                     for m, n in zip(members, given)))  # a repeated name with its id
            raise ManageError(404, f"no peer named {target!r} in this cluster (peers: {names})")
        if len(found) > 1:
            raise ManageError(409, f"{len(found)} peers are named {target!r}: give its id instead "
                                   f"({', '.join(m.info.id[:8] for m in found)})")
        member = found[0]
        if member.info.id != self.d.id and not self.d.membership.is_live(member.info.id):
            raise ManageError(409, f"peer {target} is lost; it cannot be drained or admitted")
        return member

    async def drain_self(self) -> dict:
        d = self.d
        if d.drained:
            return {"message": f"{d.cfg.name} is already drained", "epoch": d.epoch, "changed": False}
        if d.leaving:
            raise ManageError(409, f"{d.cfg.name} is leaving (it was told to stop)")
        others = [m for m in d.membership.live_compatible()
                  if m.info.id != d.id and m.state not in ("leaving", "drained")]
        rest = coord.candidate_plan(d.spec, d.membership, d.options, exclude={d.id})
        if not others or not rest.feasible:
            why = rest.reason if others else "no other peer could take its layers"
            raise ManageError(409, f"draining {d.cfg.name} would leave no feasible plan: {why}")
        before = d.epoch
        d.set_drained(True)
        log.info("drained by request: the cluster replans without this peer")
        if await self._wait(lambda: d.epoch > before and not coord.my_assignment(d.committed, d.id),
                            PLAN_CHANGE_SECONDS):
            return {"message": f"drained {d.cfg.name}: the cluster serves plan epoch {d.epoch} without it",
                    "epoch": d.epoch, "changed": True}
        if d.committed is None or not coord.my_assignment(d.committed, d.id):  # it held no layers
            return {"message": f"drained {d.cfg.name}: it held no layers; plan epoch {d.epoch} goes on",
                    "epoch": d.epoch, "changed": False}
        raise ManageError(504, f"drained {d.cfg.name}, but no plan without it was committed within "
                               f"{PLAN_CHANGE_SECONDS:.0f} s; it stays drained (see the coordinator's log)")

    async def admit_self(self) -> dict:
        d = self.d
        if not d.drained:
            return {"message": f"{d.cfg.name} is not drained", "epoch": d.epoch, "changed": False}
        before = d.epoch
        d.set_drained(False)
        log.info("admitted by request: the cluster may plan with this peer again")
        if await self._wait(lambda: d.epoch > before and coord.my_assignment(d.committed, d.id), ADMIT_SETTLE_SECONDS):
            mine = coord.my_assignment(d.committed, d.id)
            return {"message": f"admitted {d.cfg.name}: plan epoch {d.epoch} gives it layers [{mine[0]}, {mine[1]})",
                    "epoch": d.epoch, "changed": True}
        return {"message": f"admitted {d.cfg.name}: the coordinator kept plan epoch {d.epoch} (no faster plan "
                           f"uses it now; the next replan may)", "epoch": d.epoch, "changed": d.epoch > before}

    @staticmethod
    async def _wait(done, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done():
                return True
            await asyncio.sleep(0.1)
        return done()


def _describe(info: pb.PeerInfo) -> dict:
    return {"id": info.id, "name": info.name, "cluster": info.cluster, "protocol": info.protocol,
            "address": info.address, "model_fingerprint": info.model_fingerprint}


def _details(reply: pb.ManageReply) -> dict:
    try:
        details = json.loads(reply.json or "{}")
    except json.JSONDecodeError:
        details = None
    if not isinstance(details, dict):
        raise ManageError(502, "the peer answered with malformed details")
    return details
