"""One pipeline stage: this peer's layers plus the KV cache of every sequence passing through."""

from __future__ import annotations

import torch

from ..model.kvcache import KVCache, KVCacheError
from ..model.layers import BatchMeta, DecoderSlice, SeqChunk
from ..model.sampling import Sampler
from .frames import MicroBatch

# a sequence's KV is first reserved for this many positions (or its known length), growing by doubling
_DEFAULT_CAPACITY = 256


class Stage:
    def __init__(self, decoder: DecoderSlice, max_context: int | None = None):
        self.decoder = decoder
        self.kv: KVCache = decoder.new_cache(max_context)
        self.samplers: dict[int, Sampler] = {}  # the last stage samples for every sequence

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
        self.samplers.pop(seq_id, None)

    @property
    def is_first(self) -> bool:
        return self.decoder.is_first

    @property
    def is_last(self) -> bool:
        return self.decoder.is_last

    def process(self, mb: MicroBatch, hidden: torch.Tensor | None = None) -> torch.Tensor | list[int] | None:
        """One micro-batch: hidden states out, or on the last stage the sampled token ids."""
        for s in mb.starts:
            self.begin(s.seq_id, s.capacity)
            if self.is_last:
                self.samplers[s.seq_id] = Sampler(s.sampling)
        out = None
        if mb.chunks:
            x = torch.tensor(mb.tokens, dtype=torch.long) if self.is_first else hidden
            out = self.step(x, [SeqChunk(c.seq_id, c.start, c.length) for c in mb.chunks])
            if self.is_last:
                out = [self.samplers[c.seq_id].sample(out[i]) for i, c in enumerate(mb.chunks) if c.sample]
        for seq_id in mb.finished:
            self.free(seq_id)
        return out if out is not None or not self.is_last else []

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
