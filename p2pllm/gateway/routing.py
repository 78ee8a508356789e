"""Who serves a completion: the ring (through the engine) or an external backend, and the next one
when the first fails before its first token.

The choice is weighted least-connections, as nginx's `least_conn` with weights and HAProxy's
`leastconn` make it: each target's load is its requests in flight over its capacity (the ring's
scheduler slots, a backend's max_concurrent), the least loaded goes first and ties go to the ring.
Absolute free room would leave a backend of 2 slots idle until the ring's 64 were nearly all taken;
by load, the second concurrent request already goes to an idle backend. A backend is never given
more than its max_concurrent; the ring takes whatever is left (its scheduler queues, then 429s).
"""

from __future__ import annotations

import logging
from typing import Callable

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..runtime.api import Engine
from .backends import Backend, BackendPool
from .generation import complete
from .history import record_of
from .metrics import GatewayMetrics
from .proxy import BackendFailed, ClientGone, forward
from .responses import CLIENT_GONE
from .schema import ApiError, CompletionRequest

log = logging.getLogger(__name__)

RING = "ring"  # the ring's label in the x-p2pllm-backend header, metrics and status
DEFAULT_RING_CAPACITY = 64  # the scheduler's max_running, where the engine does not say (peers that are not the head)
HEADER = "x-p2pllm-backend"


class Router:
    def __init__(self, engine: Engine, metrics: GatewayMetrics, pool: BackendPool | None = None):
        self.engine = engine
        self.metrics = metrics
        self.pool = pool if pool is not None else BackendPool([], engine.model_name)
        self.ring_in_flight = 0  # requests this gateway gave the ring that are not over

    # ------------------------------------------------------------------ the choice
    def ring_capacity(self) -> int:
        cap = getattr(self.engine, "max_running", None)
        return cap if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0 else DEFAULT_RING_CAPACITY

    def ring_load(self) -> int:
        """Requests on the ring: ours, or on the head all of them (other peers' gateways send there too)."""
        try:
            stats = self.engine.stats()
            busy = stats.running + stats.queued
        except Exception:  # between plans: our own count is what we know
            busy = 0
        return max(self.ring_in_flight, busy)

    def ring_ready(self) -> bool:
        ready = getattr(self.engine, "ready", True)
        if callable(ready):
            ready = ready()
        return bool(ready) and not getattr(self.engine, "unavailable", None)

    def order(self) -> list[Backend | None]:
        """The targets to try, best first (None is the ring): the least loaded by in-flight over capacity,
        the ring on ties; full or unhealthy backends are left out; a ring that cannot serve goes last."""
        if not self.pool.backends:  # the ring alone: no load to weigh (spares a stats read per request)
            return [None]
        ready = self.ring_ready()
        ranked: list[tuple[float, int, int, int, Backend | None]] = []
        if ready:
            ranked.append((self.ring_load() / self.ring_capacity(), 0, 0, 0, None))
        for i, b in enumerate(self.pool.backends):
            if b.free > 0:
                ranked.append((b.in_flight / b.config.max_concurrent, 1, -b.free, i, b))
        ranked.sort(key=lambda r: r[:4])
        return [r[4] for r in ranked] + ([] if ready else [None])

    # ------------------------------------------------------------------ serving
    async def complete(self, request: Request, body: dict, req: CompletionRequest, arrived: float,
                       engine: Engine | None = None) -> ASGIApp:
        """The answer from the first target that gets to its first token; the last failure otherwise.
        `engine`: the ring's engine for this request (the response cache records what passes through it)."""
        if why := self._stopping(closing=True):  # told to stop: nothing new, on the ring or a backend
            raise ApiError(503, why, code="service_unavailable")
        failure: ApiError | None = None
        record = record_of(request)
        for target in self.order():
            if target is not None and target.free < 1:
                continue  # taken by other requests while we tried the ones before
            if record is not None:
                record.attempt(target.id if target is not None else RING)
            try:
                if target is None:
                    return await self._on_ring(engine or self.engine, request, req, arrived)
                return await self._on_backend(target, request, body, req, arrived)
            except _Retry as e:
                failure = e.error
        assert failure is not None  # the ring is always a target
        raise failure

    async def _on_ring(self, engine: Engine, request: Request, req: CompletionRequest, arrived: float) -> ASGIApp:
        slot = _Slot(self, None)
        try:
            answer = await complete(engine, self.metrics, request, req, arrived, on_done=slot.release)
        except ApiError as e:
            if e.status == 429 or e.status >= 500:  # full or between plans: a backend may take it
                slot.release("failed")
                raise _Retry(e) from None
            slot.release("refused")  # the request's own fault (e.g. beyond the context): no use elsewhere
            raise
        except BaseException:
            slot.release("client gone")
            raise
        return slot.started(answer)

    async def _on_backend(self, backend: Backend, request: Request, body: dict, req: CompletionRequest,
                          arrived: float) -> ASGIApp:
        slot = _Slot(self, backend)
        assert self.pool.client is not None, "the backend pool was not started"
        try:
            answer = await forward(self.pool.client, backend, body, req, self.engine.model_name, self.metrics,
                                   request, arrived, slot.release, self._stopping)
        except BackendFailed as e:
            slot.release("failed")
            log.warning("request %s: %s; trying elsewhere", _request_id(request), e)
            if e.down:
                backend.mark_down(str(e).removeprefix(f"backend {backend.id}: "))
            raise _Retry(e.api_error()) from None
        except ClientGone:
            slot.release("client gone")
            return Response(status_code=CLIENT_GONE)
        except BaseException:
            slot.release("client gone")
            raise
        return slot.started(answer)

    def _stopping(self, closing: bool = False) -> str:
        """Why this peer ends its streams now (a second Ctrl-C), or with `closing` also why it takes
        no new requests (told to stop); '' = neither (an engine without them: never)."""
        why = getattr(self.engine, "stopping", "") or (getattr(self.engine, "closing", "") if closing else "")
        return why if isinstance(why, str) else ""

    def rows(self) -> list[dict]:
        """The ring and each backend, for /metrics."""
        ring = {"id": RING, "healthy": self.ring_ready(), "in_flight": self.ring_load(),
                "max_concurrent": self.ring_capacity()}
        return [ring, *self.pool.rows()]


class _Retry(Exception):
    def __init__(self, error: ApiError):
        self.error = error


class _Slot:
    """One attempt's place on a target: taken at once (so concurrent requests see it), given back once."""

    def __init__(self, router: Router, backend: Backend | None):
        self.router, self.backend = router, backend
        self.label = backend.id if backend is not None else RING
        self.released = False
        if backend is None:
            router.ring_in_flight += 1
        else:
            backend.in_flight += 1

    def started(self, answer: ASGIApp) -> ASGIApp:
        """The target is answering: count it, and tag the answer with who serves it."""
        if self.backend is not None:
            self.backend.served += 1
        self.router.metrics.routed.labels(self.label, "served").inc()
        return _Tagged(answer, self.label, self.release)

    def release(self, outcome: str = "ok") -> None:
        """`outcome`: "ok", "failed" (before the first token), "broken" (after it), "stopped" (this
        peer ended it: told to stop now), "refused" (the request's own fault) or "client gone";
        failures are counted."""
        if self.released:
            return
        self.released = True
        if self.backend is None:
            self.router.ring_in_flight -= 1
        else:
            self.backend.in_flight -= 1
            if outcome in ("failed", "broken"):
                self.backend.failed += 1
        if outcome in ("failed", "broken"):
            self.router.metrics.routed.labels(self.label, outcome).inc()


class _Tagged:
    """An answer with the x-p2pllm-backend header, whose slot is given back when it has been sent."""

    def __init__(self, app: ASGIApp, label: str, release: Callable[[str], None]):
        self.app, self.label, self.release = app, label, release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = self.label
            await send(message)

        try:
            await self.app(scope, receive, tagged)
        finally:
            self.release("ok")  # a no-op where the answer already said how it ended


def _request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "-")
