"""What a micro-batch asks of a stage: consecutive tokens of several sequences, each at its own
positions (a prefill chunk of one sequence beside single decode tokens of others)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SeqChunk:
    """`length` consecutive tokens of one sequence starting at position `start`."""

    seq_id: int
    start: int
    length: int


@dataclass
class BatchMeta:
    chunks: list[SeqChunk]
    positions: torch.Tensor  # [T] int64: every token's position, chunk after chunk
    last_rows: torch.Tensor  # [n_chunks] int64: row of each chunk's last token

    @classmethod
    def build(cls, chunks: list[SeqChunk], device: str | torch.device = "cpu") -> "BatchMeta":
        pos, rows, row = [], [], 0
        for c in chunks:
            pos.extend(range(c.start, c.start + c.length))
            row += c.length
            rows.append(row - 1)
        return cls(
            list(chunks),
            torch.tensor(pos, dtype=torch.long, device=device),
            torch.tensor(rows, dtype=torch.long, device=device),
        )

    def all_rows(self) -> "BatchMeta":
        """The same batch asking for every token's output (tests and perplexity-style comparisons)."""
        return BatchMeta(self.chunks, self.positions, torch.arange(self.n_tokens, device=self.positions.device))

    @property
    def n_tokens(self) -> int:
        return int(self.positions.shape[0])
