"""The one interface the gateway sees of the engine: submit a request, iterate its tokens.

Nothing of the ring leaks through here (vLLM's engine-core boundary): the gateway validates
HTTP input, builds a GenerationRequest, and streams TokenEvents back to its client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Protocol

from ..model.sampling import SamplingParams

if TYPE_CHECKING:
    import torch

    from ..model.tokenizer import Tokenizer

MAX_EMBED_INPUTS = 2048  # inputs in one embeddings request (OpenAI's limit)
MAX_EMBED_TOKENS = 300_000  # tokens summed over one embeddings request's inputs (OpenAI's limit)
MAX_CHOICES = 128  # n: choices of one completion (OpenAI's limit)


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()  # stop strings; the text before the first one is returned
    ignore_eos: bool = False
    n: int = 1  # choices: the prompt is computed once, each choice samples on its own


@dataclass(frozen=True)
class TokenEvent:
    """One step of a request: a token and the text it completes, or the end (finish_reason set)."""

    token_id: int | None
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "error" | "cancelled"
    error: str | None = None
    logprob: float | None = None  # the token's, when the request asked for logprobs
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) of the most likely alternatives
    index: int = 0  # which choice (a request with n > 1 interleaves its choices' events)
    cached_tokens: int = 0  # on the last event: prompt tokens whose KV the prefix cache held


@dataclass
class EngineStats:
    queued: int = 0
    running: int = 0
    stages: int = 1
    epoch: int = 0
    extra: dict = field(default_factory=dict)


class EngineError(Exception):
    """A request the engine cannot take; `status` is the HTTP status the gateway answers with."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.code = code


class Engine(Protocol):
    model_name: str
    context: int  # max prompt + completion tokens of one sequence
    tokenizer: Tokenizer

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Stream a request's tokens; the last event has finish_reason set.

        Raises EngineError before the first event when the request cannot be taken (prompt
        beyond the context: 400; no plan or not enough memory in the cluster: 503). Closing the
        iterator early (client gone) cancels the request and frees its KV on every stage.
        """
        ...

    async def embed(self, inputs: list[list[int]], request_id: str = "embed") -> list[torch.Tensor]:
        """Each input's (token ids, 1 to `context` of them) embedding: the final hidden states after
        the final norm, mean-pooled over its tokens and L2-normalized, float32 [hidden] each.

        Raises EngineError: 400 for an empty input, one beyond the context or ids outside the
        vocabulary, more than MAX_EMBED_INPUTS; 503 when the cluster cannot serve or an input's
        computation failed.
        """
        ...

    def stats(self) -> EngineStats: ...
