"""The OpenAI-compatible HTTP gateway: routes, the API key, body limits, request ids.

Every peer serves this app over its engine, a ClusterEngine that hands requests to the
coordinator's scheduler (in process on the coordinator, over gRPC elsewhere), so the gateway
knows nothing of the ring. The parts: `schema` checks request bodies, `generation` runs one
completion against the engine, `responses` has OpenAI's shapes, `metrics` the Prometheus registry,
`caching` the response cache, `routing` the choice between the ring and external backends
(`backends`, `proxy`).
Every client mistake is a 4xx in OpenAI's error shape; only our own bugs are a 500, and those
carry the request id that the log line also names.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..runtime.api import Engine
from .backends import BackendPool
from .caching import CachedCompletions
from .dashboard_api import ClusterControl, dashboard_routes, is_public
from .embeddings import embeddings_route
from .history import (COMPLETION_PATHS, STATE_KEY, RequestHistory, RequestRecord, epoch_of, history_route,
                      record_of)
from .metrics import GatewayMetrics, endpoint_label
from .ollama import ollama_routes
from .origins import RequestOrigins
from .response_cache import CacheSettings
from .responses import CLIENT_GONE, JSON, error_response
from .responses_api import responses_route
from .routing import Router
from .schema import ApiError, IgnoredFieldsLog, ignored_fields, parse_completion_request, parse_json_object, short

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 1024 * 1024  # a request body larger than this is a 413
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def create_app(engine: Engine, *, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               response_cache: CacheSettings | None = None, backends: BackendPool | None = None,
               cluster: ClusterControl | None = None, history: RequestHistory | None = None,
               origins: RequestOrigins | None = None) -> Starlette:
    """The gateway's ASGI app for `engine`.

    `api_key`: when set, every request but /health needs `Authorization: Bearer KEY`.
    `response_cache`: when set, /v1 completions go through the response cache (gateway/caching.py).
    `backends`: external OpenAI-compatible servers that share /v1 completions with the ring
    (gateway/routing.py); whoever serves the app starts and stops the pool.
    `cluster`: the daemon behind the gateway, for the dashboard's data and node management.
    `history`: where finished completions are recorded and GET /v1/history reads (None: off; gateway/history.py).
    `origins`: which browser origins and Host names are answered (gateway/origins.py; default: the
    gateway's own and loopback origins, any Host).
    """
    origins = origins or RequestOrigins()
    gateway = Gateway(engine, api_key=api_key, max_body_bytes=max_body_bytes, response_cache=response_cache,
                      backends=backends, history=history, origins=origins)
    routes = [
        Route("/v1/models", gateway.models, methods=["GET"]),
        Route("/v1/models/{model:path}", gateway.model, methods=["GET"]),
        Route("/v1/chat/completions", gateway.chat_completions, methods=["POST"]),
        Route("/v1/completions", gateway.completions, methods=["POST"]),
        responses_route(gateway, _read_body),  # POST /v1/responses (OpenAI's Responses API, over chat's path)
        embeddings_route(gateway, _read_body),  # POST /v1/embeddings
        history_route(gateway),  # GET /v1/history
        Route("/health", gateway.health, methods=["GET"]),
        Route("/metrics", gateway.metrics_endpoint, methods=["GET"]),
        *ollama_routes(gateway, _read_body),  # Ollama's API: /api/chat, /api/generate, /api/tags, ...
        *dashboard_routes(cluster, gateway.metrics.registry, _read_body),  # /, /v1/cluster, /v1/peers
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_exception, ApiError: _api_error})
    app.add_middleware(_GatewayMiddleware, gateway=gateway)
    # outermost: answers allowed pages' CORS preflights (they carry no API key) and marks their answers readable
    app.add_middleware(CORSMiddleware, allow_origin_regex=origins.cors_origin_regex(),
                       allow_methods=["GET", "POST", "DELETE"], allow_headers=["*"],
                       expose_headers=["x-request-id", "retry-after"], max_age=600)
    return app


class Gateway:
    """The endpoints of one app over its engine."""

    def __init__(self, engine: Engine, *, api_key: str | None, max_body_bytes: int = MAX_BODY_BYTES,
                 response_cache: CacheSettings | None = None, backends: BackendPool | None = None,
                 history: RequestHistory | None = None, origins: RequestOrigins | None = None):
        self.engine = engine
        self.origins = origins or RequestOrigins()
        self.history = history
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.metrics = GatewayMetrics(engine)
        self.router = Router(engine, self.metrics, backends)
        self.metrics.track_routes(self.router.rows)
        self.cache = CachedCompletions(response_cache, self.metrics) if response_cache is not None else None
        self.started = int(time.time())
        self.ignored = IgnoredFieldsLog("/v1 completions")

    def authorized(self, headers: Headers) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(token.strip().encode(), self.api_key)

    async def models(self, request: Request) -> Response:
        return JSON({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name != self.engine.model_name:
            raise ApiError(404, f"The model '{short(name)}' does not exist.", param="model", code="model_not_found")
        return JSON(self._model_card())

    def _model_card(self) -> dict:
        return {"id": self.engine.model_name, "object": "model", "created": self.started, "owned_by": "p2pllm",
                "max_model_len": self.engine.context}

    async def health(self, request: Request) -> Response:
        ready = getattr(self.engine, "ready", True)
        if callable(ready):
            ready = ready()
        body: dict[str, Any] = {"status": "ok" if ready else "unavailable", "model": self.engine.model_name}
        why = getattr(self.engine, "not_ready_reason", None)
        if not ready and why is not None and why():
            body["reason"] = why()
        try:
            stats = self.engine.stats()
            body.update(queued=stats.queued, running=stats.running, stages=stats.stages, epoch=stats.epoch)
        except Exception as e:
            ready = False
            body.update(status="unavailable", reason=f"engine stats failed: {e}")
        if self.router.pool:  # external backends serve completions while the ring cannot
            body["backends"] = self.router.pool.rows()
            if not ready and any(b["healthy"] for b in body["backends"]):
                ready, body["status"] = True, "ok"
        return JSON(body, status_code=200 if ready else 503)

    async def metrics_endpoint(self, request: Request) -> Response:
        if self.cache is not None:
            self.cache.size()  # drops expired answers first: their evictions and the entries gauge then agree
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def chat_completions(self, request: Request) -> Response | ASGIApp:
        return await self._completion(request, chat=True)

    async def completions(self, request: Request) -> Response | ASGIApp:
        return await self._completion(request, chat=False)

    async def _completion(self, request: Request, *, chat: bool) -> Response | ASGIApp:
        arrived = time.perf_counter()
        body = parse_json_object(await _read_body(request, self.max_body_bytes))
        engine = self.engine
        req = parse_completion_request(body, chat=chat, model_name=engine.model_name, context=engine.context,
                                       vocab_size=getattr(engine.tokenizer, "vocab_size", None))
        self.ignored.note(ignored_fields(body))
        if (record := record_of(request)) is not None:
            record.begin(req)
        if self.cache is not None:
            return await self.cache.complete(engine, request, body, req, arrived,
                                             lambda e: self.router.complete(request, body, req, arrived, e))
        return await self.router.complete(request, body, req, arrived)


BODY_TIMEOUT_SECONDS = 60.0  # a whole body (4 MiB at most) within a minute, as nginx's client_body_timeout


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it passes `limit` bytes (the middleware has already
    refused a larger Content-Length; this catches chunked bodies and lies), and with a 408 when it
    has not all arrived in BODY_TIMEOUT_SECONDS: a client trickling bytes does not hold a
    connection and its buffer forever."""
    chunks, size = [], 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT_SECONDS):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"The request body is too large (more than {limit} bytes).",
                                   code="request_too_large")
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, f"The request body did not arrive within {BODY_TIMEOUT_SECONDS:g} s "
                            f"({size} bytes came).", code="request_timeout") from None
    return b"".join(chunks)


class _GatewayMiddleware:
    """Request ids, the API key, the body-size limit, request metrics, and the 500 of last resort."""

    def __init__(self, app: ASGIApp, gateway: Gateway):
        self.app = app
        self.gw = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID_RE.match(given) else "req-" + uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        path = scope["path"]
        status: list[int] = []
        record = None
        if self.gw.history is not None and scope["method"] == "POST" and path in COMPLETION_PATHS:
            record = scope["state"][STATE_KEY] = RequestRecord(request_id, path, self.gw.engine.model_name)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                MutableHeaders(scope=message)["x-request-id"] = request_id
            elif record is not None and message["type"] == "http.response.body" and not message.get("more_body"):
                self._record(record, status)  # before the client sees the end: it is in the history once it ends
            await send(message)

        try:
            self._admit(headers, path)
            await self.app(scope, receive, send_with_id)
        except ApiError as e:
            if record is not None:
                record.fail(e.message)
            if not status:
                await error_response(e)(scope, receive, send_with_id)
        except ClientDisconnect:  # gone while sending its body: nobody to answer (counted as 499)
            log.info("request %s: the client left before its body arrived", request_id)
            if record is not None:
                record.fail("the client disconnected before its request body arrived")
        except Exception:
            log.exception("request %s: %s %s failed", request_id, scope["method"], path)
            if record is not None:
                record.fail(f"internal server error (request id {request_id})")
            if not status:
                await error_response(ApiError(500, f"Internal server error (request id {request_id}); the server "
                                                   f"log has the details.", code="internal_error"))(
                    scope, receive, send_with_id)
        finally:
            self.gw.metrics.requests.labels(endpoint_label(path), str(status[0] if status else CLIENT_GONE)).inc()
            if record is not None:  # a request that ended without its answer's end (no-op once recorded)
                self._record(record, status, cut=bool(status))

    def _record(self, record: RequestRecord, status: list[int], *, cut: bool = False) -> None:
        """The request's history row; never raises: it runs before the answer's last bytes go out."""
        if record.begun and not record.ended:  # a body that did not parse is no completion: no row
            try:
                self.gw.history.add(record.end(status[0] if status else CLIENT_GONE, epoch_of(self.gw.engine), cut=cut))
            except Exception:
                log.exception("request %s: its history row could not be written", record.request_id)

    def _admit(self, headers: Headers, path: str) -> None:
        """Refuse a request before it reaches a route: a foreign page or Host name, a wrong API key, a
        declared body too large."""
        refusal = self.gw.origins.refusal(headers) if path != "/health" else ""
        if refusal:
            raise ApiError(403, refusal, code="forbidden_origin")
        if path != "/health" and not is_public(path) and not self.gw.authorized(headers):
            raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY' with the key this "
                                "gateway was started with.", code="invalid_api_key")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.gw.max_body_bytes:
            raise ApiError(413, f"The request body is too large ({declared} bytes; the limit is "
                                f"{self.gw.max_body_bytes}).", code="request_too_large")


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})."
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed for {request.url.path}."
    else:
        message = exc.detail or "HTTP error"
    return error_response(ApiError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None),
                          headers=dict(exc.headers or {}))


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    if (record := record_of(request)) is not None:
        record.fail(exc.message)
    return error_response(exc)
