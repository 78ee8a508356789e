"""Plain data the head and the stages exchange: one micro-batch travelling the ring, and KV rows
moving between stages (replicas, plan changes)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.kvcache import KVFormat
from ..model.sampling import SamplingParams


@dataclass(frozen=True)
class SeqStart:
    """A sequence's first appearance: stages preallocate its KV, the last stage makes its sampler."""

    seq_id: int
    capacity: int
    sampling: SamplingParams
    generated: tuple[int, ...] = ()  # tokens it generated before (a replan): the penalties count them
    # an embedding: the last stage mean-pools its final-normed hidden states instead of sampling,
    # and answers after its last chunk (sample=True) with the vector (a Pooled)
    embed: bool = False
    # n > 1: the sequence starts with a copy of positions [0, fork_len) of sequence `fork_of`'s KV
    # (the shared prompt, computed once), which every stage holds
    fork_of: int | None = None
    fork_len: int = 0


@dataclass(frozen=True)
class Pooled:
    """An embedding sequence's answer from the last stage."""

    seq_id: int
    vector: torch.Tensor  # float32 [hidden]: final-normed hidden states, mean over its tokens, unit L2 norm


@dataclass(frozen=True)
class Chunk:
    seq_id: int
    start: int  # position of the chunk's first token
    length: int
    sample: bool  # the last stage samples the next token after this chunk


@dataclass
class MicroBatch:
    epoch: int
    mb_id: int
    chunks: list[Chunk]
    tokens: list[int]  # the inputs of every chunk, in order (the first stage embeds them)
    starts: list[SeqStart] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)  # free these sequences after this micro-batch
    # these get no more chunks but keep their KV (the prefix cache): room reserved beyond it goes back
    retained: list[int] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(c.length for c in self.chunks)

    @property
    def n_sampled(self) -> int:
        return sum(1 for c in self.chunks if c.sample)


@dataclass(frozen=True)
class LayerKV:
    """KV of layers [first_layer, first_layer + n) of one sequence, positions [start, start + length)."""

    seq_id: int
    first_layer: int
    start: int
    data: torch.Tensor  # uint8 [n_layers, 2, length, row_bytes]: raw rows in `format`
    format: KVFormat

    @property
    def end_layer(self) -> int:
        return self.first_layer + int(self.data.shape[0])

    @property
    def length(self) -> int:
        return int(self.data.shape[2])

    def layers(self, a: int, b: int) -> "LayerKV":
        return LayerKV(self.seq_id, a, self.start, self.data[a - self.first_layer: b - self.first_layer], self.format)

    def positions(self, n: int) -> "LayerKV":
        return LayerKV(self.seq_id, self.first_layer, self.start, self.data[:, :, :n], self.format)
