"""One pipeline stage: this peer's layers plus the KV cache of every sequence passing through."""

from __future__ import annotations

import torch

from ..model.kvcache import KVCache, KVCacheError
from ..model.layers import BatchMeta, DecoderSlice, SeqChunk

# a sequence's KV is first reserved for this many positions (or its known length), growing by doubling
_DEFAULT_CAPACITY = 256


class Stage:
    def __init__(self, decoder: DecoderSlice, max_context: int | None = None):
        self.decoder = decoder
        self.kv: KVCache = decoder.new_cache(max_context)

    @property
    def start(self) -> int:
        return self.decoder.start

    @property
    def end(self) -> int:
        return self.decoder.end

    def begin(self, seq_id: int, capacity: int) -> None:
        """Preallocate a sequence's KV for `capacity` positions."""
        if seq_id not in self.kv:
            self.kv.allocate(seq_id, capacity)

    def free(self, seq_id: int) -> None:
        self.kv.free(seq_id)

    def step(self, x: torch.Tensor, chunks: list[SeqChunk]) -> torch.Tensor:
        """Run this stage's layers on one micro-batch (token ids or hidden states)."""
        for c in chunks:
            if c.seq_id not in self.kv:
                self.kv.allocate(c.seq_id, max(_DEFAULT_CAPACITY, c.start + c.length))
            if c.start > self.kv.length(c.seq_id):
                raise KVCacheError(
                    f"sequence {c.seq_id}: chunk starts at {c.start} but only {self.kv.length(c.seq_id)} positions are cached"
                )
            self.kv.reserve(c.seq_id, c.start + c.length)
            self.kv.truncate(c.seq_id, c.start)
        meta = BatchMeta.build(chunks, self.decoder.device)
        return self.decoder.forward(x.to(self.decoder.device), meta, self.kv)
