"""Tokenizer and chat template, built from the model's own files.

Two sources:

- a GGUF file's own vocabulary (`tokenizer.ggml.*`): `llama` (SentencePiece-style, merged by
  score with byte fallback, the algorithm of llama.cpp's SPM tokenizer) and `gpt2` (byte-level
  BPE with `tokenizer.ggml.merges` and the pre-tokenizer regexes llama.cpp picks from
  `tokenizer.ggml.pre`);
- a Hugging Face folder (`tokenizer.json`, optional `tokenizer_config.json`,
  `special_tokens_map.json`, `chat_template.jinja`, `generation_config.json`), run by the
  `tokenizers` library exactly as transformers runs it.

Decoding is one rule for every source: each visible token is a byte string, the bytes are
joined and read as UTF-8 (invalid sequences become U+FFFD), and tokenizers that add a leading
space when encoding drop the first space of a full decode. `StreamDecoder` applies the same
rule one token at a time, so streamed text always equals the full decode.

Chat templates run in jinja2's immutable sandbox: a model file can format text, never touch
Python objects or the filesystem.
"""

from __future__ import annotations

import codecs
import functools
import heapq
import json
import logging
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import ModelFileError, P2PError
from .formats import open_model_file

log = logging.getLogger(__name__)

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Texts of tokens that end a turn in common chat formats; llama.cpp treats them as end of
# generation when present (its "EOG" set).
END_OF_TURN_TEXTS = (
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<EOT>",
    "<|end_of_text|>",
    "<｜end▁of▁sentence｜>",
)

# Used when a model ships no chat template: ChatML, the format most chat models share.
FALLBACK_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

_SPACE = "\u2581"  # SentencePiece's visible space
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SURROGATE = re.compile("[\ud800-\udfff]")

# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp, llm_tokenizer_bpe), applied one after
# the other, each splitting every piece into matches and the text between them.
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_RE = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_RE = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS: dict[str, tuple[list[str], bool, bool]] = {}  # pre -> (regexes, ignore_merges, add_bos)


def _register_pre(names: str, regexes: list[str], ignore_merges: bool = False, add_bos: bool = False) -> None:
    for name in names.split():
        _PRE_TOKENIZERS[name] = (regexes, ignore_merges, add_bos)


_register_pre(
    "default",
    [r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+", r"[0-9][0-9][0-9]"],
)
_register_pre(
    "gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de mpt olmo jais trillion exaone4 mellum",
    [_GPT2_RE],
)
_register_pre(
    "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2",
    [_LLAMA3_RE],
    ignore_merges=True,
    add_bos=True,
)
_register_pre("dbrx smaug-bpe", [_LLAMA3_RE])
_register_pre("qwen2 deepseek-r1-qwen stablelm2 megrez hunyuan", [_QWEN2_RE])
_register_pre("starcoder refact command-r smollm codeshell exaone minerva-7b", [r"\p{N}", _GPT2_RE])
_register_pre("falcon", [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_RE, r"[0-9][0-9][0-9]"])


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 byte values onto printable characters."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_TO_UNICODE = _bytes_to_unicode()
_UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}


# fast path: mapped characters -> latin-1 of their byte; unmapped ones in 0x80-0xFF -> a
# character latin-1 cannot encode, which sends the token to the slow path
_TO_LATIN1 = str.maketrans(
    {**{chr(c): "\uffff" for c in range(0x80, 0x100)}, **{c: chr(b) for b, c in BYTE_TO_UNICODE.items()}}
)


def _byte_level_bytes(text: str) -> bytes:
    """A byte-level BPE token's text back to its bytes (characters outside the map as UTF-8)."""
    try:
        return text.translate(_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:
        pass
    out = bytearray()
    for ch in text:
        b = _UNICODE_TO_BYTE.get(ch)
        if b is None:
            out += ch.encode("utf-8", "replace")
        else:
            out.append(b)
    return bytes(out)


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "replace")


def _clean_text(text: str) -> str:
    """Text safe to encode as UTF-8 (lone surrogates from JSON become U+FFFD)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)


# --------------------------------------------------------------------------- encoders


class _SpecialSplitter:
    """Cuts text at special-token texts the way llama.cpp's tokenizer_st_partition does:
    longest token text first, each splitting the raw fragments left by the previous ones."""

    def __init__(self, always: dict[str, int], on_request: dict[str, int]):
        self._tables = {False: dict(always), True: {**on_request, **always}}
        self._lengths = {k: sorted({len(t) for t in v}, reverse=True) for k, v in self._tables.items()}
        self._firsts = {k: {t[0] for t in v} for k, v in self._tables.items()}

    def split(self, text: str, parse_special: bool) -> list[str | int]:
        table = self._tables[parse_special]
        if not table or not text:
            return [text] if text else []
        firsts, lengths = self._firsts[parse_special], self._lengths[parse_special]
        present = set()
        for i, ch in enumerate(text):
            if ch in firsts:
                for n in lengths:
                    piece = text[i : i + n]
                    if piece in table:
                        present.add(piece)
        fragments: list[str | int] = [text]
        for special in sorted(present, key=lambda t: (-len(t), table[t])):
            out: list[str | int] = []
            for frag in fragments:
                if not isinstance(frag, str):
                    out.append(frag)
                    continue
                start = 0
                while True:
                    at = frag.find(special, start)
                    if at < 0:
                        break
                    if at > start:
                        out.append(frag[start:at])
                    out.append(table[special])
                    start = at + len(special)
                if start < len(frag):
                    out.append(frag[start:])
            fragments = out
        return fragments


class _SpmEncoder:
    """llama.cpp's SPM tokenizer: merge the adjacent pair whose union is the highest-scoring
    token (ties: leftmost), then re-split pieces that are not tokens along the merge history,
    falling back to byte tokens."""

    def __init__(self, pieces: list[str], scores: list[float], unk_id: int | None, add_space_prefix: bool):
        self.add_space_prefix = add_space_prefix
        self._ids: dict[str, int] = {}
        for i, p in enumerate(pieces):
            self._ids[p] = i  # a later duplicate wins, as in llama.cpp
        self._scores = scores
        self._byte_ids: list[int | None] = []
        for b in range(256):
            tid = self._ids.get(f"<0x{b:02X}>")
            if tid is None:
                tid = self._ids.get(chr(b)) if b < 128 else None
            self._byte_ids.append(tid if tid is not None else unk_id)

    def encode(self, text: str, prev_special: bool) -> list[int]:
        if self.add_space_prefix and prev_special:
            text = " " + text
        text = text.replace(" ", _SPACE)
        if not text:
            return []
        n = len(text)
        # symbol i: [start, length, prev, next]
        syms = [[i, 1, i - 1, i + 1 if i + 1 < n else -1] for i in range(n)]
        ids, scores = self._ids, self._scores
        heap: list[tuple[float, int, int, int]] = []
        rev_merge: dict[str, tuple[int, int]] = {}

        def try_add(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            s = syms[left][0]
            size = syms[left][1] + syms[right][1]
            piece = text[s : s + size]
            tid = ids.get(piece)
            if tid is None:
                return
            heapq.heappush(heap, (-scores[tid], left, right, size))
            rev_merge[piece] = (left, right)

        for i in range(1, n):
            try_add(i - 1, i)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            ls, rs = syms[left], syms[right]
            if ls[1] == 0 or rs[1] == 0 or ls[1] + rs[1] != size:
                continue
            ls[1] += rs[1]
            rs[1] = 0
            ls[3] = rs[3]
            if rs[3] >= 0:
                syms[rs[3]][2] = left
            try_add(ls[2], left)
            try_add(left, ls[3])

        out: list[int] = []

        def resegment(index: int) -> None:
            s, length = syms[index][0], syms[index][1]
            piece = text[s : s + length]
            tid = ids.get(piece)
            if tid is not None:
                out.append(tid)
                return
            pair = rev_merge.get(piece)
            if pair is None:
                for b in piece.encode("utf-8"):
                    bid = self._byte_ids[b]
                    if bid is not None:
                        out.append(bid)
                return
            resegment(pair[0])
            resegment(pair[1])

        i = 0
        while i != -1:
            resegment(i)
            i = syms[i][3]
        return out


class _HFEncoder:
    """A `tokenizers.Tokenizer` run on raw fragments (special tokens already cut out)."""

    def __init__(self, hf: Any):
        self._hf = hf

    def encode(self, text: str, prev_special: bool) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids if text else []


def _gguf_bpe(pieces: list[str], merges: list[str], pre: str) -> tuple[Any, bool, bool]:
    """A `tokenizers` BPE over a GGUF vocabulary with llama.cpp's pre-tokenizer for `pre`."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, models, pre_tokenizers

    known = pre in _PRE_TOKENIZERS
    if not known:
        log.warning("tokenizer.ggml.pre %r is not one we know; using llama.cpp's default pre-tokenizer", pre)
    regexes, ignore_merges, add_bos = _PRE_TOKENIZERS[pre if known else "default"]
    vocab: dict[str, int] = {}
    for i, p in enumerate(pieces):
        vocab[p] = i
    pairs = []
    for m in merges:
        at = m.find(" ", 1)
        if at > 0:
            pairs.append((m[:at], m[at + 1 :]))
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    return hf, ignore_merges, add_bos


# --------------------------------------------------------------------------- Tokenizer


class Tokenizer:
    """Text <-> token ids for one model, with its special tokens and chat template.

    Build one with `load_tokenizer`. Instances are immutable and safe to share between threads.
    """

    def __init__(
        self,
        *,
        pieces: list[str],
        piece_bytes: list[bytes],
        hidden: set[int],
        encoder: Any,
        splitter: _SpecialSplitter | None,
        bos_id: int | None,
        eos_id: int | None,
        eos_ids: set[int],
        add_bos: bool,
        strip_leading_space: bool,
        chat_template: str | None,
        source: str,
        hf: Any = None,
    ):
        self._pieces = pieces
        self._piece_bytes = piece_bytes
        self._hidden = frozenset(hidden)
        self._encoder = encoder
        self._splitter = splitter
        self._bos_id = bos_id
        self._eos_id = eos_id
        self._eos_ids = frozenset(eos_ids | ({eos_id} if eos_id is not None else set()))
        self._add_bos = add_bos
        self._strip = strip_leading_space
        self._chat_template = chat_template
        self._hf = hf  # Hugging Face folders: the library does its own special-token splitting
        self._hf_raw = None
        self.source = source

    # ------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        """The model's own eos token (one of `eos_ids`)."""
        return self._eos_id

    @property
    def eos_ids(self) -> set[int]:
        """Every id that ends generation: eos plus end-of-turn tokens such as <|eot_id|>."""
        return set(self._eos_ids)

    @property
    def add_bos(self) -> bool:
        """Whether `encode` prepends BOS by default (the model's own setting)."""
        return self._add_bos

    @property
    def chat_template(self) -> str | None:
        """The model's own template, or None when it ships none (see FALLBACK_CHAT_TEMPLATE)."""
        return self._chat_template

    def __repr__(self) -> str:
        return f"Tokenizer({self.source}, vocab_size={self.vocab_size}, bos={self._bos_id}, eos={sorted(self._eos_ids)})"

    # ------------------------------------------------------------------ encode

    def encode(self, text: str, add_bos: bool | None = None, *, parse_special: bool = True,
               continuation: bool = False) -> list[int]:
        """Token ids of `text`. `add_bos` None means the model's default (`self.add_bos`).

        With `parse_special` (the default, as for a rendered chat template) the texts of special
        tokens such as `<|im_start|>` become those tokens; without it only user-defined added
        tokens do, as in llama.cpp. `continuation`: `text` goes on from earlier text, so a
        SentencePiece model's leading-space prefix is not added (what a grammar engine needs).
        """
        text = _clean_text(text)
        if add_bos is None:
            add_bos = self._add_bos
        out: list[int] = []
        if add_bos and self._bos_id is not None:
            out.append(self._bos_id)
        if self._hf is not None:
            out.extend(self._hf_encode(text, parse_special))
            return out
        prev_special = not continuation
        for frag in self._splitter.split(text, parse_special):
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True
            else:
                out.extend(self._encoder.encode(frag, prev_special))
                prev_special = False
        return out

    def _hf_encode(self, text: str, parse_special: bool) -> list[int]:
        if not text:
            return []
        hf = self._hf
        if not parse_special:
            if self._hf_raw is None:
                from tokenizers import Tokenizer as HFTokenizer

                raw = HFTokenizer.from_str(self._hf.to_str())
                raw.encode_special_tokens = True
                self._hf_raw = raw
            hf = self._hf_raw
        return hf.encode(text, add_special_tokens=False).ids

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> list[int]:
        """The prompt ids of a conversation: the rendered template, with BOS added only when the
        model adds one and the template did not already write it."""
        text = self.apply_chat_template(messages, add_generation_prompt, **extra)
        bos_text = self.bos_text
        add = self._add_bos and not (bos_text and text.startswith(bos_text))
        return self.encode(text, add_bos=add)

    # ------------------------------------------------------------------ decode

    def decode(self, ids: list[int], *, continuation: bool = False) -> str:
        """The text of `ids`, without BOS/EOS/control tokens.

        For tokenizers that add a leading space when encoding (SentencePiece style), the first
        space of the text is dropped, as llama.cpp and Hugging Face do for a full decode; pass
        `continuation=True` for ids that continue earlier text (a completion) to keep it.
        """
        data = b"".join(self._token_bytes(i) for i in ids)
        text = data.decode("utf-8", "replace")
        if self._strip and not continuation and text.startswith(" "):
            text = text[1:]
        return text

    def stream_decoder(self, *, continuation: bool = False) -> "StreamDecoder":
        """An incremental decoder; its pushes (then `flush()`) join to `decode(ids, continuation=...)`."""
        return StreamDecoder(self, continuation=continuation)

    def _token_bytes(self, token_id: int) -> bytes:
        if token_id in self._hidden or not 0 <= token_id < len(self._piece_bytes):
            return b""
        return self._piece_bytes[token_id]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for; a special token's own text (e.g. b"<|im_end|>")."""
        if token_id in self._hidden:
            return self._pieces[token_id].encode()
        return self._token_bytes(token_id)

    @property
    def special_ids(self) -> frozenset[int]:
        """Control tokens (BOS, EOS, end-of-turn ...): never part of decoded text."""
        return self._hidden

    def token_to_piece(self, token_id: int) -> str:
        """One token for display: its text, special tokens included ("<s>"), bytes as read."""
        if not 0 <= token_id < len(self._pieces):
            return ""
        if token_id in self._hidden:
            return self._pieces[token_id]
        return self._piece_bytes[token_id].decode("utf-8", "replace")

    def token_text(self, token_id: int) -> str:
        """The token's text as stored in the vocabulary ("▁Once", "Ġthe", "<0x0A>")."""
        return self._pieces[token_id]

    @property
    def bos_text(self) -> str:
        return self._pieces[self._bos_id] if self._bos_id is not None else ""

    @property
    def eos_text(self) -> str:
        return self._pieces[self._eos_id] if self._eos_id is not None else ""

    # ------------------------------------------------------------------ chat

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """Render a conversation with the model's template (or FALLBACK_CHAT_TEMPLATE) in a sandbox.

        `extra` reaches the template as variables (e.g. `tools`). A template that fails raises
        P2PError with one line.
        """
        source = self._chat_template if self._chat_template is not None else FALLBACK_CHAT_TEMPLATE
        return render_chat_template(source, messages, add_generation_prompt, bos_token=self.bos_text,
                                    eos_token=self.eos_text, **extra)


class StreamDecoder:
    """Turns token ids into text as they arrive, holding back incomplete UTF-8 sequences.

    `"".join(d.push(i) for i in ids) + d.flush() == tok.decode(ids, continuation=...)`; `flush()`
    is only non-empty when the ids ended inside a UTF-8 sequence.
    """

    def __init__(self, tokenizer: Tokenizer, *, continuation: bool = False):
        self._tok = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._strip = tokenizer._strip and not continuation
        self._started = False

    def push(self, token_id: int) -> str:
        return self._emit(self._utf8.decode(self._tok._token_bytes(token_id)))

    def flush(self) -> str:
        return self._emit(self._utf8.decode(b"", final=True))

    def _emit(self, text: str) -> str:
        if text and not self._started:
            self._started = True
            if self._strip and text.startswith(" "):
                text = text[1:]
        return text


# --------------------------------------------------------------------------- chat template sandbox


class _TemplateError(Exception):
    pass


def _raise_exception(message: str) -> None:
    raise _TemplateError(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    # transformers' version: no HTML escaping, unicode kept
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


_ENV = None


def render_chat_template(source: str, messages: list[dict], add_generation_prompt: bool = True, *,
                         bos_token: str = "", eos_token: str = "", **extra: Any) -> str:
    """A chat template rendered in a sandbox, as transformers renders it; one-line P2PError when
    it does not compile or fails (a template's raise_exception included)."""
    template = _compiled(source)
    try:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                               eos_token=eos_token, **extra)
    except P2PError:
        raise
    except Exception as e:  # jinja2 errors and whatever the template's own operations raise
        raise P2PError(f"chat template failed: {_one_line(e)}") from None


@functools.lru_cache(maxsize=16)
def _compiled(source: str):
    try:
        return _template_env().from_string(source)
    except Exception as e:
        raise P2PError(f"chat template does not compile: {_one_line(e)}") from None


def _template_env():
    global _ENV
    if _ENV is None:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        _ENV = env
    return _ENV


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else type(e).__name__
    return text[:300]


# --------------------------------------------------------------------------- loading


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a `.gguf` file or a Hugging Face model folder (or its config.json)."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError(p, "no such file or folder")
    if p.is_file() and p.name in ("config.json", "tokenizer.json"):
        p = p.parent
    try:
        if p.is_dir():
            return _load_hf(p)
        model_file = open_model_file(p)
        try:
            return _load_gguf(p, model_file.metadata)
        finally:
            model_file.close()
    except P2PError:
        raise
    except Exception as e:  # `tokenizers` refusing the file's vocabulary or merges (a corrupt token, ...)
        raise ModelFileError(p, f"its tokenizer cannot be built: {e}") from None


def _valid_id(value: Any, n: int) -> int | None:
    """A special-token id from metadata, or None where it is unset or outside the vocabulary."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 <= value < n else None


def _load_gguf(path: Path, meta: dict[str, Any]) -> Tokenizer:
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        raise ModelFileError(path, "no tokenizer in this GGUF (tokenizer.ggml.model is missing)")
    if model not in ("llama", "gpt2"):
        raise ModelFileError(path, f"unsupported tokenizer.ggml.model {model!r} (supported: 'llama', 'gpt2')")
    pieces = meta.get("tokenizer.ggml.tokens")
    if not isinstance(pieces, list) or not pieces or not all(isinstance(t, str) for t in pieces):
        raise ModelFileError(path, "tokenizer.ggml.tokens is missing or not a list of strings")
    n = len(pieces)
    pieces = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(pieces)]
    types = meta.get("tokenizer.ggml.token_type")
    if types is None:
        types = [NORMAL] * n
    if not isinstance(types, list) or len(types) != n:
        raise ModelFileError(path, f"tokenizer.ggml.token_type has {_len(types)} entries for {n} tokens")

    def flag(key: str, default: bool) -> bool:
        value = meta.get(key)
        return bool(value) if isinstance(value, bool) else default

    if model == "llama":
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None:
            scores = [0.0] * n
        if not isinstance(scores, list) or len(scores) != n:
            raise ModelFileError(path, f"tokenizer.ggml.scores has {_len(scores)} entries for {n} tokens")
        unk = _valid_id(meta.get("tokenizer.ggml.unknown_token_id", 0), n)
        add_space_prefix = flag("tokenizer.ggml.add_space_prefix", True)
        encoder: Any = _SpmEncoder(pieces, [float(s) for s in scores], unk, add_space_prefix)
        default_add_bos = True
        default_bos, default_eos = (1 if n > 1 else None), (2 if n > 2 else None)
        piece_bytes = [_spm_piece_bytes(t, ty) for t, ty in zip(pieces, types)]
        strip = add_space_prefix
    else:
        merges = meta.get("tokenizer.ggml.merges")
        if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
            raise ModelFileError(path, "tokenizer.ggml.merges is missing (needed by a gpt2 tokenizer)")
        pre = meta.get("tokenizer.ggml.pre") or "default"
        hf, _, pre_add_bos = _gguf_bpe(pieces, merges, str(pre))
        encoder = _HFEncoder(hf)
        default_add_bos = pre_add_bos
        default_bos = default_eos = None
        piece_bytes = [_utf8(t) if ty in (USER_DEFINED, CONTROL, UNKNOWN) else _byte_level_bytes(t) for t, ty in zip(pieces, types)]
        strip = flag("tokenizer.ggml.add_space_prefix", False)

    bos = _valid_id(meta.get("tokenizer.ggml.bos_token_id", default_bos), n)
    eos = _valid_id(meta.get("tokenizer.ggml.eos_token_id", default_eos), n)
    eos_ids = {i for i in (eos,) if i is not None}
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        i = _valid_id(meta.get(key), n)
        if i is not None:
            eos_ids.add(i)
    index = {t: i for i, t in enumerate(pieces)}
    eos_ids.update(index[t] for t in END_OF_TURN_TEXTS if t in index)

    hidden = {i for i, ty in enumerate(types) if ty in (CONTROL, UNKNOWN, UNUSED)}
    hidden.update(i for i in (bos, eos) if i is not None)
    if model == "llama":
        hidden.update(i for i, ty in enumerate(types) if ty not in (NORMAL, USER_DEFINED, BYTE))
    always = {t: i for i, (t, ty) in enumerate(zip(pieces, types)) if ty == USER_DEFINED}
    on_request = {t: i for i, (t, ty) in enumerate(zip(pieces, types)) if ty in (CONTROL, UNKNOWN)}
    template = meta.get("tokenizer.chat_template")
    return Tokenizer(
        pieces=pieces,
        piece_bytes=piece_bytes,
        hidden=hidden,
        encoder=encoder,
        splitter=_SpecialSplitter(always, on_request),
        bos_id=bos,
        eos_id=eos,
        eos_ids=eos_ids,
        add_bos=flag("tokenizer.ggml.add_bos_token", default_add_bos) and bos is not None,
        strip_leading_space=strip,
        chat_template=template if isinstance(template, str) else None,
        source=f"gguf:{model}",
    )


def _len(value: Any) -> int:
    return len(value) if isinstance(value, list) else 0


def _spm_piece_bytes(text: str, token_type: int) -> bytes:
    if token_type == BYTE:
        m = _BYTE_PIECE.fullmatch(text)
        return bytes([int(m.group(1), 16)]) if m else _utf8(text)
    if token_type == USER_DEFINED:
        return _utf8(text)
    return _utf8(text.replace(_SPACE, " "))


# --------------------------------------------------------------------------- Hugging Face folders


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(path, f"not valid JSON ({_one_line(e)})") from None
    except OSError as e:
        raise ModelFileError(path, f"cannot read ({e.strerror})") from None


def _optional_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ModelFileError(path, "not a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _load_hf(folder: Path) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    tj = folder / "tokenizer.json"
    if not tj.is_file():
        if (folder / "tokenizer.model").is_file():
            raise ModelFileError(folder, "has only a SentencePiece tokenizer.model; tokenizer.json is needed")
        raise ModelFileError(folder, "no tokenizer.json in this folder")
    spec = _read_json(tj)
    if not isinstance(spec, dict):
        raise ModelFileError(tj, "not a JSON object")
    try:
        hf = HFTokenizer.from_str(json.dumps(spec))
    except Exception as e:
        raise ModelFileError(tj, f"not a tokenizer the tokenizers library can load ({_one_line(e)})") from None
    config = _optional_json(folder / "tokenizer_config.json")
    special_map = _optional_json(folder / "special_tokens_map.json")

    n = hf.get_vocab_size(with_added_tokens=True)
    pieces = [hf.id_to_token(i) or "" for i in range(n)]
    added = {int(t["id"]): t for t in spec.get("added_tokens") or [] if isinstance(t, dict) and "id" in t}

    def special_id(name: str) -> int | None:
        text = _token_content(config.get(name))
        if text is None:
            text = _token_content(special_map.get(name))
        return hf.token_to_id(text) if text is not None else None

    bos = special_id("bos_token")
    eos = special_id("eos_token")
    with_specials = hf.encode("", add_special_tokens=True).ids
    adds_first = with_specials[0] if with_specials else None
    if bos is None and adds_first is not None:
        bos = adds_first
    if isinstance(config.get("add_bos_token"), bool):
        add_bos = config["add_bos_token"] and bos is not None
    else:
        add_bos = bos is not None and adds_first == bos

    eos_ids = {eos} if eos is not None else set()
    for extra in ("config.json", "generation_config.json"):
        value = _optional_json(folder / extra).get("eos_token_id")
        for i in value if isinstance(value, list) else [value]:
            if _valid_id(i, n) is not None:
                eos_ids.add(i)
    vocab = hf.get_vocab(with_added_tokens=True)
    eos_ids.update(vocab[t] for t in END_OF_TURN_TEXTS if t in vocab)

    hidden = {i for i, t in added.items() if t.get("special")}
    hidden.update(i for i in (bos, eos) if i is not None)
    piece_bytes, strip = _hf_piece_bytes(spec.get("decoder"), pieces, added, hf)

    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str):
        jinja_file = folder / "chat_template.jinja"
        template = jinja_file.read_text(encoding="utf-8") if jinja_file.is_file() else None

    return Tokenizer(
        pieces=pieces,
        piece_bytes=piece_bytes,
        hidden=hidden,
        encoder=None,
        splitter=None,
        bos_id=bos,
        eos_id=eos,
        eos_ids=eos_ids,
        add_bos=add_bos,
        strip_leading_space=strip,
        chat_template=template,
        source="huggingface",
        hf=hf,
    )


def _hf_piece_bytes(decoder: Any, pieces: list[str], added: dict[int, dict], hf: Any) -> tuple[list[bytes], bool]:
    """Each token's bytes under a tokenizer.json decoder, and whether a full decode drops the
    first space. Covers the decoders LLM tokenizers use (ByteLevel; Replace/ByteFallback/Fuse/
    Strip; Metaspace); others fall back to the library's decode of the single token."""
    steps = []
    if isinstance(decoder, dict):
        steps = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    strip = False
    byte_level = byte_fallback = False
    replaces: list[tuple[str, str]] = []
    supported = bool(steps)
    for step in steps:
        kind = step.get("type") if isinstance(step, dict) else None
        if kind == "ByteLevel":
            byte_level = True
        elif kind == "ByteFallback":
            byte_fallback = True
        elif kind == "Fuse":
            pass
        elif kind == "Replace":
            pattern = step.get("pattern", {})
            if "String" in pattern:
                replaces.append((pattern["String"], step.get("content", "")))
            else:
                supported = False
        elif kind == "Strip":
            strip = strip or (step.get("content") == " " and int(step.get("start", 0)) > 0)
        elif kind == "Metaspace":
            replaces.append((step.get("replacement", _SPACE), " "))
            scheme = step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else "never")
            strip = strip or scheme != "never"
        else:
            supported = False
    out: list[bytes] = []
    for i, text in enumerate(pieces):
        if not supported:
            out.append(_utf8(hf.decode([i], skip_special_tokens=False)))
            continue
        if byte_fallback and (m := _BYTE_PIECE.fullmatch(text)) and i not in added:
            out.append(bytes([int(m.group(1), 16)]))
            continue
        for old, new in replaces:
            text = text.replace(old, new)
        out.append(_byte_level_bytes(text) if byte_level else _utf8(text))
    return out, strip
