"""Choosing the next token: greedy, temperature, top-k, top-p, with a per-request seed."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..errors import UsageError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    def validate(self) -> "SamplingParams":
        if not 0.0 <= self.temperature <= 100.0:
            raise UsageError(f"temperature must be between 0 and 100, got {self.temperature}")
        if self.top_k < 0:
            raise UsageError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise UsageError(f"seed must be a non-negative 64-bit integer, got {self.seed}")
        return self

    @property
    def greedy(self) -> bool:
        # below this, logits / temperature overflows float32: the distribution is argmax anyway
        return self.temperature < 1e-4


class Sampler:
    """One per sequence: its generator makes a seeded request reproducible whatever else runs."""

    def __init__(self, params: SamplingParams):
        self.params = params.validate()
        self._gen = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
            self._gen = torch.Generator().manual_seed(seed)

    def sample(self, logits: torch.Tensor) -> int:
        """logits: [vocab] float32 on any device."""
        p = self.params
        if p.greedy:
            return int(torch.argmax(logits))
        logits = logits.float().cpu() / p.temperature
        if p.top_k and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            # drop a token once the mass before it already reaches top_p (the first always stays)
            drop = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._gen))
