"""One peer: discovery + membership + transport + stage (+ the head and gateway on the coordinator).

Every loop here only moves information around; decisions live in cluster/ (membership,
coordinator, planner) and computation in runtime/ and model/.

The peer is a few parts, each with its own state, wired here (docs/architecture.md):
  config.py     DaemonConfig and what is made of it first (security, compute threads, history)
  peers.py      control plane: discovery -> membership, hello and health loops, link measurement
  agreement.py  control plane: election, the coordinator loop, propose/commit, the plan state
  dataplane.py  data plane: ring binding, frames, KV replicas and fetches, the head
  loading.py    data plane: a layer range's stage, built on the compute thread
  pieces.py     model pieces served to and fetched from peers (--from-peers)
  status.py     `status` rows and the health numbers, as plain functions
This module is the lifecycle (run, signals, draining, shutdown), the gateway, node management and
the gRPC handler (transport/server.py's ControlHandler), which hands each call to its part. Every
part logs as "p2pllm.daemon": tests, benchmarks and people read those lines.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
import signal
import time
from pathlib import Path
from typing import Callable

from .. import PROTOCOL_VERSION
from ..cluster import coordinator as coord
from ..cluster.capability import probe
from ..cluster.discovery import Announcement, Discovery, pick_interface_address
from ..cluster.management import PeerManager
from ..cluster.membership import Membership
from ..cluster.planner import PlanOptions
from ..gateway.backends import BackendPool
from ..gateway.origins import RequestOrigins, is_loopback_name
from ..model.backends import choose_backend, held_dtype, stage_kv_dtype
from ..model.kvcache import kv_bytes_per_value
from ..model.spec import read_spec
from ..proto import p2pllm_pb2 as pb
from ..runtime.api import EngineStats
from ..runtime.cluster_engine import ClusterEngine
from ..runtime.compute_lane import ComputeLane
from ..runtime.scheduler import DRAINING
from ..transport.client import ClientPool
from ..transport.server import start_server
from ..wording import counted
from .agreement import Agreement
from .config import DaemonConfig, _open_history, _security, _set_compute_threads
from .dataplane import DataPlane
from .loading import StageLoader
from .peers import PeerLoops
from .pieces import PeerPieces
from .status import head_load, health_stats, peer_rows, resident_bytes, ring_load

__all__ = ["Daemon", "DaemonConfig"]

log = logging.getLogger(__name__)


class Daemon:
    def __init__(self, cfg: DaemonConfig):
        self.cfg = cfg
        self.history = _open_history(cfg)  # first: a state dir it cannot use is reported before any work
        self.id = secrets.token_hex(8)
        self.threads = _set_compute_threads(cfg.threads)
        self.spec = read_spec(cfg.model)
        self.backend = choose_backend(self.spec, cfg.backend, cfg.device)
        self.kv_dtype = stage_kv_dtype(self.spec, self.backend, cfg.device, cfg.kv_dtype)
        ref = getattr(cfg.model, "ref", "")  # what --model said: a store name (llama3.2:1b) names the model best
        self.model_name = ref if ref and not Path(ref).expanduser().exists() else Path(cfg.model).name
        self.host = pick_interface_address(cfg.interface)
        self.address = f"{self.host}:{cfg.port}"
        self.caps = probe(device=cfg.device, threads=cfg.threads, max_memory=cfg.max_memory, reprobe=cfg.reprobe)
        self.info = pb.PeerInfo(
            id=self.id,
            name=cfg.name,
            cluster=cfg.cluster,
            protocol=PROTOCOL_VERSION,
            address=self.address,
            gateway_port=cfg.gateway_port,
            model_fingerprint=self.spec.fingerprint,
            caps=pb.Capabilities(
                mem_bytes=int(self.caps.usable_memory),
                flops=float(self.caps.flops.get(self.caps.compute_dtype(), 0.0)),
                mem_bw=float(self.caps.mem_bw),
                net_bw=0.0,
                cpu_count=int(self.caps.cpu_count),
                device=f"{self.caps.device}:{self.caps.device_name}",
            ),
            n_layers=self.spec.n_layers,
        )
        self.membership = Membership(self.info, cfg.peer_timeout)
        self.security = _security(cfg)
        self.clients = ClientPool(self.security, on_dropped=self._connection_dropped)
        context = min(cfg.context or self.spec.context, self.spec.context)
        self.options = PlanOptions(
            context=context,
            dtype=held_dtype(self.spec, self.backend, cfg.device),
            kv_dtype_bytes=kv_bytes_per_value(self.kv_dtype),
            backend=self.backend,
            batch=cfg.batch,
            prefix_cache=context if cfg.prefix_cache is None else cfg.prefix_cache,
            objective=cfg.objective,
            strategy=cfg.strategy,
            hysteresis=cfg.hysteresis,
        )
        self.compute = ComputeLane.for_threads(self.threads)  # the stage's one thread (small steps: maybe the loop)
        self.started_at = time.monotonic()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.server = None
        self.discovery = None
        self.gateway = None
        self.backends = BackendPool(cfg.backends, self.model_name)  # health-checked while the gateway runs
        self.leaving = False
        self.engine = None  # the gateway's ClusterEngine, once it runs
        self._no_plan: tuple[float, str] = (-1e9, "")  # (when, why) of _why_no_plan
        self.drained = False  # by `p2pllm peers drain`: up and listed, but planned without (cluster/management.py)
        from ..model.tokenizer import load_tokenizer

        self.tokenizer = cfg.tokenizer if cfg.tokenizer is not None else load_tokenizer(cfg.model)
        # the parts (control plane, data plane, model pieces), each with its own state
        self.peers = PeerLoops(self.info, self.membership, self.clients, cfg.peers, on_lost=self._peers_lost,
                               on_epoch=lambda epoch: self.agreement.saw_epoch(epoch))
        self.data = DataPlane(self.id, self.address, self.spec, self.options, self.security, self.clients,
                              self.membership, self.compute, self.tokenizer, self.model_name, cfg.micro_batches,
                              cfg.wire_dtype, on_broken=self._connection_dropped)
        self.loader = StageLoader(cfg.model, self.spec, self.backend, cfg.device, self.kv_dtype, context,
                                  self.threads, self.tokenizer, self.compute, explicit_threads=bool(cfg.threads))
        self.pieces = PeerPieces(cfg.model, self.spec, self.id, self.membership, self.options, self.clients,
                                 cfg.fetch_from, cfg.model_cache, on_change=self._out_of_plan_changed,
                                 busy=self._ring_busy, busy_rate=cfg.fetch_serve_rate,
                                 coordinator=lambda: self.agreement.coordinator())
        self._frames_seen = (0, 0.0)  # the stage's frame count, and when it last changed (_ring_busy)
        self.agreement = Agreement(self.id, self.spec, self.options, self.membership, self.clients, self.data,
                                   self.loader, self.pieces, cfg.kv_replicas, self.peers.dial, self.gateway_url,
                                   started_at=self.started_at)
        self.peer_manager = PeerManager(self)

    # what node management (cluster/management.py) and the lifecycle read of the parts
    @property
    def epoch(self) -> int:
        return self.agreement.epoch

    @property
    def committed(self) -> pb.PlanProposal | None:
        return self.agreement.committed

    @property
    def state(self) -> str:
        return self.agreement.state

    @property
    def scheduler(self):
        return self.data.scheduler

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._on_signal)
            except (NotImplementedError, RuntimeError):
                pass
        await self.pieces.open()
        self.server = await start_server(self, self._listen_hosts(), self.cfg.port, self.security)
        try:
            await self._start()
        except BaseException:  # e.g. the gateway's port is taken: stop what started, or the gRPC
            await self._close()  # server's finaliser runs after the loop closed and prints tracebacks
            raise
        await self._stop.wait()
        await self.shutdown()

    def _listen_hosts(self) -> list[str]:
        return peer_listen_hosts(self.cfg.interface, self.host)

    async def _start(self) -> None:
        """Everything after the gRPC server: discovery, the gateway, the loops."""
        log.info("peer traffic: %s", self.security.describe())
        log.info(
            "peer %s (%s) listening on %s; model %s: %s, %d layers, %.2f GiB; fingerprint %s",
            self.cfg.name, self.id[:8], self.address, self.cfg.model, self.spec.arch, self.spec.n_layers,
            self.spec.weight_bytes(0, self.spec.n_layers) / 2**30, self.spec.fingerprint,
        )
        log.info(
            "capabilities: %s, %.1f GFLOPS (%s), %.1f GB/s memory bandwidth, %d cores (%s)%s",
            self.caps.describe_memory(), self.info.caps.flops / 1e9, self.caps.compute_dtype(),
            self.caps.mem_bw / 1e9, self.caps.cpu_count, self.info.caps.device,
            " (cached measurement)" if self.caps.cached else "",
        )
        if self.cfg.mdns:
            self.discovery = Discovery(self._announcement(), on_found=self.peers.on_found,
                                       on_lost=self.peers.on_goodbye, interface_address=self.host)
            await self.discovery.start()
            log.info("mDNS: advertising and browsing on %s", self.host)
        else:
            log.info("mDNS off; static peers: %s", ", ".join(self.cfg.peers) or "none")
        await self._start_gateway()
        self._tasks = [
            asyncio.create_task(self.peers.hello_loop(), name="hello"),
            asyncio.create_task(self.peers.health_loop(), name="health"),
            asyncio.create_task(self.peers.link_loop(), name="links"),
            asyncio.create_task(self.agreement.coordinator_loop(), name="coordinator"),
        ]
        if self.pieces.fetching:
            self._tasks.append(asyncio.create_task(self.pieces.prefetch(), name="prefetch"))

    def stop(self) -> None:
        self._stop.set()

    def _on_signal(self) -> None:
        """First signal: drain (the cluster replans without us first); a second one: stop now."""
        if self.leaving:
            log.warning("stopping now")
            self.stop()
            return
        self.leaving = True
        if self.scheduler is not None:
            asyncio.get_running_loop().create_task(self._drain_head())
            return
        if self.engine is not None:  # the requests it forwards to the coordinator finish first (_leave)
            self.engine.closing = ("this peer is leaving the cluster and takes no new requests; "
                                   "another peer's gateway serves them")
        if self.committed is not None and coord.my_assignment(self.committed, self.id):
            self.agreement.state = "leaving"
            asyncio.get_running_loop().create_task(self._leave())
        else:
            asyncio.get_running_loop().create_task(self._leave(needed=False))

    async def _leave(self, timeout: float = 60.0, needed: bool = True) -> None:
        """Stop once the plan no longer `needed` this peer's layers and the requests its gateway
        forwards (to the coordinator or to its backends) have ended (at most `timeout` for both);
        a second Ctrl-C stops at once."""
        deadline = time.monotonic() + timeout
        if needed and not await self._until_replanned(deadline, timeout):
            return  # a second Ctrl-C: stopping already, nothing more to say
        # the streams its gateway forwards to the coordinator end first: stopping the gateway cut
        # them after its 5 s grace, a 200 truncated with no error (and a traceback in the log)
        await _until_forwarded_end(self._forwarded, self._stop, deadline)
        self.stop()

    def _forwarded(self) -> int:
        """Requests this peer's gateway has on the coordinator or on its backends, still running."""
        return (self.engine.forwarding() if self.engine is not None else 0) + self.backends.in_flight()

    async def _until_replanned(self, deadline: float, timeout: float) -> bool:
        """Wait for a plan without this peer (or nobody to take its layers, or the deadline);
        False when a second Ctrl-C came first."""
        log.info("leaving: waiting for the cluster to replan without this peer (a second Ctrl-C stops now)")
        while time.monotonic() < deadline:
            if self._stop.is_set():
                return False
            if self.committed is None or not coord.my_assignment(self.committed, self.id):
                log.info("the cluster no longer needs this peer's layers")
                return True
            heirs = [m for m in self.membership.live_compatible()
                     if m.info.id != self.id and m.state not in coord.OUT_OF_PLAN]
            if not heirs:  # e.g. the whole cluster was told to stop: waiting would only delay this one
                log.info("no other peer stays to take this peer's layers; stopping now")
                return True
            await asyncio.sleep(0.2)
        log.warning("the cluster did not replan without this peer within %.0f s; stopping anyway", timeout)
        return True

    async def _drain_head(self, timeout: float = 120.0) -> None:
        log.info("draining: no new requests; finishing the ones in flight (a second Ctrl-C stops now)")
        self.scheduler.ready = False
        if self.engine is not None:  # /health says it too (it answered "ok" while requests got 503)
            self.engine.closing = DRAINING
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = self.scheduler.stats()
            if stats.running + stats.queued + self.backends.in_flight() == 0:
                break
            await asyncio.sleep(0.2)
        self.stop()

    async def shutdown(self) -> None:
        log.info("shutting down")
        await self._close()

    async def _close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # requests still running (a second Ctrl-C) end now with a clear error, before the gateway
        # stops: it cut them after a 5 s grace, a 200 stream truncated without one
        stopping = "this peer is shutting down (it was told to stop now); retry on another peer's gateway"
        if self.engine is not None:
            self.engine.stopping = stopping
        scheduler = self.scheduler
        if scheduler is not None:
            scheduler.unavailable = stopping
            await scheduler.stop()
        if self.gateway is not None:
            await self.gateway.stop()
        if self.history is not None:
            self.history.close()
        await self.backends.stop()
        if self.discovery is not None:
            await self.discovery.stop()
        if self.server is not None:
            await self.server.stop(grace=1.0)
        await self.data.links.close()
        self.pieces.close()
        await self.clients.close()
        self.compute.shutdown()

    # ------------------------------------------------------------------ the gateway
    async def _start_gateway(self) -> None:
        from ..gateway.app import create_app
        from ..gateway.server import serve_gateway

        engine = self.engine = ClusterEngine(
            model_name=self.model_name, context=self.options.context, tokenizer=self.tokenizer,
            clients=self.clients, local=lambda: self.scheduler, coordinator_address=self._coordinator_address,
            not_ready=self._not_ready, stats=self._engine_stats, spec=self.spec,
            cluster_context=lambda: coord.plan_context(self.committed),
        )
        await self.backends.start()
        origins = RequestOrigins(self.cfg.allowed_origins, self.cfg.allowed_hosts,
                                 local_only=is_loopback_name(self.cfg.gateway_host))
        self.gateway = await serve_gateway(create_app(engine, api_key=self.cfg.api_key, backends=self.backends,
                                                      response_cache=self.cfg.response_cache, cluster=self,
                                                      history=self.history, origins=origins),
                                           self.cfg.gateway_host, self.cfg.gateway_port)
        log.info("gateway: %s (OpenAI-compatible; forwards to the coordinator%s)", self.gateway_url,
                 f" or to external backends {', '.join(b.id for b in self.backends.backends)}" if self.backends else "")
        if self.history is not None:
            log.info("request history (%s): %s, the latest %s (GET /v1/history)", self.history.mode,
                     self.history.path, counted(self.history.max_rows, "request"))
        else:
            log.info("request history: off")

    @property
    def gateway_url(self) -> str:
        return f"http://{self.cfg.gateway_host}:{self.cfg.gateway_port}/v1"

    def _coordinator_address(self) -> str | None:
        if self.committed is None:
            return None
        member = self.membership.members.get(self.committed.coordinator)
        return member.info.address if member is not None else self.committed.head_address

    def _ring_busy(self) -> bool:
        """Requests run through this peer now: it heads sequences, or its stage handled a ring frame
        in the last second. Fetching peers are served slower meanwhile (docs/fetch.md, Sources)."""
        if self.scheduler is not None:
            stats = self.scheduler.stats()
            if stats.running + stats.queued:
                return True
        frames, now = self.data.ring_stage.frames, time.monotonic()
        if frames != self._frames_seen[0]:
            self._frames_seen = (frames, now)
        return now - self._frames_seen[1] < 1.0

    def _not_ready(self) -> str:
        if self.committed is None:
            infeasible = self._why_no_plan()
            return f"the cluster has no plan: with the peers here none is feasible: {infeasible}" if infeasible \
                else "the cluster has no plan yet (peers are still meeting or loading)"
        if self.scheduler is not None:
            return self.scheduler.unavailable or ""  # the head queues requests through a plan change
        if not self.membership.is_live(self.committed.coordinator):
            nobody = coord.nobody_to_plan(self.membership)
            return f"the coordinator was lost and {nobody}" if nobody else \
                "the coordinator was lost; the peers are electing a new one"
        return ""

    def _not_serving(self) -> str:
        """Why this peer's gateway answers 503 now ('' = it serves): the cluster's reason, or this
        peer's own (leaving, draining) that the gateway adds to it."""
        return self.engine.not_ready_reason() if self.engine is not None else self._not_ready()

    def _why_no_plan(self) -> str:
        """Before any plan: why the peers met so far cannot make one ('' = they can, or may yet), as
        every peer's planner sees it (at most once every 2 s: requests ask on every 503)."""
        now = time.monotonic()
        if now - self._no_plan[0] >= 2.0:
            candidate = coord.candidate_plan(self.spec, self.membership, self.options)
            planned = [m for m in self.membership.live_compatible() if m.state not in coord.OUT_OF_PLAN]
            self._no_plan = (now, "" if candidate.feasible or not planned else candidate.reason)
        return self._no_plan[1]

    def _engine_stats(self) -> EngineStats:
        if self.scheduler is not None:
            stats = self.scheduler.stats()
        else:
            stats = EngineStats(stages=len(self.committed.stages) if self.committed else 0, epoch=self.epoch)
        stats.extra.update({
            "stage_compute_seconds": self.data.ring_stage.compute_seconds,
            "stage_frames": self.data.ring_stage.frames,
            "ring_bytes_sent": self.data.links.bytes_sent(),
            "kv_replica_bytes_sent": self.data.ring_stage.replica_bytes,
            "kv_replica_bytes_held": self.data.replicas.nbytes(),
        })
        stats.extra.update(health_stats(self.membership, self.committed, self.data.stage, self.id,
                                        serving=not self._not_serving(), mem_limit=int(self.info.caps.mem_bytes)))
        return stats

    def _announcement(self) -> Announcement:
        return Announcement(
            id=self.id, name=self.cfg.name, cluster=self.cfg.cluster, protocol=PROTOCOL_VERSION, host=self.host,
            grpc_port=self.cfg.port, gateway_port=self.cfg.gateway_port, fingerprint=self.spec.fingerprint,
            mem_bytes=int(self.info.caps.mem_bytes), flops=float(self.info.caps.flops), mem_bw=float(self.caps.mem_bw),
        )

    # ------------------------------------------------------------------ wiring between the parts
    def _connection_dropped(self, address: str) -> None:
        self.peers.connection_dropped(address)

    def _peers_lost(self, lost: list[str]) -> None:
        """A lost stage parks the ring's sequences at once and wakes the coordinator's loop to replan."""
        self.data.peers_lost(lost, self.committed)
        self.agreement.replan_now.set()

    # ------------------------------------------------------------------ node management
    @property
    def public_state(self) -> str:
        """The state other peers see: drained or fetching override what the plan made of this peer.
        A peer told to stop says `leaving` whatever it is: a draining coordinator keeps its own
        state "serving" (its planning must not drop it while it finishes its requests), but
        without this its peers logged its announced exit as a failure ("lost: its connection
        dropped") and `status` showed it serving until it vanished."""
        if self.leaving:
            return "leaving"
        return "drained" if self.drained else "fetching" if self.pieces.fetching else self.state

    def set_drained(self, drained: bool) -> None:
        """Out of the plan or back in: the coordinator (maybe this peer) sees it at its next health
        check, as it sees a peer leaving, and replans once."""
        self.drained = drained
        self._out_of_plan_changed()

    def _out_of_plan_changed(self) -> None:
        out = self.public_state if self.public_state in coord.OUT_OF_PLAN else "unknown"
        self.membership.members[self.id].state = out  # for our own planning
        self.agreement.replan_now.set()

    def add_static_peer(self, address: str) -> None:
        """Dial `address` from now on, like `join --peer` (the hello loop retries it while it is away)."""
        self.peers.add_static_peer(address)

    async def manage(self, action: str, target: str) -> dict:
        """The gateway's way in (the dashboard): the same as a ManageRequest taken here."""
        return await self.peer_manager.run(action, target)

    # ------------------------------------------------------------------ gRPC handlers
    async def on_hello(self, req: pb.HelloRequest, peer: str) -> pb.HelloReply:
        return await self.peers.on_hello(req, peer)

    def on_health(self, req: pb.HealthRequest) -> pb.HealthReply:
        if req.from_id in self.membership.members:
            self.membership.heard_from(req.from_id)
        links = [pb.LinkStats(peer_id=p, rtt_s=r, bw=b) for p, (r, b) in self.peers.links.items()]
        peers = [m.info.address for m in self.membership.members.values()
                 if m.info.id != self.id and self.membership.is_live(m.info.id)]
        return pb.HealthReply(id=self.id, state=self.public_state, epoch=self.epoch,
                              coordinator=self.agreement.coordinator(), load_progress=self.loader.load_progress,
                              links=links, peers=peers, mem_used=resident_bytes(), head=head_load(self.scheduler),
                              holds=self.pieces.holding, fetch=self.pieces.fetch_progress)

    async def on_propose(self, req: pb.PlanProposal) -> pb.PlanReply:
        return await self.agreement.on_propose(req)

    async def on_commit(self, req: pb.CommitRequest) -> pb.PlanReply:
        return await self.agreement.on_commit(req)

    async def on_manage(self, req: pb.ManageRequest) -> pb.ManageReply:
        return await self.peer_manager.handle(req)

    def on_status(self) -> str:
        return json.dumps(self.status())

    async def on_frame(self, frame: pb.Frame) -> pb.FrameAck:
        return await self.data.on_frame(frame)

    def on_generate(self, req: pb.GenerateRequest):
        return self.data.on_generate(req)

    async def on_embed(self, req: pb.EmbedRequest) -> pb.EmbedReply:
        return await self.data.on_embed(req)

    async def on_fetch_kv(self, req: pb.FetchKVRequest) -> list[pb.KVDelta]:
        return await self.data.on_fetch_kv(req)

    async def on_manifest(self, req: pb.ManifestRequest) -> pb.Manifest:
        return await self.pieces.on_manifest(req)

    def on_fetch_piece(self, req: pb.FetchPieceRequest):
        return self.pieces.on_fetch_piece(req)

    # ------------------------------------------------------------------ status
    def status(self) -> dict:
        coordinator = self.agreement.coordinator()
        peers = peer_rows(self.membership, self.id, self.committed, coordinator, self.epoch, self.peers.links,
                          self.public_state, self.pieces.holding, self.pieces.fetch_progress)
        engine = self._engine_stats()
        ring = ring_load(head_load(self.scheduler), self.committed, self.membership)
        return {
            "id": self.id,
            "name": self.cfg.name,
            "coordinator": coordinator,
            "epoch": self.epoch,
            "gateway": self.gateway_url,
            "active_sequences": engine.running + engine.queued,
            # running sequences' KV, and the finished ones the prefix cache keeps
            "kv_sequences": len(self.data.stage.sequences()) if self.data.stage is not None else 0,
            "ring": ring,  # the head's queue, sequences and token count (cluster-wide)
            "peers": peers,
            "plan": json.loads(self.committed.plan_json) if self.committed is not None else None,
            "not_serving": self._not_serving() or None,  # why the gateway answers 503 now (None: it serves)
            "backends": self.backends.rows(),  # this peer's gateway's external servers
        }


def peer_listen_hosts(interface: str | None, host: str) -> list[str]:
    """Where the gRPC server listens: every IPv4 address, unless --interface chose one (`host`):
    then that one and loopback (for `p2pllm status` on this machine), so the peer port is not
    open on the other networks."""
    if not interface:
        return ["0.0.0.0"]
    return [host] if ipaddress.ip_address(host).is_loopback else [host, "127.0.0.1"]


async def _until_forwarded_end(running: Callable[[], int], stop: asyncio.Event, deadline: float) -> None:
    """Wait (until `deadline`, or a second Ctrl-C) for the `running` forwarded requests to end."""
    said = False
    while (n := running()) and not stop.is_set():
        if time.monotonic() >= deadline:
            log.warning("%s through this peer's gateway still running; stopping anyway", counted(n, "request"))
            return
        if not said:
            log.info("waiting for %s through this peer's gateway to finish (a second Ctrl-C "
                     "ends them now)", counted(n, "request"))
            said = True
        await asyncio.sleep(0.2)
