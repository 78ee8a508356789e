"""The OpenAI-compatible HTTP gateway: validation at the edge, one async interface to the engine.

The gateway turns HTTP requests into `GenerationRequest`s and streams `TokenEvent`s back, in the
exact shapes of OpenAI's API (JSON and server-sent events). It knows nothing of the ring: a peer
that is not the coordinator gets a `forward_to` callable and proxies `/v1/*` to the coordinator's
gateway instead. Every client mistake is a 4xx in OpenAI's error shape; only our own bugs are a
500, and those carry the request id that the log line also names.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import P2PError
from ..model.sampling import SamplingParams
from ..runtime.api import Engine, EngineError, GenerationRequest, TokenEvent

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 1024 * 1024  # a request body larger than this is a 413
MAX_STOP_STRINGS = 4
DEFAULT_MAX_TOKENS = 256
CHAT_ROLES = {"system", "developer", "user", "assistant"}
FORWARDED_HEADER = "x-p2pllm-forwarded"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_ENDPOINTS = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics")
_TEXT_IN_THREAD = 16_384  # characters: longer prompts are tokenized off the event loop
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


# --------------------------------------------------------------------------- errors


class ApiError(Exception):
    """A request we answer with an OpenAI error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return _JSON(self.body(), status_code=self.status, headers=headers)


def _dumps(data: Any) -> bytes:
    """Compact JSON in UTF-8; text a client sent with lone surrogates comes back escaped, not as a 500."""
    try:
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        return json.dumps(data, separators=(",", ":")).encode()


class _JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return _dumps(content)


def _short(value: Any, limit: int = 80) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# --------------------------------------------------------------------------- metrics


class _EngineCollector:
    """Queue depth, running sequences and the engine's own numbers, read at scrape time."""

    def __init__(self, gateway: "Gateway"):
        self.gateway = gateway

    def describe(self):
        return []

    def collect(self):
        engine = self.gateway.engine
        if engine is None:
            return
        try:
            stats = engine.stats()
        except Exception:  # a scrape must not fail because the engine is between plans
            log.debug("engine stats unavailable for /metrics", exc_info=True)
            return
        for name, doc, value in (
            ("p2pllm_engine_queued_requests", "Requests waiting for admission.", stats.queued),
            ("p2pllm_engine_running_requests", "Sequences being generated.", stats.running),
            ("p2pllm_engine_stages", "Pipeline stages in the current plan.", stats.stages),
            ("p2pllm_engine_plan_epoch", "Epoch of the plan being served.", stats.epoch),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        for key, value in sorted((stats.extra or {}).items()):
            name = "p2pllm_engine_" + re.sub(r"[^a-zA-Z0-9_]", "_", str(key))
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                yield GaugeMetricFamily(name, f"Engine statistic {key!r}.", value=value)
            elif isinstance(value, dict):
                family = GaugeMetricFamily(name, f"Engine statistic {key!r}, by key.", labels=["key"])
                for k, v in sorted(value.items(), key=lambda kv: str(kv[0])):
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        family.add_metric([str(k)], v)
                yield family


class GatewayMetrics:
    def __init__(self, gateway: "Gateway"):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("p2pllm_gateway_requests", "HTTP requests answered, by endpoint and status.",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("p2pllm_gateway_prompt_tokens", "Prompt tokens of accepted requests.", registry=r)
        self.completion_tokens = Counter("p2pllm_gateway_completion_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram("p2pllm_gateway_time_to_first_token_seconds",
                              "From the request's arrival to its first generated token.", buckets=_TTFT_BUCKETS,
                              registry=r)
        self.itl = Histogram("p2pllm_gateway_inter_token_latency_seconds",
                             "Time between two consecutive tokens of one request.", buckets=_ITL_BUCKETS, registry=r)
        r.register(_EngineCollector(gateway))


def _endpoint_label(path: str) -> str:
    if path in _ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


# --------------------------------------------------------------------------- request plumbing


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it passes `limit` bytes (whatever Content-Length says)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"The request body is too large ({declared} bytes; the limit is {limit}).",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"The request body is too large (more than {limit} bytes).", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_json_object(body: bytes) -> dict:
    if not body.strip():
        raise _bad("The request body is empty; expected a JSON object.")
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _bad(f"The request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise _bad("The request body must be a JSON object.")
    return data


class _ClientWatch:
    """Notices the HTTP client going away while we wait on the engine (or the coordinator)."""

    def __init__(self, receive: Receive):
        self._gone = asyncio.ensure_future(self._watch(receive))

    @staticmethod
    async def _watch(receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    @property
    def gone(self) -> bool:
        return self._gone.done()

    async def next(self, it: AsyncIterator) -> Any:
        """The iterator's next item; None when the client left first (StopAsyncIteration passes)."""
        if self._gone.done():
            return None
        step = asyncio.ensure_future(it.__anext__())
        try:
            await asyncio.wait({step, self._gone}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            step.cancel()
            raise
        if step.done():
            return step.result()
        step.cancel()
        await asyncio.gather(step, return_exceptions=True)
        return None

    def close(self) -> None:
        self._gone.cancel()


async def _aclose(it: Any) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:
            log.debug("closing an engine iterator failed", exc_info=True)


class _StreamResponse:
    """Sends chunks as they come; when the client leaves, the producer is closed (and with it the
    engine request), whether we learn it from a failed send or from the watcher."""

    def __init__(self, chunks: AsyncIterator[bytes], *, status: int = 200, headers: list[tuple[bytes, bytes]]):
        self.chunks = chunks
        self.status = status
        self.headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client is gone (uvicorn's ClientDisconnected)
            pass
        finally:
            await self.chunks.aclose()


_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def _sse(data: Any) -> bytes:
    return b"data: " + (data.encode() if isinstance(data, str) else _dumps(data)) + b"\n\n"


# --------------------------------------------------------------------------- parameters


def _int(body: dict, name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"Invalid type for '{name}': expected an integer, got {type(value).__name__}.", name,
                   "invalid_type")
    if not lo <= value <= hi:
        raise _bad(f"Invalid value for '{name}': {value} is not between {lo} and {hi}.", name, "invalid_value")
    return value


def _number(body: dict, name: str, lo: float, hi: float, *, lo_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"Invalid type for '{name}': expected a number, got {type(value).__name__}.", name, "invalid_type")
    if value > hi or value < lo or (lo_open and value == lo):
        low = f"greater than {lo}" if lo_open else f"at least {lo}"
        raise _bad(f"Invalid value for '{name}': {value} must be {low} and at most {hi}.", name, "invalid_value")
    return float(value)


def _bool(body: dict, name: str) -> bool | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise _bad(f"Invalid type for '{name}': expected a boolean, got {type(value).__name__}.", name, "invalid_type")
    return value


@dataclass(frozen=True)
class _Params:
    max_tokens: int | None
    sampling: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool


def _common_params(body: dict, context: int, *, chat: bool) -> _Params:
    if body.get("n") is not None and _int(body, "n", 1, 128) != 1:
        raise _bad("Only n=1 is supported.", "n", "unsupported_value")
    if chat and body.get("max_completion_tokens") is not None:
        max_tokens = _int(body, "max_completion_tokens", 1, context)
    else:
        max_tokens = _int(body, "max_tokens", 1, context)
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0, lo_open=True)
    top_k = body.get("top_k")
    if top_k == -1:  # vLLM's spelling of "off"
        top_k = 0
    else:
        top_k = _int(body, "top_k", 0, 1 << 31)
    seed = _int(body, "seed", 0, 2**63 - 1)
    for name in ("logprobs", "echo"):
        value = body.get(name)
        if value not in (None, False, 0):
            raise _bad(f"'{name}' is not supported by this server.", name, "unsupported_parameter")
    if body.get("top_logprobs") not in (None, 0):
        raise _bad("'top_logprobs' is not supported by this server.", "top_logprobs", "unsupported_parameter")
    if body.get("best_of") not in (None, 1):
        raise _bad("Only best_of=1 is supported.", "best_of", "unsupported_value")
    if body.get("suffix") not in (None, ""):
        raise _bad("'suffix' is not supported by this server.", "suffix", "unsupported_parameter")
    if body.get("tools"):
        raise _bad("Tool calls are not supported by this server.", "tools", "unsupported_parameter")
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise _bad("Only response_format {\"type\": \"text\"} is supported.", "response_format",
                   "unsupported_parameter")

    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,) if stop else ()
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOP_STRINGS:
            raise _bad(f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}.", "stop", "invalid_value")
        stops = tuple(s for s in stop if s)
    else:
        raise _bad("Invalid type for 'stop': expected a string or a list of strings.", "stop", "invalid_type")

    stream = bool(_bool(body, "stream"))
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise _bad("Invalid type for 'stream_options': expected an object.", "stream_options", "invalid_type")
        include_usage = bool(_bool(options, "include_usage"))
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("Invalid type for 'model': expected a string.", "model", "invalid_type")
    return _Params(
        max_tokens=max_tokens,
        sampling=SamplingParams(temperature=1.0 if temperature is None else temperature, top_k=top_k or 0,
                                top_p=1.0 if top_p is None else top_p, seed=seed),
        stop=stops,
        stream=stream,
        include_usage=include_usage and stream,
        ignore_eos=bool(_bool(body, "ignore_eos")),
    )


def _message_text(content: Any, index: int, role: str) -> str:
    param = f"messages[{index}].content"
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise _bad(f"Invalid content part in {param}: expected objects with a 'type'.", param, "invalid_type")
            if part["type"] != "text":
                raise _bad(f"Content of type {_short(repr(part['type']))} is not supported; only text is.", param,
                           "unsupported_value")
            if not isinstance(part.get("text"), str):
                raise _bad(f"Invalid text part in {param}: 'text' must be a string.", param, "invalid_type")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"Invalid type for '{param}': expected a string or a list of text parts.", param, "invalid_type")


def _chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise _bad("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        raise _bad("Invalid type for 'messages': expected an array of objects.", "messages", "invalid_type")
    if not messages:
        raise _bad("'messages' must contain at least one message.", "messages", "empty_array")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f"Invalid type for 'messages[{i}]': expected an object.", f"messages[{i}]", "invalid_type")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise _bad(f"Invalid value for 'messages[{i}].role': {_short(repr(role))}; supported roles are "
                       f"{', '.join(sorted(CHAT_ROLES))}.", f"messages[{i}].role", "invalid_value")
        text = _message_text(message.get("content"), i, role)
        out.append({"role": "system" if role == "developer" else role, "content": text})
    return out


# --------------------------------------------------------------------------- the gateway


class Gateway:
    """State of one app: the engine, metrics, auth, forwarding."""

    def __init__(self, engine: Engine | None, *, api_key: str | None,
                 forward_to: Callable[[], str | None] | None, max_body_bytes: int = MAX_BODY_BYTES):
        self.engine = engine
        self.api_key = api_key.encode() if api_key else None
        self.forward_to = forward_to
        self.max_body_bytes = max_body_bytes
        self.metrics = GatewayMetrics(self)
        self.started = int(time.time())
        self._http: httpx.AsyncClient | None = None

    # ------------------------------------------------------------------ auth, forwarding

    def serving(self) -> Engine:
        """The engine, or a 503 when this peer has none and no coordinator to forward to."""
        if self.engine is None:
            raise ApiError(503, "This peer does not serve the model and knows no coordinator to forward to yet.",
                           code="service_unavailable")
        return self.engine

    def authorized(self, headers: Headers) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(token.strip().encode(), self.api_key)

    def forward_target(self) -> str | None:
        if self.forward_to is None:
            return None
        target = self.forward_to()
        return target.rstrip("/") if target else None

    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(connect=5.0, read=600.0, write=60.0, pool=30.0),
                                           trust_env=False)
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def proxy(self, scope: Scope, receive: Receive, send: Send, target: str, request_id: str) -> None:
        """Relay one /v1 request to the coordinator's gateway, streaming the answer back as it comes."""
        request = Request(scope, receive)
        if request.headers.get(FORWARDED_HEADER):
            raise ApiError(503, f"Forwarding loop: this gateway was reached by forwarding and would forward to "
                                f"{target} again.", code="service_unavailable")
        body = await _read_body(request, self.max_body_bytes)
        headers = {k: v for k in ("authorization", "content-type", "accept") if (v := request.headers.get(k))}
        headers["x-request-id"] = request_id
        headers[FORWARDED_HEADER] = "1"
        url = target + scope["path"] + (("?" + scope["query_string"].decode("latin-1")) if scope["query_string"] else "")
        client = self.http()
        try:
            upstream = await client.send(client.build_request(request.method, url, content=body, headers=headers),
                                         stream=True)
        except httpx.TransportError as e:
            log.warning("request %s: coordinator gateway %s unreachable: %s", request_id, target, e)
            raise ApiError(503, f"The coordinator's gateway at {target} is unreachable "
                                f"({type(e).__name__}: {e or 'no answer'}).", code="service_unavailable") from None
        keep = ("content-type", "cache-control", "content-encoding")
        out_headers = [(k.encode(), v.encode()) for k in keep if (v := upstream.headers.get(k))]
        watch = _ClientWatch(receive)

        async def relay() -> AsyncIterator[bytes]:
            it = upstream.aiter_raw()
            try:
                while True:
                    try:
                        chunk = await watch.next(it)
                    except StopAsyncIteration:
                        return
                    except httpx.HTTPError as e:  # the coordinator went away mid-answer: end the stream
                        log.warning("request %s: relay from %s broke: %s", request_id, target, e)
                        return
                    if chunk is None:
                        return
                    yield chunk
            finally:
                watch.close()
                await upstream.aclose()

        await _StreamResponse(relay(), status=upstream.status_code, headers=out_headers)(scope, receive, send)

    # ------------------------------------------------------------------ endpoints

    async def models(self, request: Request) -> Response:
        return _JSON({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name != self.serving().model_name:
            raise ApiError(404, f"The model '{_short(name)}' does not exist.", param="model", code="model_not_found")
        return _JSON(self._model_card())

    def _model_card(self) -> dict:
        engine = self.serving()
        return {"id": engine.model_name, "object": "model", "created": self.started, "owned_by": "p2pllm",
                "max_model_len": engine.context}

    async def health(self, request: Request) -> Response:
        target = self.forward_target()
        if target is not None:
            return _JSON({"status": "ok", "mode": "forwarding", "coordinator": target})
        if self.engine is None:
            return _JSON({"status": "unavailable", "reason": "no engine on this peer and no coordinator known"},
                         status_code=503)
        ready = getattr(self.engine, "ready", True)
        if callable(ready):
            ready = ready()
        body: dict[str, Any] = {"status": "ok" if ready else "unavailable", "model": self.engine.model_name}
        try:
            stats = self.engine.stats()
            body.update(queued=stats.queued, running=stats.running, stages=stats.stages, epoch=stats.epoch)
        except Exception as e:
            ready = False
            body.update(status="unavailable", reason=f"engine stats failed: {e}")
        return _JSON(body, status_code=200 if ready else 503)

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def chat_completions(self, request: Request) -> Response:
        return await self._completion(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._completion(request, chat=False)

    # ------------------------------------------------------------------ generation

    async def _completion(self, request: Request, *, chat: bool) -> Response:
        arrived = time.perf_counter()
        body = _parse_json_object(await _read_body(request, self.max_body_bytes))
        engine = self.serving()
        model = body.get("model")
        params = _common_params(body, engine.context, chat=chat)
        if model is not None and model != engine.model_name:
            raise _bad(f"The model '{_short(model)}' does not exist; this server serves '{engine.model_name}'.", "model",
                       "model_not_found")
        prompt_ids = await (self._chat_prompt(body) if chat else self._completion_prompt(body))
        if not prompt_ids:
            raise _bad("The prompt is empty.", "messages" if chat else "prompt", "empty_prompt")
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = max(1, min(DEFAULT_MAX_TOKENS, engine.context - len(prompt_ids)))
        cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        req = GenerationRequest(cid, prompt_ids, max_tokens, params.sampling, params.stop, params.ignore_eos)
        try:
            started = engine.generate(req)
            it = await started if inspect.isawaitable(started) else started
        except EngineError as e:
            raise ApiError(e.status, str(e), code=e.code,
                           param=("messages" if chat else "prompt") if e.code == "context_length_exceeded" else None)
        job = _Job(self, request, it, chat=chat, cid=cid, n_prompt=len(prompt_ids), arrived=arrived,
                   include_usage=params.include_usage)
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        try:
            first = await job.next()
        except EngineError as e:  # engines may refuse on the first step instead of at submission
            await job.close()
            raise ApiError(e.status, str(e), code=e.code) from None
        except BaseException:
            await job.close()
            raise
        if first is None:
            await job.close()
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        if first.finish_reason is not None and first.finish_reason not in ("stop", "length") and not job.text:
            await job.close()
            raise job.failure(first)
        if params.stream:
            return _StreamResponse(job.sse(first), headers=_SSE_HEADERS)
        return await job.whole(first)

    async def _chat_prompt(self, body: dict) -> list[int]:
        messages = _chat_messages(body)
        tok = self.engine.tokenizer
        size = sum(len(m["content"]) for m in messages)
        encode = getattr(tok, "encode_chat", None)

        def render() -> list[int]:
            try:
                if encode is not None:
                    return encode(messages)
                return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
            except P2PError as e:  # the template refused the conversation (e.g. roles must alternate)
                raise _bad(str(e), "messages", "invalid_messages") from None

        return await asyncio.to_thread(render) if size > _TEXT_IN_THREAD else render()

    async def _completion_prompt(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if prompt is None:
            raise _bad("Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            tok = self.engine.tokenizer
            return await asyncio.to_thread(tok.encode, prompt) if len(prompt) > _TEXT_IN_THREAD else tok.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = getattr(self.engine.tokenizer, "vocab_size", None)
            bad = [t for t in prompt if t < 0 or (vocab is not None and t >= vocab)]
            if bad:
                raise _bad(f"Token id {bad[0]} is outside the vocabulary (0 to {vocab - 1 if vocab else '?'}).",
                           "prompt", "invalid_value")
            return list(prompt)
        if isinstance(prompt, list) and len(prompt) > 1:
            raise _bad("Only one prompt per request is supported.", "prompt", "unsupported_value")
        raise _bad("Invalid type for 'prompt': expected a string, a list of one string, or a list of token ids.",
                   "prompt", "invalid_type")


class _Job:
    """One accepted request: iterates the engine, counts tokens, shapes the answer."""

    def __init__(self, gw: Gateway, request: Request, it: AsyncIterator[TokenEvent], *, chat: bool, cid: str,
                 n_prompt: int, arrived: float, include_usage: bool):
        self.gw = gw
        self.it = it
        self.chat = chat
        self.cid = cid
        self.n_prompt = n_prompt
        self.arrived = arrived
        self.include_usage = include_usage
        self.created = int(time.time())
        self.model = gw.engine.model_name
        self.request_id = request.scope.get("state", {}).get("request_id", cid)
        self.watch = _ClientWatch(request.receive)
        self.n_tokens = 0
        self.text = ""
        self.last_token_at: float | None = None
        self.first_token_at: float | None = None
        self.closed = False
        self.outcome = "unfinished"

    async def next(self) -> TokenEvent | None:
        """The next event, None when the client left; a stream ending without a finish is an error."""
        try:
            event = await self.watch.next(self.it)
        except StopAsyncIteration:
            event = TokenEvent(None, "", "error", "the engine ended the request without a finish reason")
        if event is None:
            self.outcome = "client gone"
            return None
        if event.token_id is not None:
            now = time.perf_counter()
            if self.last_token_at is None:
                self.first_token_at = now
                self.gw.metrics.ttft.observe(now - self.arrived)
            else:
                self.gw.metrics.itl.observe(now - self.last_token_at)
            self.last_token_at = now
            self.n_tokens += 1
            self.gw.metrics.completion_tokens.inc()
        self.text += event.text
        if event.finish_reason is not None:
            self.outcome = event.finish_reason
        return event

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.watch.close()
        await _aclose(self.it)
        elapsed = time.perf_counter() - self.arrived
        ttft = f"{self.first_token_at - self.arrived:.3f}s" if self.first_token_at else "-"
        log.info("request %s (%s): %s after %d prompt + %d completion tokens, %.3fs, first token %s",
                 self.request_id, self.cid, self.outcome, self.n_prompt, self.n_tokens, elapsed, ttft)

    def failure(self, event: TokenEvent) -> ApiError:
        if event.finish_reason == "error":
            return ApiError(503, f"Generation failed: {event.error or 'unknown engine error'}",
                            code="engine_error")
        return ApiError(503, f"The request was {event.finish_reason} by the server.", code="engine_error")

    def usage(self) -> dict:
        return {"prompt_tokens": self.n_prompt, "completion_tokens": self.n_tokens,
                "total_tokens": self.n_prompt + self.n_tokens}

    async def whole(self, first: TokenEvent) -> Response:
        try:
            event: TokenEvent | None = first
            while event is not None and event.finish_reason is None:
                event = await self.next()
            if event is None:
                return Response(status_code=499)
        finally:
            await self.close()
        if event.finish_reason not in ("stop", "length"):
            raise self.failure(event)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": self.text}, "logprobs": None,
                      "finish_reason": event.finish_reason}
        else:
            choice = {"index": 0, "text": self.text, "logprobs": None, "finish_reason": event.finish_reason}
        return _JSON({
            "id": self.cid,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [choice],
            "usage": self.usage(),
        })

    def _chunk(self, text: str | None, finish: str | None, *, role: bool = False) -> dict:
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        chunk = {"id": self.cid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "created": self.created, "model": self.model, "system_fingerprint": None, "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    async def sse(self, first: TokenEvent) -> AsyncIterator[bytes]:
        try:
            if self.chat:
                yield _sse(self._chunk("", None, role=True))
            event: TokenEvent | None = first
            while event is not None:
                if event.finish_reason is not None:
                    if event.finish_reason in ("stop", "length"):
                        if event.text:
                            yield _sse(self._chunk(event.text, None))
                        yield _sse(self._chunk(None, event.finish_reason))
                        if self.include_usage:
                            usage = self._chunk(None, None)
                            usage.update(choices=[], usage=self.usage())
                            yield _sse(usage)
                    else:
                        yield _sse(self.failure(event).body())
                    yield _sse("[DONE]")
                    return
                if event.text:
                    yield _sse(self._chunk(event.text, None))
                event = await self.next()
        finally:
            await self.close()


# --------------------------------------------------------------------------- middleware and app


class _GatewayMiddleware:
    """Request ids, the API key, the body-size limit, forwarding, request metrics, and the 500 of last resort."""

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

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                MutableHeaders(scope=message)["x-request-id"] = request_id
            await send(message)

        try:
            await self._dispatch(scope, receive, send_with_id, headers, path, request_id)
        except ApiError as e:
            if not status:
                await e.response()(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s: %s %s failed", request_id, scope["method"], path)
            if not status:
                await ApiError(500, f"Internal server error (request id {request_id}); the server log has the "
                                    f"details.", code="internal_error").response()(scope, receive, send_with_id)
        finally:
            self.gw.metrics.requests.labels(_endpoint_label(path), str(status[0] if status else 499)).inc()

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send, headers: Headers, path: str,
                        request_id: str) -> None:
        if path != "/health" and not self.gw.authorized(headers):
            raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY' with the key this "
                                "gateway was started with.", code="invalid_api_key")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.gw.max_body_bytes:
            raise ApiError(413, f"The request body is too large ({declared} bytes; the limit is "
                                f"{self.gw.max_body_bytes}).", code="request_too_large")
        if path.startswith("/v1/"):
            target = self.gw.forward_target()
            if target is not None:
                await self.gw.proxy(scope, receive, send, target, request_id)
                return
        await self.app(scope, receive, send)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})."
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed for {request.url.path}."
    else:
        message = exc.detail or "HTTP error"
    return ApiError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None).response(
        headers=dict(exc.headers or {}))


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


def create_app(engine: Engine | None, *, api_key: str | None = None, forward_to: Callable[[], str | None] | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
    """The gateway's ASGI app for `engine` (None on a peer that only forwards: until it knows a
    coordinator, /v1 answers 503 and /health says "unavailable").

    `api_key`: when set, every request but /health needs `Authorization: Bearer KEY`.
    `forward_to`: called per request; a base URL ("http://10.0.0.2:8700") means this peer is not
    the coordinator and /v1/* requests are relayed there (/health and /metrics stay local).
    """
    gateway = Gateway(engine, api_key=api_key, forward_to=forward_to, max_body_bytes=max_body_bytes)
    routes = [
        Route("/v1/models", gateway.models, methods=["GET"]),
        Route("/v1/models/{model:path}", gateway.model, methods=["GET"]),
        Route("/v1/chat/completions", gateway.chat_completions, methods=["POST"]),
        Route("/v1/completions", gateway.completions, methods=["POST"]),
        Route("/health", gateway.health, methods=["GET"]),
        Route("/metrics", gateway.metrics_endpoint, methods=["GET"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await gateway.close()

    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_exception, ApiError: _api_error},
                    lifespan=lifespan)
    app.add_middleware(_GatewayMiddleware, gateway=gateway)
    app.state.gateway = gateway
    return app
