"""`p2pllm run`: the whole model in one process, optionally cut into in-process stages.

Hidden states cross each cut through transport/wire.py, the same tensor <-> bytes code the
network uses, so a split run exercises the exact path a cluster does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import P2PError, UsageError
from ..model.backends import open_stage
from ..model.sampling import Sampled, SamplingParams
from ..model.spec import ModelSpec, read_spec
from ..model.tokenizer import Tokenizer, load_tokenizer
from ..transport.wire import blob_to_tensor, pack_blob, tensor_to_blob, unpack_blob
from .api import GenerationRequest
from .frames import MicroBatch, Pooled
from .scheduler import Scheduler
from .stage import Stage

log = logging.getLogger(__name__)


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


class LocalRing:
    """A ring whose stages all live in this process, run one micro-batch at a time on one
    compute thread (so the event loop never blocks on a matmul)."""

    epoch = 0

    def __init__(self, stages: list[Stage], spec: ModelSpec, wire_dtype: str | None = None):
        self.stages = stages
        self.spec = spec
        self.wire_dtype = wire_dtype
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")

    @property
    def n_stages(self) -> int:
        return len(self.stages)

    async def run(self, mb: MicroBatch) -> list[Sampled | Pooled]:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.run_sync, mb)

    def run_sync(self, mb: MicroBatch) -> list[Sampled | Pooled]:
        x = None
        for i, stage in enumerate(self.stages):
            if i > 0 and x is not None:
                x = self._hop(x, stage)
            x = stage.process(mb, x)
        return x

    def _hop(self, hidden: torch.Tensor, next_stage: Stage) -> torch.Tensor:
        """Send hidden states across a cut the way the network would: bytes, then checked."""
        data = pack_blob(tensor_to_blob(hidden, self.wire_dtype))
        return blob_to_tensor(
            unpack_blob(data),
            expect_shape=(hidden.shape[0], self.spec.hidden),
            allowed=("float32", "float16", "bfloat16"),
            out_dtype=next_stage.backend.activation_dtype,
        )

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        for stage in self.stages:
            stage.close()


class LocalPipeline:
    """A whole model in this process, as in-process stages cut at `cuts`.

    `backend`, `dtype`, `kv_dtype`, `device` and `threads` are those of `model.backends.open_stage`
    (auto: ggml for a GGUF on the CPU, torch otherwise)."""

    def __init__(self, path: str, cuts: list[int] | None = None, *, backend: str = "auto", dtype: str | None = None,
                 kv_dtype: str | None = None, device: str = "cpu", threads: int | None = None,
                 wire_dtype: str | None = None, progress: Callable[[int, int], None] | None = None,
                 spec: ModelSpec | None = None):
        self.path = str(path)
        self.spec = spec or read_spec(path)
        self.tokenizer: Tokenizer = load_tokenizer(path)
        stages = [
            Stage(open_stage(path, a, b, spec=self.spec, backend=backend, device=device, dtype=dtype,
                             kv_dtype=kv_dtype, threads=threads, progress=progress), self.tokenizer)
            for a, b in stage_ranges(cuts or [], self.spec.n_layers)
        ]
        self.ring = LocalRing(stages, self.spec, wire_dtype)

    @property
    def backend(self) -> str:
        return self.stages[0].backend.name

    @property
    def stages(self) -> list[Stage]:
        return self.ring.stages

    def engine(self, **kwargs) -> Scheduler:
        name = Path(self.path).name
        return Scheduler(self.ring, self.tokenizer, model_name=name, context=self.spec.context, vocab=self.spec.vocab,
                         **kwargs)

    def generate(self, prompt_ids: list[int], *, max_tokens: int = 128, sampling: SamplingParams = SamplingParams(),
                 stop: list[str] | None = None, on_text: Callable[[str], None] | None = None,
                 ignore_eos: bool = False) -> GenerationResult:
        """Generate one sequence; `ignore_eos` runs to max_tokens (benchmarks need a fixed length)."""
        if not prompt_ids:
            raise UsageError("the prompt is empty")
        if max_tokens < 1:
            raise UsageError(f"--max-tokens must be at least 1, got {max_tokens}")
        # as many tokens as fit: a CLI user asking for more than the context gets finish_reason "length"
        max_tokens = min(max_tokens, self.spec.context - len(prompt_ids))
        if max_tokens < 1:
            raise UsageError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {self.spec.context}")
        req = GenerationRequest("run", list(prompt_ids), max_tokens, sampling.validate(), tuple(stop or ()), ignore_eos)
        return asyncio.run(self._generate(req, on_text))

    async def _generate(self, req: GenerationRequest, on_text) -> GenerationResult:
        engine = self.engine()
        await engine.start()
        res = GenerationResult(list(req.prompt_ids))
        try:
            t0 = time.perf_counter()
            async for event in await engine.generate(req):
                if event.token_id is not None:
                    if not res.ids:
                        now = time.perf_counter()
                        res.prefill_seconds, t0 = now - t0, now
                    res.ids.append(event.token_id)
                res.text += event.text
                if on_text and event.text:
                    on_text(event.text)
                if event.finish_reason:
                    if event.finish_reason == "error":
                        raise P2PError(f"generation failed: {event.error}")
                    res.finish_reason = event.finish_reason
            res.decode_seconds = time.perf_counter() - t0
        finally:
            await engine.stop()
        return res


async def build_local_engine(model_path: str, cuts: list[int] | None = None, **kwargs) -> Scheduler:
    """A started, real in-process engine (continuous batching over in-process stages)."""
    pipe = await asyncio.get_running_loop().run_in_executor(None, lambda: LocalPipeline(model_path, cuts))
    engine = pipe.engine(**kwargs)
    await engine.start()
    return engine
