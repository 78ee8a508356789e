"""OpenAI's response shapes and how they go on the wire: JSON bodies and server-sent events.

Errors are OpenAI's error object, except under /api/ (Ollama's API, `ollama.py`), where they are
Ollama's `{"error": "message"}`, whoever raises them (the API key check, a body too large, a route).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from .schema import ApiError


def dumps(data: Any) -> bytes:
    """Compact JSON in UTF-8; text a client sent with lone surrogates comes back escaped, not as a 500."""
    try:
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        return json.dumps(data, separators=(",", ":")).encode()


class JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return dumps(content)


OLLAMA_PREFIX = "/api/"  # paths that speak Ollama's API
CLIENT_GONE = 499  # nginx's "client closed request": the status of an answer nobody reads


def error_response(error: ApiError, headers: dict[str, str] | None = None) -> JSON:
    """The error's response: its body is chosen by the path of the request it answers."""
    return _ErrorResponse(error, headers)


RETRY_AFTER_SECONDS = "1"  # a 429 (queue full) or 503 (between plans) is worth trying again soon


class _ErrorResponse(JSON):
    def __init__(self, error: ApiError, headers: dict[str, str] | None):
        if error.status in (429, 503) and not any(k.lower() == "retry-after" for k in headers or {}):
            headers = {**(headers or {}), "Retry-After": RETRY_AFTER_SECONDS}
        if error.status in (408, 413):  # the body was not read to its end: the connection cannot carry another
            headers = {**(headers or {}), "Connection": "close"}
        super().__init__(error.body(), status_code=error.status, headers=headers)
        self.error = error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if str(scope.get("path", "")).startswith(OLLAMA_PREFIX):
            self.body = dumps({"error": self.error.message})
            self.headers["content-length"] = str(len(self.body))
        await super().__call__(scope, receive, send)


# --------------------------------------------------------------------------- completions


@dataclass(frozen=True)
class CompletionShape:
    """The shapes of one completion's answer, whole or as stream chunks, in OpenAI's exact form."""

    cid: str  # "chatcmpl-…" or "cmpl-…"
    model: str
    chat: bool
    include_usage: bool  # streamed: every chunk has "usage": null and a last chunk carries the counts
    created: int = field(default_factory=lambda: int(time.time()))
    tokenizer: Any = None  # with it, logprobs are reported (the request asked for them)

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def whole(self, text: str | None, finish_reason: str, usage: dict, logprobs: list | None = None,
              tool_calls: list[dict] | None = None) -> dict:
        return self.whole_choices([self.choice(0, text, finish_reason, logprobs, tool_calls)], usage)

    def whole_choices(self, choices: list[dict], usage: dict) -> dict:
        return {**self._head(self.object), "choices": choices, "usage": usage}

    def choice(self, index: int, text: str | None, finish_reason: str, logprobs: list | None = None,
               tool_calls: list[dict] | None = None) -> dict:
        """One choice of a whole answer."""
        lp = self.logprobs(logprobs)
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if tool_calls:
                message["tool_calls"] = tool_calls
            return {"index": index, "message": message, "logprobs": lp, "finish_reason": finish_reason}
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}

    def chunk(self, text: str | None, finish_reason: str | None = None, *, role: bool = False,
              logprobs: list | None = None, tool_calls: list[dict] | None = None, index: int = 0,
              text_offset: int = 0) -> dict:
        """A streamed piece: `text` (None: no content, as in the last chat delta) or the finish;
        `logprobs`: the (token, logprob, alternatives) of the tokens this piece's text came from;
        `text_offset`: where the first of them starts in the choice's text (completions)."""
        lp = self.logprobs(logprobs, text_offset) if logprobs else None
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            if tool_calls:  # streamed as OpenAI does: each call whole, with its index
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(tool_calls)]
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish_reason}
        chunk = {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def logprobs(self, entries: list | None, text_offset: int = 0) -> dict | None:
        """OpenAI's logprobs object for (token id, logprob, alternatives) entries; None when not asked.
        `text_offset`: where the first entry's token starts in the choice's text (completions)."""
        if self.tokenizer is None or entries is None:
            return None

        def piece(token: int) -> tuple[str, list[int]]:
            raw = self.tokenizer.token_bytes(token)
            return raw.decode("utf-8", "replace"), list(raw)

        if self.chat:
            content = []
            for token, logprob, top in entries:
                text, raw = piece(token)
                alternatives = [{"token": piece(t)[0], "logprob": lp, "bytes": piece(t)[1]} for t, lp in top]
                content.append({"token": text, "logprob": logprob, "bytes": raw, "top_logprobs": alternatives})
            return {"content": content, "refusal": None}
        texts = [piece(token)[0] for token, _, _ in entries]
        offsets = [text_offset + sum(len(t) for t in texts[:i]) for i in range(len(texts))]
        return {"tokens": texts, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{piece(t)[0]: lp for t, lp in top} for _, _, top in entries],
                "text_offset": offsets}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": usage}

    def _head(self, object: str) -> dict:
        return {"id": self.cid, "object": object, "created": self.created, "model": self.model,
                "system_fingerprint": None}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; `cached_tokens`: prompt tokens whose KV the prefix cache held."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


# --------------------------------------------------------------------------- server-sent events


def sse(data: Any) -> bytes:
    """One event: a JSON object, or the literal `[DONE]`."""
    return b"data: " + (data.encode() if isinstance(data, str) else dumps(data)) + b"\n\n"


class EventStream:
    """Sends server-sent events (or, with another `media_type`, NDJSON lines) as they come; when
    the client leaves, the producer is closed (and with it the engine request), whether we learn it
    from a failed send or from the producer."""

    def __init__(self, events: AsyncIterator[bytes], media_type: str = "text/event-stream; charset=utf-8"):
        self.events = events
        self.headers = [
            (b"content-type", media_type.encode()),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            async for event in self.events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client is gone (uvicorn's ClientDisconnected)
            pass
        finally:
            await self.events.aclose()
