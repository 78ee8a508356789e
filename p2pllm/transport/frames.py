"""MicroBatch <-> protobuf Frame, and the checks a received frame must pass before any use.

Every field that comes from the network is checked against the committed plan and the model:
epoch, sequence ids, positions within the context, token ids within the vocabulary, the hidden
tensor's dtype, shape and byte length, sampling parameters.
"""

from __future__ import annotations

import math

from typing import Container

import torch

from ..errors import P2PError, UsageError
from ..model.grammar import NO_TOKEN
from ..model.kvcache import KVFormat
from ..model.sampling import Sampled, SamplingParams
from ..model.spec import ModelSpec
from ..proto import p2pllm_pb2 as pb
from ..runtime.frames import Chunk, LayerKV, MicroBatch, Pooled, SeqStart
from .sampling_wire import sampling_fields, sampling_from
from .vectors import vectors_from, vectors_message
from .wire import TensorBlob, WireError, blob_to_tensor, tensor_to_blob

MAX_FRAME_TOKENS = 16384
MAX_FRAME_CHUNKS = 1024  # also the limit on starts, finished and retained ids in one frame
MAX_LIVE_SEQUENCES = 256  # sequences one stage holds KV for (the head runs at most 64 at once)
ACTIVATION_DTYPES = ("float32", "float16", "bfloat16")


class FrameError(P2PError):
    """A frame that does not match the committed plan; refused, never half-applied."""


def encode(mb: MicroBatch, hidden: torch.Tensor | None = None, wire_dtype: str | None = None) -> pb.Frame:
    frame = pb.Frame(
        epoch=mb.epoch,
        micro_batch=mb.mb_id,
        chunks=[pb.Chunk(seq_id=c.seq_id, start=c.start, length=c.length, sample=c.sample) for c in mb.chunks],
        starts=[_encode_start(s) for s in mb.starts],
        finished=mb.finished,
        retained=mb.retained,
    )
    if hidden is not None:
        blob = tensor_to_blob(hidden, wire_dtype)
        frame.hidden.CopyFrom(pb.Tensor(dtype=blob.dtype, shape=list(blob.shape), data=blob.data))
    else:
        frame.tokens.extend(mb.tokens)
    return frame


def result_frame(epoch: int, mb_id: int, answers: list[Sampled | Pooled] | None = None, error: str = "") -> pb.Frame:
    """The last stage's answers to the head: sampled tokens in `sampled`, embeddings' vectors in
    `pooled` (with their sequences in `pooled_seqs`), each list in chunk order."""
    answers = answers or []
    sampled = [a for a in answers if isinstance(a, Sampled)]
    pooled = [a for a in answers if isinstance(a, Pooled)]
    frame = pb.Frame(epoch=epoch, micro_batch=mb_id, sampled=[s.token for s in sampled], error=error, to_head=True)
    if any(s.logprob is not None for s in sampled):
        frame.sampled_logprobs.extend(math.nan if s.logprob is None else s.logprob for s in sampled)
        frame.top_counts.extend(len(s.top) for s in sampled)
        frame.top_ids.extend(t for s in sampled for t, _ in s.top)
        frame.top_logprobs.extend(lp for s in sampled for _, lp in s.top)
    if pooled:
        frame.pooled_seqs.extend(p.seq_id for p in pooled)
        frame.pooled.CopyFrom(vectors_message([p.vector for p in pooled]))
    return frame


def decode_result(frame: pb.Frame, vocab: int, answering: list[int], hidden: int) -> list[Sampled | Pooled]:
    """The answers a result frame carries for the micro-batch's answering chunks (`answering`: their
    sequences, in chunk order), checked: FrameError for a count that does not match, an id outside
    the vocabulary, a positive log-probability, lists that do not line up, pooled sequences that are
    not answering chunks of this micro-batch in order, or a vector of the wrong size or not finite."""
    pooled_seqs = list(frame.pooled_seqs)
    if len(frame.sampled) + len(pooled_seqs) != len(answering):
        raise FrameError(f"{len(frame.sampled)} tokens and {len(pooled_seqs)} embeddings for "
                         f"{len(answering)} sequences")
    embedded = set(pooled_seqs)
    if [s for s in answering if s in embedded] != pooled_seqs:
        raise FrameError("embeddings for sequences that do not answer in this micro-batch")
    vectors: list = []
    if pooled_seqs:
        try:
            vectors = vectors_from(frame.pooled, len(pooled_seqs), hidden)
        except WireError as e:
            raise FrameError(f"embeddings: {e}") from None
    elif frame.HasField("pooled"):
        raise FrameError("embedding vectors without their sequences")
    tokens, by_seq = iter(_decode_sampled(frame, vocab)), dict(zip(pooled_seqs, vectors))
    return [Pooled(s, by_seq[s]) if s in by_seq else next(tokens) for s in answering]


def _decode_sampled(frame: pb.Frame, vocab: int) -> list[Sampled]:
    n = len(frame.sampled)
    if any(not 0 <= t < vocab and t != NO_TOKEN for t in frame.sampled):
        raise FrameError("a sampled token id outside the vocabulary")
    if not frame.sampled_logprobs:
        if frame.top_counts or frame.top_ids or frame.top_logprobs:
            raise FrameError("top logprobs without logprobs")
        return [Sampled(t) for t in frame.sampled]
    counts = list(frame.top_counts)
    if len(frame.sampled_logprobs) != n or len(counts) != n or any(c > SamplingParams.MAX_TOP_LOGPROBS for c in counts) \
            or sum(counts) != len(frame.top_ids) or len(frame.top_ids) != len(frame.top_logprobs):
        raise FrameError("logprobs that do not line up with the sampled tokens")
    if any(not 0 <= t < vocab for t in frame.top_ids) or any(lp > 0 for lp in frame.sampled_logprobs) \
            or any(not lp <= 0 for lp in frame.top_logprobs):
        raise FrameError("a logprob above 0 or an alternative outside the vocabulary")
    out, at = [], 0
    for token, logprob, count in zip(frame.sampled, frame.sampled_logprobs, counts):
        top = tuple(zip(frame.top_ids[at: at + count], frame.top_logprobs[at: at + count]))
        at += count
        out.append(Sampled(token) if math.isnan(logprob) else Sampled(token, logprob, top))
    return out


def _encode_start(s: SeqStart) -> pb.SequenceStart:
    return pb.SequenceStart(seq_id=s.seq_id, capacity=s.capacity, generated=s.generated, embed=s.embed,
                            has_fork=s.fork_of is not None, fork_of=s.fork_of or 0, fork_len=s.fork_len,
                            **sampling_fields(s.sampling))


def decode(frame: pb.Frame, spec: ModelSpec, epoch: int, context: int, first: bool,
           device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
           known: Container[int] | None = None, live: int = 0,
           ) -> tuple[MicroBatch, torch.Tensor | None]:
    """A checked MicroBatch (and hidden states for a non-first stage), or FrameError.

    With `known` (the sequences this stage holds, `live` of them), every chunk must belong to a
    known sequence or one this frame starts, and the stage may not grow past MAX_LIVE_SEQUENCES.
    """
    if frame.epoch != epoch:
        raise FrameError(f"frame of epoch {frame.epoch}, this peer serves epoch {epoch}")
    if frame.to_head or frame.sampled or frame.error or frame.pooled_seqs or frame.HasField("pooled"):
        raise FrameError("a result frame sent to a stage")
    for name, n in (("chunks", len(frame.chunks)), ("starts", len(frame.starts)), ("finished", len(frame.finished)),
                    ("retained", len(frame.retained))):
        if n > MAX_FRAME_CHUNKS:
            raise FrameError(f"{n} {name} in one frame (limit {MAX_FRAME_CHUNKS})")
    chunks, seen, n_tokens = [], set(), 0
    for c in frame.chunks:
        if c.length < 1 or c.start + c.length > context:
            raise FrameError(f"sequence {c.seq_id}: positions [{c.start}, {c.start + c.length}) outside the context")
        if c.seq_id in seen:
            raise FrameError(f"sequence {c.seq_id} appears twice in one frame")
        seen.add(c.seq_id)
        n_tokens += c.length
        chunks.append(Chunk(c.seq_id, c.start, c.length, c.sample))
    if n_tokens > MAX_FRAME_TOKENS:
        raise FrameError(f"{n_tokens} tokens in one frame (limit {MAX_FRAME_TOKENS})")
    starts = []
    for s in frame.starts:
        if not 0 < s.capacity <= context:
            raise FrameError(f"sequence {s.seq_id}: capacity {s.capacity} outside the context of {context}")
        try:
            params = sampling_from(s, spec.vocab)
        except UsageError as e:
            raise FrameError(f"sequence {s.seq_id}: {e}") from None
        if len(s.generated) > context or any(not 0 <= t < spec.vocab for t in s.generated):
            raise FrameError(f"sequence {s.seq_id}: its generated tokens are longer than the context or outside "
                             "the vocabulary")
        if s.has_fork and (s.fork_of == s.seq_id or not 0 < s.fork_len <= s.capacity or s.embed
                           or (known is not None and s.fork_of not in known)):
            raise FrameError(f"sequence {s.seq_id}: a copy of {s.fork_len} positions of sequence {s.fork_of}, "
                             "which this stage does not hold or which does not fit")
        starts.append(SeqStart(s.seq_id, s.capacity, params, tuple(s.generated), s.embed,
                               s.fork_of if s.has_fork else None, s.fork_len if s.has_fork else 0))
    started = {s.seq_id for s in starts}
    if len(started) != len(starts):
        raise FrameError("a sequence is started twice in one frame")
    if known is not None:
        unknown = [c.seq_id for c in chunks if c.seq_id not in known and c.seq_id not in started]
        if unknown:
            raise FrameError(f"sequence {unknown[0]} was never started on this stage")
        new = sum(1 for s in started if s not in known)
        if new and live + new > MAX_LIVE_SEQUENCES:
            raise FrameError(f"{live + new} sequences on this stage (limit {MAX_LIVE_SEQUENCES})")
    tokens: list[int] = []
    hidden = None
    if first and frame.HasField("hidden"):
        raise FrameError("hidden states in a frame for the first stage (it takes token ids)")
    if not first and frame.tokens:
        raise FrameError("token ids in a frame for a later stage (it takes hidden states)")
    if first:
        tokens = list(frame.tokens)
        if len(tokens) != n_tokens:
            raise FrameError(f"{len(tokens)} token ids for {n_tokens} positions")
        if tokens and not 0 <= min(tokens) <= max(tokens) < spec.vocab:
            raise FrameError(f"token id outside the vocabulary of {spec.vocab}")
    elif chunks:
        if not frame.HasField("hidden"):
            raise FrameError("no hidden states in a frame for a middle stage")
        t = frame.hidden
        blob = TensorBlob(t.dtype, tuple(t.shape), t.data)
        try:
            hidden = blob_to_tensor(blob, expect_shape=(n_tokens, spec.hidden), allowed=ACTIVATION_DTYPES,
                                    device=device, out_dtype=dtype, finite=True)
        except WireError as e:
            raise FrameError(f"hidden states: {e}") from None
    mb = MicroBatch(frame.epoch, frame.micro_batch, chunks, tokens, starts, list(frame.finished), list(frame.retained))
    return mb, hidden


def encode_kv(kv: LayerKV, epoch: int = 0) -> pb.KVDelta:
    blob = tensor_to_blob(kv.data)
    return pb.KVDelta(seq_id=kv.seq_id, start=kv.start, first_layer=kv.first_layer, epoch=epoch,
                      format=kv.format.name, data=pb.Tensor(dtype=blob.dtype, shape=list(blob.shape), data=blob.data))


def decode_kv(delta: pb.KVDelta, spec: ModelSpec, context: int) -> LayerKV:
    """A checked KV delta: a known format, layers within the model, positions within the context,
    exact shape and byte length for that format."""
    try:
        fmt = KVFormat.parse(delta.format)
        row = fmt.row_bytes(spec.n_kv_heads * spec.head_dim)
    except P2PError:
        raise FrameError(f"KV delta in unknown format {delta.format[:40]!r}") from None
    t = delta.data
    shape = tuple(t.shape)
    if len(shape) != 4:
        raise FrameError(f"KV delta of rank {len(shape)}, expected 4")
    n_layers, length = shape[0], shape[2]
    if not (0 < n_layers and delta.first_layer + n_layers <= spec.n_layers):
        raise FrameError(f"KV delta for layers [{delta.first_layer}, {delta.first_layer + n_layers}) outside the model")
    if delta.start + length > context:
        raise FrameError(f"KV delta for positions past the context of {context}")
    try:
        data = blob_to_tensor(TensorBlob(t.dtype, shape, t.data), expect_shape=(n_layers, 2, length, row),
                              allowed=("uint8",))
    except WireError as e:
        raise FrameError(f"KV delta: {e}") from None
    return LayerKV(delta.seq_id, delta.first_layer, delta.start, data, fmt)
