"""The gateway's response cache: whole answers kept by request, bounded in count, bytes and age.

An exact entry's key is the sha256 of the request in canonical JSON: the served model, the
endpoint, and every body field but those that never change the text (`stream`,
`stream_options`, OpenAI's bookkeeping fields). Only deterministic requests are cached
(temperature 0, or a seed): any other answer is one draw of many and must not be repeated.

Semantic mode adds a second lookup: the vector of the request's last user message (or its
prompt), compared by cosine with the entries of the same *scope* (the same request but for that
text: model, endpoint, system prompt, earlier turns, every parameter). A match needs at least
the threshold; the closest match wins. Nothing here knows HTTP or the engine.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .schema import NO_EFFECT_FIELDS, CompletionRequest

MiB = 1 << 20
DEFAULT_SEMANTIC_THRESHOLD = 0.95
# body fields that shape only the wire format or OpenAI's bookkeeping: the same answer either way
_NOT_IN_KEY = frozenset(("stream", "stream_options", *NO_EFFECT_FIELDS))


@dataclass(frozen=True)
class CacheSettings:
    max_entries: int = 1024
    max_bytes: int = 64 * MiB
    ttl: float = 600.0  # seconds an answer is served after it was made
    semantic: float | None = None  # cosine threshold of a semantic match; None: exact matches only


@dataclass
class Entry:
    answer: Any  # what the gateway replays
    n_prompt: int  # the prompt tokens of the request that made it
    size: int  # bytes, estimated by whoever stores it
    expires: float = 0.0
    scope: str | None = None  # semantic: the entry's scope and vector (unit length)
    vector: np.ndarray | None = None


def cacheable(req: CompletionRequest) -> bool:
    """A deterministic request: greedy, or seeded (the same seed gives the same text)."""
    return req.sampling.greedy or req.sampling.seed is not None


def exact_key(body: dict, *, model: str, chat: bool) -> str:
    return _digest(body, model, chat, "exact")


def semantic_scope(body: dict, *, model: str, chat: bool) -> str | None:
    """The key of everything but the text a semantic lookup compares; None when the request has
    no such text (a conversation not ending with a user message)."""
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict) \
                or messages[-1].get("role") != "user":
            return None
        body = {**body, "messages": [*messages[:-1], {**messages[-1], "content": None}]}
    else:
        body = {k: v for k, v in body.items() if k != "prompt"}
    return _digest(body, model, chat, "semantic")


def query_text(req: CompletionRequest) -> str | list[int] | None:
    """What a semantic lookup embeds: the last user message, or the prompt (text or token ids)."""
    if req.messages is not None:
        last = req.messages[-1]
        return last["content"] if last["role"] == "user" and last["content"] else None
    return req.prompt or None


def _digest(body: dict, model: str, chat: bool, kind: str) -> str:
    fields = {k: v for k, v in body.items() if k not in _NOT_IN_KEY and v is not None and k != "model"}
    doc = {"kind": kind, "endpoint": "chat" if chat else "completions", "model": model, "body": _canonical(fields)}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"))  # ASCII: lone surrogates cannot fail
    return hashlib.sha256(text.encode()).hexdigest()


def _canonical(value: Any) -> Any:
    """JSON-equal numbers written alike (0.0 as 0): the parser reads them as the same value."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


class ResponseCache:
    """LRU entries with a TTL counted from when each was stored, at most `max_entries` of them and
    `max_bytes` in all; `on_evict(reason)` hears of each one dropped ("lru" or "expired")."""

    def __init__(self, settings: CacheSettings, *, clock: Callable[[], float] = time.monotonic,
                 on_evict: Callable[[str], None] | None = None):
        self.settings = settings
        self.clock = clock
        self.on_evict = on_evict or (lambda reason: None)
        self.bytes = 0
        self._entries: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self._by_age: deque[tuple[float, str]] = deque()  # (expires, key) in the order stored
        self._scopes: dict[str, dict[str, np.ndarray]] = {}  # semantic scope -> key -> vector

    def __len__(self) -> int:
        return len(self._entries)

    def size(self) -> tuple[int, int]:
        """(entries, bytes), expired entries dropped first."""
        self._expire()
        return len(self._entries), self.bytes

    def get(self, key: str) -> Entry | None:
        self._expire()
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def nearest(self, scope: str, vector: np.ndarray) -> tuple[Entry, float] | None:
        """The entry of `scope` whose vector is closest to `vector` (unit length), with its cosine,
        when that is at least the threshold."""
        self._expire()
        rows = self._scopes.get(scope)
        if not rows or self.settings.semantic is None:
            return None
        keys = list(rows)
        similarity = np.stack([rows[k] for k in keys]) @ vector.astype(np.float32)
        best = int(np.argmax(similarity))
        if not similarity[best] >= self.settings.semantic:  # (a NaN never matches)
            return None
        entry = self.get(keys[best])
        return (entry, float(similarity[best])) if entry is not None else None

    def put(self, key: str, entry: Entry) -> bool:
        """Store `entry` (replacing `key`'s), evicting the least recently used past the bounds;
        False when it alone is larger than the byte bound."""
        self._expire()
        if key in self._entries:
            self._drop(key)
        if entry.size > self.settings.max_bytes or self.settings.max_entries < 1:
            return False
        entry.expires = self.clock() + self.settings.ttl
        self._entries[key] = entry
        self._by_age.append((entry.expires, key))
        if len(self._by_age) > 2 * len(self._entries) + 64:  # stale (replaced, evicted) items: rebuild
            self._by_age = deque(sorted((e.expires, k) for k, e in self._entries.items()))
        self.bytes += entry.size
        if entry.scope is not None and entry.vector is not None:
            self._scopes.setdefault(entry.scope, {})[key] = entry.vector
        while len(self._entries) > self.settings.max_entries or self.bytes > self.settings.max_bytes:
            self._drop(next(iter(self._entries)), "lru")
        return True

    def _expire(self) -> None:
        now = self.clock()
        while self._by_age and self._by_age[0][0] <= now:
            expires, key = self._by_age.popleft()
            entry = self._entries.get(key)
            if entry is not None and entry.expires == expires:  # not since replaced by a newer answer
                self._drop(key, "expired")

    def _drop(self, key: str, reason: str | None = None) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.size
        if entry.scope is not None:
            rows = self._scopes.get(entry.scope, {})
            rows.pop(key, None)
            if not rows:
                self._scopes.pop(entry.scope, None)
        if reason is not None:
            self.on_evict(reason)
