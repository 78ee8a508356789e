"""One completion on an external backend: the client's checked body goes there, its answer comes back.

The answer keeps the backend's shape (ids, chunks, usage) with one change: `model` names our model
(and the request names the backend's). Until the first token arrives nothing has reached the
client, so any failure up to then is a `BackendFailed` and the request may be tried elsewhere;
after it, a broken stream ends with OpenAI's error event and [DONE], as the ring's streams do.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import AsyncIterator, Callable

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .backends import Backend, describe
from .history import RequestRecord, record_of
from .metrics import GatewayMetrics
from .responses import JSON, EventStream, sse
from .schema import ApiError, CompletionRequest

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
STREAM_READ_TIMEOUT = 120.0  # between two events of a stream (the first one waits for the prompt's prefill)
WHOLE_READ_TIMEOUT = 600.0  # for a whole answer, which arrives at once
_ERROR_BODY_BYTES = 64 * 1024
# llama.cpp's servers penalize repeats by default (1.1), which OpenAI's API and the ring do not: unless the
# client says otherwise, they are asked not to, so that greedy answers are the same wherever they are served
NEUTRAL_DEFAULTS = {"llama_server": {"repeat_penalty": 1.0}, "lm_studio": {"repeat_penalty": 1.0}}


class BackendFailed(Exception):
    """The backend failed before the first token; `status` is what a client would get if nothing else can serve."""

    def __init__(self, backend: Backend, message: str, *, status: int = 502, down: bool = True):
        super().__init__(f"backend {backend.id}: {message}")
        self.status = status
        self.down = down  # take it out of rotation (not for a 429 or a refusal of this one request)

    def api_error(self) -> ApiError:
        code = "rate_limit_exceeded" if self.status == 429 else "backend_error"
        return ApiError(self.status, str(self), code=code)


async def forward(client: httpx.AsyncClient, backend: Backend, body: dict, req: CompletionRequest, our_model: str,
                  metrics: GatewayMetrics, request: Request, arrived: float,
                  on_done: Callable[[str], None], stopping: Callable[[], str] = lambda: "") -> Response | ASGIApp:
    """The backend's answer to `body`, once its first token is in; `on_done(outcome)` is called when it is
    over (a stream: when it ends): "ok", "broken" (failed after the first token), "client gone" or
    "stopped" (`stopping` said why this peer ends its streams now)."""
    url = backend.config.url + ("/v1/chat/completions" if req.chat else "/v1/completions")
    payload = {**body, "model": backend.model or our_model}
    for key, value in NEUTRAL_DEFAULTS.get(backend.config.type, {}).items():
        payload.setdefault(key, value)
    headers = backend.headers()  # not our x-request-id: llama-cpp-python's server refuses ids that are not UUIDs
    if not req.stream:
        data = await _whole(client, backend, url, payload, headers, request)
        _count(metrics, data.get("usage"))
        if (record := record_of(request)) is not None:
            record.note_answer(data, streamed=False)
        on_done("ok")
        return JSON({**data, "model": our_model})
    timeout = httpx.Timeout(STREAM_READ_TIMEOUT, connect=CONNECT_TIMEOUT)
    try:
        reply = await client.send(client.build_request("POST", url, json=payload, headers=headers, timeout=timeout),
                                  stream=True)
    except httpx.HTTPError as e:
        raise BackendFailed(backend, describe(e)) from None
    try:
        if reply.status_code != 200:
            raise await _refusal(backend, reply)
        relay = _Relay(backend, reply, our_model, metrics, on_done, record_of(request), stopping)
        await relay.open()
    except BaseException:
        await reply.aclose()
        raise
    metrics.ttft.observe(time.perf_counter() - arrived)
    return relay


async def _whole(client: httpx.AsyncClient, backend: Backend, url: str, payload: dict, headers: dict,
                 request: Request) -> dict:
    """A whole answer; a client that leaves while it is computed cancels the backend's request."""
    post = asyncio.ensure_future(client.post(url, json=payload, headers=headers,
                                             timeout=httpx.Timeout(WHOLE_READ_TIMEOUT, connect=CONNECT_TIMEOUT)))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({post, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not post.done():
            post.cancel()
    if not post.done() or post.cancelled():
        raise ClientGone()
    try:
        reply = post.result()
    except httpx.HTTPError as e:
        raise BackendFailed(backend, describe(e)) from None
    if reply.status_code != 200:
        raise await _refusal(backend, reply)
    try:
        data = reply.json()
    except ValueError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        raise BackendFailed(backend, "its answer is not an OpenAI completion")
    return data


class ClientGone(Exception):
    """The client left before the answer was ready (routing.py answers nothing)."""


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _refusal(backend: Backend, reply: httpx.Response) -> BackendFailed:
    """A non-200 answer as a BackendFailed carrying the backend's own message where it gave one."""
    raw = b""
    try:
        async for chunk in reply.aiter_bytes():
            raw += chunk
            if len(raw) > _ERROR_BODY_BYTES:
                break
    except httpx.HTTPError:
        pass
    message = ""
    try:
        error = json.loads(raw).get("error")
        message = error.get("message", "") if isinstance(error, dict) else str(error or "")
    except (ValueError, AttributeError):
        message = raw[:200].decode("utf-8", "replace").strip()
    status = reply.status_code
    # 5xx and odd answers: the server is in trouble; a 429 or 4xx: only this request is refused
    return BackendFailed(backend, f"HTTP {status}" + (f": {message}" if message else ""),
                         status=429 if status == 429 else 502, down=status >= 500 or status < 400)


async def _events(reply: httpx.Response) -> AsyncIterator[str]:
    """The `data` of each server-sent event (lines joined; comments and other fields dropped)."""
    data: list[str] = []
    async for line in reply.aiter_lines():
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)


async def _until_first_token(backend: Backend, events: AsyncIterator[str]) -> list[str]:
    """The events up to and with the first that carries text, a tool call or a finish; a failure before
    then is a BackendFailed (nothing was sent to the client yet)."""
    opening = []
    try:
        async for data in events:
            opening.append(data)
            if data == "[DONE]":
                raise BackendFailed(backend, "its stream ended before the first token")
            chunk = _json(data)
            if chunk is None:
                raise BackendFailed(backend, f"it sent an event that is not JSON: {data[:80]!r}")
            if "error" in chunk and not chunk.get("choices"):
                error = chunk["error"]
                message = error.get("message") if isinstance(error, dict) else error
                raise BackendFailed(backend, f"its stream failed: {message}")
            if _has_token(chunk):
                return opening
    except httpx.HTTPError as e:
        raise BackendFailed(backend, describe(e)) from None
    raise BackendFailed(backend, "its stream ended before the first token")


def _has_token(chunk: dict) -> bool:
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        if choice.get("finish_reason") or choice.get("text") or delta.get("content") or delta.get("tool_calls"):
            return True
    return False


class _Relay:
    """The stream to the client: the events up to the first token, then the rest as they come. An ASGI
    app of its own, so that the backend's response is closed and `on_done` called however it ends."""

    def __init__(self, backend: Backend, reply: httpx.Response, our_model: str, metrics: GatewayMetrics,
                 on_done: Callable[[str], None], record: RequestRecord | None = None,
                 stopping: Callable[[], str] = lambda: ""):
        self.backend, self.reply, self.our_model = backend, reply, our_model
        self.metrics, self.on_done, self.stopping = metrics, on_done, stopping
        self.record = record  # the request's history record, which notes each chunk
        self.events = _events(reply)
        self.opening: list[str] = []
        self.outcome = "client gone"  # unless the stream ends: the client left while we were sending

    async def open(self) -> None:
        self.opening = await _until_first_token(self.backend, self.events)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        media_type = self.reply.headers.get("content-type", "text/event-stream")
        try:
            await EventStream(self._pieces(), media_type=media_type)(scope, receive, send)
        finally:
            await self.reply.aclose()
            self.on_done(self.outcome)

    async def _pieces(self) -> AsyncIterator[bytes]:
        for data in self.opening:
            yield _rewritten(data, self.our_model, self.metrics, self.record)
        done, stopped = False, ""
        try:
            async for data in self.events:
                # checked at every event: a peer told to stop now ends the stream with why, before
                # the gateway's shutdown grace cuts it without a word
                if stopped := self.stopping():
                    break
                yield _rewritten(data, self.our_model, self.metrics, self.record)
                if data == "[DONE]":
                    done = True
                    break
        except httpx.HTTPError as e:
            log.warning("backend %s broke a stream after its first token: %s", self.backend.id, describe(e))
            self.backend.mark_down(f"a stream broke: {describe(e)}")
        if not done:  # a stream ends with [DONE]; one that broke says so first, as the ring's streams do
            error = ApiError(503, stopped, code="service_unavailable") if stopped else \
                ApiError(502, f"backend {self.backend.id} ended the stream early", code="backend_error")
            if self.record is not None:
                self.record.fail(error.message)
            yield sse(error.body())
            yield sse("[DONE]")
        self.outcome = "ok" if done else "stopped" if stopped else "broken"


def _rewritten(data: str, our_model: str, metrics: GatewayMetrics, record: RequestRecord | None = None) -> bytes:
    chunk = _json(data)
    if chunk is None:
        return sse(data) if data == "[DONE]" else b""
    if "model" in chunk:
        chunk["model"] = our_model
    _count(metrics, chunk.get("usage"))
    if record is not None:
        record.note_answer(chunk)
    return sse(chunk)


def _json(data: str) -> dict | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _count(metrics: GatewayMetrics, usage: object) -> None:
    """Token counters from the backend's usage, where it reports one."""
    if isinstance(usage, dict):
        for counter, key in ((metrics.prompt_tokens, "prompt_tokens"), (metrics.completion_tokens,
                                                                         "completion_tokens")):
            value = usage.get(key)
            if isinstance(value, int) and value > 0:
                counter.inc(value)
