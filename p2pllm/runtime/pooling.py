"""Mean pooling for embeddings, at the last stage: a sequence's final-normed hidden states are
summed chunk by chunk (a long input spans several micro-batches) and answered as their mean,
L2-normalized, after its last chunk."""

from __future__ import annotations

import torch

from ..errors import P2PError


class PoolError(P2PError):
    """A chunk that does not continue what was pooled so far (the micro-batch is refused)."""


class MeanPool:
    """The running sum and count of one sequence's final-normed hidden states."""

    def __init__(self, hidden: int):
        self.sum = torch.zeros(hidden, dtype=torch.float64)  # f64: the sum over thousands of rows loses nothing
        self.count = 0

    def add(self, seq_id: int, start: int, rows: torch.Tensor) -> None:
        """Rows [start, start + len(rows)) of the sequence; they must follow the rows pooled so far
        (an embedding is recomputed from position 0 after a plan change, never resumed halfway)."""
        if start != self.count:
            raise PoolError(f"sequence {seq_id}: a pooled chunk starts at {start}, but {self.count} positions "
                            "were pooled here")
        self.sum += rows.to(device="cpu", dtype=torch.float64).sum(0)
        self.count += int(rows.shape[0])

    def vector(self) -> torch.Tensor:
        """float32 [hidden]: the mean, scaled to unit length."""
        mean = self.sum / max(self.count, 1)
        return torch.nn.functional.normalize(mean, dim=0).to(torch.float32)
