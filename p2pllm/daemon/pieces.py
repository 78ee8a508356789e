"""Model pieces (--from-peers): what this peer serves to peers that fetch their layers, and, on a
peer started with a partial copy, fetching its own layers before it asks to be planned
(docs/fetch.md)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from ..cluster import coordinator as coord
from ..cluster.fetch import ModelFetcher, PieceSource
from ..cluster.membership import Membership
from ..cluster.planner import PlanOptions
from ..errors import P2PError
from ..model.pieces import PartialModel
from ..model.spec import ModelSpec
from ..proto import p2pllm_pb2 as pb
from ..transport.client import ClientPool
from ..transport.server import RpcRefused
from .agreement import SETTLE_SECONDS

log = logging.getLogger(__package__)  # "p2pllm.daemon": one logger for the whole peer


def holding(partial: PartialModel, n_layers: int) -> pb.Holding:
    """What a partial copy holds: its whole layers, and whether the first and last stages' pieces
    outside their layers (embedding, output head) are here."""

    def ends_held(start: int, end: int) -> bool:  # the stage's pieces outside its layers: embedding, head
        return not any(p.layer is None for p in partial.missing(start, end))

    return pb.Holding(layers=partial.held_layers(), embed=ends_held(0, 1), head=ends_held(n_layers - 1, n_layers))


class PeerPieces:
    """The PieceSource this peer serves (`pieces`; None: it serves none) and, with --from-peers, the
    ModelFetcher that fills its partial copy (`fetcher`), with what that copy holds (`holding`,
    for health replies and this peer's own planning) and the fetch running now (`fetch_progress`).
    `on_change()`: `fetching` changed, or the copy was opened (the peer's planned state changes)."""

    def __init__(self, model, spec: ModelSpec, me: str, membership: Membership, options: PlanOptions,
                 clients: ClientPool, sources: list[str], cache: str | None, on_change: Callable[[], None],
                 busy: Callable[[], bool] | None = None, busy_rate: float = 0.0,
                 coordinator: Callable[[], str | None] = lambda: None):
        self.model = model
        self.coordinator = coordinator  # who will plan (the head), to predict the range it will give
        # while `busy()` (requests run through this peer) what it serves is capped at busy_rate bytes/s
        self.pacing = {"busy": busy, "busy_rate": busy_rate} if busy is not None and busy_rate > 0 else {}
        self.spec = spec
        self.id = me
        self.membership = membership
        self.options = options
        self.on_change = on_change
        # --from-peers: the layers this peer will hold are fetched before it asks for them (docs/fetch.md);
        # every GGUF peer serves the pieces it holds to such peers
        self.fetcher = ModelFetcher(clients, sources, cache, progress=self.fetched_bytes) if sources else None
        self.fetch_progress: pb.FetchProgress | None = None  # the fetch running now, for status and health
        self.fetching = self.fetcher is not None  # out of plans until the range it expects is here
        self.pieces: PieceSource | None = None
        self.holding: pb.Holding | None = None  # what a partial copy holds (None: the whole file)

    async def open(self) -> None:
        """What this peer serves to peers that fetch their layers: its GGUF file or Hugging Face folder,
        or the pieces of its own partial copy (which grows as it fetches)."""
        if self.fetcher is not None:
            self.pieces = PieceSource(await self.fetcher.open(), **self.pacing)
            self._note_holding()
            self.on_change()
        elif self.spec.format == "gguf":
            self.pieces = PieceSource(self.model, **self.pacing)
        elif self.spec.format == "hf":
            try:
                self.pieces = PieceSource(self.model, **self.pacing)
            except (P2PError, OSError) as e:  # a folder it cannot cut into pieces still runs; it serves none
                log.warning("this peer serves no model pieces to --from-peers peers: %s", e)

    def close(self) -> None:
        if self.fetcher is not None:
            self.fetcher.close()
        if self.pieces is not None:
            self.pieces.close()

    async def on_manifest(self, req: pb.ManifestRequest) -> pb.Manifest:
        if self.pieces is None:
            raise RpcRefused(grpc.StatusCode.UNIMPLEMENTED, "this peer serves no model pieces")
        return await self.pieces.on_manifest(req)

    async def on_fetch_piece(self, req: pb.FetchPieceRequest):
        if self.pieces is None:
            raise RpcRefused(grpc.StatusCode.UNIMPLEMENTED, "this peer serves no model pieces")
        async for chunk in self.pieces.on_fetch_piece(req):
            yield chunk

    async def prefetch(self) -> None:
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
            candidate = coord.candidate_plan(self.spec, self.membership, self.options, head=self.coordinator())
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
            self.on_change()
            return

    async def fetch_missing(self, rng: tuple[int, int]) -> None:
        """Before loading `rng` from a partial copy: its held pieces are checked against their hashes
        (those not hashed by this process yet: a restart, pieces another daemon on the cache fetched),
        and what it lacks is fetched, the pieces that failed the check among them (nothing with the
        whole model)."""
        if self.fetcher is None:
            return
        await self.fetcher.verify(*rng)
        self._note_holding()
        if not self.fetcher.partial.complete(*rng):
            await self._fetch_range(rng)  # assigned another range than the one fetched ahead, or pieces forgotten

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

    def fetched_bytes(self, done: int, total: int, rate: float) -> None:
        """The fetcher's progress callback."""
        if self.fetch_progress is not None:
            self.fetch_progress.done, self.fetch_progress.total, self.fetch_progress.rate = done, total, rate

    def _note_holding(self) -> None:
        """What the partial copy holds, for health replies and this peer's own planning (and what it
        serves: the copy now at its path, when another daemon on the cache started it afresh)."""
        if self.pieces is not None and self.pieces.partial is not self.fetcher.partial:
            old, self.pieces = self.pieces, PieceSource(self.fetcher.partial, **self.pacing)
            old.close()
        self.holding = holding(self.fetcher.partial, self.spec.n_layers)
        self.membership.members[self.id].holds = self.holding
