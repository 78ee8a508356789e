"""Constrained decoding: OpenAI's `response_format` (any JSON object, or a JSON schema) as a mask on
the next token's logits, computed by llguidance, the grammar engine llama.cpp uses.

The gateway turns `response_format` into an llguidance grammar and checks it against the model's
tokenizer (a bad schema is a 400 there). The grammar travels with the sequence to the last stage,
which samples: it keeps one matcher per sequence, masks every token the grammar forbids before
choosing, and advances the matcher with the choice. Once the grammar is complete only end-of-text
is allowed, so the answer always parses.
"""

from __future__ import annotations

import re
import threading
import weakref
from typing import TYPE_CHECKING

import numpy as np

from ..errors import UsageError

if TYPE_CHECKING:
    import torch

    from .tokenizer import Tokenizer

MAX_GRAMMAR_BYTES = 256 * 1024  # a grammar (a compiled schema) larger than this is refused, on the wire too
# one line, as json.dumps writes it: free whitespace lets a small model pad with newlines until max_tokens
# (a schema's own "x-guidance" options may say otherwise)
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(UsageError):
    """A response_format or grammar that cannot be used; one line naming why."""


# OpenAI's rule for a name it lets a request give: a function's (tools) and a response schema's
OPENAI_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def grammar_for_response_format(rf: dict) -> str:
    """The llguidance grammar for an OpenAI `response_format` object ("" for plain text)."""
    import json

    from llguidance import LLMatcher

    kind = rf.get("type")
    if kind == "text":
        return ""
    if kind == "json_object":
        schema: object = {"type": "object"}
    elif kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise GrammarError("response_format json_schema needs an object 'json_schema' with a 'name'")
        if not OPENAI_NAME.fullmatch(spec["name"]):
            raise GrammarError(f"response_format json_schema.name {spec['name'][:70]!r} must be 1-64 of a-z, A-Z, "
                               "0-9, _ and -")
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise GrammarError("response_format json_schema.schema must be a JSON schema object")
    else:
        raise GrammarError(f"response_format type {str(kind)[:40]!r} is not one of text, json_object, json_schema")
    try:
        grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_LAYOUT)
    except ValueError as e:
        raise GrammarError(f"the JSON schema cannot be used: {str(e).splitlines()[0][:200]}") from None
    problem = LLMatcher.validate_grammar(grammar)
    if problem:
        raise GrammarError(f"the JSON schema cannot be used: {problem.splitlines()[0][:200]}")
    if len(grammar.encode()) > MAX_GRAMMAR_BYTES:
        raise GrammarError(f"the JSON schema compiles to more than {MAX_GRAMMAR_BYTES // 1024} KiB")
    return grammar


_LL_TOKENIZERS: "weakref.WeakKeyDictionary[Tokenizer, object]" = weakref.WeakKeyDictionary()
_LL_LOCK = threading.Lock()


def ll_tokenizer(tokenizer: "Tokenizer"):
    """The llguidance view of our tokenizer (every token's bytes, EOS, how text encodes); built once."""
    import llguidance

    with _LL_LOCK:
        found = _LL_TOKENIZERS.get(tokenizer)
        if found is None:
            found = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenTable(tokenizer)))
            _LL_TOKENIZERS[tokenizer] = found
        return found


class _TokenTable:
    """What llguidance.TokenizerWrapper reads from a tokenizer."""

    def __init__(self, tokenizer: "Tokenizer"):
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.special_token_ids = sorted(tokenizer.special_ids)

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_bos=False, parse_special=False, continuation=True)


# The answer of a sequence whose grammar allows no next token (a JSON schema no finite JSON meets,
# such as an object that requires itself, passes llguidance's checks and dead-ends mid-answer):
# the head ends that sequence alone with GRAMMAR_DEAD_END, rather than the masked argmax picking
# token 0 (end of text) and a "stop" answer that does not parse.
NO_TOKEN = -1
GRAMMAR_DEAD_END = ("the response_format cannot be met: after the text so far its grammar allows no next token "
                    "(a JSON schema that no finite JSON satisfies?)")


class Constraint:
    """One sequence's grammar state at the sampler: the mask before a choice, the advance after."""

    def __init__(self, grammar: str, tokenizer: "Tokenizer", generated: tuple[int, ...] = ()):
        import llguidance

        ll = ll_tokenizer(tokenizer)
        self._matcher = llguidance.LLMatcher(ll, grammar, log_level=0)
        self._vocab = ll.vocab_size
        self._bitmask = np.zeros((ll.vocab_size + 31) // 32, dtype=np.int32)  # bit i of word w: token 32w+i
        for token in generated:  # a replan: replay what was generated to reach the same state
            self._matcher.consume_token(token)
        if self._matcher.is_error():
            raise GrammarError(f"grammar rejected: {self._matcher.get_error()[:200]}")

    def mask_(self, logits: torch.Tensor) -> bool:
        """Set every token the grammar forbids to -inf, in place (`logits`: the sampler's own
        float32 copy on the CPU); False when it forbids every token.

        The bitmask is unpacked with numpy rather than llguidance.torch, whose kernel is a
        torch.compile (a C compiler and seconds on first use)."""
        self._matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
        allowed = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")[: self._vocab].astype(bool)
        row = logits.numpy()  # shares the tensor's memory
        row[: self._vocab][~allowed] = -np.inf
        row[self._vocab:] = -np.inf  # padding rows of the embedding are never text
        return bool(allowed.any()) and not self._matcher.is_error()

    def consume(self, token: int) -> None:
        self._matcher.consume_token(token)
