"""What a micro-batch asks of a stage: consecutive tokens of several sequences, each at its own
positions (a prefill chunk of one sequence beside single decode tokens of others)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Container, NamedTuple

import torch


@dataclass(frozen=True)
class SeqChunk:
    """`length` consecutive tokens of one sequence starting at position `start`."""

    seq_id: int
    start: int
    length: int


def _no_rows() -> torch.Tensor:
    return torch.empty(0, dtype=torch.long)


_NO_ROWS = _no_rows()  # shared by every batch without such rows (never written: it has no elements)


@dataclass
class BatchMeta:
    chunks: list[SeqChunk]
    positions: torch.Tensor  # [T] int64: every token's position, chunk after chunk
    last_rows: torch.Tensor  # [n] int64: row of each chunk's last token (the last stage's logits rows)
    # rows whose final-normed hidden state the last stage returns instead of logits (embeddings:
    # every token of a pooled sequence's chunk; such chunks have no entry in last_rows)
    normed_rows: torch.Tensor = field(default_factory=_no_rows)

    @classmethod
    def build(cls, chunks: list[SeqChunk], device: str | torch.device = "cpu",
              pooled: Container[int] = ()) -> "BatchMeta":
        """`pooled`: sequences whose chunks ask for every row's final-normed hidden state, not logits."""
        pos, rows, normed, row = [], [], [], 0
        for c in chunks:
            pos.extend(range(c.start, c.start + c.length))
            if c.seq_id in pooled:
                normed.extend(range(row, row + c.length))
            else:
                rows.append(row + c.length - 1)
            row += c.length
        return cls(
            list(chunks),
            torch.tensor(pos, dtype=torch.long, device=device),
            torch.tensor(rows, dtype=torch.long, device=device),
            # most batches pool nothing: one torch call less per step (each costs ~0.1 ms after a pause)
            torch.tensor(normed, dtype=torch.long, device=device) if normed or str(device) != "cpu" else _NO_ROWS,
        )

    def to(self, device: str | torch.device) -> "BatchMeta":
        return BatchMeta(self.chunks, self.positions.to(device), self.last_rows.to(device), self.normed_rows.to(device))

    def all_rows(self) -> "BatchMeta":
        """The same batch asking for every token's output (tests and perplexity-style comparisons)."""
        return BatchMeta(self.chunks, self.positions, torch.arange(self.n_tokens, device=self.positions.device))

    @property
    def n_tokens(self) -> int:
        return int(self.positions.shape[0])


class LastOutputs(NamedTuple):
    """What the last stage computes for a micro-batch (`forward_last`)."""

    logits: torch.Tensor  # float32 [len(last_rows), vocab]
    normed: torch.Tensor  # float32 [len(normed_rows), hidden]: after the final norm, before the output head
