"""One pipeline stage: this peer's layers (either backend) plus the KV of every sequence passing through."""

from __future__ import annotations

import torch

from ..model.backends import StageBackend
from ..model.batch import BatchMeta, SeqChunk
from ..model.kvcache import KVCacheError
from ..model.sampling import Sampler
from .frames import MicroBatch

# a sequence's KV is first reserved for this many positions (or its known length), growing as needed
_DEFAULT_CAPACITY = 256


class Stage:
    def __init__(self, backend: StageBackend, tokenizer=None):
        self.backend = backend
        self.tokenizer = tokenizer  # the last stage's samplers need it for grammar-constrained sequences
        self.kv = backend.kv
        self.samplers: dict[int, Sampler] = {}  # the last stage samples for every sequence

    @property
    def start(self) -> int:
        return self.backend.start

    @property
    def end(self) -> int:
        return self.backend.end

    @property
    def is_first(self) -> bool:
        return self.backend.is_first

    @property
    def is_last(self) -> bool:
        return self.backend.is_last

    def begin(self, seq_id: int, capacity: int) -> None:
        """Preallocate a sequence's KV for `capacity` positions."""
        if seq_id not in self.kv:
            self.kv.allocate(seq_id, capacity)

    def free(self, seq_id: int) -> None:
        self.kv.free(seq_id)
        self.samplers.pop(seq_id, None)

    def close(self) -> None:
        self.backend.close()

    def process(self, mb: MicroBatch, hidden: torch.Tensor | None = None) -> torch.Tensor | list[int] | None:
        """One micro-batch: hidden states out, or on the last stage the sampled tokens (`Sampled`)."""
        for s in mb.starts:
            self.begin(s.seq_id, s.capacity)
            if self.is_last:
                self.samplers[s.seq_id] = Sampler(s.sampling, s.generated, self.tokenizer)
        out = None
        if mb.chunks:
            x = torch.tensor(mb.tokens, dtype=torch.long) if self.is_first else hidden
            out = self.step(x, [SeqChunk(c.seq_id, c.start, c.length) for c in mb.chunks])
            if self.is_last:
                out = [self.samplers[c.seq_id].choose(out[i]) for i, c in enumerate(mb.chunks) if c.sample]
        for seq_id in mb.finished:
            self.free(seq_id)
        return out if out is not None or not self.is_last else []

    def step(self, x: torch.Tensor, chunks: list[SeqChunk]) -> torch.Tensor:
        """Run this stage's layers on one micro-batch (token ids or hidden states); each chunk
        continues its sequence (a replayed chunk overwrites what followed it)."""
        for c in chunks:
            if c.seq_id not in self.kv:
                self.kv.allocate(c.seq_id, max(_DEFAULT_CAPACITY, c.start + c.length))
            if c.start > self.kv.length(c.seq_id):
                raise KVCacheError(
                    f"sequence {c.seq_id}: chunk starts at {c.start} but only {self.kv.length(c.seq_id)} positions are cached"
                )
            self.kv.truncate(c.seq_id, c.start)
        return self.backend.forward(x, BatchMeta.build(chunks))
