"""The head: admission, continuous batching, chunked prefill, micro-batches in flight.

The scheduler only decides which sequences go into which micro-batch and what their results
mean; a Ring executes micro-batches (in-process stages, or the gRPC ring of a cluster). Up to
`micro_batches` are in flight at once so that every stage has work; a sequence is in at most one.
An embedding input is a sequence too, prefilled like a prompt and batched with the others; its
answer is a vector instead of tokens.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Protocol

import torch

from ..model.grammar import GRAMMAR_DEAD_END, NO_TOKEN
from ..model.sampling import Sampled
from ..model.tokenizer import Tokenizer
from ..wording import counted
from .api import (MAX_CHOICES, MAX_EMBED_INPUTS, MAX_EMBED_TOKENS, EngineError, EngineStats, GenerationRequest,
                  TokenEvent)
from .frames import Chunk, MicroBatch, Pooled, SeqStart
from .prefix_cache import PrefixCache
from .timeline import mark

log = logging.getLogger(__name__)


class Ring(Protocol):
    n_stages: int
    epoch: int

    async def run(self, mb: MicroBatch) -> list[Sampled | Pooled]:
        """Execute one micro-batch through every stage; one answer per chunk with `sample`: a
        sampled token, or an embedding sequence's vector."""
        ...


class RingUnavailable(Exception):
    """The ring cannot take work now (no committed plan, a stage lost); the text says why."""


class RingRetry(RingUnavailable):
    """A stage refused a micro-batch (most often one not yet switched to this epoch): send it again."""


# the head (the coordinator) stops taking requests while it drains; every gateway relays this
DRAINING = "the coordinator is shutting down and takes no new requests; another peer takes over in a few seconds"
MAX_QUEUED = 256  # requests waiting for admission; one more is answered 429 (Retry-After)
MAX_RETRIES = 100  # micro-batches of one sequence refused as RingRetry before it fails (~10 s)
RETRY_DELAY = 0.1


@dataclass
class _Seq:
    req: GenerationRequest
    seq_id: int
    tokens: list[int]
    decoder: object
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    pos: int = 0  # tokens whose KV every stage holds
    generated: int = 0
    held: str = ""  # text held back while it may be the start of a stop string
    started: bool = False
    in_flight: bool = False
    done: bool = False
    admitted_at: float = field(default_factory=time.monotonic)
    embedding: asyncio.Future | None = None  # an embedding input: its vector (no tokens, no events)
    index: int = 0  # which choice of its request (n > 1); choices share one events queue
    fork_of: "_Seq | None" = None  # a choice waiting to start as a copy of this one's prompt KV
    pending_forks: int = 0  # choices still waiting to copy this one's prompt KV
    retries: int = 0  # its micro-batches refused by a stage not yet on the epoch
    fork_src: tuple[int, int] | None = None  # (sequence, positions) its start copies, kept for a resend
    cached: int = 0  # prompt positions copied from the prefix cache instead of computed
    reason: str | None = None  # how it finished
    request: int = -1  # the first sequence of its request (its choices, its embedding inputs share it)

    def __post_init__(self) -> None:
        if self.request < 0:
            self.request = self.seq_id


class Scheduler:
    def __init__(self, ring: Ring, tokenizer: Tokenizer, *, model_name: str, context: int,
                 micro_batches: int | None = None, prefill_chunk: int = 256, token_budget: int = 512,
                 max_running: int = 64, vocab: int | None = None, max_queued: int = MAX_QUEUED,
                 prefix_cache: int = 0):
        self.ring = ring
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.context = context
        self.micro_batches = micro_batches
        self.prefill_chunk = prefill_chunk
        self.token_budget = max(token_budget, prefill_chunk)
        self.max_running = max_running
        self.max_queued = max_queued
        # KV positions every stage can hold for all sequences together (None: not bounded): a
        # sequence starts only when its whole capacity (prompt + max_tokens) fits beside the others'
        self.kv_budget: int | None = None
        self.tokens_generated = 0  # every sequence's, since start: the dashboard's tokens/s is its rate
        self.vocab = vocab or tokenizer.vocab_size
        self._seqs: dict[int, _Seq] = {}
        self._ids = itertools.count(1)
        self._mb_ids = itertools.count(1)
        self._to_free: list[int] = []
        self._to_retain: list[int] = []
        # positions of ended sequences whose free (or keep) has not been sent yet: a stage runs a
        # micro-batch's starts before its frees, so their room is not free for the one that sends them
        self._freeing: dict[int, int] = {}
        # finished sequences whose KV the stages keep for prompts that start alike (0 positions: off)
        self.prefix_cache = PrefixCache(prefix_cache) if prefix_cache > 0 else None
        self._in_flight: set[asyncio.Task] = set()
        self._held: list[tuple[asyncio.Queue, TokenEvent]] | None = None  # see _run
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self.ready = True
        # plan changes: while paused no micro-batch starts; sequences whose micro-batch failed are
        # parked at their last confirmed position and resume (or replay) on the new plan
        self.paused: str | None = None
        self.unavailable: str | None = None  # why new requests get a 503 (e.g. survivors too small)
        self.resume_timeout = 60.0
        self._pause_timer: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="scheduler")

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        for task in list(self._in_flight):
            task.cancel()
        await asyncio.gather(*self._in_flight, return_exceptions=True)
        for seq in list(self._seqs.values()):
            self._finish(seq, "error", error="the engine is shutting down")

    @property
    def max_in_flight(self) -> int:
        return max(1, self.micro_batches or self.ring.n_stages)

    def queued(self) -> int:
        return sum(1 for s in self._seqs.values() if not s.started and not s.done)

    def kv_need(self, req: GenerationRequest) -> int:
        """KV positions a request's sequence may grow to: what admission counts against kv_budget."""
        return min(self.context, len(req.prompt_ids) + req.max_tokens)

    def kv_reserved(self) -> int:
        return sum(self.kv_need(s.req) for s in self._seqs.values() if s.started)

    def _kv_held(self) -> int:
        """What admission counts: the room of running sequences (and of the choices still to copy
        their prompt from one of them) and the prefix cache's positions."""
        waiting = sum(self.kv_need(s.req) * s.pending_forks for s in self._seqs.values() if s.started and not s.done)
        return self.kv_reserved() + waiting + (self.prefix_cache.tokens if self.prefix_cache else 0)

    def stats(self) -> EngineStats:
        running = sum(1 for s in self._seqs.values() if s.started and not s.done)
        queued = self.queued()
        extra = {"in_flight": len(self._in_flight), "active_sequences": len(self._seqs),
                 "kv_reserved_tokens": self.kv_reserved(), "tokens_generated": self.tokens_generated}
        if self.kv_budget is not None:
            extra["kv_budget_tokens"] = self.kv_budget
        if self.prefix_cache is not None:
            extra.update(self.prefix_cache.stats())
        return EngineStats(queued=queued, running=running, stages=self.ring.n_stages, epoch=self.ring.epoch,
                           extra=extra)

    # ------------------------------------------------------------------ requests
    async def generate(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]:
        n_prompt = len(req.prompt_ids)
        if n_prompt == 0:
            raise EngineError("the prompt is empty")
        if n_prompt >= self.context:
            raise EngineError(
                f"This model's maximum context length is {self.context} tokens; the prompt has {n_prompt} tokens.",
                code="context_length_exceeded",
            )
        if not 0 <= min(req.prompt_ids) <= max(req.prompt_ids) < self.vocab:
            raise EngineError(f"prompt token ids must be between 0 and {self.vocab - 1}")
        if req.max_tokens < 1:
            raise EngineError(f"max_tokens must be at least 1, got {req.max_tokens}")
        if n_prompt + req.max_tokens > self.context:
            raise EngineError(
                f"This model's maximum context length is {self.context} tokens; the prompt ({n_prompt}) plus "
                f"max_tokens ({req.max_tokens}) exceeds it.",
                code="context_length_exceeded",
            )
        if not self.ready or self.unavailable:
            raise EngineError(self.unavailable or DRAINING, status=503,
                              code="service_unavailable")
        if not 1 <= req.n <= MAX_CHOICES:
            raise EngineError(f"n must be between 1 and {MAX_CHOICES}, got {req.n}")
        need = self.kv_need(req)
        if self.kv_budget is not None and need > self.kv_budget:
            raise EngineError(f"the cluster's KV cache holds {self.kv_budget} tokens; the prompt ({n_prompt}) plus "
                              f"max_tokens ({req.max_tokens}) needs {need}", code="context_length_exceeded")
        waiting = self.queued()
        if waiting + req.n > self.max_queued:
            raise EngineError(f"{waiting} requests are waiting already (at most {self.max_queued}); try again "
                              "in a moment", status=429, code="rate_limit_exceeded")
        # continuation: the text follows the prompt, so a leading space of the first token is kept
        first = _Seq(req, next(self._ids), list(req.prompt_ids), self.tokenizer.stream_decoder(continuation=True))
        group = [first]
        for i in range(1, req.n):  # more choices: they copy the prompt's KV once `first` computed it
            sampling = req.sampling if req.sampling.seed is None else \
                replace(req.sampling, seed=(req.sampling.seed + i) % 2**63)  # seeded, yet each its own
            child = _Seq(replace(req, sampling=sampling), next(self._ids), list(req.prompt_ids),
                         self.tokenizer.stream_decoder(continuation=True), events=first.events, index=i,
                         request=first.seq_id,
                         fork_of=first if n_prompt > 1 else None)
            group.append(child)
        first.pending_forks = sum(1 for s in group if s.fork_of is not None)
        for seq in group:
            self._seqs[seq.seq_id] = seq
        self._wake.set()
        return self._events(group)

    async def _events(self, group: list[_Seq]) -> AsyncIterator[TokenEvent]:
        unfinished = len(group)
        try:
            while unfinished:
                event = await group[0].events.get()
                yield event
                unfinished -= event.finish_reason is not None
        finally:
            for seq in group:
                if not seq.done:  # the client went away: cancel, free its KV once it is not in flight
                    self._finish(seq, "cancelled")

    async def embed(self, inputs: list[list[int]], request_id: str = "embed") -> list[torch.Tensor]:
        """Each input's final hidden states after the final norm, mean-pooled over its tokens and
        L2-normalized (float32 [hidden] each). The inputs run as sequences like prompts, batched
        with whatever else runs; cancelling the call cancels those still running."""
        if not inputs:
            raise EngineError("there are no inputs to embed")
        if len(inputs) > MAX_EMBED_INPUTS:
            raise EngineError(f"{len(inputs)} inputs; at most {MAX_EMBED_INPUTS} may be embedded at once")
        if sum(map(len, inputs)) > MAX_EMBED_TOKENS:
            raise EngineError(f"the inputs have {sum(map(len, inputs))} tokens; at most {MAX_EMBED_TOKENS} may be "
                              "embedded at once")
        for i, ids in enumerate(inputs):
            if not ids:
                raise EngineError(f"input {i} is empty")
            if len(ids) > self.context:
                raise EngineError(f"This model's maximum context length is {self.context} tokens; input {i} has "
                                  f"{len(ids)} tokens.", code="context_length_exceeded")
            if not 0 <= min(ids) <= max(ids) < self.vocab:
                raise EngineError(f"input {i}: token ids must be between 0 and {self.vocab - 1}")
        if not self.ready or self.unavailable:
            raise EngineError(self.unavailable or DRAINING, status=503,
                              code="service_unavailable")
        loop = asyncio.get_running_loop()
        first = next(self._ids)
        seqs = [_Seq(GenerationRequest(request_id, list(ids), 0), first if i == 0 else next(self._ids), list(ids),
                     None, embedding=loop.create_future(), request=first) for i, ids in enumerate(inputs)]
        for seq in seqs:
            self._seqs[seq.seq_id] = seq
        self._wake.set()
        try:
            return list(await asyncio.gather(*(seq.embedding for seq in seqs)))
        finally:
            for seq in seqs:  # the caller left, or another input failed: the rest need not run
                self._finish(seq, "cancelled")

    # ------------------------------------------------------------------ the loop
    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._launch()

    def _launch(self) -> None:
        """Start micro-batches while a slot is free and a sequence is ready."""
        while not self.paused and len(self._in_flight) < self.max_in_flight:
            mb = self._build()
            if mb is None:
                break
            task = asyncio.create_task(self._run(mb))
            self._in_flight.add(task)
            self._idle.clear()
            task.add_done_callback(self._landed)

    def _landed(self, task: asyncio.Task) -> None:
        self._in_flight.discard(task)
        if not self._in_flight:
            self._idle.set()
        self._wake.set()  # a slot is free

    # ------------------------------------------------------------------ plan changes
    def pause(self, reason: str) -> None:
        """Start no micro-batch until resume(); parked sequences fail after resume_timeout."""
        if self.paused is None:
            log.info("pausing the ring: %s", reason)
            self._pause_timer = asyncio.get_running_loop().call_later(self.resume_timeout, self._give_up)
        self.paused = reason

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) for the micro-batches in flight to land."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("%d micro-batches still in flight after %.0fs", len(self._in_flight), timeout)

    def resume_points(self) -> list[tuple[int, int]]:
        """(sequence, positions whose KV every stage holds) of every sequence to carry over (not
        embeddings: they start again from position 0)."""
        return [(s.seq_id, s.pos) for s in self._seqs.values()
                if s.started and not s.done and not s.in_flight and s.embedding is None]

    def resume(self, epoch_note: str, rebuilt: dict[int, int]) -> None:
        """The new plan is committed: each carried-over sequence goes on from the positions every
        stage rebuilt (`rebuilt`); the tokens after that are computed again (all, at worst)."""
        replayed = 0
        for seq in self._seqs.values():
            if seq.done or not seq.started:
                continue
            # an embedding's pooled sum lived on the old last stage: it is computed again from its start
            pos = 0 if seq.embedding is not None else min(seq.pos, rebuilt.get(seq.seq_id, 0))
            replayed += pos < seq.pos
            seq.pos = pos
            seq.fork_src = None  # its KV is rebuilt (or replayed) like any sequence's, never copied again
            seq.started = False  # announce it again: the new last stage needs its sampler
        if self.prefix_cache is not None:  # the new stages do not hold its KV (a kept stage frees it)
            self._to_free.extend(self.prefix_cache.clear())
        if self._pause_timer is not None:
            self._pause_timer.cancel()
            self._pause_timer = None
        log.info("resuming the ring on %s (%s some tokens)", epoch_note,
                 counted(replayed, "sequence recomputes", "sequences recompute"))
        self.paused = None
        self.unavailable = None
        self._wake.set()

    def _give_up(self) -> None:
        reason = self.paused or "the ring was paused too long"
        log.warning("no new plan within %.0fs: failing the parked requests (%s)", self.resume_timeout, reason)
        self.fail_parked(f"the cluster could not recover in time: {reason}")

    def fail_parked(self, reason: str) -> None:
        """End every parked or queued sequence with a clear error (the cluster cannot carry them on)."""
        for seq in list(self._seqs.values()):
            if not seq.in_flight:
                self._finish(seq, "error", error=reason)

    def _build(self) -> MicroBatch | None:
        ready = [s for s in self._seqs.values() if not s.done and not s.in_flight]
        # a started choice's siblings still to copy its prompt count as running: they start without
        # a place of their own (admitting them separately deadlocked: first choices filled the
        # budget, each waiting for siblings that could not be admitted)
        running = sum(1 + s.pending_forks for s in self._seqs.values() if s.started and not s.done)
        freeing = sum(self._freeing.get(s, 0) for s in (*self._to_free, *self._to_retain))
        reserved, admitting = self._kv_held() + freeing, True
        # a fair share per micro-batch, so that every micro-batch in flight has work
        share = max(1, -(-sum(1 for s in self._seqs.values() if not s.done) // self.max_in_flight))
        chunks, tokens, starts, budget = [], [], [], self.token_budget
        for seq in _turns(ready):
            if len(chunks) >= share or budget <= 0:
                break
            if not seq.started:
                parent = seq.fork_of
                if parent is not None and parent.started and not parent.done:
                    # a choice of a request admitted with its first choice: its room and place are counted
                    if not self._may_start(seq, starts):
                        continue
                else:
                    group = 1 + seq.pending_forks  # a request's choices are admitted together
                    need = self.kv_need(seq.req) * group
                    if admitting and self.kv_budget is not None and reserved + need > self.kv_budget:
                        reserved -= self._evict(reserved + need - self.kv_budget)  # the cache gives way first
                    # first come, first served: once one does not fit, later ones wait too
                    admitting = admitting and (self.kv_budget is None or (running == 0 and not freeing)
                                               or reserved + need <= self.kv_budget)
                    if not admitting or (running and running + group > self.max_running) \
                            or not self._may_start(seq, starts):
                        continue
                    running += group
                    reserved += need
                seq.started = True
                self._reuse_prefix(seq)
                capacity = min(self.context, len(seq.tokens) + seq.req.max_tokens)
                generated = tuple(seq.tokens[len(seq.req.prompt_ids):]) if seq.req.sampling.adjusts_logits else ()
                fork = self._fork(seq)
                starts.append(SeqStart(seq.seq_id, capacity, seq.req.sampling, generated,
                                       embed=seq.embedding is not None, fork_of=fork[0], fork_len=fork[1]))
            length = min(len(seq.tokens) - seq.pos, self.prefill_chunk, budget)
            if seq.pending_forks:  # its prompt's last position waits until every choice copied the rest
                length = min(length, len(seq.req.prompt_ids) - 1 - seq.pos)
            if length <= 0:
                continue
            chunks.append(Chunk(seq.seq_id, seq.pos, length, sample=seq.pos + length == len(seq.tokens)))
            tokens.extend(seq.tokens[seq.pos: seq.pos + length])
            seq.in_flight = True
            budget -= length
        finished, self._to_free = self._to_free, []
        retained, self._to_retain = self._to_retain, []
        for s in (*finished, *retained):  # the next micro-batch's starts come after these frees
            self._freeing.pop(s, None)
        if not chunks and not finished and not starts and not retained:
            return None
        return MicroBatch(self.ring.epoch, next(self._mb_ids), chunks, tokens, starts, finished, retained)

    def _may_start(self, seq: _Seq, starting: list[SeqStart]) -> bool:
        """A choice that copies another's prompt starts once every stage holds that prompt but its
        last position (then it computes that position itself, and samples its own first token), and
        not in the micro-batch that starts the other (a stage checks a copy's source before it runs
        the frame's starts; a prompt found in the prefix cache is held from its start on)."""
        parent = seq.fork_of
        if parent is None:
            return True
        if parent.done:  # cancelled or failed before the copy: this choice cannot copy any more
            seq.fork_of = None
            parent.pending_forks -= 1
            return True
        return (parent.started and not parent.in_flight and parent.pos >= len(parent.req.prompt_ids) - 1
                and all(s.seq_id != parent.seq_id for s in starting))

    def _fork(self, seq: _Seq) -> tuple[int | None, int]:
        """(sequence to copy, positions) for a choice that starts now; (None, 0) for any other."""
        parent, seq.fork_of = seq.fork_of, None
        if parent is not None:
            parent.pending_forks -= 1
            seq.pos = len(parent.req.prompt_ids) - 1
            seq.fork_src = (parent.seq_id, seq.pos)
        return seq.fork_src or (None, 0)

    async def _run(self, mb: MicroBatch) -> None:
        try:
            answers = await self.ring.run(mb)
            mark("answers")
            if len(answers) != mb.n_sampled:
                raise RingUnavailable(f"the ring returned {len(answers)} answers for {mb.n_sampled} sequences")
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # a plan change, or a stage not yet on this epoch: park at the last confirmed position
            parked = self.paused is not None or isinstance(e, RingRetry)
            log.warning("micro-batch %d %s: %s", mb.mb_id, "parked" if parked else "failed", e)
            for c in mb.chunks:
                seq = self._seqs.get(c.seq_id)
                if seq is None:
                    continue
                seq.in_flight = False
                seq.retries += isinstance(e, RingRetry)
                if seq.done:
                    self._release(seq)
                elif not parked or seq.retries > MAX_RETRIES:  # else it fails with the reason
                    self._finish(seq, "error", error=str(e) or type(e).__name__)
            if parked:  # the frees (and keeps) it carried must travel again
                self._to_free.extend(mb.finished)
                self._to_retain.extend(mb.retained)
            if isinstance(e, RingRetry) and self.paused is None:  # try again in a moment
                for s in mb.starts:  # its starts must travel again too
                    if s.seq_id in self._seqs:
                        self._seqs[s.seq_id].started = False
                asyncio.get_running_loop().call_later(RETRY_DELAY, self._wake.set)
            else:
                self._wake.set()
            return
        # the next micro-batch leaves before the tokens go to their clients: writing to a client's
        # stream waits until the frame is on its way (ClusterRing.run lets them go first where the
        # step is computed right here)
        self._held = []
        try:
            self._take(mb, answers)
            self._in_flight.discard(asyncio.current_task())
            self._launch()
        finally:
            held, self._held = self._held, None
            for events, event in held:
                events.put_nowait(event)
            self._wake.set()

    def _take(self, mb: MicroBatch, answers: list[Sampled | Pooled]) -> None:
        """A micro-batch's answers: sequences move on, tokens become events, embeddings results."""
        results = iter(answers)
        for c in mb.chunks:
            seq = self._seqs.get(c.seq_id)
            answer = next(results) if c.sample else None
            if seq is None:
                continue
            seq.in_flight = False
            if seq.done:  # cancelled while in flight: its KV can go now
                self._release(seq)
                continue
            seq.pos += c.length
            if answer is None:
                continue
            if isinstance(answer, Pooled) != (seq.embedding is not None):
                self._finish(seq, "error", error=f"the last stage answered sequence {seq.seq_id} with "
                                                 f"{'a vector' if isinstance(answer, Pooled) else 'a token'}")
            elif isinstance(answer, Pooled):
                seq.embedding.set_result(answer.vector)
                self._finish(seq, "stop")
            else:
                self._accept(seq, answer)

    # ------------------------------------------------------------------ tokens -> events
    def _accept(self, seq: _Seq, sampled: Sampled) -> None:
        req, tok = seq.req, sampled.token
        if tok == NO_TOKEN:
            self._finish(seq, "error", error=GRAMMAR_DEAD_END)
            return
        logprobs = dict(logprob=sampled.logprob, top=sampled.top)
        if tok in self.tokenizer.eos_ids and not req.ignore_eos:
            self._finish(seq, "stop")
            return
        seq.tokens.append(tok)
        seq.generated += 1
        self.tokens_generated += 1
        text = seq.held + seq.decoder.push(tok)
        cut = _first_stop(text, req.stop)
        if cut is not None:
            self._emit(seq, TokenEvent(tok, text[:cut], **logprobs, index=seq.index))
            self._finish(seq, "stop", flush=False)  # nothing after a stop string is returned
            return
        keep = _stop_prefix_len(text, req.stop)
        seq.held = text[len(text) - keep:] if keep else ""
        self._emit(seq, TokenEvent(tok, text[: len(text) - keep], **logprobs, index=seq.index))
        if seq.generated >= req.max_tokens or len(seq.tokens) >= self.context:
            self._finish(seq, "length")

    def _emit(self, seq: _Seq, event: TokenEvent) -> None:
        """An event for the sequence's client; held while a landed micro-batch's answers are taken
        and the next micro-batch starts."""
        if self._held is not None:
            self._held.append((seq.events, event))
        else:
            seq.events.put_nowait(event)

    def _finish(self, seq: _Seq, reason: str, error: str | None = None, flush: bool = True) -> None:
        if seq.done:
            return
        seq.done = True
        seq.reason = reason
        if seq.embedding is not None:
            if reason == "error" and not seq.embedding.done():
                seq.embedding.set_exception(EngineError(f"Embedding failed: {error or 'unknown engine error'}",
                                                        status=503, code="engine_error"))
            seq.embedding.cancel()  # (a no-op once its vector or error is set)
        else:
            tail = seq.held + seq.decoder.flush() if flush and reason in ("stop", "length") else ""
            seq.held = ""
            self._emit(seq, TokenEvent(None, tail, reason, error, index=seq.index, cached_tokens=seq.cached))
        if not seq.in_flight:
            self._release(seq)
        self._wake.set()

    def _release(self, seq: _Seq) -> None:
        self._seqs.pop(seq.seq_id, None)
        if not seq.started:
            return
        self._freeing[seq.seq_id] = self.kv_need(seq.req)
        cache = self.prefix_cache
        # a failed sequence's KV may be half-written; an embedding input is seldom the start of a prompt
        if cache is None or seq.reason == "error" or seq.embedding is not None or self.paused:
            self._to_free.append(seq.seq_id)
            return
        freed = cache.add(seq.seq_id, seq.tokens[:seq.pos], pinned=self._pinned())
        self._to_free.extend(freed)
        if seq.seq_id not in freed:
            self._to_retain.append(seq.seq_id)

    # ------------------------------------------------------------------ the prefix cache
    def _pinned(self) -> set[int]:
        """Kept sequences that a live sequence's start copies (a resent start copies again)."""
        return {s.fork_src[0] for s in self._seqs.values() if s.fork_src is not None}

    def _evict(self, tokens: int) -> int:
        """Free at least `tokens` cached positions for admission, if the cache holds them; how many went."""
        if self.prefix_cache is None:
            return 0
        before = self.prefix_cache.tokens
        self._to_free.extend(self.prefix_cache.evict(tokens, pinned=self._pinned()))
        return before - self.prefix_cache.tokens

    def _reuse_prefix(self, seq: _Seq) -> None:
        """A sequence starting from nothing begins as a copy of the kept KV its prompt starts with."""
        if (self.prefix_cache is None or seq.pos or seq.fork_of is not None or seq.fork_src is not None
                or seq.embedding is not None):
            return
        source, n = self.prefix_cache.match(seq.tokens)
        if source is not None:
            seq.pos, seq.fork_src = n, (source, n)
            seq.cached = seq.cached or n  # (a replay after a plan change reports its first start's)


def _turns(ready: list[_Seq]) -> list[_Seq]:
    """The order in which sequences get room in a micro-batch: decodes first, oldest first; then
    prompts and embedding inputs taking turns by request (every request's first waiting sequence
    before any request's second), in order of arrival. So one request of many sequences (an
    embeddings batch of long inputs, n choices) does not hold back the prompt of a chat that came
    after it for the whole of its prefill, as first come first served would."""
    decoding = sorted((s for s in ready if s.pos >= len(s.req.prompt_ids)), key=lambda s: s.admitted_at)
    turn: dict[int, int] = {}
    prompts = []
    for s in sorted((s for s in ready if s.pos < len(s.req.prompt_ids)), key=lambda s: (s.admitted_at, s.seq_id)):
        turn[s.request] = turn.get(s.request, -1) + 1
        prompts.append((turn[s.request], s.admitted_at, s.seq_id, s))
    return decoding + [s for *_, s in sorted(prompts, key=lambda t: t[:3])]


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that could begin a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
