"""One peer: discovery + membership + transport + stage (+ the head and gateway on the coordinator).

Every loop here only moves information around; decisions live in cluster/ (membership,
coordinator, planner) and computation in runtime/ and model/.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from . import PROTOCOL_VERSION
from .cluster import coordinator as coord
from .cluster.capability import probe
from .cluster.discovery import Announcement, Discovery, pick_interface_address
from .cluster.fetch import ModelFetcher, PieceSource
from .cluster.management import PeerManager
from .cluster.membership import Membership
from .cluster.planner import Plan, PlanOptions
from .errors import P2PError
from .gateway.backends import BackendPool
from .model.backends import choose_backend, held_dtype, stage_kv_dtype
from .model.kvcache import kv_bytes_per_value
from .model.pieces import layer_ranges
from .model.spec import read_spec
from .proto import p2pllm_pb2 as pb
from .runtime.api import EngineStats
from .runtime.cluster_engine import ClusterEngine, serve_embed, serve_generate
from .runtime.cluster_ring import ClusterRing
from .runtime.recovery import plan_sources, restore_kv, serve_fetch
from .runtime.replica import ReplicaStore, exported
from .runtime.ring_stage import Binding, RingStage
from .runtime.scheduler import Scheduler
from .transport import frames
from .transport.client import ClientPool
from .transport.ring import LinkPool
from .transport.security import Security
from .transport.server import RpcRefused, start_server

log = logging.getLogger(__name__)

HEALTH_INTERVAL = 0.5
HELLO_INTERVAL = 1.0
SETTLE_SECONDS = 1.0  # membership must be quiet this long before a (re)plan
STARTUP_GRACE = 2.5  # mDNS answers take about a second: give peers started together time to meet
LINK_REMEASURE_SECONDS = 60.0


@dataclass
class DaemonConfig:
    model: str
    port: int = 7700
    gateway_port: int = 8700
    gateway_host: str = "127.0.0.1"
    name: str = field(default_factory=socket.gethostname)
    cluster: str = "default"
    peers: list[str] = field(default_factory=list)
    mdns: bool = True
    interface: str | None = None
    device: str = "cpu"
    backend: str = "auto"  # auto | ggml | torch (model.backends.choose_backend)
    kv_dtype: str | None = None  # None: f16 on ggml stages, the compute dtype on torch stages
    max_memory: int | None = None
    threads: int | None = None
    micro_batches: int | None = None
    kv_replicas: int = 1
    peer_timeout: float = 2.0
    strategy: str = "optimal"
    objective: str = "latency"
    context: int | None = None
    batch: int = 8
    prefix_cache: int | None = None  # KV positions for the head's prefix cache; None: one context, 0: off
    hysteresis: float = 0.10
    reprobe: bool = False
    wire_dtype: str | None = None  # activations on the wire: None = the compute dtype (exact)
    api_key: str | None = None
    response_cache: object | None = None  # a gateway.response_cache.CacheSettings; None: off (join: on)
    secret: str | None = None  # the cluster secret (mutual TLS between peers); None needs insecure=True
    insecure: bool = False
    backends: list = field(default_factory=list)  # gateway.backends.BackendConfig: external servers of this gateway
    fetch_from: list[str] = field(default_factory=list)  # --from-peers: `model` is a partial copy; its sources
    model_cache: str | None = None  # where that copy lives (None: model.pieces.default_cache_root())
    state_dir: str | None = None  # None: gateway.history.default_state_dir(cluster)
    history: str = "off"  # request history of this gateway: off | meta | full (join: meta)
    history_rows: int = 10_000


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
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        # plan state
        self.epoch = 0
        self.committed: pb.PlanProposal | None = None
        self.committed_plan: Plan | None = None  # the Plan object, where this peer made it
        self.pending: dict[int, tuple[pb.PlanProposal, object]] = {}
        self.stage = None  # runtime.stage.Stage of the committed epoch (None: no layers here)
        self.loaded: tuple[tuple[int, int], object] | None = None  # ((start, end), Stage) reusable across epochs
        self.state = "idle"
        self.load_progress = 0.0
        self.load_seconds = 0.0
        self.highest_epoch = 0
        self._links: dict[str, tuple[float, float]] = {}
        self._link_measured_at: dict[str, float] = {}
        self._dial: set[str] = set(cfg.peers)
        self._stop = asyncio.Event()
        self._replan_now = asyncio.Event()
        self._health_now = asyncio.Event()
        self._dropped: set[str] = set()  # addresses whose connection dropped since they last answered
        self.started_at = time.monotonic()
        self._tasks: list[asyncio.Task] = []
        self._proposing = False
        self.server = None
        self.discovery = None
        self.gateway = None
        self.backends = BackendPool(cfg.backends, self.model_name)  # health-checked while the gateway runs
        # data plane
        self.links = LinkPool(self.security, on_refused=self._frame_refused, local=(self.address, self.on_frame),
                              on_broken=self._connection_dropped)
        self.ring_stage = RingStage(self.spec, self.links, self.compute, cfg.wire_dtype)
        self.ring: ClusterRing | None = None  # the head's ring, on the coordinator
        self.replicas = ReplicaStore(self.spec, self.options.context)
        self.leaving = False
        self.drained = False  # by `p2pllm peers drain`: up and listed, but planned without (cluster/management.py)
        # --from-peers: the layers this peer will hold are fetched before it asks for them (docs/fetch.md);
        # every GGUF peer serves the pieces it holds to such peers
        self.fetcher = ModelFetcher(self.clients, cfg.fetch_from, cfg.model_cache, progress=self._fetched_bytes) \
            if cfg.fetch_from else None
        self.fetch_progress: pb.FetchProgress | None = None  # the fetch running now, for status and health
        self.fetching = self.fetcher is not None  # out of plans until the range it expects is here
        self.pieces: PieceSource | None = None
        self.holding: pb.Holding | None = None  # what a partial copy holds (None: the whole file)
        self.peer_manager = PeerManager(self)
        self.scheduler: Scheduler | None = None
        from .model.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(cfg.model)

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._on_signal)
            except (NotImplementedError, RuntimeError):
                pass
        await self._open_pieces()
        self.server = await start_server(self, "0.0.0.0", self.cfg.port, self.security)
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
            self.discovery = Discovery(self._announcement(), on_found=self._on_found, on_lost=self._on_lost,
                                       interface_address=self.host)
            await self.discovery.start()
            log.info("mDNS: advertising and browsing on %s", self.host)
        else:
            log.info("mDNS off; static peers: %s", ", ".join(self.cfg.peers) or "none")
        await self._start_gateway()
        self._tasks = [
            asyncio.create_task(self._hello_loop(), name="hello"),
            asyncio.create_task(self._health_loop(), name="health"),
            asyncio.create_task(self._link_loop(), name="links"),
            asyncio.create_task(self._coordinator_loop(), name="coordinator"),
        ]
        if self.fetching:
            self._tasks.append(asyncio.create_task(self._prefetch(), name="prefetch"))
        await self._stop.wait()
        await self.shutdown()

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
        elif self.committed is not None and coord.my_assignment(self.committed, self.id):
            self.state = "leaving"
            asyncio.get_running_loop().create_task(self._leave())
        else:
            self.stop()

    async def _leave(self, timeout: float = 60.0) -> None:
        log.info("leaving: waiting for the cluster to replan without this peer (a second Ctrl-C stops now)")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.committed is None or not coord.my_assignment(self.committed, self.id):
                log.info("the cluster no longer needs this peer's layers")
                break
            heirs = [m for m in self.membership.live_compatible()
                     if m.info.id != self.id and m.state not in coord.OUT_OF_PLAN]
            if not heirs:  # e.g. the whole cluster was told to stop: waiting would only delay this one
                log.info("no other peer stays to take this peer's layers; stopping now")
                break
            await asyncio.sleep(0.2)
        else:
            log.warning("the cluster did not replan without this peer within %.0f s; stopping anyway", timeout)
        self.stop()

    async def _drain_head(self, timeout: float = 120.0) -> None:
        log.info("draining: no new requests; finishing the ones in flight (a second Ctrl-C stops now)")
        self.scheduler.ready = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = self.scheduler.stats()
            if stats.running + stats.queued == 0:
                break
            await asyncio.sleep(0.2)
        self.stop()

    async def shutdown(self) -> None:
        log.info("shutting down")
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.gateway is not None:
            await self.gateway.stop()
        if self.history is not None:
            self.history.close()
        await self.backends.stop()
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self.discovery is not None:
            await self.discovery.stop()
        if self.server is not None:
            await self.server.stop(grace=1.0)
        await self.links.close()
        if self.fetcher is not None:
            self.fetcher.close()
        if self.pieces is not None:
            self.pieces.close()
        await self.clients.close()
        self.compute.shutdown(wait=False, cancel_futures=True)

    async def _start_gateway(self) -> None:
        from .gateway.app import create_app
        from .gateway.server import serve_gateway

        engine = ClusterEngine(
            model_name=self.model_name, context=self.options.context, tokenizer=self.tokenizer,
            clients=self.clients, local=lambda: self.scheduler, coordinator_address=self._coordinator_address,
            not_ready=self._not_ready, stats=self._engine_stats, spec=self.spec,
        )
        await self.backends.start()
        self.gateway = await serve_gateway(create_app(engine, api_key=self.cfg.api_key, backends=self.backends,
                                                      response_cache=self.cfg.response_cache, cluster=self,
                                                      history=self.history),
                                           self.cfg.gateway_host, self.cfg.gateway_port)
        log.info("gateway: %s (OpenAI-compatible; forwards to the coordinator%s)", self.gateway_url,
                 f" or to external backends {', '.join(b.id for b in self.backends.backends)}" if self.backends else "")
        if self.history is not None:
            log.info("request history (%s): %s, the latest %d requests (GET /v1/history)", self.history.mode,
                     self.history.path, self.history.max_rows)
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

    def _not_ready(self) -> str:
        if self.committed is None:
            return "the cluster has no plan yet (peers are still meeting or loading)"
        if self.scheduler is not None:
            return self.scheduler.unavailable or ""  # the head queues requests through a plan change
        if not self.membership.is_live(self.committed.coordinator):
            return "the coordinator was lost; the peers are electing a new one"
        return ""

    def _engine_stats(self) -> EngineStats:
        if self.scheduler is not None:
            stats = self.scheduler.stats()
        else:
            stats = EngineStats(stages=len(self.committed.stages) if self.committed else 0, epoch=self.epoch)
        stats.extra.update({
            "stage_compute_seconds": self.ring_stage.compute_seconds,
            "stage_frames": self.ring_stage.frames,
            "ring_bytes_sent": self.links.bytes_sent(),
            "kv_replica_bytes_sent": self.ring_stage.replica_bytes,
            "kv_replica_bytes_held": self.replicas.nbytes(),
        })
        stats.extra.update(self._health_stats())
        return stats

    def _health_stats(self) -> dict:
        """What the alert rules (docs/monitoring/) watch, as this peer sees it: its peer table, whether
        a plan is committed and served, its stage's KV against the room the plan left it, its memory."""
        members = list(self.membership.members.values())
        live = sum(1 for m in members if m.compatible and self.membership.is_live(m.info.id))
        kv_held = kv_allocated = 0
        if self.stage is not None:
            kv_held, kv_allocated = self.stage.kv_memory()
        return {
            "peers_known": len(members),  # this peer included, excluded (incompatible) peers too
            "peers_live": live,
            "peers_lost": sum(1 for m in members if m.compatible and not self.membership.is_live(m.info.id)),
            "peers_excluded": sum(1 for m in members if not m.compatible),
            "plan_committed": int(self.committed is not None),
            "serving": int(not self._not_ready()),
            "kv_bytes": kv_held,
            "kv_allocated_bytes": kv_allocated,
            "kv_capacity_bytes": _kv_room(self.committed, self.id) if self.committed is not None else 0,
            "memory_used_bytes": _resident_bytes(),
            "memory_limit_bytes": int(self.info.caps.mem_bytes),
        }

    def _announcement(self) -> Announcement:
        return Announcement(
            id=self.id, name=self.cfg.name, cluster=self.cfg.cluster, protocol=PROTOCOL_VERSION, host=self.host,
            grpc_port=self.cfg.port, gateway_port=self.cfg.gateway_port, fingerprint=self.spec.fingerprint,
            mem_bytes=int(self.info.caps.mem_bytes), flops=float(self.info.caps.flops), mem_bw=float(self.caps.mem_bw),
        )

    # ------------------------------------------------------------------ node management
    @property
    def public_state(self) -> str:
        """The state other peers see: drained or fetching override what the plan made of this peer."""
        return "drained" if self.drained else "fetching" if self.fetching else self.state

    def set_drained(self, drained: bool) -> None:
        """Out of the plan or back in: the coordinator (maybe this peer) sees it at its next health
        check, as it sees a peer leaving, and replans once."""
        self.drained = drained
        self._out_of_plan_changed()

    def _out_of_plan_changed(self) -> None:
        out = self.public_state if self.public_state in coord.OUT_OF_PLAN else "unknown"
        self.membership.members[self.id].state = out  # for our own planning
        self._replan_now.set()

    def add_static_peer(self, address: str) -> None:
        """Dial `address` from now on, like `join --peer` (the hello loop retries it while it is away)."""
        self._dial.add(address)
        asyncio.get_running_loop().create_task(self._hello(address))

    # ------------------------------------------------------------------ model pieces (--from-peers)
    async def _open_pieces(self) -> None:
        """What this peer serves to peers that fetch their layers: its GGUF file or Hugging Face folder,
        or the pieces of its own partial copy (which grows as it fetches)."""
        if self.fetcher is not None:
            self.pieces = PieceSource(await self.fetcher.open())
            self._note_holding()
            self._out_of_plan_changed()
        elif self.spec.format == "gguf":
            self.pieces = PieceSource(self.cfg.model)
        elif self.spec.format == "hf":
            try:
                self.pieces = PieceSource(self.cfg.model)
            except (P2PError, OSError) as e:  # a folder it cannot cut into pieces still runs; it serves none
                log.warning("this peer serves no model pieces to --from-peers peers: %s", e)

    async def on_manifest(self, req: pb.ManifestRequest) -> pb.Manifest:
        if self.pieces is None:
            raise RpcRefused(grpc.StatusCode.UNIMPLEMENTED, "this peer serves no model pieces")
        return await self.pieces.on_manifest(req)

    async def on_fetch_piece(self, req: pb.FetchPieceRequest):
        if self.pieces is None:
            raise RpcRefused(grpc.StatusCode.UNIMPLEMENTED, "this peer serves no model pieces")
        async for chunk in self.pieces.on_fetch_piece(req):
            yield chunk

    async def _prefetch(self) -> None:
        """Fetch the range the planner would give this peer while the cluster serves without it,
        then come into the plan: one replan adds it, its layers already here. (The coordinator may
        still assign another range: on_propose fetches what is missing then.)"""
        while True:
            await asyncio.sleep(SETTLE_SECONDS)
            others = [m for m in self.membership.live_compatible() if m.info.id != self.id]
            if not others or time.monotonic() - self.membership.changed_at < SETTLE_SECONDS:
                continue
            me = self.membership.members[self.id]
            me.state = "unknown"  # the plan as if this peer were in
            candidate = coord.candidate_plan(self.spec, self.membership, self.options)
            me.state = "fetching"
            mine = next(((s.start, s.end) for s in candidate.stages if s.peer == self.id), None)
            try:
                if candidate.feasible and mine is not None:
                    await self._fetch_range(mine)
            except P2PError as e:
                log.warning("fetching layers [%d, %d) failed: %s; trying again", mine[0], mine[1], e)
                await asyncio.sleep(5.0)
                continue
            log.info("%s; ready to be planned", f"layers [{mine[0]}, {mine[1]}) are here" if mine else
                     "the planner would give this peer no layers now")
            self.fetching = False
            self._out_of_plan_changed()
            return

    async def _fetch_range(self, rng: tuple[int, int]) -> None:
        """The pieces layers [start, end) need, from every live peer that may hold them."""
        self.fetcher.add_sources([m.info.address for m in self.membership.live_compatible() if m.info.id != self.id])
        self.fetch_progress = pb.FetchProgress(start=rng[0], end=rng[1],
                                               total=sum(p.nbytes for p in self.fetcher.partial.missing(*rng)))
        try:
            await self.fetcher.fetch(*rng)
        finally:
            self.fetch_progress = None
            self._note_holding()

    def _fetched_bytes(self, done: int, total: int, rate: float) -> None:
        if self.fetch_progress is not None:
            self.fetch_progress.done, self.fetch_progress.total, self.fetch_progress.rate = done, total, rate

    def _note_holding(self) -> None:
        """What the partial copy holds, for health replies and this peer's own planning."""
        partial, n = self.fetcher.partial, self.spec.n_layers

        def ends_held(start: int, end: int) -> bool:  # the stage's pieces outside its layers: embedding, head
            return not any(p.layer is None for p in partial.missing(start, end))

        self.holding = pb.Holding(layers=partial.held_layers(), embed=ends_held(0, 1), head=ends_held(n - 1, n))
        self.membership.members[self.id].holds = self.holding

    async def on_manage(self, req: pb.ManageRequest) -> pb.ManageReply:
        return await self.peer_manager.handle(req)

    async def manage(self, action: str, target: str) -> dict:
        """The gateway's way in (the dashboard): the same as a ManageRequest taken here."""
        return await self.peer_manager.run(action, target)

    # ------------------------------------------------------------------ discovery -> membership
    def _on_found(self, ann: Announcement) -> None:
        if ann.id != self.id:
            self._dial.add(ann.address)

    def _on_lost(self, peer_id: str) -> None:
        member = self.membership.members.get(peer_id)
        if member is not None:
            log.info("peer %s (%s) said goodbye", member.info.name, peer_id[:8])
            member.last_seen = -1e9  # silent from now on: the next expiry marks it lost

    async def _hello(self, address: str) -> None:
        try:
            reply = await self.clients.get(address).hello(self.info)
        except Exception as e:  # an unreachable or refusing peer: try again later
            log.debug("hello %s failed: %s", address, e)
            return
        self.membership.upsert(reply.peer)
        self.membership.heard_from(reply.peer.id)
        for known in reply.known:
            if known.id != self.id and known.id not in self.membership.members:
                self._dial.add(known.address)

    async def _hello_loop(self) -> None:
        while True:
            targets = set(self._dial)
            for m in self.membership.members.values():
                if m.info.id != self.id and not self.membership.is_live(m.info.id):
                    targets.add(m.info.address)
            known = {m.info.address for m in self.membership.members.values() if self.membership.is_live(m.info.id)}
            await asyncio.gather(*(self._hello(a) for a in targets - known - {self.address}))
            await asyncio.sleep(HELLO_INTERVAL)

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
            self.highest_epoch = max(self.highest_epoch, reply.epoch)
            known = {m.info.address for m in self.membership.members.values()}
            self._dial.update(a for a in reply.peers[:256] if a not in known and a != self.address)

    async def _health_loop(self) -> None:
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
        sequences at once and wakes the coordinator's loop to replan."""
        lost = self.membership.expire()
        if lost and self.ring is not None and self.committed is not None:
            stage_peers = {s.peer_id for s in self.committed.stages}
            for pid in lost:
                if pid in stage_peers:
                    self.scheduler.pause(f"peer {pid[:8]} of the ring was lost")
                    self.ring.fail_all(f"peer {pid[:8]} of the ring was lost")
        if lost:
            self._replan_now.set()

    def _connection_dropped(self, address: str) -> None:
        """A peer's connection dropped or its ring stream broke: check it now, not at the next tick."""
        member = self.membership.by_address(address)
        if member is not None and member.info.id != self.id:
            self._dropped.add(address)
            self._health_now.set()

    async def _link_loop(self) -> None:
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
                self._links[pid] = (rtt, bw)
                self._link_measured_at[pid] = now
                log.info("link to %s: rtt %.2f ms, %.0f MB/s", m.info.name, rtt * 1e3, bw / 1e6)
            self.membership.members[self.id].links = dict(self._links)
            await asyncio.sleep(1.0)

    # ------------------------------------------------------------------ coordinator
    def coordinator(self) -> str:
        return coord.elect(self.membership, self.epoch, self.committed.coordinator if self.committed else "")

    async def _coordinator_loop(self) -> None:
        while True:
            try:  # a lost stage wakes the loop at once; otherwise it looks twice a second
                await asyncio.wait_for(self._replan_now.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
            self._replan_now.clear()
            if self.coordinator() != self.id or self._proposing:
                continue
            broken = self.committed is not None and coord.broken_reason(self.committed, self.membership)
            if not broken and time.monotonic() - self.membership.changed_at < SETTLE_SECONDS:
                continue  # a lost stage is replanned at once; joins wait for membership to settle
            if self.committed is None and time.monotonic() - self.started_at < STARTUP_GRACE:
                continue
            candidate = coord.candidate_plan(self.spec, self.membership, self.options)
            if not candidate.feasible:
                if self.committed is None:
                    self._log_once(f"no feasible plan yet: {candidate.reason}")
                elif self.scheduler is not None and coord.broken_reason(self.committed, self.membership):
                    reason = f"the cluster lost capacity and cannot hold the model: {candidate.reason}"
                    self._log_once(reason)
                    self.scheduler.pause(reason)
                    self.scheduler.unavailable = reason  # new requests: 503 until capacity returns
                    self.scheduler.fail_parked(reason)  # running ones: a clear error now, not a hang
                continue
            why = coord.needs_new_plan(self.committed, self.committed_plan, candidate, self.membership,
                                       self.options.hysteresis)
            if why:
                self._proposing = True
                try:
                    await self._propose_and_commit(candidate, why)
                finally:
                    self._proposing = False

    _last_logged = ""

    def _log_once(self, msg: str) -> None:
        if msg != self._last_logged:
            self._last_logged = msg
            log.warning(msg)

    async def _propose_and_commit(self, candidate: Plan, why: str) -> None:
        epoch = max(self.epoch, self.highest_epoch, *(m.epoch for m in self.membership.members.values())) + 1
        proposal = coord.to_proposal(candidate, epoch, self.id, self.membership, self.spec.fingerprint)
        sched = self.scheduler
        if sched is not None and self.committed is not None:  # switch between steps, carrying sequences over
            sched.pause(why)
            await sched.drain(timeout=10.0)
            proposal.resume.extend(pb.ResumeSeq(seq_id=s, positions=p) for s, p in sched.resume_points())
        proposal.sources.extend(plan_sources(self.committed, bool(self.cfg.kv_replicas)))
        proposal.kv_replicas = self.cfg.kv_replicas
        log.info("proposing plan epoch %d (%s): %s; carrying %d sequences over", epoch, why,
                 _describe(proposal, self.membership), len(proposal.resume))
        targets = [m for m in self.membership.live_compatible()]

        async def ask(member):
            if member.info.id == self.id:
                return await self.on_propose(proposal)
            return await self.clients.get(member.info.address).propose(proposal)

        replies = await asyncio.gather(*(ask(m) for m in targets), return_exceptions=True)
        failed = [(m, r) for m, r in zip(targets, replies) if isinstance(r, BaseException) or not r.ok]
        if failed:
            m, r = failed[0]
            reason = r if isinstance(r, BaseException) else r.reason
            log.warning("epoch %d not accepted by %s: %s; will retry", epoch, m.info.name, reason)
            self.highest_epoch = max(self.highest_epoch, epoch)
            return

        async def commit(member):
            if member.info.id == self.id:
                return await self.on_commit(pb.CommitRequest(epoch=epoch, coordinator=self.id))
            return await self.clients.get(member.info.address).commit(epoch, self.id)

        resume_at: dict[int, int] = {}  # per sequence: the positions every stage rebuilt
        for r in replies:
            for seq in r.restored:
                resume_at[seq.seq_id] = min(resume_at.get(seq.seq_id, seq.positions), seq.positions)
        await asyncio.gather(*(commit(m) for m in targets), return_exceptions=True)
        self.committed_plan = candidate
        if self.scheduler is not None:
            self.scheduler.resume(f"epoch {epoch}", resume_at)

    # ------------------------------------------------------------------ gRPC handlers
    async def on_hello(self, req: pb.HelloRequest, peer: str) -> pb.HelloReply:
        member = self.membership.upsert(req.peer)
        self.membership.heard_from(req.peer.id)
        known = [m.info for m in self.membership.members.values() if m.info.id not in (self.id, req.peer.id)]
        return pb.HelloReply(peer=self.info, compatible=member.compatible, reason=member.reason, known=known)

    def on_health(self, req: pb.HealthRequest) -> pb.HealthReply:
        if req.from_id in self.membership.members:
            self.membership.heard_from(req.from_id)
        links = [pb.LinkStats(peer_id=p, rtt_s=r, bw=b) for p, (r, b) in self._links.items()]
        peers = [m.info.address for m in self.membership.members.values()
                 if m.info.id != self.id and self.membership.is_live(m.info.id)]
        return pb.HealthReply(id=self.id, state=self.public_state, epoch=self.epoch, coordinator=self.coordinator(),
                              load_progress=self.load_progress, links=links, peers=peers, mem_used=_resident_bytes(),
                              head=self._head_load(), holds=self.holding, fetch=self.fetch_progress)

    async def on_propose(self, req: pb.PlanProposal) -> pb.PlanReply:
        reason = coord.validate_proposal(req, self.spec, self.spec.fingerprint, self.epoch, self.coordinator())
        if reason:
            log.info("refused plan epoch %d: %s", req.epoch, reason)
            return pb.PlanReply(ok=False, reason=reason)
        self.highest_epoch = max(self.highest_epoch, req.epoch)
        for s in req.stages:  # a stage peer we have not met yet: say hello (the ring needs it anyway)
            if s.peer_id not in self.membership.members and s.peer_id != self.id:
                self._dial.add(s.address)
        mine = coord.my_assignment(req, self.id)
        try:
            stage = await self._load(mine) if mine else None
        except P2PError as e:
            return pb.PlanReply(ok=False, reason=str(e))
        # the old epoch stops here: refuse its frames, let the one being computed finish
        self.ring_stage.bind(None)
        await asyncio.get_running_loop().run_in_executor(self.compute, lambda: None)
        rebuilt = {r.seq_id: r.positions for r in req.resume}  # a peer without layers holds no KV
        if stage is not None:
            rebuilt = await restore_kv(stage, self.stage, self.replicas, list(req.resume), list(req.sources),
                                            self._fetch_kv, self.spec, self.options.context, self.address)
        # a newer proposal supersedes every older one that never committed: their stages (weights
        # and KV) go now, or a peer would hold two ranges at once and exceed its memory
        self.pending = {e: v for e, v in self.pending.items() if e > req.epoch}
        self.pending[req.epoch] = (req, stage)
        if self.state not in ("serving", "leaving"):
            self.state = "ready"
        return pb.PlanReply(ok=True, restored=[pb.ResumeSeq(seq_id=s, positions=n) for s, n in rebuilt.items()])

    async def on_commit(self, req: pb.CommitRequest) -> pb.PlanReply:
        entry = self.pending.pop(req.epoch, None)
        if entry is None:
            return pb.PlanReply(ok=False, reason=f"epoch {req.epoch} was never accepted here")
        proposal, stage = entry
        if proposal.coordinator != req.coordinator:
            return pb.PlanReply(ok=False, reason="commit from another coordinator than the proposal's")
        self.epoch, self.committed, self.stage = req.epoch, proposal, stage
        self.replicas.clear()  # the new predecessor sends a full snapshot
        self._bind_ring(proposal, stage)
        if self.state != "leaving":
            self.state = "serving"
        mine = coord.my_assignment(proposal, self.id)
        where = f"layers [{mine[0]}, {mine[1]}) loaded in {self.load_seconds:.1f}s" if mine else "no layers"
        log.info("plan epoch %d committed: %s; this peer holds %s", req.epoch, _describe(proposal, self.membership),
                 where)
        log.info("ready: epoch %d, coordinator %s, %s; gateway %s", self.epoch, proposal.coordinator[:8], where,
                 self.gateway_url)
        return pb.PlanReply(ok=True)

    def on_status(self) -> str:
        return json.dumps(self.status())

    def _frame_refused(self, address: str, mb_id: int, error: str) -> None:
        """A peer refused a micro-batch this one sent on. The head must hear of it at once (else it
        waits for the micro-batch until a timeout): here, or by a result frame carrying the error.
        Only a peer that had not committed the epoch yet: refusals during a plan change are the
        plan change's to handle (it parks and replays), and retrying them broke identical text."""
        if "switching plans" not in error:
            return
        if self.ring is not None:
            self.ring.refused(mb_id, error)
            return
        b = self.ring_stage.binding
        if b is not None and address != b.head_address:  # (the head refusing our result: nothing to tell it)
            result = frames.result_frame(b.epoch, mb_id, error=f"{address} refused it: {error}")
            asyncio.get_running_loop().create_task(self.links.get(b.head_address).send(result))

    async def on_frame(self, frame: pb.Frame) -> pb.FrameAck:
        if frame.replica:
            try:
                for delta in frame.kv[:4096]:
                    self.replicas.add(delta)
            except P2PError as e:
                log.warning("refused a KV replica frame: %s", e)
                return pb.FrameAck(micro_batch=frame.micro_batch, error=str(e))
            return pb.FrameAck(micro_batch=frame.micro_batch)
        # finished sequences need no replica either, nor kept ones (a plan change empties the prefix cache)
        for seq_id in [*frame.finished[:4096], *frame.retained[:4096]]:
            self.replicas.free(seq_id)
        if frame.to_head:
            if self.ring is None:
                return pb.FrameAck(micro_batch=frame.micro_batch, error="this peer is not the head")
            self.ring.deliver(frame)
            return pb.FrameAck(micro_batch=frame.micro_batch)
        return pb.FrameAck(micro_batch=frame.micro_batch, error=await self.ring_stage.handle(frame))

    def on_generate(self, req: pb.GenerateRequest):
        return serve_generate(self.scheduler, req)

    async def on_embed(self, req: pb.EmbedRequest) -> pb.EmbedReply:
        return await serve_embed(self.scheduler, req, self.spec.hidden)

    async def on_fetch_kv(self, req: pb.FetchKVRequest) -> list[pb.KVDelta]:
        stage = self.stage
        return await asyncio.get_running_loop().run_in_executor(
            self.compute, serve_fetch, req, stage, self.replicas)

    async def _fetch_kv(self, address: str, req: pb.FetchKVRequest) -> list[pb.KVDelta]:
        member = self.membership.by_address(address)
        if member is not None and not self.membership.is_live(member.info.id):
            return []  # lost: asking would only wait for a timeout
        call = self.clients.get(address).stub.FetchKV(req, timeout=30.0)
        return [delta async for delta in call]

    def _bind_ring(self, proposal: pb.PlanProposal, stage) -> None:
        addresses = [s.address for s in proposal.stages]
        mine = [i for i, s in enumerate(proposal.stages) if s.peer_id == self.id]
        nxt = addresses[mine[0] + 1] if mine and mine[0] + 1 < len(addresses) else None
        # the replica holder is the one plan_sources names, so failover looks where deltas went
        replica = None
        if mine:
            replica = plan_sources(proposal, bool(proposal.kv_replicas))[mine[0]].replica_address or None
        binding = Binding(proposal.epoch, stage, nxt, proposal.head_address, self.options.context, replica)
        self.ring_stage.bind(binding)
        if replica and stage is not None and stage.kv.sequences():
            asyncio.get_running_loop().create_task(self._send_snapshot(binding))
        if proposal.coordinator == self.id:
            if self.ring is None:
                self.ring = ClusterRing(self.links, self.spec.vocab, self.spec.hidden)
                self.scheduler = Scheduler(self.ring, self.tokenizer, model_name=self.model_name,
                                           context=self.options.context, vocab=self.spec.vocab,
                                           micro_batches=self.cfg.micro_batches,
                                           prefix_cache=self.options.prefix_cache)
                asyncio.get_running_loop().create_task(self.scheduler.start())
            self.ring.configure(proposal.epoch, addresses)
            self.scheduler.kv_budget = coord.kv_budget(proposal, self.options.kv_positions, self.options.context)
        elif self.scheduler is not None:  # no longer the head: its requests fail cleanly
            scheduler, self.scheduler, self.ring = self.scheduler, None, None
            asyncio.get_running_loop().create_task(scheduler.stop())

    # ------------------------------------------------------------------ loading
    async def _send_snapshot(self, b: Binding) -> None:
        """All of our carried-over KV to the new replica holder (deltas follow step by step)."""
        def export():
            kv = b.stage.kv
            return [exported(kv, b.stage.start, s, 0, kv.length(s)) for s in kv.sequences() if kv.length(s) > 0]

        deltas = await asyncio.get_running_loop().run_in_executor(self.compute, export)
        if deltas:
            await self.ring_stage.send_replica(b, deltas)

    async def _load(self, rng: tuple[int, int]):
        if self.stage is not None and (self.stage.start, self.stage.end) == rng:
            return self.stage  # the range this peer serves now (a later proposal may have loaded another)
        if self.loaded is not None and self.loaded[0] == rng:
            return self.loaded[1]
        if self.fetcher is not None and not self.fetcher.partial.complete(*rng):
            await self._fetch_range(rng)  # assigned another range than the one fetched ahead
        self.state, self.load_progress = "loading", 0.0
        log.info("loading layers [%d, %d) of %d", rng[0], rng[1], self.spec.n_layers)

        shown = [time.monotonic()]

        def progress(done: int, total: int) -> None:
            self.load_progress = done / max(total, 1)
            if time.monotonic() - shown[0] >= 2.0 and done < total:  # a long load says how far it is
                shown[0] = time.monotonic()
                log.info("loading layers [%d, %d): %.0f%%", rng[0], rng[1], 100 * self.load_progress)

        def build():
            from .model.backends import open_stage
            from .runtime.stage import Stage

            return Stage(open_stage(self.cfg.model, rng[0], rng[1], spec=self.spec, backend=self.backend,
                                    device=self.cfg.device, kv_dtype=self.kv_dtype, max_context=self.options.context,
                                    threads=self.threads, progress=progress), self.tokenizer)

        t0 = time.monotonic()
        stage = await asyncio.get_running_loop().run_in_executor(self.compute, build)
        self.loaded = (rng, stage)
        self.load_progress = 1.0
        self.load_seconds = time.monotonic() - t0
        log.info("loaded layers [%d, %d) in %.1fs (%s backend, %.0f MiB of weights, KV %s)", rng[0], rng[1],
                 self.load_seconds, stage.backend.name, stage.backend.weight_bytes / 2**20, stage.kv.format.name)
        return stage

    # ------------------------------------------------------------------ status
    def _head_load(self) -> pb.HeadLoad | None:
        if self.scheduler is None:
            return None
        stats = self.scheduler.stats()
        return pb.HeadLoad(queued=stats.queued, running=stats.running, tokens_generated=self.scheduler.tokens_generated)

    def _ring_load(self) -> dict | None:
        """The head's numbers: its own here, else from the coordinator's last health reply."""
        load = self._head_load()
        if load is None and self.committed is not None:
            member = self.membership.members.get(self.committed.coordinator)
            load = member.head if member is not None else None
        if load is None:
            return None
        return {"queued": load.queued, "running": load.running, "tokens_generated": load.tokens_generated}

    def status(self) -> dict:
        layers = {}
        if self.committed is not None:
            layers = {s.peer_id: [s.start, s.end] for s in self.committed.stages}
        peers = []
        coordinator = self.coordinator()
        for m in sorted(self.membership.members.values(), key=lambda m: m.info.id):
            me, live = m.info.id == self.id, self.membership.is_live(m.info.id)
            state = self.public_state if me else m.state if live else "lost"
            rtt = self._links.get(m.info.id, (None, None))[0]
            peers.append({
                "id": m.info.id,
                "name": m.info.name,
                "address": m.info.address,
                "layers": layers.get(m.info.id),
                "healthy": live,
                "excluded_reason": m.reason or None,
                "state": state,
                "epoch": self.epoch if me else m.epoch,
                "drained": state == "drained",
                "coordinator": m.info.id == coordinator,
                "device": m.info.caps.device,
                "mem_used": _resident_bytes() if me else (m.mem_used or None),  # from its last health reply
                "mem_limit": int(m.info.caps.mem_bytes),  # what it offers the planner
                "rtt_ms": round(rtt * 1e3, 3) if rtt is not None else None,  # this peer's measurement
                "holds": _holding_json(self.holding if me else m.holds),
                "fetch": _fetch_json(self.fetch_progress if me else m.fetch),
            })
        engine = self._engine_stats()
        return {
            "id": self.id,
            "name": self.cfg.name,
            "coordinator": coordinator,
            "epoch": self.epoch,
            "gateway": self.gateway_url,
            "active_sequences": engine.running + engine.queued,
            # running sequences' KV, and the finished ones the prefix cache keeps
            "kv_sequences": len(self.stage.sequences()) if self.stage is not None else 0,
            "ring": self._ring_load(),  # the head's queue, sequences and token count (cluster-wide)
            "peers": peers,
            "plan": json.loads(self.committed.plan_json) if self.committed is not None else None,
            "backends": self.backends.rows(),  # this peer's gateway's external servers
        }


def _holding_json(h: pb.Holding | None) -> dict | None:
    """A partial copy's layers as ranges (None: the whole file)."""
    if h is None:
        return None
    return {"layers": [list(r) for r in layer_ranges(sorted(set(h.layers)))], "embed": h.embed, "head": h.head}


def _fetch_json(f: pb.FetchProgress | None) -> dict | None:
    if f is None:
        return None
    left = max(0, f.total - f.done)
    return {"layers": [f.start, f.end], "done": f.done, "total": f.total, "mb_s": round(f.rate / 1e6, 2),
            "eta_s": round(left / f.rate, 1) if f.rate > 0 else None}


def _security(cfg: DaemonConfig) -> Security:
    if cfg.secret:
        return Security.from_secret(cfg.secret)
    if not cfg.insecure:
        raise P2PError("no cluster secret: give one (DaemonConfig.secret, --secret) or opt out with insecure=True")
    return Security.insecure()


def _resident_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _set_compute_threads(threads: int | None) -> int:
    """Leave one core to the event loop and gRPC: torch's spinning worker threads competing with
    them made every hop ten times slower on a 2-core machine (measured: 31 -> 3 ms per token).
    The same count goes to ggml stages."""
    import os

    import torch

    n = threads or max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(n)
    return n


def _kv_room(proposal: pb.PlanProposal, peer_id: str) -> int:
    """Bytes the plan leaves a peer's stage for KV: its memory limit less weights and workspace.

    Both KV caches grow on demand, so no allocation says how far they may go; this room is what
    the head's admission budget is computed from (coordinator.kv_budget), so KV held near it means
    requests are about to queue, and past it the peer holds more than its plan allowed. Without a
    known limit (0), the KV the plan sized for batch x context. 0: the peer holds no stage."""
    try:
        return coord.kv_room(next(s["memory"] for s in json.loads(proposal.plan_json)["stages"]
                                  if s["peer"] == peer_id))
    except (ValueError, KeyError, TypeError, StopIteration):
        return 0


def _describe(proposal: pb.PlanProposal, membership: Membership) -> str:
    parts = []
    for s in proposal.stages:
        m = membership.members.get(s.peer_id)
        parts.append(f"{m.info.name if m else s.peer_id[:8]}[{s.start},{s.end})")
    return " -> ".join(parts)


def _open_history(cfg: DaemonConfig):
    """The gateway's request history (gateway/history.py); None with --history off."""
    from .gateway.history import RequestHistory, default_state_dir

    return RequestHistory.open(cfg.state_dir or default_state_dir(cfg.cluster), cfg.history, cfg.history_rows,
                               port=cfg.port)
