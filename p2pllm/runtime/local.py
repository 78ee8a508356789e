"""`p2pllm run`: the whole model in one process, optionally cut into in-process stages.

Hidden states cross each cut through transport/wire.py, the same tensor <-> bytes code the
network uses, so a split run exercises the exact path a cluster does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import UsageError
from ..model.layers import DecoderSlice, SeqChunk
from ..model.loader import load_slice
from ..model.sampling import Sampler, SamplingParams
from ..model.spec import ModelSpec, read_spec
from ..model.tokenizer import Tokenizer, load_tokenizer
from ..transport.wire import blob_to_tensor, pack_blob, tensor_to_blob, unpack_blob
from .stage import Stage

log = logging.getLogger(__name__)

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return len(self.prompt_ids) / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.ids) - 1  # the first token comes out of the prefill
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {
            "text": self.text,
            "prompt_ids": self.prompt_ids,
            "ids": self.ids,
            "prompt_tokens": len(self.prompt_ids),
            "completion_tokens": len(self.ids),
            "finish_reason": self.finish_reason,
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 3),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
        }


def parse_split(text: str | None, n_layers: int) -> list[int]:
    """'2,4' -> cuts before layers 2 and 4: stages [0,2) [2,4) [4,n)."""
    if not text:
        return []
    try:
        cuts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--split takes layer numbers separated by commas, got {text!r}") from None
    if cuts != sorted(set(cuts)) or any(not 0 < c < n_layers for c in cuts):
        raise UsageError(f"--split cuts must be increasing and between 1 and {n_layers - 1}, got {text!r}")
    return cuts


def stage_ranges(cuts: list[int], n_layers: int) -> list[tuple[int, int]]:
    bounds = [0, *cuts, n_layers]
    return list(zip(bounds[:-1], bounds[1:]))


class LocalPipeline:
    def __init__(self, path: str, cuts: list[int] | None = None, *, dtype: torch.dtype = torch.float32,
                 device: str = "cpu", wire_dtype: str | None = None,
                 progress: Callable[[int, int], None] | None = None, spec: ModelSpec | None = None):
        self.spec = spec or read_spec(path)
        self.tokenizer: Tokenizer = load_tokenizer(path)
        self.wire_dtype = wire_dtype
        ranges = stage_ranges(cuts or [], self.spec.n_layers)
        self.stages = [
            Stage(DecoderSlice(load_slice(path, a, b, spec=self.spec, dtype=dtype, device=device, progress=progress),
                               dtype=dtype, device=device))
            for a, b in ranges
        ]
        self._next_seq = 0

    def _hop(self, hidden: torch.Tensor, next_stage: Stage) -> torch.Tensor:
        """Send hidden states across a cut the way the network would: bytes, then checked."""
        data = pack_blob(tensor_to_blob(hidden, self.wire_dtype))
        return blob_to_tensor(
            unpack_blob(data),
            expect_shape=(hidden.shape[0], self.spec.hidden),
            allowed=("float32", "float16", "bfloat16"),
            out_dtype=next_stage.decoder.dtype,
        )

    def forward(self, tokens: torch.Tensor, chunks: list[SeqChunk]) -> torch.Tensor:
        x = tokens
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = self._hop(x, stage)
            x = stage.step(x, chunks)
        return x

    def generate(self, prompt_ids: list[int], *, max_tokens: int = 128, sampling: SamplingParams = SamplingParams(),
                 stop: list[str] | None = None, on_text: Callable[[str], None] | None = None,
                 ignore_eos: bool = False) -> GenerationResult:
        """Generate one sequence; `ignore_eos` runs to max_tokens (benchmarks need a fixed length)."""
        ctx = self.spec.context
        if not prompt_ids:
            raise UsageError("the prompt is empty")
        if len(prompt_ids) >= ctx:
            raise UsageError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {ctx}")
        if max_tokens < 1:
            raise UsageError(f"--max-tokens must be at least 1, got {max_tokens}")
        sampler = Sampler(sampling)
        seq = self._next_seq
        self._next_seq += 1
        capacity = min(ctx, len(prompt_ids) + max_tokens)
        for s in self.stages:
            s.begin(seq, capacity)
        res = GenerationResult(list(prompt_ids))
        eos = set() if ignore_eos else self.tokenizer.eos_ids
        stream = self.tokenizer.stream_decoder()
        stops = [s for s in (stop or []) if s]
        try:
            pos, tokens = 0, list(prompt_ids)
            t0 = time.perf_counter()
            while True:
                logits = self.forward(torch.tensor(tokens, dtype=torch.long), [SeqChunk(seq, pos, len(tokens))])
                tok = sampler.sample(logits[0])
                now = time.perf_counter()
                if not res.ids:
                    res.prefill_seconds, t0 = now - t0, now
                pos += len(tokens)
                if tok in eos:
                    res.finish_reason = "stop"
                    break
                res.ids.append(tok)
                piece = stream.push(tok)
                res.text += piece
                hit = _first_stop(res.text, stops)
                if hit is not None:
                    res.text, res.finish_reason = res.text[:hit], "stop"
                    break
                if on_text and piece:
                    on_text(piece)
                if len(res.ids) >= max_tokens or pos >= ctx:
                    res.finish_reason = "length"
                    break
                tokens = [tok]
            res.decode_seconds = time.perf_counter() - t0
        finally:
            for s in self.stages:
                s.free(seq)
        return res


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
