"""A real, deterministic tokenizer for demo models, with no download.

Byte-level BPE (GPT-2 style) trained by the `tokenizers` library on `data/demo_corpus.txt`, a
small original English corpus shipped with the package. Ids are fixed:

    0 <unk>   1 <s> (bos)   2 </s> (eos)   3 <|user|>   4 <|assistant|>   5 <|system|>
    6 <|end|> (end of turn)   7..262 the 256 byte tokens   then learned merges
    then <|reserved_N|> specials up to the requested vocabulary size

The same tokenizer can be written as a Hugging Face folder (`write_demo_tokenizer_hf`) or as
GGUF key/values (`demo_tokenizer_gguf_fields`) that llama.cpp reads as a gpt2-type BPE with
the GPT-2 pre-tokenizer; all three encode every text to the same ids.
"""

from __future__ import annotations

import json
import threading
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError

if TYPE_CHECKING:
    import tokenizers

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
UNK_ID, BOS_ID, EOS_ID, END_OF_TURN_ID = 0, 1, 2, 6
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256

DEMO_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') }}"
    "{%- endif -%}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)

_cache: dict[int, str] = {}
_lock = threading.Lock()


def demo_corpus() -> str:
    return resources.files("p2pllm.model").joinpath("data/demo_corpus.txt").read_text(encoding="utf-8")


def _train(vocab_size: int) -> str:
    """tokenizer.json text of a freshly trained demo tokenizer (no cache)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(demo_corpus().split("\n\n"), trainer)
    learned = tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(vocab_size - learned)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    for i, text in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(text) != i:
            raise RuntimeError(f"demo tokenizer: {text} got id {tok.token_to_id(text)}, expected {i}")
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise RuntimeError("demo tokenizer: vocabulary size came out wrong")
    return tok.to_str()


def _json(vocab_size: int) -> str:
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise UsageError(f"demo tokenizer vocab size must be at least {MIN_VOCAB_SIZE}, got {vocab_size}")
    with _lock:
        text = _cache.get(vocab_size)
        if text is None:
            text = _cache[vocab_size] = _train(vocab_size)
    return text


def build_demo_tokenizer(vocab_size: int) -> "tokenizers.Tokenizer":
    """The demo tokenizer with exactly `vocab_size` ids (trained once per size per process)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_json(vocab_size))


def write_demo_tokenizer_hf(folder: str | Path, vocab_size: int) -> None:
    """tokenizer.json and tokenizer_config.json in `folder`, loadable by `load_tokenizer` and by
    `transformers.AutoTokenizer`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(_json(vocab_size), encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,
        "chat_template": DEMO_CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def demo_tokenizer_gguf_fields(vocab_size: int) -> dict[str, Any]:
    """GGUF tokenizer key/values for the same tokenizer, as llama.cpp reads a gpt2-type BPE.

    `tokenizer.ggml.pre` is "gpt-2": llama.cpp's "default" uses a different regex list.
    """
    spec = json.loads(_json(vocab_size))
    tok = build_demo_tokenizer(vocab_size)
    tokens = [tok.id_to_token(i) for i in range(vocab_size)]
    special_ids = {int(t["id"]) for t in spec["added_tokens"] if t.get("special")}
    types = [(2 if i == UNK_ID else 3) if i in special_ids else 1 for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else f"{m[0]} {m[1]}" for m in spec["model"]["merges"]]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": BOS_ID,
        "tokenizer.ggml.eos_token_id": EOS_ID,
        "tokenizer.ggml.eot_token_id": END_OF_TURN_ID,
        "tokenizer.ggml.unknown_token_id": UNK_ID,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": DEMO_CHAT_TEMPLATE,
    }
