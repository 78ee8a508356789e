"""One pipeline stage: this peer's layers (either backend) plus the KV of every sequence passing through."""

from __future__ import annotations

from typing import Container

import torch

from ..model.backends import StageBackend
from ..model.batch import BatchMeta, LastOutputs, SeqChunk
from ..model.kvcache import KVCacheError, KVEntries
from ..model.sampling import Sampled, Sampler
from .frames import MicroBatch, Pooled
from .pooling import MeanPool, PoolError

# a sequence's KV is first reserved for this many positions (or its known length), growing as needed
_DEFAULT_CAPACITY = 256


class Stage:
    def __init__(self, backend: StageBackend, tokenizer=None):
        self.backend = backend
        self.tokenizer = tokenizer  # the last stage's samplers need it for grammar-constrained sequences
        self.kv = backend.kv
        self.samplers: dict[int, Sampler] = {}  # the last stage samples for every sequence ...
        self.pools: dict[int, MeanPool] = {}  # ... but embeddings, which it pools
        self.embeddings: set[int] = set()  # sequences started as embeddings (every stage: no KV replicas)
        # finished sequences the head's prefix cache keeps: their KV rows, apart from the running
        # sequences' KV (attention over those never spans them); a start may copy one
        self.kept: dict[int, KVEntries] = {}

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

    def __contains__(self, seq_id: int) -> bool:
        """Whether this stage has the sequence's KV: running, or kept for the prefix cache."""
        return seq_id in self.kv or seq_id in self.kept

    def sequences(self) -> list[int]:
        """Every sequence whose KV this stage has: running, then kept."""
        return [*self.kv.sequences(), *self.kept]

    def kv_memory(self) -> tuple[int, int]:
        """(bytes of the KV rows held, bytes the caches have allocated), kept sequences included.

        They differ: a torch sequence's buffer is sized for prompt + max_tokens ahead of use, and
        the ggml cell pool holds the cells written since it last handed memory back, freed ones
        included (model/backends/ggml_kv.py). Called from the event loop (/metrics) while the
        compute thread may add or free sequences: a sequence freed meanwhile is skipped, and a dict
        changing under iteration is read again."""
        spec = self.backend.spec
        per_position = 2 * self.kv.n_layers * self.kv.format.row_bytes(spec.n_kv_heads * spec.head_dim)
        for _ in range(3):
            try:
                positions = 0
                for seq_id in list(self.kv.sequences()):
                    try:
                        positions += self.kv.length(seq_id)
                    except KeyError:
                        pass
                kept = sum(e.data.numel() * e.data.element_size() for e in list(self.kept.values()))
                return positions * per_position + kept, self.kv.nbytes() + kept
            except RuntimeError:  # "dictionary changed size during iteration"
                continue
        raise RuntimeError("the KV cache kept changing while it was measured")

    def fork(self, source: int, seq_id: int, length: int) -> None:
        """Start `seq_id` with a copy of `source`'s KV of positions [0, length): the prompt of
        another choice (n > 1), or a kept sequence (the prefix cache)."""
        kept = self.kept.get(source)
        if kept is not None and kept.length >= length:
            data, fmt = kept.data[:, :, :length], kept.format
        elif source in self.kv and self.kv.length(source) >= length:
            entries = self.kv.export(source, 0, length)
            data, fmt = entries.data, entries.format
        else:
            raise KVCacheError(f"sequence {seq_id} copies {length} positions of sequence {source}, which this "
                               "stage does not hold")
        self.kv.import_entries(KVEntries(seq_id, 0, data, fmt))

    def keep(self, seq_id: int) -> None:
        """A finished sequence the prefix cache keeps: its KV rows leave the running sequences'
        store for a copy of exactly its length, and it samples no more."""
        n = self.kv.length(seq_id) if seq_id in self.kv else 0
        kept = self.kv.export(seq_id, 0, n) if n else None
        self.free(seq_id)
        if kept is not None:
            self.kept[seq_id] = kept

    def free(self, seq_id: int) -> None:
        self.kv.free(seq_id)
        self.kept.pop(seq_id, None)
        self.samplers.pop(seq_id, None)
        self.pools.pop(seq_id, None)
        self.embeddings.discard(seq_id)

    def close(self) -> None:
        self.backend.close()

    def process(self, mb: MicroBatch, hidden: torch.Tensor | None = None
                ) -> torch.Tensor | list[Sampled | Pooled] | None:
        """One micro-batch: hidden states out, or on the last stage one answer per chunk with
        `sample` (in chunk order): a sampled token, or an embedding sequence's pooled vector."""
        for s in mb.starts:
            self.begin(s.seq_id, s.capacity)
            if s.fork_of is not None:
                self.fork(s.fork_of, s.seq_id, s.fork_len)
            if s.embed:
                self.embeddings.add(s.seq_id)
            else:
                self.embeddings.discard(s.seq_id)
            if self.is_last:
                if s.embed:  # (again, after a plan change: pooling restarts with position 0)
                    self.pools[s.seq_id] = MeanPool(self.backend.spec.hidden)
                    self.samplers.pop(s.seq_id, None)
                else:
                    self.samplers[s.seq_id] = Sampler(s.sampling, s.generated, self.tokenizer)
                    self.pools.pop(s.seq_id, None)
        out = None
        if mb.chunks:
            x = torch.tensor(mb.tokens, dtype=torch.long) if self.is_first else hidden
            chunks = [SeqChunk(c.seq_id, c.start, c.length) for c in mb.chunks]
            if self.is_last:
                for c in chunks:  # refused before anything is computed or cached
                    if c.seq_id in self.pools and self.pools[c.seq_id].count != c.start:
                        raise PoolError(f"sequence {c.seq_id}: a pooled chunk starts at {c.start}, but "
                                        f"{self.pools[c.seq_id].count} positions were pooled here")
                out = self._answer(mb, self.step(x, chunks, pooled=self.pools))
            else:
                out = self.step(x, chunks)
        for seq_id in mb.retained:
            self.keep(seq_id)
        for seq_id in mb.finished:
            self.free(seq_id)
        return out if out is not None or not self.is_last else []

    def _answer(self, mb: MicroBatch, outputs: LastOutputs) -> list[Sampled | Pooled]:
        """Logits rows go to their samplers, normed rows to their pools (rows come chunk by chunk)."""
        answers: list[Sampled | Pooled] = []
        logit_row = normed_row = 0
        for c in mb.chunks:
            pool = self.pools.get(c.seq_id)
            if pool is not None:
                pool.add(c.seq_id, c.start, outputs.normed[normed_row: normed_row + c.length])
                normed_row += c.length
                if c.sample:
                    answers.append(Pooled(c.seq_id, pool.vector()))
            else:
                if c.sample:
                    answers.append(self.samplers[c.seq_id].choose(outputs.logits[logit_row]))
                logit_row += 1
        return answers

    def step(self, x: torch.Tensor, chunks: list[SeqChunk], pooled: Container[int] | None = None
             ) -> torch.Tensor | LastOutputs:
        """Run this stage's layers on one micro-batch (token ids or hidden states); each chunk
        continues its sequence (a replayed chunk overwrites what followed it). With `pooled` (the
        last stage), the outputs of forward_last: logits, and every row of the `pooled` sequences
        after the final norm."""
        for c in chunks:
            if c.seq_id not in self.kv:
                self.kv.allocate(c.seq_id, max(_DEFAULT_CAPACITY, c.start + c.length))
            if c.start > self.kv.length(c.seq_id):
                raise KVCacheError(
                    f"sequence {c.seq_id}: chunk starts at {c.start} but only {self.kv.length(c.seq_id)} positions are cached"
                )
            self.kv.truncate(c.seq_id, c.start)
        if pooled is None:
            return self.backend.forward(x, BatchMeta.build(chunks))
        return self.backend.forward_last(x, BatchMeta.build(chunks, pooled=pooled))
