"""The engine every peer's gateway talks to: the coordinator's scheduler, here or over gRPC.

On the coordinator a request goes straight to the local Scheduler; on any other peer it is
forwarded with the Generate RPC (the coordinator's gateway may listen on loopback only, the
peers' gRPC ports are what the cluster shares); embeddings likewise, with the Embed RPC.
Tokenizing happens on the receiving peer: every peer has the same model (fingerprint-checked).
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Callable

import grpc
import torch

from ..model.spec import ModelSpec
from ..model.tokenizer import Tokenizer
from ..proto import p2pllm_pb2 as pb
from ..transport.client import MAX_MESSAGE_BYTES, ClientPool
from ..transport.sampling_wire import sampling_fields, sampling_from
from ..transport.vectors import vectors_from, vectors_message
from ..transport.wire import WireError
from .api import MAX_EMBED_INPUTS, EngineError, EngineStats, GenerationRequest, TokenEvent
from .scheduler import Scheduler

log = logging.getLogger(__name__)


class ClusterEngine:
    def __init__(self, *, model_name: str, context: int, tokenizer: Tokenizer, clients: ClientPool,
                 local: Callable[[], Scheduler | None], coordinator_address: Callable[[], str | None],
                 not_ready: Callable[[], str], stats: Callable[[], EngineStats], spec: ModelSpec | None = None,
                 cluster_context: Callable[[], int | None] = lambda: None):
        self.model_name = model_name
        self.spec = spec  # what the model is (Ollama's /api/show, /api/tags describe it)
        self._own_context = context
        self._cluster_context = cluster_context
        self.tokenizer = tokenizer
        self._clients = clients
        self._local = local
        self._coordinator_address = coordinator_address
        self._not_ready = not_ready
        self._stats = stats
        # a daemon told to stop: `closing` refuses new requests (503) while the ones it forwards
        # finish; `stopping` ends those too, each with it as a clear error. Without them the
        # gateway's shutdown cut its streams after 5 s: a 200 truncated without an error.
        self.closing = ""
        self.stopping = ""
        self._calls: set = set()  # the Generate calls forwarded from here, while they run

    @property
    def context(self) -> int:
        """The context requests are checked against: the committed plan's (its coordinator's
        --context, which its scheduler enforces), else this peer's own."""
        return self._cluster_context() or self._own_context

    @property
    def ready(self) -> bool:
        return not self.not_ready_reason()

    def not_ready_reason(self) -> str:
        """Why requests get a 503 now ('' = they do not): /health says it too."""
        return self.stopping or self.closing or self._not_ready()

    def stats(self) -> EngineStats:
        return self._stats()

    def forwarding(self) -> int:
        """Requests this gateway forwarded to the coordinator that still run."""
        self._calls = {c for c in self._calls if not c.done()}
        return len(self._calls)

    async def generate(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]:
        reason = self.not_ready_reason()
        if reason:
            raise EngineError(reason, status=503, code="service_unavailable")
        local = self._local()
        if local is not None:
            return await local.generate(req)
        address = self._coordinator_address()
        if address is None:
            raise EngineError("no coordinator is known yet", status=503, code="service_unavailable")
        return await _remote_generate(self._clients.get(address).stub, address, req,
                                      lambda: self._coordinator_gone(address), lambda: self.stopping, self._calls)

    def _coordinator_gone(self, address: str) -> str:
        """Why the coordinator at `address` no longer serves this peer's requests ('' = it does):
        membership lost it (silent past --peer-timeout), or another peer coordinates now."""
        reason = self._not_ready()
        if reason:
            return reason
        return "" if self._coordinator_address() == address else "another peer coordinates the cluster now"

    async def embed(self, inputs: list[list[int]], request_id: str = "embed") -> list[torch.Tensor]:
        reason = self._not_ready()
        if reason:
            raise EngineError(reason, status=503, code="service_unavailable")
        local = self._local()
        if local is not None:
            return await local.embed(inputs, request_id)
        address = self._coordinator_address()
        if address is None:
            raise EngineError("no coordinator is known yet", status=503, code="service_unavailable")
        if self.spec is None:
            raise EngineError("this peer does not know the model's hidden size", status=503,
                              code="service_unavailable")
        return await _remote_embed(self._clients.get(address).stub, address, inputs, request_id, self.spec.hidden)


GONE_CHECK_SECONDS = 0.5  # how often a stream waiting on the coordinator asks whether it is still there


class _CoordinatorGone(Exception):
    pass


class _Stopping(Exception):
    """This peer stops now: the stream ends with this as its error (the coordinator is fine)."""


async def _read(call, gone: Callable[[], str], stopping: Callable[[], str] = lambda: ""):
    """The call's next message, or _CoordinatorGone as soon as `gone` says why the coordinator is
    gone: a frozen or cut-off host resets no connection, and a read would wait for gRPC's
    keepalive, or for ever (a stream hung for all of a 30 s kill -STOP)."""
    if stopping():  # checked before every read: a stream whose tokens keep coming never waits long
        call.cancel()
        raise _Stopping(stopping())
    read = asyncio.ensure_future(call.read())
    try:
        while True:
            done, _ = await asyncio.wait({read}, timeout=GONE_CHECK_SECONDS)
            if done:
                return read.result()
            if stopping():
                call.cancel()
                raise _Stopping(stopping())
            why = gone()
            if why:
                call.cancel()
                raise _CoordinatorGone(why)
    finally:
        if not read.done():  # gone, or the client left: nobody reads it any more
            read.cancel()


async def _remote_generate(stub, address: str, req: GenerationRequest,
                           gone: Callable[[], str] = lambda: "", stopping: Callable[[], str] = lambda: "",
                           calls: set | None = None) -> AsyncIterator[TokenEvent]:
    call = stub.Generate(pb.GenerateRequest(
        request_id=req.request_id, prompt_ids=req.prompt_ids, max_tokens=req.max_tokens,
        stop=list(req.stop), ignore_eos=req.ignore_eos, n=req.n, **sampling_fields(req.sampling),
    ))
    if calls is not None:
        calls.add(call)
    try:
        first = await _read(call, gone, stopping)
    except grpc.aio.AioRpcError as e:
        raise EngineError(f"the coordinator at {address} is unreachable ({e.code().name.lower()})", status=503,
                          code="service_unavailable") from None
    except _CoordinatorGone as e:
        raise EngineError(f"lost the coordinator at {address} ({e})", status=503,
                          code="service_unavailable") from None
    except _Stopping as e:
        raise EngineError(str(e), status=503, code="service_unavailable") from None
    if first is grpc.aio.EOF:
        raise EngineError(f"the coordinator at {address} closed the request", status=503, code="service_unavailable")
    if first.status:
        raise EngineError(first.error, status=first.status, code=first.code or "invalid_request_error")
    return _stream(call, first, address, req.n, gone, stopping)


# a reply carries every vector in one message: (inputs x hidden) float32 must fit the gRPC limit
_REPLY_OVERHEAD = 4096
_EMBED_TIMEOUT = 600.0  # a backstop only: a lost coordinator fails the call as soon as gRPC notices


def _fits_one_reply(n: int, hidden: int) -> bool:
    return n * hidden * 4 + _REPLY_OVERHEAD <= MAX_MESSAGE_BYTES


async def _remote_embed(stub, address: str, inputs: list[list[int]], request_id: str,
                        hidden: int) -> list[torch.Tensor]:
    if len(inputs) > MAX_EMBED_INPUTS or not _fits_one_reply(len(inputs), hidden):
        raise EngineError(f"{len(inputs)} inputs are too many for one request", code="request_too_large")
    request = pb.EmbedRequest(request_id=request_id, inputs=[pb.TokenIds(ids=ids) for ids in inputs])
    if request.ByteSize() > MAX_MESSAGE_BYTES:
        raise EngineError("the inputs are too large for one request", code="request_too_large")
    try:
        reply = await stub.Embed(request, timeout=_EMBED_TIMEOUT)
    except grpc.aio.AioRpcError as e:
        raise EngineError(f"the coordinator at {address} did not answer ({e.code().name.lower()})", status=503,
                          code="service_unavailable") from None
    if reply.status:
        raise EngineError(reply.error, status=reply.status, code=reply.code or "invalid_request_error")
    try:  # a peer of the cluster, but its answer is still checked before it reaches a client
        return vectors_from(reply.vectors, len(inputs), hidden)
    except WireError as e:
        raise EngineError(f"the coordinator at {address} sent malformed embeddings ({e})", status=503,
                          code="engine_error") from None


async def _stream(call, first: pb.GenerateEvent, address: str, n: int,
                  gone: Callable[[], str], stopping: Callable[[], str] = lambda: "") -> AsyncIterator[TokenEvent]:
    unfinished = n  # choices still running
    try:
        event = first
        while True:
            if event.index >= n:
                yield TokenEvent(None, "", "error", f"the coordinator at {address} answered for choice {event.index}")
                return
            yield _event(event)
            unfinished -= bool(event.finish_reason)
            if not unfinished or event.finish_reason not in ("", "stop", "length"):
                return
            try:
                event = await _read(call, gone, stopping)
            except _Stopping as e:
                yield TokenEvent(None, "", "error", str(e))
                return
            except grpc.aio.AioRpcError as e:
                yield TokenEvent(None, "", "error", f"lost the coordinator at {address} ({e.code().name.lower()})")
                return
            except _CoordinatorGone as e:
                yield TokenEvent(None, "", "error", f"lost the coordinator at {address} ({e})")
                return
            if event is grpc.aio.EOF:
                yield TokenEvent(None, "", "error", f"the coordinator at {address} ended the stream early")
                return
    finally:
        call.cancel()  # the client went away: the coordinator cancels the sequence


def _event(e: pb.GenerateEvent) -> TokenEvent:
    """An event from the coordinator (a peer of the cluster: its logprobs were checked where sampled)."""
    top = tuple(zip(e.top_ids, e.top_logprobs)) if e.has_logprob else ()
    return TokenEvent(e.token_id if e.has_token else None, e.text, e.finish_reason or None, e.error or None,
                      e.logprob if e.has_logprob else None, top, e.index, e.cached_tokens)


async def serve_generate(scheduler: Scheduler | None, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateEvent]:
    """The coordinator's side of the Generate RPC."""
    if scheduler is None:
        yield pb.GenerateEvent(status=503, code="service_unavailable", finish_reason="error",
                               error="this peer is not the coordinator (the cluster is changing; retry)")
        return
    try:
        sampling = sampling_from(request, scheduler.vocab)
        req = GenerationRequest(request.request_id, list(request.prompt_ids), request.max_tokens, sampling,
                                tuple(request.stop[:16]), request.ignore_eos, n=max(1, request.n))
        events = await scheduler.generate(req)
    except EngineError as e:
        yield pb.GenerateEvent(status=e.status, code=e.code, error=str(e), finish_reason="error")
        return
    except Exception as e:  # bad parameters (UsageError) and the like
        yield pb.GenerateEvent(status=400, code="invalid_request_error", error=str(e), finish_reason="error")
        return
    try:
        async for ev in events:
            yield pb.GenerateEvent(has_token=ev.token_id is not None, token_id=ev.token_id or 0, text=ev.text,
                                   finish_reason=ev.finish_reason or "", error=ev.error or "",
                                   has_logprob=ev.logprob is not None, logprob=ev.logprob or 0.0,
                                   top_ids=[t for t, _ in ev.top], top_logprobs=[lp for _, lp in ev.top],
                                   index=ev.index, cached_tokens=ev.cached_tokens)
    finally:
        await events.aclose()


async def serve_embed(scheduler: Scheduler | None, request: pb.EmbedRequest, hidden: int) -> pb.EmbedReply:
    """The coordinator's side of the Embed RPC (`hidden`: the model's hidden size)."""
    if scheduler is None:
        return pb.EmbedReply(status=503, code="service_unavailable",
                             error="this peer is not the coordinator (the cluster is changing; retry)")
    inputs = [list(i.ids) for i in request.inputs]
    if len(inputs) > MAX_EMBED_INPUTS or not _fits_one_reply(len(inputs), hidden):
        return pb.EmbedReply(status=400, code="request_too_large",
                             error=f"{len(inputs)} inputs are too many for one request")
    try:
        vectors = await scheduler.embed(inputs, request.request_id[:128] or "embed")
    except EngineError as e:
        return pb.EmbedReply(status=e.status, code=e.code, error=str(e))
    return pb.EmbedReply(vectors=vectors_message(vectors))
