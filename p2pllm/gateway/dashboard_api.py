"""The dashboard: its static page at `/`, and the JSON it reads and the actions it takes.

`GET /v1/cluster` is one snapshot: this peer's `p2pllm status --json` object plus the gateway's
/metrics numbers; `GET /v1/cluster/events` streams one per second (SSE). `POST /v1/peers` tests or
adds a peer by address, `POST /v1/peers/{name}/drain|admit` moves a peer out of the plan and back
(cluster/management.py; `name` may be a peer's id, which the page sends: names may repeat). A
snapshot's `queued`, `running` and `tokens_per_s` are the cluster's, from status.ring (the head's), on
every peer. The page is served without the API key (it holds no data and asks for the key);
everything it reads needs the key like every other route.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from pathlib import Path
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..argtypes import host_port
from ..cluster.management import ManageError
from .responses import JSON
from .schema import ApiError, parse_json_object

PAGE_DIR = Path(__file__).with_name("dashboard")
EVENT_INTERVAL = 1.0  # seconds between two snapshots on /v1/cluster/events
RATE_WINDOW = 2.0  # seconds of token counts the tokens/s is measured over
# the page runs only its own script and style and talks only to its gateway; no site may frame it
PAGE_HEADERS = {"cache-control": "no-cache", "x-frame-options": "DENY", "x-content-type-options": "nosniff",
                "content-security-policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"}
PUBLIC_PATHS = ("/", "/favicon.ico")  # with /dashboard/...: the page itself, served without the key


class ClusterControl(Protocol):
    """What the dashboard needs of the daemon behind the gateway."""

    def status(self) -> dict: ...  # the `p2pllm status --json` object

    async def manage(self, action: str, target: str) -> dict: ...  # raises ManageError


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith("/dashboard/")


def dashboard_routes(cluster: ClusterControl | None, registry, read_body) -> list:
    """The page, and with a cluster behind the gateway, its data and actions."""
    api = DashboardApi(cluster, registry, read_body)
    routes = [Route("/", api.page, methods=["GET"]), Mount("/dashboard", StaticFiles(directory=PAGE_DIR, check_dir=False))]
    if cluster is not None:
        routes += [
            Route("/v1/cluster", api.snapshot_endpoint, methods=["GET"]),
            Route("/v1/cluster/events", api.events, methods=["GET"]),
            Route("/v1/peers", api.add_peer, methods=["POST"]),
            Route("/v1/peers/{name}/{action:str}", api.peer_action, methods=["POST"]),
        ]
    return routes


class DashboardApi:
    def __init__(self, cluster: ClusterControl | None, registry, read_body):
        self.cluster = cluster
        self.registry = registry
        self.read_body = read_body
        self._tokens: deque[tuple[float, float]] = deque()  # (time, tokens generated) over RATE_WINDOW

    async def page(self, request: Request) -> Response:
        return FileResponse(PAGE_DIR / "index.html", headers=PAGE_HEADERS)

    # ------------------------------------------------------------------ data
    def snapshot(self) -> dict:
        status = self.cluster.status()
        metrics = self._metrics()
        ring = status.get("ring") or {}
        # the cluster's queue and sequences are the head's (the coordinator's scheduler): this peer's own gauges
        # are 0 on every other peer, so they are taken from status.ring, as the tokens are, where it has them
        for key in ("queued", "running"):
            if ring.get(key) is not None:
                metrics[key] = ring[key]
        metrics["tokens_generated"] = ring.get("tokens_generated")
        metrics["tokens_per_s"] = self._rate(ring.get("tokens_generated"))
        return {"object": "cluster", "time": time.time(), "status": status, "metrics": metrics}

    def _metrics(self) -> dict:
        """The numbers of this gateway's /metrics (one pass over its registry)."""
        values: dict[str, float] = {}
        requests = errors = 0.0
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name == "p2pllm_gateway_requests_total":
                    requests += sample.value
                    errors += sample.value if sample.labels.get("status", "").startswith("5") else 0
                elif not sample.labels:
                    values[sample.name] = sample.value

        def get(name: str) -> float | None:
            return values.get(name)

        return {
            "completion_tokens_total": get("p2pllm_gateway_completion_tokens_total"),
            "prompt_tokens_total": get("p2pllm_gateway_prompt_tokens_total"),
            "queued": get("p2pllm_engine_queued_requests"),
            "running": get("p2pllm_engine_running_requests"),
            "kv_bytes": get("p2pllm_engine_kv_bytes"),
            "kv_capacity_bytes": get("p2pllm_engine_kv_capacity_bytes"),
            "replica_bytes": get("p2pllm_engine_kv_replica_bytes_held"),
            "memory_used_bytes": get("p2pllm_engine_memory_used_bytes"),
            "requests_total": requests,
            "errors_total": errors,
        }

    def _rate(self, tokens: float | None) -> float | None:
        """Tokens per second over the last RATE_WINDOW seconds of snapshots (None until two exist)."""
        if tokens is None:
            return None
        now = time.monotonic()
        samples = self._tokens
        if samples and tokens < samples[-1][1]:  # a new head counts from 0
            samples.clear()
        samples.append((now, float(tokens)))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW:
            samples.popleft()
        (t0, n0), (t1, n1) = samples[0], samples[-1]
        return round((n1 - n0) / (t1 - t0), 3) if t1 - t0 >= 0.2 else None

    async def snapshot_endpoint(self, request: Request) -> Response:
        return JSON(self.snapshot())

    async def events(self, request: Request) -> Response:
        async def stream():
            while True:
                yield f"data: {json.dumps(self.snapshot())}\n\n"
                await asyncio.sleep(EVENT_INTERVAL)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    # ------------------------------------------------------------------ actions
    async def add_peer(self, request: Request) -> Response:
        body = parse_json_object(await self.read_body(request, 64 * 1024))
        address = body.get("address")
        test = body.get("test", False)
        if not isinstance(address, str) or not isinstance(test, bool):
            raise ApiError(400, "expected {\"address\": \"HOST:PORT\", \"test\": true|false}",
                           param="address" if not isinstance(address, str) else "test")
        try:
            host_port(address)
        except Exception as e:
            raise ApiError(400, f"address: {e}", param="address") from None
        return await self._manage("test" if test else "add", address)

    async def peer_action(self, request: Request) -> Response:
        action = request.path_params["action"]
        if action not in ("drain", "admit"):
            raise ApiError(404, f"Invalid URL (POST {request.url.path}): the actions are drain and admit.",
                           code="not_found")
        return await self._manage(action, request.path_params["name"])

    async def _manage(self, action: str, target: str) -> Response:
        try:
            details: dict[str, Any] = await self.cluster.manage(action, target)
        except ManageError as e:
            raise ApiError(e.status, str(e), code={404: "peer_not_found", 409: "conflict"}.get(e.status)) from None
        return JSON({"ok": True, **details})
