"""One completion's life: tokenize the checked request, submit it to the engine, answer as it goes.

The engine is whatever the app was given (on a peer that is not the coordinator, a ClusterEngine
that relays to the coordinator over gRPC); this module only sees `generate` and `TokenEvent`s.
While a request runs its HTTP connection is watched: a client that leaves closes the engine's
iterator, which cancels the sequence everywhere. How the answer looks on the wire is an `Answer`:
OpenAI's (server-sent events) here, Ollama's (NDJSON) in `ollama.py`; the loop is the same.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive

from ..errors import P2PError
from ..model.grammar import GRAMMAR_DEAD_END
from ..runtime.api import Engine, EngineError, GenerationRequest, TokenEvent
from .history import record_of
from .metrics import GatewayMetrics
from .responses import CLIENT_GONE, JSON, CompletionShape, EventStream, sse, usage
from .schema import ApiError, CompletionRequest, bad
from .tools import interpret, render_inputs

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
_TEXT_IN_THREAD = 16_384  # characters: longer prompts are tokenized off the event loop
_MESSAGES_IN_THREAD = 256  # ... and so are longer conversations (rendering 100k messages took seconds)


class Answer(ABC):
    """How one completion's answer goes on the wire: the whole answer, or the pieces of a stream
    (OpenAI's here, Ollama's in ollama.py)."""

    cid: str  # the request's id, given to the engine and named in log lines
    media_type: str  # of a streamed answer

    @abstractmethod
    def whole(self, job: "Job", finish_reason: str) -> Response:
        ...

    def opening(self, job: "Job") -> Iterable[bytes]:
        """What a stream starts with, before the first piece of text."""
        return ()

    @abstractmethod
    def piece(self, job: "Job", text: str, index: int = 0) -> bytes:
        ...

    def choice_end(self, job: "Job", index: int, finish_reason: str) -> Iterable[bytes]:
        """The end of one choice of several (n > 1) while others go on."""
        return ()

    @abstractmethod
    def closing(self, job: "Job", finish_reason: str) -> Iterable[bytes]:
        """The end of a stream that finished with "stop" or "length" (its last choice's reason)."""
        ...

    @abstractmethod
    def failure(self, job: "Job", error: ApiError) -> Iterable[bytes]:
        """The end of a stream that failed after its first token."""
        ...


class OpenAIAnswer(Answer):
    """OpenAI's completion objects and chunks, streamed as server-sent events ending with [DONE]."""

    media_type = "text/event-stream; charset=utf-8"

    def __init__(self, shape: CompletionShape):
        self.shape = shape
        self.cid = shape.cid
        self.text_offsets: dict[int, int] = {}  # per choice: where the next streamed token starts (completions)

    def whole(self, job: "Job", finish_reason: str) -> Response:
        return JSON(self.shape.whole_choices([self.shape.choice(i, c.text, c.finish_reason, c.logprobs)
                                              for i, c in enumerate(job.choices)], job.usage()))

    def opening(self, job: "Job") -> Iterable[bytes]:
        return [sse(self.shape.chunk("", role=True, index=i)) for i in range(len(job.choices))] if self.shape.chat \
            else []

    def piece(self, job: "Job", text: str, index: int = 0) -> bytes:
        start = self.text_offsets.get(index, 0)
        chunk = self.shape.chunk(text, logprobs=job.unsent_logprobs(index), index=index, text_offset=start)
        lp = chunk["choices"][0]["logprobs"]
        if lp and not self.shape.chat:  # offsets into the whole choice's text, as the whole answer has them
            self.text_offsets[index] = start + sum(map(len, lp["tokens"]))  # (they restarted at 0 each chunk)
        return sse(chunk)

    def choice_end(self, job: "Job", index: int, finish_reason: str) -> Iterable[bytes]:
        return [sse(self.shape.chunk(None, finish_reason, index=index))]

    def closing(self, job: "Job", finish_reason: str) -> Iterable[bytes]:
        yield from self.choice_end(job, job.last_index, finish_reason)
        if self.shape.include_usage:
            yield sse(self.shape.usage_chunk(job.usage()))
        yield sse("[DONE]")

    def failure(self, job: "Job", error: ApiError) -> Iterable[bytes]:
        return [sse(error.body()), sse("[DONE]")]


class ToolAnswer(OpenAIAnswer):
    """A chat answer constrained to the tool-call format (gateway/tools.py): it is read as a whole
    when it ends, then sent as OpenAI's `tool_calls` or as content; streamed, it arrives in one
    delta at the end (the JSON means nothing to a client before it is complete)."""

    def whole(self, job: "Job", finish_reason: str) -> Response:
        choices = []
        for i, c in enumerate(job.choices):
            content, calls = interpret(c.text)
            choices.append(self.shape.choice(i, content, "tool_calls" if calls else c.finish_reason, c.logprobs,
                                             calls))
        return JSON(self.shape.whole_choices(choices, job.usage()))

    def piece(self, job: "Job", text: str, index: int = 0) -> bytes:
        return b""

    def choice_end(self, job: "Job", index: int, finish_reason: str) -> Iterable[bytes]:
        content, calls = interpret(job.choices[index].text)
        yield sse(self.shape.chunk(content, logprobs=job.unsent_logprobs(index), tool_calls=calls, index=index))
        yield sse(self.shape.chunk(None, "tool_calls" if calls else finish_reason, index=index))


async def complete(engine: Engine, metrics: GatewayMetrics, request: Request, req: CompletionRequest,
                   arrived: float, answer: Answer | None = None,
                   on_done: Callable[[str], None] | None = None) -> Response | ASGIApp:
    """The answer to a checked request: a JSON body, or a stream once the first token is in.

    `answer`: the wire format (default: OpenAI's, for /v1/chat/completions and /v1/completions).
    `on_done`: told how a stream ended (Job.stream_outcome) once it has.
    """
    prompt_ids = await _prompt_ids(engine, req)
    if not prompt_ids:
        raise bad("The prompt is empty.", req.prompt_param, "empty_prompt")
    max_tokens = _max_tokens(engine, req, len(prompt_ids))
    if answer is None:
        answer = openai_answer(engine, req)
    submitted = time.perf_counter()
    try:
        started = engine.generate(GenerationRequest(answer.cid, prompt_ids, max_tokens, req.sampling, req.stop,
                                                    req.ignore_eos, n=req.n))
        it = await started if inspect.isawaitable(started) else started
    except EngineError as e:
        raise _refused(e, req) from None
    job = Job(metrics, request, it, answer, n_prompt=len(prompt_ids), arrived=arrived, submitted=submitted,
              n=req.n)
    metrics.prompt_tokens.inc(len(prompt_ids))
    try:
        first = await job.next()
    except EngineError as e:  # engines may refuse on the first step instead of at submission
        await job.close()
        raise _refused(e, req) from None
    except BaseException:
        await job.close()
        raise
    if first is None:
        await job.close()
        return Response(status_code=CLIENT_GONE)
    if first.finish_reason is not None and first.finish_reason not in ("stop", "length") and not job.any_text:
        await job.close()
        raise _failure(first)
    if req.stream:
        job.on_done = on_done
        return EventStream(job.events(first), media_type=answer.media_type)
    return await job.whole(first)


async def fits_the_context(engine: Engine, req: CompletionRequest) -> bool:
    """Whether the request's prompt and max_tokens fit the context, as the engine will check (a 400
    for a conversation the template refuses or a window with no room, as `complete` raises)."""
    prompt_ids = await _prompt_ids(engine, req)
    return bool(prompt_ids) and len(prompt_ids) + _max_tokens(engine, req, len(prompt_ids)) <= engine.context


def openai_answer(engine: Engine, req: CompletionRequest) -> Answer:
    """OpenAI's wire format for a /v1 request, with a fresh id: tool calls when it offers tools."""
    kind = ToolAnswer if req.tools is not None and req.tools.constrained else OpenAIAnswer
    return kind(CompletionShape(("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex, engine.model_name,
                                req.chat, req.include_usage,
                                tokenizer=engine.tokenizer if req.sampling.top_logprobs is not None else None))


def _max_tokens(engine: Engine, req: CompletionRequest, n_prompt: int) -> int:
    if req.window is None:  # OpenAI: prompt + max_tokens must fit (else the engine's 400)
        if req.max_tokens is not None:
            return req.max_tokens
        return max(1, min(DEFAULT_MAX_TOKENS, engine.context - n_prompt))
    window = min(req.window, engine.context)  # Ollama: as many as fit in the window, at most max_tokens
    room = window - n_prompt
    if room < 1:
        raise ApiError(400, f"The prompt has {n_prompt} tokens, which leaves no room in the context window of "
                            f"{window} tokens (options.num_ctx, at most {engine.context}); prompts are not "
                            f"truncated.", param=req.prompt_param, code="context_length_exceeded")
    return room if req.max_tokens is None else min(req.max_tokens, room)


_LONGEST_TOKEN: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()


def longest_token(tok: Any) -> int | None:
    """The most bytes one token of `tok` stands for (None when the tokenizer cannot say): a text of
    C characters is at least C / that many tokens."""
    try:
        longest = _LONGEST_TOKEN.get(tok)
        if longest is None:
            longest = _LONGEST_TOKEN[tok] = max(1, max(len(tok.token_bytes(i)) for i in range(tok.vocab_size)))
        return longest
    except (AttributeError, TypeError, ValueError):
        return None


def refuse_text_beyond_context(engine: Engine, chars: int, param: str, what: str = "the prompt") -> None:
    """A 400 context_length_exceeded, before tokenizing, for text that cannot fit the context
    whatever its tokens: the Hugging Face tokenizer holds the GIL while it encodes (1.5 s for a
    4 MB body), which stalled the whole daemon (its event loop, the peers' heartbeats) only to
    count tokens the engine then refused."""
    if chars <= engine.context:  # fits whatever the tokens (spares reading the vocabulary once)
        return
    longest = longest_token(engine.tokenizer)
    if longest is not None and chars // longest > engine.context:
        raise ApiError(400, f"This model's maximum context length is {engine.context} tokens; {what} has at least "
                            f"{chars // longest} tokens.", param=param, code="context_length_exceeded")


async def _prompt_ids(engine: Engine, req: CompletionRequest) -> list[int]:
    tok = engine.tokenizer
    if req.messages is not None:
        refuse_text_beyond_context(engine, sum(len(m["content"]) for m in req.messages), req.prompt_param)
        messages, extra = render_inputs(req.messages, req.tools, getattr(tok, "chat_template", None))
        encode = getattr(tok, "encode_chat", None)

        size = sum(len(m["content"]) for m in messages)
        big = size > _TEXT_IN_THREAD or len(messages) > _MESSAGES_IN_THREAD

        def render() -> list[int]:
            try:
                if big:  # many short messages render to a long text too: bounded before it is tokenized
                    text = tok.apply_chat_template(messages, add_generation_prompt=True, **extra)
                    refuse_text_beyond_context(engine, len(text), req.prompt_param)
                    if encode is None:
                        return tok.encode(text)
                if encode is not None:
                    return encode(messages, **extra)
                return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, **extra))
            except P2PError as e:  # the template refused the conversation (e.g. roles must alternate)
                raise bad(str(e), "messages", "invalid_messages") from None

        return await asyncio.to_thread(render) if big else render()
    if isinstance(req.prompt, str):
        refuse_text_beyond_context(engine, len(req.prompt), req.prompt_param)
        long = len(req.prompt) > _TEXT_IN_THREAD
        return await asyncio.to_thread(tok.encode, req.prompt) if long else tok.encode(req.prompt)
    return list(req.prompt or ())


def _refused(e: EngineError, req: CompletionRequest) -> ApiError:
    param = req.prompt_param if e.code == "context_length_exceeded" else None
    return ApiError(e.status, str(e), code=e.code, param=param)


def _failure(event: TokenEvent) -> ApiError:
    """A request that ended other than by "stop" or "length"."""
    if event.finish_reason == "error" and event.error == GRAMMAR_DEAD_END:  # the request's fault, not the engine's
        return ApiError(400, GRAMMAR_DEAD_END[0].upper() + GRAMMAR_DEAD_END[1:], code="invalid_value",
                        param="response_format")
    if event.finish_reason == "error":
        return ApiError(503, f"Generation failed: {event.error or 'unknown engine error'}", code="engine_error")
    return ApiError(503, f"The request was {event.finish_reason} by the server.", code="engine_error")


class _ClientWatch:
    """Notices the HTTP client going away while we wait on the engine."""

    def __init__(self, receive: Receive):
        self._gone = asyncio.ensure_future(self._watch(receive))

    @staticmethod
    async def _watch(receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    async def next(self, it: AsyncIterator) -> Any:
        """The iterator's next item; None when the client left first (StopAsyncIteration passes)."""
        if self._gone.done():
            return None
        step = asyncio.ensure_future(it.__anext__())
        try:
            await asyncio.wait({step, self._gone}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            step.cancel()
            raise
        if step.done():
            return step.result()
        step.cancel()
        await asyncio.gather(step, return_exceptions=True)
        return None

    def close(self) -> None:
        self._gone.cancel()


@dataclass
class Choice:
    """One choice of an answer as it comes in (a request has n)."""

    text: str = ""
    finish_reason: str | None = None
    logprobs: list = field(default_factory=list)  # (token, logprob, alternatives), when asked
    sent_logprobs: int = 0  # how many went out with streamed pieces


class Job:
    """One accepted request: iterates the engine, counts tokens and times them, shapes the answer."""

    def __init__(self, metrics: GatewayMetrics, request: Request, it: AsyncIterator[TokenEvent],
                 answer: Answer, *, n_prompt: int, arrived: float, submitted: float, n: int = 1):
        self.metrics = metrics
        self.it = it
        self.answer = answer
        self.n_prompt = n_prompt
        self.arrived = arrived  # perf_counter() when the request arrived
        self.submitted = submitted  # ... when it was handed to the engine
        self.request_id = request.scope.get("state", {}).get("request_id", answer.cid)
        self.watch = _ClientWatch(request.receive)
        self.n_tokens = 0  # of every choice
        self.cached_tokens = 0  # prompt tokens the prefix cache held (the engine says so at the end)
        self.choices = [Choice() for _ in range(n)]
        self.last_index = 0  # the choice of the latest event
        self.last_token_at: float | None = None
        self.first_token_at: float | None = None
        self.closed = False
        self.outcome = "unfinished"
        self.error: str | None = None  # why the engine ended it, when not by "stop" or "length"
        self.error_status = 0  # ... and the HTTP status that failure has (a 4xx: the request's own fault)
        self.on_done: Callable[[str], None] | None = None  # told a stream's stream_outcome() when it ends
        if (record := record_of(request)) is not None:
            record.job = self  # the request's history row is read from this Job when it ends

    async def next(self) -> TokenEvent | None:
        """The next event, None when the client left; a stream ending without a finish is an error."""
        try:
            event = await self.watch.next(self.it)
        except StopAsyncIteration:
            event = TokenEvent(None, "", "error", "the engine ended the request without a finish reason")
        if event is None:
            self.outcome = "client gone"
            return None
        if not 0 <= event.index < len(self.choices):
            event = TokenEvent(None, "", "error", f"the engine answered for choice {event.index}")
        choice = self.choices[event.index]
        self.last_index = event.index
        if event.token_id is not None:
            now = time.perf_counter()
            if self.last_token_at is None:
                self.first_token_at = now
                self.metrics.ttft.observe(now - self.arrived)
            else:
                self.metrics.itl.observe(now - self.last_token_at)
            self.last_token_at = now
            self.n_tokens += 1
            self.metrics.completion_tokens.inc()
            if event.logprob is not None:
                choice.logprobs.append((event.token_id, event.logprob, event.top))
        choice.text += event.text
        if event.finish_reason is not None:
            choice.finish_reason = event.finish_reason
            self.cached_tokens = max(self.cached_tokens, min(event.cached_tokens, self.n_prompt))
            if event.finish_reason not in ("stop", "length") or self.finished:
                self.outcome = event.finish_reason
            if event.finish_reason not in ("stop", "length"):
                failure = _failure(event)
                self.error, self.error_status = failure.message, failure.status
        return event

    @property
    def text(self) -> str:
        """The first choice's text (the only one, unless n > 1)."""
        return self.choices[0].text

    @property
    def logprobs(self) -> list:
        return self.choices[0].logprobs

    @property
    def any_text(self) -> bool:
        return any(c.text for c in self.choices)

    @property
    def finished(self) -> bool:
        """Every choice ended."""
        return all(c.finish_reason is not None for c in self.choices)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.watch.close()
        close = getattr(self.it, "aclose", None)
        if close is not None:
            try:
                await close()
            except Exception:
                log.debug("closing an engine iterator failed", exc_info=True)
        elapsed = time.perf_counter() - self.arrived
        ttft = f"{self.first_token_at - self.arrived:.3f}s" if self.first_token_at else "-"
        log.info("request %s (%s): %s after %d prompt + %d completion tokens, %.3fs, first token %s",
                 self.request_id, self.answer.cid, self.outcome, self.n_prompt, self.n_tokens, elapsed, ttft)

    def usage(self) -> dict:
        return usage(self.n_prompt, self.n_tokens, self.cached_tokens)

    def has_unsent_logprobs(self, index: int = 0) -> bool:
        c = self.choices[index]
        return len(c.logprobs) > c.sent_logprobs

    def unsent_logprobs(self, index: int = 0) -> list:
        """A choice's logprobs of the tokens since its last streamed piece (that piece's text is theirs)."""
        c = self.choices[index]
        out, c.sent_logprobs = c.logprobs[c.sent_logprobs:], len(c.logprobs)
        return out

    async def whole(self, first: TokenEvent) -> Response:
        try:
            event: TokenEvent | None = first
            while event is not None and event.finish_reason in (None, "stop", "length") and not self.finished:
                event = await self.next()
            if event is None:
                return Response(status_code=CLIENT_GONE)
        finally:
            await self.close()
        if event.finish_reason not in ("stop", "length"):
            raise _failure(event)
        return self.answer.whole(self, event.finish_reason)

    async def events(self, first: TokenEvent) -> AsyncIterator[bytes]:
        """The answer as a stream of pieces; a failure after the first token ends it with an error."""
        answer = self.answer
        try:
            for data in answer.opening(self):
                yield data
            event: TokenEvent | None = first
            while event is not None:
                if event.finish_reason is not None:
                    if event.finish_reason in ("stop", "length"):
                        # a token that was all stop string has no text, but the whole answer reports its
                        # logprob: it goes out with an empty piece, or the stream would lose it
                        if event.text or self.has_unsent_logprobs(event.index):
                            yield answer.piece(self, event.text, event.index)
                        if not self.finished:  # n > 1: this choice ended, others go on
                            for data in answer.choice_end(self, event.index, event.finish_reason):
                                yield data
                            event = await self.next()
                            continue
                        for data in answer.closing(self, event.finish_reason):
                            yield data
                    else:
                        for data in answer.failure(self, _failure(event)):
                            yield data
                    return
                if event.text:
                    yield answer.piece(self, event.text, event.index)
                event = await self.next()
        finally:
            await self.close()
            if self.on_done is not None:
                self.on_done(self.stream_outcome())

    def stream_outcome(self) -> str:
        """How a stream ended, as routing counts it: "ok", "broken" (the server failed it after its
        first token: the error event), "refused" (its own fault, e.g. a grammar no text can finish)
        or "client gone"."""
        if self.outcome in ("stop", "length"):
            return "ok"
        if self.outcome in ("client gone", "unfinished"):
            return "client gone"
        return "broken" if self.error_status >= 500 else "refused"
