"""What a client may ask: a JSON body checked field by field into a plain `CompletionRequest`.

Nothing here knows HTTP or the engine. A body and the served model's facts go in; a
`CompletionRequest` or an `ApiError` (OpenAI's error object, with the field at fault) comes out.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from ..model.sampling import SamplingParams
from ..runtime.api import MAX_CHOICES

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 4
CHAT_ROLES = {"system", "developer", "user", "assistant", "tool"}


_ERROR_TYPES = {429: "requests"}  # OpenAI's type for a rate limit on requests (code rate_limit_exceeded)


class ApiError(Exception):
    """A request we answer with an OpenAI error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _ERROR_TYPES.get(status) or ("server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def short(value: Any, limit: int = 80) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "…"


@dataclass(frozen=True)
class CompletionRequest:
    """A checked /v1/chat/completions (`messages`) or /v1/completions (`prompt`) body."""

    chat: bool
    max_tokens: int | None  # None: the server's default
    sampling: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool
    messages: list[dict] | None = None  # chat: {"role", "content"} with text content, "developer" as "system"
    prompt: str | list[int] | None = None  # completions: text, or token ids inside the vocabulary
    # Ollama's num_ctx/num_predict: when set, prompt + completion take at most `window` tokens and
    # max_tokens (None: no limit) is cut to what fits, rather than a limit the request must fit
    window: int | None = None
    tools: Any = None  # chat: a gateway.tools.ToolPlan when the request offers tools
    n: int = 1  # choices, sampled from one computed prompt

    @property
    def prompt_param(self) -> str:
        """The field an error about the prompt names."""
        return "messages" if self.chat else "prompt"


def parse_json_object(body: bytes) -> dict:
    if not body.strip():
        raise bad("The request body is empty; expected a JSON object.")
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise bad(f"The request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise bad("The request body must be a JSON object.")
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_completion_request(body: dict, *, chat: bool, model_name: str, context: int,
                             vocab_size: int | None) -> CompletionRequest:
    """Check `body` against the served model; the first field at fault is the ApiError raised."""
    params = _common_params(body, context, chat=chat, vocab_size=vocab_size)
    model = body.get("model")
    if model is not None and model != model_name:
        raise bad(f"The model '{short(model)}' does not exist; this server serves '{model_name}'.", "model",
                  "model_not_found")
    if chat:
        return CompletionRequest(chat=True, messages=_chat_messages(body), tools=_tools(body, params), **params)
    for name in ("tools", "tool_choice", "parallel_tool_calls"):
        if body.get(name) is not None:
            raise bad(f"'{name}' is a chat parameter: use /v1/chat/completions.", name, "unsupported_parameter")
    return CompletionRequest(chat=False, prompt=_completion_prompt(body, vocab_size), **params)


def _tools(body: dict, params: dict) -> Any:
    """The request's ToolPlan; its answers are constrained to the tool-call format (gateway/tools.py)."""
    from dataclasses import replace

    from ..model.grammar import GrammarError, grammar_for_response_format
    from .tools import parse_tools, reply_schema

    plan = parse_tools(body)
    if plan is None or not plan.constrained:
        return plan
    if params["sampling"].grammar:
        raise bad("'response_format' and 'tools' cannot be combined: a tool call's arguments already follow the "
                  "function's schema.", "response_format", "invalid_value")
    try:
        grammar = grammar_for_response_format({"type": "json_schema",
                                               "json_schema": {"name": "tool_calls", "schema": reply_schema(plan)}})
    except GrammarError as e:
        raise bad(f"A tool's parameters cannot be used: {e}", "tools", "invalid_value") from None
    params["sampling"] = replace(params["sampling"], grammar=grammar)
    return plan


# --------------------------------------------------------------------------- fields


def _typed(body: dict, name: str, types: type | tuple[type, ...], expected: str) -> Any:
    """`body[name]` (None when absent) when it is of `types`; booleans are never numbers."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, types) or (isinstance(value, bool) and types is not bool):
        raise bad(f"Invalid type for '{name}': expected {expected}, got {type(value).__name__}.", name,
                  "invalid_type")
    return value


def _int(body: dict, name: str, lo: int, hi: int) -> int | None:
    value = _typed(body, name, int, "an integer")
    if value is not None and not lo <= value <= hi:
        raise bad(f"Invalid value for '{name}': {value} is not between {lo} and {hi}.", name, "invalid_value")
    return value


def _number(body: dict, name: str, lo: float, hi: float, *, lo_open: bool = False) -> float | None:
    value = _typed(body, name, (int, float), "a number")
    if value is None:
        return None
    if value > hi or value < lo or (lo_open and value == lo):
        low = f"greater than {lo}" if lo_open else f"at least {lo}"
        raise bad(f"Invalid value for '{name}': {value} must be {low} and at most {hi}.", name, "invalid_value")
    return float(value)


def _bool(body: dict, name: str) -> bool | None:
    return _typed(body, name, bool, "a boolean")


def _common_params(body: dict, context: int, *, chat: bool, vocab_size: int | None = None) -> dict[str, Any]:
    n = _int(body, "n", 1, MAX_CHOICES) or 1
    if chat and body.get("max_completion_tokens") is not None:
        max_tokens = _int(body, "max_completion_tokens", 1, context)
    else:
        max_tokens = _int(body, "max_tokens", 1, context)
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0, lo_open=True)
    top_k = 0 if body.get("top_k") == -1 else _int(body, "top_k", 0, 1 << 31)  # -1: vLLM's spelling of "off"
    seed = _int(body, "seed", 0, 2**63 - 1)
    presence = _number(body, "presence_penalty", -2.0, 2.0) or 0.0
    frequency = _number(body, "frequency_penalty", -2.0, 2.0) or 0.0
    logit_bias = _logit_bias(body.get("logit_bias"), vocab_size)
    grammar = _response_format(body.get("response_format"))
    top_logprobs = _logprobs(body, chat)
    _refuse_unsupported(body)
    stops = _stop_strings(body.get("stop"))
    stream = bool(_bool(body, "stream"))
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise bad("Invalid type for 'stream_options': expected an object.", "stream_options", "invalid_type")
        value = options.get("include_usage")
        if value is not None and not isinstance(value, bool):  # named by its path, as OpenAI names nested fields
            raise bad(f"Invalid type for 'stream_options.include_usage': expected a boolean, got "
                      f"{type(value).__name__}.", "stream_options.include_usage", "invalid_type")
        include_usage = bool(value)
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise bad("Invalid type for 'model': expected a string.", "model", "invalid_type")
    return dict(
        max_tokens=max_tokens,
        sampling=SamplingParams(temperature=1.0 if temperature is None else temperature, top_k=top_k or 0,
                                top_p=1.0 if top_p is None else top_p, seed=seed, presence_penalty=presence,
                                frequency_penalty=frequency, logit_bias=logit_bias, grammar=grammar,
                                top_logprobs=top_logprobs),
        stop=stops,
        stream=stream,
        include_usage=include_usage and stream,
        ignore_eos=bool(_bool(body, "ignore_eos")),
        n=n,
    )


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives to report with each token's logprob; None: no logprobs. Chat takes
    `logprobs: true` and `top_logprobs` 0-20; completions take `logprobs` 0-5 (OpenAI's limits)."""
    if chat:
        wanted = _bool(body, "logprobs")
        top = _int(body, "top_logprobs", 0, SamplingParams.MAX_TOP_LOGPROBS)
        if top is not None and not wanted:
            raise bad("'top_logprobs' needs 'logprobs': true.", "top_logprobs", "invalid_value")
        return (top or 0) if wanted else None
    if body.get("top_logprobs") is not None:
        raise bad("'top_logprobs' is a chat parameter; completions take 'logprobs': N (0 to 5).", "top_logprobs",
                  "unsupported_parameter")
    return _int(body, "logprobs", 0, 5)


def _response_format(value: Any) -> str:
    """The grammar a response_format asks for ("" for text): JSON objects and JSON schemas are
    constrained token by token (model/grammar.py), so the answer always parses."""
    from ..model.grammar import GrammarError, grammar_for_response_format

    if value is None:
        return ""
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise bad("Invalid type for 'response_format': expected an object with a 'type'.", "response_format",
                  "invalid_type")
    try:
        return grammar_for_response_format(value)
    except GrammarError as e:
        raise bad(f"Invalid 'response_format': {e}", "response_format", "invalid_value") from None


def _logit_bias(value: Any, vocab_size: int | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias}: ids inside the vocabulary, biases in [-100, 100], at most 300."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise bad("Invalid type for 'logit_bias': expected an object mapping token ids to numbers.", "logit_bias",
                  "invalid_type")
    if len(value) > SamplingParams.MAX_BIASED_TOKENS:
        raise bad(f"'logit_bias' may name at most {SamplingParams.MAX_BIASED_TOKENS} tokens, got {len(value)}.",
                  "logit_bias", "invalid_value")
    out = {}
    for key, bias in value.items():
        token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 10 else None
        if token is None or (vocab_size is not None and token >= vocab_size):
            raise bad(f"Invalid key in 'logit_bias': {short(repr(key))} is not a token id of this model "
                      f"(0 to {vocab_size - 1 if vocab_size else '?'}).", "logit_bias", "invalid_value")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise bad(f"Invalid value in 'logit_bias' for token {token}: expected a number from -100 to 100.",
                      "logit_bias", "invalid_value")
        out[token] = float(bias)
    return tuple(sorted(out.items()))


# OpenAI request fields that never change the text (bookkeeping for OpenAI's platform): accepted, no effect
NO_EFFECT_FIELDS = ("user", "metadata", "store", "service_tier", "prompt_cache_key", "prompt_cache_retention",
                    "prompt_cache_options", "safety_identifier")
# fields that would change the answer and that this server does not do: set, they are a 400
UNSUPPORTED_FIELDS = ("audio", "functions", "function_call", "prediction", "web_search_options", "moderation",
                      "verbosity", "reasoning_effort")


# what the completion endpoints read; beside NO_EFFECT_FIELDS and UNSUPPORTED_FIELDS, the rest of a body is ignored
READ_FIELDS = ("messages", "prompt", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
               "seed", "stop", "stream", "stream_options", "n", "presence_penalty", "frequency_penalty", "logit_bias",
               "response_format", "logprobs", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
               "ignore_eos", "modalities", "echo", "best_of", "suffix")


def ignored_fields(body: dict) -> list[str]:
    """A completion body's fields this server neither reads nor knows from OpenAI's API (another
    server's extensions such as llama.cpp's `min_p`, or a typo): accepted, as llama.cpp and vLLM do,
    and named in the log so the operator can tell why they changed nothing."""
    return sorted(k for k in body if k not in READ_FIELDS and k not in NO_EFFECT_FIELDS
                  and k not in UNSUPPORTED_FIELDS)


class IgnoredFieldsLog:
    """Names the request fields an endpoint ignores in the log, once each: an operator can tell why
    a field changed nothing, and a client sending junk cannot flood the log (at most 256 names)."""

    def __init__(self, where: str):
        self.where = where
        self._named: set[str] = set()

    def note(self, fields: list[str]) -> None:
        new = [k for k in fields if k not in self._named]
        if new and len(self._named) < 256:
            self._named.update(new)
            log.warning("%s: ignoring request fields this server does not know (another server's own, or a typo): "
                        "%s (logged once per field)", self.where, ", ".join(short(k, 40) for k in new[:16]))


def _refuse_unsupported(body: dict) -> None:
    """Parameters whose answer would not be what the client asked for are a 400, not ignored."""
    for name in UNSUPPORTED_FIELDS:
        if body.get(name) is not None:
            raise bad(f"'{name}' is not supported by this server.", name, "unsupported_parameter")
    if body.get("modalities") not in (None, ["text"]):
        raise bad("Only modalities [\"text\"] is supported.", "modalities", "unsupported_value")
    if body.get("echo") not in (None, False):
        raise bad("'echo' is not supported by this server.", "echo", "unsupported_parameter")
    if body.get("best_of") not in (None, 1):
        raise bad("Only best_of=1 is supported.", "best_of", "unsupported_value")
    if body.get("suffix") not in (None, ""):
        raise bad("'suffix' is not supported by this server.", "suffix", "unsupported_parameter")



def _stop_strings(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOP_STRINGS:
            raise bad(f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}.", "stop", "invalid_value")
        return tuple(s for s in stop if s)
    raise bad("Invalid type for 'stop': expected a string or a list of strings.", "stop", "invalid_type")


# --------------------------------------------------------------------------- prompts


def _chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise bad("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        raise bad("Invalid type for 'messages': expected an array of objects.", "messages", "invalid_type")
    if not messages:
        raise bad("'messages' must contain at least one message.", "messages", "empty_array")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad(f"Invalid type for 'messages[{i}]': expected an object.", f"messages[{i}]", "invalid_type")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise bad(f"Invalid value for 'messages[{i}].role': {short(repr(role))}; supported roles are "
                      f"{', '.join(sorted(CHAT_ROLES))}.", f"messages[{i}].role", "invalid_value")
        text = _message_text(message.get("content"), i, role)
        checked: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": text}
        if role == "assistant" and message.get("tool_calls"):
            checked["tool_calls"] = _tool_calls(message["tool_calls"], i)
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise bad(f"Missing 'messages[{i}].tool_call_id': a tool message answers a call by its id.",
                          f"messages[{i}].tool_call_id", "missing_required_parameter")
            checked["tool_call_id"] = call_id
        out.append(checked)
    return out


def _tool_calls(calls: Any, index: int) -> list[dict]:
    """An assistant message's earlier tool calls: [{id, type: function, function: {name, arguments}}]."""
    param = f"messages[{index}].tool_calls"
    ok = isinstance(calls, list) and all(
        isinstance(c, dict) and isinstance(c.get("id"), str) and isinstance(c.get("function"), dict)
        and isinstance(c["function"].get("name"), str) and isinstance(c["function"].get("arguments", ""), str)
        for c in calls)
    if not ok:
        raise bad(f"Invalid '{param}': expected [{{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                  f"\"arguments\": JSON text}}}}].", param, "invalid_type")
    return [{"id": c["id"], "type": "function", "function": {"name": c["function"]["name"],
                                                             "arguments": c["function"].get("arguments", "")}}
            for c in calls]


def _message_text(content: Any, index: int, role: str) -> str:
    param = f"messages[{index}].content"
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise bad(f"Invalid content part in {param}: expected objects with a 'type'.", param, "invalid_type")
            if part["type"] != "text":
                raise bad(f"Content of type {short(repr(part['type']))} is not supported; only text is.", param,
                          "unsupported_value")
            if not isinstance(part.get("text"), str):
                raise bad(f"Invalid text part in {param}: 'text' must be a string.", param, "invalid_type")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"Invalid type for '{param}': expected a string or a list of text parts.", param, "invalid_type")


def _completion_prompt(body: dict, vocab_size: int | None) -> str | list[int]:
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        outside = [t for t in prompt if t < 0 or (vocab_size is not None and t >= vocab_size)]
        if outside:
            raise bad(f"Token id {outside[0]} is outside the vocabulary "
                      f"(0 to {vocab_size - 1 if vocab_size else '?'}).", "prompt", "invalid_value")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        # a batch of prompts; token ids mixed with other values ([1, 2.5], [1, true]) are a type error
        raise bad("Only one prompt per request is supported.", "prompt", "unsupported_value")
    raise bad("Invalid type for 'prompt': expected a string, a list of one string, or a list of token ids.",
              "prompt", "invalid_type")
