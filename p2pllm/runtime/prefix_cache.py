"""The head's prefix cache: finished sequences whose KV stays on every stage, for prompts that start alike.

Chats resend their whole history each turn, agents repeat a long system prompt, and several
questions about one document share it. When a sequence ends, the scheduler keeps its KV (the
positions every stage holds: its prompt and what it generated) under its sequence id instead of
freeing it, and remembers the tokens here. A new prompt that starts with tokens of a kept entry
begins as a copy of that entry's KV (the stages' `fork`, as n > 1 choices copy their prompt) and
computes only the rest. The cache is an LRU bounded in positions (what the planner reserves for
it) and entries; KV admission takes room from it before it makes a request wait.

This module only keeps the book (pure, no I/O); the scheduler sends the stages the ids to keep
(`MicroBatch.retained`) and to free.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container, Sequence

import numpy as np

MIN_REUSE = 16  # a shorter shared start is cheaper to compute again than to copy (and to keep)
MAX_ENTRIES = 64  # each is a live sequence on every stage (a stage holds at most 256)


class PrefixCache:
    def __init__(self, max_tokens: int, max_entries: int = MAX_ENTRIES, min_reuse: int = MIN_REUSE):
        self.max_tokens = max_tokens
        self.max_entries = max_entries
        self.min_reuse = min_reuse
        self._entries: OrderedDict[int, np.ndarray] = OrderedDict()  # sequence -> its tokens; oldest first
        self.tokens = 0  # KV positions held by every stage for the entries
        self.hits = self.misses = 0
        self.reused_tokens = 0  # prompt tokens not computed thanks to the cache

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._entries

    def match(self, prompt: Sequence[int]) -> tuple[int | None, int]:
        """(entry, positions to copy) for the kept sequence sharing the longest start with `prompt`;
        (None, 0) when none shares at least `min_reuse` tokens. At least the prompt's last token is
        always left to compute: its logits choose the first new token."""
        p = np.asarray(prompt, dtype=np.int64)
        best, best_n = None, 0
        for seq_id, tokens in self._entries.items():
            n = _common_start(tokens, p)
            if n > best_n:
                best, best_n = seq_id, n
        usable = min(best_n, len(p) - 1)
        if best is None or usable < self.min_reuse:
            self.misses += 1
            return None, 0
        self._entries.move_to_end(best)
        self.hits += 1
        self.reused_tokens += usable
        return best, usable

    def add(self, seq_id: int, tokens: Sequence[int], pinned: Container[int] = ()) -> list[int]:
        """Keep a finished sequence's KV (`tokens`: the positions every stage holds). Returns the
        sequences whose KV can go now: entries it makes redundant (they start it), entries pushed
        out by the bounds (never `pinned` ones: a starting sequence still copies them), or the
        sequence itself when it is too short, too long, or already kept by a longer entry."""
        t = np.asarray(tokens, dtype=np.int64)
        if not self.min_reuse <= len(t) <= self.max_tokens:
            return [seq_id]
        for other, kept in self._entries.items():
            if len(kept) >= len(t) and _common_start(kept, t) == len(t):
                self._entries.move_to_end(other)
                return [seq_id]
        freed = [other for other, kept in self._entries.items()
                 if other not in pinned and _common_start(kept, t) == len(kept)]
        for other in freed:
            self._drop(other)
        self._entries[seq_id] = t
        self.tokens += len(t)
        while self.tokens > self.max_tokens or len(self._entries) > self.max_entries:
            victim = next((s for s in self._entries if s not in pinned and s != seq_id), None)
            if victim is None:
                break
            self._drop(victim)
            freed.append(victim)
        return freed

    def evict(self, tokens: int, pinned: Container[int] = ()) -> list[int]:
        """Free at least `tokens` positions if the unpinned entries hold them, oldest first."""
        freed, gone = [], 0
        for seq_id in list(self._entries):
            if gone >= tokens:
                break
            if seq_id not in pinned:
                gone += self._drop(seq_id)
                freed.append(seq_id)
        return freed

    def clear(self) -> list[int]:
        """Forget every entry (a plan change: the new stages do not hold them); their ids to free."""
        freed = list(self._entries)
        self._entries.clear()
        self.tokens = 0
        return freed

    def _drop(self, seq_id: int) -> int:
        n = len(self._entries.pop(seq_id))
        self.tokens -= n
        return n

    def stats(self) -> dict:
        return {"prefix_cache_tokens": self.tokens, "prefix_cache_entries": len(self._entries),
                "prefix_cache_budget_tokens": self.max_tokens, "prefix_cache_hits": self.hits,
                "prefix_cache_misses": self.misses, "prefix_cache_reused_tokens": self.reused_tokens}


def _common_start(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens two sequences share."""
    m = min(len(a), len(b))
    same = a[:m] == b[:m]
    return m if same.all() else int(np.argmin(same))
