"""SamplingParams on the wire: the same fields in SequenceStart (head -> last stage) and
GenerateRequest (a gateway -> the coordinator), checked on the way in."""

from __future__ import annotations

from ..errors import UsageError
from ..model.sampling import SamplingParams


# top_p travels as a float32: a request's top_p of 1e-300 (valid: only the likeliest token stays)
# arrived as 0.0, which the last stage refused, failing every sequence of its micro-batch. Any
# top_p below a token's smallest possible share keeps the same single token.
F32_SMALLEST_NORMAL = 1.1754943508222875e-38


def sampling_fields(p: SamplingParams) -> dict:
    """Keyword arguments for a pb.SequenceStart or pb.GenerateRequest."""
    return dict(temperature=p.temperature, top_k=p.top_k, top_p=max(p.top_p, F32_SMALLEST_NORMAL),
                has_seed=p.seed is not None,
                seed=p.seed or 0, presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
                bias_ids=[t for t, _ in p.logit_bias], bias_values=[b for _, b in p.logit_bias], grammar=p.grammar,
                logprobs=p.top_logprobs is not None, top_logprobs=p.top_logprobs or 0)


def sampling_from(msg, vocab: int | None = None) -> SamplingParams:
    """The checked SamplingParams a message carries; UsageError when a value is out of range."""
    if len(msg.bias_ids) != len(msg.bias_values):
        raise UsageError(f"logit_bias has {len(msg.bias_ids)} token ids but {len(msg.bias_values)} values")
    return SamplingParams(msg.temperature, msg.top_k, msg.top_p, msg.seed if msg.has_seed else None,
                          msg.presence_penalty, msg.frequency_penalty,
                          tuple(zip(msg.bias_ids, msg.bias_values)), msg.grammar,
                          msg.top_logprobs if msg.logprobs else None).validate(vocab)
