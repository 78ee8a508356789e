"""Ollama's API on the gateway's port (/api/*), so that tools made for Ollama work unchanged.

Nothing here generates: a request is checked into the same `CompletionRequest` the OpenAI
endpoints build and run by the same `generation.complete`; this module knows Ollama's field
names, defaults and shapes. A streamed answer is NDJSON, one object a line,
`{"model", "created_at", "message": {"role": "assistant", "content"} | "response", "done": false}`,
ending with `{"done": true, "done_reason", "total_duration", "load_duration", "prompt_eval_count",
"prompt_eval_duration", "eval_count", "eval_duration"}` (durations in nanoseconds). Errors are
Ollama's `{"error": "message"}` (`responses.error_response` chooses the shape by path).

A request field or option that would change the answer and is not honoured is a 400 naming it
(Ollama itself ignores options it does not know; we do not); options that never change the text
(threads, GPU layers, memory mapping, ...) are accepted and have no effect.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Iterable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from .. import __version__
from ..model.sampling import SamplingParams
from ..model.spec import ModelSpec
from ..model.tokenizer import FALLBACK_CHAT_TEMPLATE
from ..runtime.api import Engine
from .generation import Answer, Job, complete
from .history import record_of
from .metrics import GatewayMetrics
from .responses import JSON, dumps
from .schema import ApiError, CompletionRequest, parse_json_object, short

# Ollama's own defaults (api/types.go DefaultOptions) for the sampling options we honour
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.9
# the window of a request without num_ctx (Ollama's default before it began choosing by free memory):
# each request reserves KV for its whole window when num_predict is not given, as Ollama reserves num_ctx
DEFAULT_NUM_CTX = 4096
MAX_STOP_STRINGS = 32
MAX_TEMPERATURE = 100.0  # SamplingParams' limit

HONOURED_OPTIONS = ("temperature", "top_k", "top_p", "seed", "num_predict", "stop", "num_ctx")
# honoured only at the value that turns them off; any other value is a 400
NEUTRAL_OPTIONS: dict[str, float] = {
    "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "mirostat": 0.0, "typical_p": 1.0,
    "tfs_z": 1.0, "min_p": 0.0,
}
# never change the text (load-time and machine settings, or settings of features that are off): no effect
IGNORED_OPTIONS = frozenset({
    "numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mmap",
    "use_mlock", "num_thread", "embedding_only", "num_keep", "repeat_last_n", "penalize_newline", "mirostat_tau",
    "mirostat_eta",
})
_NEUTRAL_WHY = {
    "repeat_penalty": "this server applies no repeat penalty",
    "presence_penalty": "Ollama applies it over the last repeat_last_n tokens, prompt included, and this server "
                        "does not (/v1/chat/completions takes OpenAI's presence_penalty)",
    "frequency_penalty": "Ollama applies it over the last repeat_last_n tokens, prompt included, and this server "
                         "does not (/v1/chat/completions takes OpenAI's frequency_penalty)",
    "mirostat": "this server has no Mirostat sampling",
    "typical_p": "this server has no locally typical sampling",
    "tfs_z": "this server has no tail-free sampling",
    "min_p": "this server has no min-p sampling",
}
CHAT_ROLES = ("system", "user", "assistant")
_NEVER_EXPIRES = "9999-12-31T23:59:59Z"  # /api/ps: the cluster keeps its model loaded


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class OllamaRequest:
    """A checked /api/chat or /api/generate body."""

    model: str  # as the client named it; answers echo it
    chat: bool  # /api/chat: answers carry "message"; /api/generate: "response"
    completion: CompletionRequest | None  # None: the "load the model" call (no messages, empty prompt)
    stream: bool


def parse_chat(body: dict, *, model_name: str, context: int) -> OllamaRequest:
    model = _model(body, model_name)
    if body.get("tools") not in (None, "", []):
        raise bad("'tools' (tool calling) is not supported by this server.", "tools")
    _refuse_common(body)
    sampling, stop, max_tokens, window = _options(body.get("options"), context, body.get("format"))
    stream = _stream(body)
    messages = _messages(body.get("messages"))
    if not messages:
        return OllamaRequest(model, True, None, stream)
    return OllamaRequest(model, True, CompletionRequest(
        chat=True, max_tokens=max_tokens, sampling=sampling, stop=stop, stream=stream, include_usage=False,
        ignore_eos=False, messages=messages, window=window), stream)


def parse_generate(body: dict, *, model_name: str, context: int) -> OllamaRequest:
    model = _model(body, model_name)
    if body.get("images"):
        raise bad("'images' is not supported: the served model reads text only.", "images")
    if body.get("suffix") not in (None, ""):
        raise bad("'suffix' (fill in the middle) is not supported by this server.", "suffix")
    if body.get("template") not in (None, ""):
        raise bad("'template' is not supported: the prompt is rendered with the model's own chat template "
                  "(or sent as it is with raw: true).", "template")
    if body.get("context"):
        raise bad("'context' (deprecated in Ollama) is not supported: send the conversation to /api/chat as "
                  "messages.", "context")
    for name in ("width", "height", "steps"):
        if body.get(name) is not None:
            raise bad(f"'{name}' (image generation) is not supported by this server.", name)
    _refuse_common(body)
    prompt = _string(body, "prompt")
    system = _string(body, "system")
    raw = body.get("raw")
    if raw is not None and not isinstance(raw, bool):
        raise bad(f"'raw' must be a boolean, got {type(raw).__name__}.", "raw")
    if raw and system:
        raise bad("'system' cannot be used with raw: true (the prompt is sent as it is); put the system prompt "
                  "into the prompt, or leave raw out.", "system")
    sampling, stop, max_tokens, window = _options(body.get("options"), context, body.get("format"))
    stream = _stream(body)
    if not prompt:
        return OllamaRequest(model, False, None, stream)
    params = dict(max_tokens=max_tokens, sampling=sampling, stop=stop, stream=stream, include_usage=False,
                  ignore_eos=False, window=window)
    if raw:
        return OllamaRequest(model, False, CompletionRequest(chat=False, prompt=prompt, **params), stream)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return OllamaRequest(model, False, CompletionRequest(chat=True, messages=messages, **params), stream)


def check_model(name: Any, model_name: str) -> str:
    """`name` when it names the served model (also with Ollama's default tag, ":latest")."""
    if name is None or name == "":
        raise bad("model is required", "model")
    if not isinstance(name, str):
        raise bad(f"'model' must be a string, got {type(name).__name__}.", "model")
    if name not in (model_name, model_name + ":latest"):
        raise ApiError(404, f"model '{short(name)}' not found; this server serves '{model_name}'", param="model",
                       code="model_not_found")
    return name


def _model(body: dict, model_name: str) -> str:
    return check_model(body.get("model"), model_name)


def _refuse_common(body: dict) -> None:
    think = body.get("think")
    if think not in (None, False, ""):
        raise bad("'think': the served model does not think (only false is accepted).", "think")
    if body.get("logprobs") not in (None, False):
        raise bad("'logprobs' is not supported by this server.", "logprobs")
    if body.get("top_logprobs") not in (None, 0):
        raise bad("'top_logprobs' is not supported by this server.", "top_logprobs")


def _string(body: dict, name: str) -> str:
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise bad(f"'{name}' must be a string, got {type(value).__name__}.", name)
    return value


def _stream(body: dict) -> bool:
    stream = body.get("stream")
    if stream is None:
        return True  # Ollama streams unless told not to
    if not isinstance(stream, bool):
        raise bad(f"'stream' must be a boolean, got {type(stream).__name__}.", "stream")
    return stream


def _messages(value: Any) -> list[dict]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad("'messages' must be an array of messages.", "messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(f"'{where}' must be an object with a role and content.", where)
        role = message.get("role")
        if role == "tool":
            raise bad(f"'{where}': tool messages are not supported (nor is tool calling).", f"{where}.role")
        if role not in CHAT_ROLES:
            raise bad(f"Invalid role for '{where}': {short(repr(role))}; supported roles are system, user and "
                      f"assistant.", f"{where}.role")
        content = message.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise bad(f"'{where}.content' must be a string, got {type(content).__name__}.", f"{where}.content")
        if message.get("images"):
            raise bad(f"'{where}.images' is not supported: the served model reads text only.", f"{where}.images")
        if message.get("tool_calls"):
            raise bad(f"'{where}.tool_calls' is not supported (nor is tool calling).", f"{where}.tool_calls")
        out.append({"role": role, "content": content})
    if out and out[-1]["role"] == "assistant":
        raise bad("The conversation ends with an assistant message, which Ollama would continue; this server does "
                  "not continue messages: end the conversation with a user message.", "messages")
    return out


def _grammar(fmt: Any) -> str:
    """Ollama's `format`: "json" (any JSON value... an object, as OpenAI's json_object) or a JSON
    schema, constrained token by token like OpenAI's response_format."""
    from ..model.grammar import GrammarError, grammar_for_response_format

    if fmt in (None, ""):
        return ""
    if fmt == "json":
        rf = {"type": "json_object"}
    elif isinstance(fmt, dict):
        rf = {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    else:
        raise bad("'format' must be \"json\" or a JSON schema object.", "format")
    try:
        return grammar_for_response_format(rf)
    except GrammarError as e:
        raise bad(f"'format' cannot be used: {e}", "format") from None


def _options(options: Any, context: int, fmt: Any = None) -> tuple[SamplingParams, tuple[str, ...], int | None, int]:
    """(sampling, stop strings, max tokens or None for "until the window is full", window)."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise bad(f"'options' must be an object, got {type(options).__name__}.", "options")
    for name, value in options.items():
        if value is None or name in HONOURED_OPTIONS or name in IGNORED_OPTIONS:
            continue
        if name in NEUTRAL_OPTIONS:
            neutral = NEUTRAL_OPTIONS[name]
            number = _number(options, name)
            if number != neutral:
                raise bad(f"options.{name} is not supported: {_NEUTRAL_WHY[name]} (only {neutral:g}, which turns "
                          f"it off, is accepted).", f"options.{name}")
            continue
        raise bad(f"Unknown option options.{short(name)}: this server refuses options it does not know rather than "
                  f"ignore them.", f"options.{short(name)}")

    temperature = _number(options, "temperature")
    if temperature is None:
        temperature = DEFAULT_TEMPERATURE
    elif not 0 <= temperature <= MAX_TEMPERATURE:
        raise bad(f"options.temperature must be between 0 and {MAX_TEMPERATURE:g}, got {temperature:g}.",
                  "options.temperature")
    top_k = _integer(options, "top_k")
    top_k = DEFAULT_TOP_K if top_k is None else max(0, min(top_k, 1 << 31))  # 0 or negative: off
    top_p = _number(options, "top_p")
    if top_p is None:
        top_p = DEFAULT_TOP_P
    elif not 0 <= top_p <= 1:
        raise bad(f"options.top_p must be between 0 and 1, got {top_p:g}.", "options.top_p")
    if top_p == 0:  # only the most likely token is left: greedy
        temperature, top_p = 0.0, 1.0
    seed = _integer(options, "seed")
    if seed is not None and seed >= 2**63:
        raise bad(f"options.seed must be below 2^63, got {seed}.", "options.seed")
    if seed is not None and seed < 0:
        seed = None  # Ollama's -1: a random seed
    num_predict = _integer(options, "num_predict")
    max_tokens = num_predict if num_predict is not None and num_predict > 0 else None  # <= 0: no limit
    num_ctx = _integer(options, "num_ctx")
    if num_ctx is not None and not 1 <= num_ctx <= context:
        raise bad(f"options.num_ctx must be between 1 and the context this server serves ({context} tokens), got "
                  f"{num_ctx}.", "options.num_ctx")
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, grammar=_grammar(fmt))
    return sampling, _stop(options.get("stop")), max_tokens, num_ctx or min(DEFAULT_NUM_CTX, context)


def _number(options: dict, name: str) -> float | None:
    value = options.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"options.{name} must be a number, got {type(value).__name__}.", f"options.{name}")
    return float(value)


def _integer(options: dict, name: str) -> int | None:
    value = options.get(name)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"options.{name} must be an integer, got {short(repr(value))}.", f"options.{name}")
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise bad("options.stop must be an array of strings.", "options.stop")
    if len(value) > MAX_STOP_STRINGS:
        raise bad(f"options.stop takes at most {MAX_STOP_STRINGS} strings, got {len(value)}.", "options.stop")
    return tuple(s for s in value if s)


# --------------------------------------------------------------------------- answers


def created_at(t: float | None = None) -> str:
    """Ollama's timestamps: RFC 3339 in UTC."""
    moment = datetime.fromtimestamp(time.time() if t is None else t, timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _line(obj: dict) -> bytes:
    return dumps(obj) + b"\n"


class OllamaAnswer(Answer):
    """Ollama's chat or generate objects; streamed as NDJSON, the last one with the counts."""

    media_type = "application/x-ndjson"

    def __init__(self, model: str, chat: bool):
        self.model = model
        self.chat = chat
        self.cid = ("ollama-chat-" if chat else "ollama-gen-") + uuid.uuid4().hex

    def _object(self, text: str, done: bool) -> dict:
        obj: dict[str, Any] = {"model": self.model, "created_at": created_at()}
        if self.chat:
            obj["message"] = {"role": "assistant", "content": text}
        else:
            obj["response"] = text
        obj["done"] = done
        return obj

    def final(self, job: Job, finish_reason: str, text: str) -> dict:
        now = time.perf_counter()
        first = job.first_token_at or now

        def ns(seconds: float) -> int:
            return max(0, int(seconds * 1e9))

        return {**self._object(text, True), "done_reason": finish_reason,
                "total_duration": ns(now - job.arrived), "load_duration": ns(job.submitted - job.arrived),
                "prompt_eval_count": job.n_prompt, "prompt_eval_duration": ns(first - job.submitted),
                "eval_count": job.n_tokens, "eval_duration": ns(now - first)}

    def whole(self, job: Job, finish_reason: str) -> Response:
        return JSON(self.final(job, finish_reason, job.text))

    def piece(self, job: Job, text: str, index: int = 0) -> bytes:
        return _line(self._object(text, False))

    def closing(self, job: Job, finish_reason: str) -> Iterable[bytes]:
        return [_line(self.final(job, finish_reason, ""))]

    def failure(self, job: Job, error: ApiError) -> Iterable[bytes]:
        return [_line({"error": in_ollamas_words(error).message})]


def in_ollamas_words(error: ApiError) -> ApiError:
    """An error of the shared generation path, naming Ollama's `format` where it names OpenAI's
    `response_format` (a schema no finite JSON meets): an Ollama client never sent the latter."""
    if error.param != "response_format":
        return error
    return ApiError(error.status, error.message.replace("response_format", "format"), param="format",
                    code=error.code, type=error.type)


def loaded(model: str, chat: bool) -> dict:
    """The answer to the "load the model" call: done at once (the cluster keeps its model loaded)."""
    obj: dict[str, Any] = {"model": model, "created_at": created_at()}
    if chat:
        obj["message"] = {"role": "assistant", "content": ""}
    else:
        obj["response"] = ""
    obj.update(done=True, done_reason="load")
    return obj


# --------------------------------------------------------------------------- the served model


@dataclass(frozen=True)
class ModelFacts:
    """What /api/tags, /api/ps and /api/show say about the served model."""

    name: str
    size: int
    digest: str
    modified_at: str
    details: dict
    model_info: dict
    context: int  # served: prompt + completion tokens of one request

    @staticmethod
    def of(engine: Engine, started: float) -> "ModelFacts":
        """From the engine, and its ModelSpec when it has one (`engine.spec`, or its ring's)."""
        spec = getattr(engine, "spec", None)
        if spec is None:
            spec = getattr(getattr(engine, "ring", None), "spec", None)
        if not isinstance(spec, ModelSpec):
            spec = None
        name = engine.model_name
        path = spec.path if spec is not None and spec.path and os.path.exists(spec.path) else None
        size, modified = 0, started
        if spec is not None:
            size = spec.weight_bytes(0, spec.n_layers)
        if path is not None:
            modified = os.path.getmtime(path)
            if os.path.isfile(path):
                size = os.path.getsize(path)
        digest = hashlib.sha256(f"p2pllm\0{name}\0{spec.fingerprint if spec else ''}".encode()).hexdigest()
        if spec is not None:
            params = (spec.n_layers * spec.layer_params + spec.embedding_params * (1 if spec.tied_embeddings else 2)
                      + spec.hidden)
            fmt = {"hf": "safetensors"}.get(spec.format, spec.format)
            details = {"parent_model": "", "format": fmt, "family": spec.arch, "families": [spec.arch],
                       "parameter_size": human_number(params), "quantization_level": spec.file_dtype.upper()}
            a = spec.arch
            info = {"general.architecture": a, "general.name": name, "general.parameter_count": params,
                    f"{a}.context_length": spec.context, f"{a}.block_count": spec.n_layers,
                    f"{a}.embedding_length": spec.hidden, f"{a}.feed_forward_length": spec.ffn,
                    f"{a}.attention.head_count": spec.n_heads, f"{a}.attention.head_count_kv": spec.n_kv_heads,
                    f"{a}.attention.key_length": spec.head_dim,
                    f"{a}.attention.layer_norm_rms_epsilon": spec.norm_eps, f"{a}.rope.freq_base": spec.rope_theta,
                    f"{a}.vocab_size": spec.vocab}
        else:
            fmt = "gguf" if name.lower().endswith(".gguf") else ""
            details = {"parent_model": "", "format": fmt, "family": "", "families": None, "parameter_size": "",
                       "quantization_level": ""}
            info = {"general.name": name}
        return ModelFacts(name, size, digest, created_at(modified), details, info, engine.context)

    def listing(self) -> dict:
        return {"name": self.name, "model": self.name, "modified_at": self.modified_at, "size": self.size,
                "digest": self.digest, "details": self.details}


def human_number(n: int) -> str:
    """A parameter count as Ollama writes it: 135M, 134.52M, 8.0B, 7B."""
    for unit, scale, decimals in (("B", 1e9, 1), ("M", 1e6, 2)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.{decimals}f}{unit}"
    return f"{n / 1e3:.0f}K" if n >= 1000 else str(n)


# --------------------------------------------------------------------------- routes


class OllamaApi:
    """The /api/* endpoints of one gateway, over its engine and metrics."""

    def __init__(self, engine: Engine, metrics: GatewayMetrics, read_body: Callable[[Request], Awaitable[bytes]],
                 started: float):
        self.engine = engine
        self.metrics = metrics
        self.read_body = read_body
        self.started = started
        self._facts: ModelFacts | None = None

    @property
    def facts(self) -> ModelFacts:
        if self._facts is None:
            self._facts = ModelFacts.of(self.engine, self.started)
        return self._facts

    def routes(self) -> list[Route]:
        return [
            Route("/api/version", self.version, methods=["GET"]),
            Route("/api/tags", self.tags, methods=["GET"]),
            Route("/api/ps", self.ps, methods=["GET"]),
            Route("/api/show", self.show, methods=["POST"]),
            Route("/api/chat", self.chat, methods=["POST"]),
            Route("/api/generate", self.generate, methods=["POST"]),
        ]

    async def version(self, request: Request) -> Response:
        return JSON({"version": __version__})

    async def tags(self, request: Request) -> Response:
        return JSON({"models": [self.facts.listing()]})

    async def ps(self, request: Request) -> Response:
        f = self.facts
        return JSON({"models": [{**f.listing(), "expires_at": _NEVER_EXPIRES, "size_vram": 0,
                                 "context_length": f.context}]})

    async def show(self, request: Request) -> Response:
        body = parse_json_object(await self.read_body(request))
        check_model(body.get("model") or body.get("name"), self.engine.model_name)  # "name": Ollama's old spelling
        f = self.facts
        template = self.engine.tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE
        parameters = {"temperature": DEFAULT_TEMPERATURE, "top_k": DEFAULT_TOP_K, "top_p": DEFAULT_TOP_P,
                      "num_ctx": min(DEFAULT_NUM_CTX, f.context)}
        return JSON({
            "modelfile": f"# {f.name} served by p2pllm (a cluster, not a Modelfile)\nFROM {f.name}\n"
                         + "".join(f"PARAMETER {k} {v}\n" for k, v in parameters.items()),
            "parameters": "\n".join(f"{k:<30} {v}" for k, v in parameters.items()),
            "template": template,
            "details": f.details,
            "model_info": f.model_info,
            "capabilities": ["completion"],
            "modified_at": f.modified_at,
        })

    async def chat(self, request: Request) -> Response | ASGIApp:
        return await self._generation(request, parse_chat)

    async def generate(self, request: Request) -> Response | ASGIApp:
        return await self._generation(request, parse_generate)

    async def _generation(self, request: Request, parse: Callable[..., OllamaRequest]) -> Response | ASGIApp:
        arrived = time.perf_counter()
        body = parse_json_object(await self.read_body(request))
        req = parse(body, model_name=self.engine.model_name, context=self.engine.context)
        if req.completion is None:
            self._check_ready()
            return JSON(loaded(req.model, req.chat))
        if (record := record_of(request)) is not None:
            record.begin(req.completion)
        try:
            return await complete(self.engine, self.metrics, request, req.completion, arrived,
                                  OllamaAnswer(req.model, req.chat))
        except ApiError as e:
            raise in_ollamas_words(e) from None

    def _check_ready(self) -> None:
        ready = getattr(self.engine, "ready", True)
        if callable(ready):
            ready = ready()
        if not ready:
            raise ApiError(503, "The cluster cannot serve requests now (see /health).", code="service_unavailable")


def ollama_routes(gateway: Any, read_body: Callable[[Request, int], Awaitable[bytes]]) -> list[Route]:
    """The /api/* routes for a gateway (its engine, metrics, body limit and start time)."""
    api = OllamaApi(gateway.engine, gateway.metrics, lambda request: read_body(request, gateway.max_body_bytes),
                    gateway.started)
    return api.routes()
