"""Choosing the next token: greedy, temperature, top-k, top-p, with a per-request seed; presence and
frequency penalties over the tokens generated so far and a per-token logit bias (OpenAI's meanings)."""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ModelOutputError, UsageError
from .grammar import MAX_GRAMMAR_BYTES, NO_TOKEN, Constraint

if TYPE_CHECKING:
    import torch

NON_FINITE_LOGITS = ("the model computed NaN or infinite logits: its weights are corrupt or were quantized "
                     "wrongly (`p2pllm check-model` on its file checks every tensor)")

# torch is imported where a Sampler computes: SamplingParams alone is what the gateway's request
# schema needs, and the CLI (status, chat, plan) then starts without torch's 1.5 s import


@dataclass(frozen=True)
class Sampled:
    """A token the last stage chose; with its log-probability and the top alternatives when asked."""

    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None
    presence_penalty: float = 0.0  # subtracted once from the logit of every token generated so far
    frequency_penalty: float = 0.0  # subtracted per time a token was generated so far
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), ids unique
    grammar: str = ""  # an llguidance grammar the text must follow (model/grammar.py), "" for none
    top_logprobs: int | None = None  # None: no logprobs; k: each token's logprob and the k most likely

    MAX_TOP_LOGPROBS = 20  # OpenAI's limit

    MAX_BIASED_TOKENS = 300  # OpenAI's limit on logit_bias entries

    def validate(self, vocab: int | None = None) -> "SamplingParams":
        if not 0.0 <= self.temperature <= 100.0:
            raise UsageError(f"temperature must be between 0 and 100, got {self.temperature}")
        if self.top_k < 0:
            raise UsageError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise UsageError(f"seed must be a non-negative 64-bit integer, got {self.seed}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise UsageError(f"{name} must be between -2 and 2, got {getattr(self, name)}")
        if len(self.logit_bias) > self.MAX_BIASED_TOKENS:
            raise UsageError(f"logit_bias has {len(self.logit_bias)} entries (at most {self.MAX_BIASED_TOKENS})")
        if len({t for t, _ in self.logit_bias}) != len(self.logit_bias):
            raise UsageError("logit_bias names a token twice")
        for token, bias in self.logit_bias:
            if token < 0 or (vocab is not None and token >= vocab):
                raise UsageError(f"logit_bias token {token} is outside the vocabulary")
            if not -100.0 <= bias <= 100.0:
                raise UsageError(f"logit_bias for token {token} must be between -100 and 100, got {bias}")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= self.MAX_TOP_LOGPROBS:
            raise UsageError(f"top_logprobs must be between 0 and {self.MAX_TOP_LOGPROBS}, got {self.top_logprobs}")
        if len(self.grammar.encode()) > MAX_GRAMMAR_BYTES:
            raise UsageError(f"the grammar is larger than {MAX_GRAMMAR_BYTES // 1024} KiB")
        return self

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias or self.grammar)

    @property
    def greedy(self) -> bool:
        # below this, logits / temperature overflows float32: the distribution is argmax anyway
        return self.temperature < 1e-4


class Sampler:
    """One per sequence: its generator makes a seeded request reproducible whatever else runs."""

    def __init__(self, params: SamplingParams, generated: tuple[int, ...] = (), tokenizer=None):
        """`generated`: the tokens this sequence generated before this sampler took over (after a
        replan), which the penalties count and the grammar replays. `tokenizer`: the model's, which
        a grammar needs."""
        import torch

        self.params = params.validate()
        self._constraint = None
        if params.grammar:
            if tokenizer is None:
                raise UsageError("a grammar-constrained sequence reached a stage without the model's tokenizer")
            self._constraint = Constraint(params.grammar, tokenizer, generated)
        self._counts = Counter(generated) if params.presence_penalty or params.frequency_penalty else None
        self._bias = None
        if params.logit_bias:
            ids, values = zip(*params.logit_bias)
            self._bias = (torch.tensor(ids, dtype=torch.long), torch.tensor(values, dtype=torch.float32))
        self._gen = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
            self._gen = torch.Generator().manual_seed(seed)

    def choose(self, logits: torch.Tensor) -> Sampled:
        """The next token, with its log-probability and the most likely alternatives when asked:
        those are the model's own distribution (log-softmax of the raw logits), as OpenAI reports."""
        token = self.sample(logits)
        k = self.params.top_logprobs
        if k is None or token == NO_TOKEN:
            return Sampled(token)
        import torch

        logprobs = torch.log_softmax(logits.float().cpu(), dim=-1)
        top = torch.topk(logprobs, k) if k else None
        alternatives = tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ()
        return Sampled(token, float(logprobs[token]), alternatives)

    def sample(self, logits: torch.Tensor) -> int:
        """logits: [vocab] float32 on any device. NO_TOKEN where the grammar allows none."""
        raw = logits
        if self.params.adjusts_logits:
            logits = self._adjusted(logits)
            if logits is None:
                return NO_TOKEN
        token = self._choose(logits)
        # argmax picks a NaN wherever there is one: checking the chosen logit costs one lookup a token
        # (2.5 us on the 2-core CI VM, beside ~70 us for the argmax and ~12 ms for a SmolLM2 step)
        if not math.isfinite(float(raw[token])):
            raise ModelOutputError(NON_FINITE_LOGITS)
        if self._counts is not None:
            self._counts[token] += 1
        if self._constraint is not None:
            self._constraint.consume(token)
        return token

    def _adjusted(self, logits: torch.Tensor) -> torch.Tensor | None:
        import torch

        p = self.params
        logits = logits.float().cpu().clone()
        if self._counts:
            ids = torch.tensor(list(self._counts), dtype=torch.long)
            counts = torch.tensor(list(self._counts.values()), dtype=torch.float32)
            logits.index_add_(0, ids, -(p.frequency_penalty * counts + p.presence_penalty))
        if self._bias is not None:
            logits.index_add_(0, *self._bias)
        if self._constraint is not None and not self._constraint.mask_(logits):  # last: no bias brings
            return None  # back a token the grammar forbids
        return logits

    def _choose(self, logits: torch.Tensor) -> int:
        import torch

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
        try:
            return int(torch.multinomial(probs, 1, generator=self._gen))
        except RuntimeError:  # "probability tensor contains either inf, nan or element < 0"
            raise ModelOutputError(NON_FINITE_LOGITS) from None
