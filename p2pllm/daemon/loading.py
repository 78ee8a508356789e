"""Data plane, loading: one layer range's stage built on the compute thread, with its progress
(for health replies) and the last one built (a later proposal with the same range reuses it)."""

from __future__ import annotations

import logging
import os
import time

from ..model.backends import ggml_lib as gl
from ..model.spec import ModelSpec
from ..runtime.compute_lane import ComputeLane
from ..wording import counted

log = logging.getLogger(__package__)  # "p2pllm.daemon": one logger for the whole peer


class StageLoader:
    def __init__(self, model, spec: ModelSpec, backend: str, device: str, kv_dtype: str, context: int,
                 threads: int, tokenizer, compute: ComputeLane, explicit_threads: bool = False):
        self.model = model
        self.spec = spec
        self.backend = backend
        self.device = device
        self.kv_dtype = kv_dtype
        self.context = context
        self.threads = threads
        self.explicit_threads = explicit_threads  # --threads given: every stage uses it
        self.tokenizer = tokenizer
        self.compute = compute
        self.loaded: tuple[tuple[int, int], object] | None = None  # ((start, end), Stage) reusable across epochs
        self.load_progress = 0.0
        self.load_seconds = 0.0

    def reusable(self, rng: tuple[int, int], current):
        """A stage for `rng` already here (None: it must be loaded)."""
        if current is not None and (current.start, current.end) == rng:
            return current  # the range this peer serves now (a later proposal may have loaded another)
        if self.loaded is not None and self.loaded[0] == rng:
            return self.loaded[1]
        return None

    def stage_threads(self, rng: tuple[int, int]) -> int:
        """A GGUF stage holding the whole model computes with every core: no other stage of the
        ring waits on this machine's event loop, and one SmolLM2 daemon on 2 cores decoded 116
        tok/s with 2 threads against 89 with 1 (docs/architecture.md, "Threads"). A stage of a
        longer ring leaves a core to the loop that passes the ring's frames. --threads decides alone."""
        if self.explicit_threads or rng != (0, self.spec.n_layers):
            return self.threads
        return max(self.threads, os.cpu_count() or 1)

    async def load(self, rng: tuple[int, int], shared=None):
        """A stage for `rng`; `shared` (layers_to_share of the stage this peer served): the layers
        it already holds are taken from there, and only the others are read."""
        self.load_progress = 0.0
        kept = f" (keeping layers [{shared.layers[0]}, {shared.layers[-1] + 1}) it holds)" if shared else ""
        log.info("loading layers [%d, %d) of %d%s", rng[0], rng[1], self.spec.n_layers, kept)

        shown = [time.monotonic()]

        def progress(done: int, total: int) -> None:
            self.load_progress = done / max(total, 1)
            if time.monotonic() - shown[0] >= 2.0 and done < total:  # a long load says how far it is
                shown[0] = time.monotonic()
                log.info("loading layers [%d, %d): %.0f%%", rng[0], rng[1], 100 * self.load_progress)

        def build():
            from ..model.backends import open_stage
            from ..runtime.stage import Stage

            return Stage(open_stage(self.model, rng[0], rng[1], spec=self.spec, backend=self.backend,
                                    device=self.device, kv_dtype=self.kv_dtype, max_context=self.context,
                                    threads=threads, progress=progress, shared=shared), self.tokenizer)

        threads = self.stage_threads(rng)
        t0 = time.monotonic()
        stage = await self.compute.run(build)
        self.loaded = (rng, stage)
        self.load_progress = 1.0
        self.load_seconds = time.monotonic() - t0
        backend = stage.backend
        read = getattr(backend, "loaded_bytes", backend.weight_bytes)
        kernels = f"ggml {gl.version()} backend, {counted(backend.threads, 'thread')}" if backend.name == "ggml" \
            else f"{backend.name} backend"
        log.info("loaded layers [%d, %d) in %.1fs (%s, %.0f MiB of weights, %.0f MiB of them read now, "
                 "KV %s)", rng[0], rng[1], self.load_seconds, kernels, backend.weight_bytes / 2**20,
                 read / 2**20, stage.kv.format.name)
        return stage
