"""OpenAI's Responses API (`POST /v1/responses`) over the chat completions path.

Nothing here generates. A Responses body is translated into the chat body it stands for (the
`input` items as `messages`, `instructions` as a system message first, `max_output_tokens` as
`max_tokens`, `text.format` as `response_format`, function tools as chat tools), which
`schema.parse_completion_request` checks into the very `CompletionRequest` /v1/chat/completions
builds, and `generation.complete` runs it: tokens, usage, refusals, client disconnects and
metrics are chat's. `ResponsesAnswer` shapes the Job's events as a `response` object, or as the
Responses API's typed server-sent events. Errors name the Responses API's parameters.

Nothing is stored (there is no retrieval), so what needs a stored response or conversation
(`previous_response_id`, `conversation`, `background`, stored `prompt`s) is refused with a 400
naming it, as are reasoning, hosted tools and inputs that are not text.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, Awaitable, Callable, Iterable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from ..runtime.api import Engine
from .generation import Answer, Job, complete
from .history import record_of
from .metrics import GatewayMetrics
from .responses import JSON, CompletionShape, dumps
from .schema import ApiError, IgnoredFieldsLog, bad, parse_completion_request, parse_json_object, short
from .tools import interpret

log = logging.getLogger(__name__)

PATH = "/v1/responses"

# Every field of the openai package's ResponseCreateParams is in one of these (a test compares).
READ_FIELDS = ("input", "instructions", "model", "max_output_tokens", "temperature", "top_p", "stream", "text",
               "tools", "tool_choice", "parallel_tool_calls", "max_tool_calls", "include", "top_logprobs",
               "truncation", "background")
# bookkeeping for OpenAI's platform, never changing the text: accepted, no effect
NO_EFFECT_FIELDS = ("metadata", "user", "store", "service_tier", "prompt_cache_key", "prompt_cache_retention",
                    "prompt_cache_options", "safety_identifier", "stream_options", "access_programs", "image")
# need what this server does not have (stored responses, conversations, reasoning, moderation): set, a 400
REFUSED_FIELDS = ("previous_response_id", "conversation", "prompt", "reasoning", "context_management",
                  "background_options", "moderation")
# /v1/chat/completions' own parameters, taken here too with the same meaning (as vLLM takes its extras)
EXTENSION_FIELDS = ("seed", "top_k", "stop", "ignore_eos", "presence_penalty", "frequency_penalty", "logit_bias")

LOGPROBS_INCLUDE = "message.output_text.logprobs"
# what `include` may ask for: logprobs are given; the rest are parts of items this server never produces
INCLUDABLE = (LOGPROBS_INCLUDE, "file_search_call.results", "web_search_call.results",
              "web_search_call.action.sources", "message.input_image.image_url",
              "computer_call_output.output.image_url", "code_interpreter_call.outputs", "reasoning.encrypted_content")
_WHY_REFUSED = {
    "previous_response_id": "responses are not stored here; send the whole conversation as 'input'",
    "conversation": "conversations are not stored here; send the whole conversation as 'input'",
    "prompt": "stored prompt templates live on OpenAI's platform; send the text as 'instructions' and 'input'",
    "reasoning": "the served model does not reason (only null, or effort \"none\", is accepted)",
    "context_management": "this server does not compact the context",
    "background_options": "background responses are not supported",
    "moderation": "this server has no moderation",
}
# chat parameter names in the errors of parse_completion_request, as the Responses API names them
_RENAMED = {"max_tokens": "max_output_tokens", "messages": "input", "response_format": "text.format",
            "logprobs": "include"}


# --------------------------------------------------------------------------- requests


def chat_body(body: dict) -> tuple[dict, dict]:
    """(the equivalent /v1/chat/completions body, what the `response` object echoes of the request)."""
    _refuse(body)
    chat: dict[str, Any] = {"messages": _messages(body)}
    for ours, theirs in (("model", "model"), ("max_output_tokens", "max_tokens"), ("temperature", "temperature"),
                         ("top_p", "top_p"), ("stream", "stream"), ("parallel_tool_calls", "parallel_tool_calls"),
                         *((f, f) for f in EXTENSION_FIELDS)):
        if body.get(ours) is not None:
            chat[theirs] = body[ours]
    text = _text(body.get("text"))
    if text["format"]["type"] != "text":
        chat["response_format"] = _response_format(text["format"])
    if _logprobs(body):
        chat["logprobs"] = True
        if body.get("top_logprobs") is not None:
            chat["top_logprobs"] = body["top_logprobs"]
    tools = _tools(body.get("tools"))
    if tools:
        chat["tools"] = [{"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters")
                                                           if t[k] is not None}} for t in tools]
    choice = body.get("tool_choice")
    if choice is not None:
        chat["tool_choice"] = _tool_choice(choice)
    _max_tool_calls(body, chat, bool(tools))
    instructions = body.get("instructions")
    metadata = body.get("metadata")
    echo = {
        "instructions": instructions, "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": body.get("max_tool_calls"), "metadata": metadata if isinstance(metadata, dict) else {},
        "parallel_tool_calls": body.get("parallel_tool_calls", True) is not False,
        "temperature": _or(body.get("temperature"), 1.0), "top_p": _or(body.get("top_p"), 1.0),
        "top_logprobs": body.get("top_logprobs") or 0, "text": text, "tools": tools,
        "tool_choice": choice if choice is not None else "auto", "truncation": body.get("truncation") or "disabled",
        "user": body.get("user") if isinstance(body.get("user"), str) else None,
        "prompt_cache_key": body.get("prompt_cache_key") if isinstance(body.get("prompt_cache_key"), str) else None,
        "safety_identifier": body["safety_identifier"] if isinstance(body.get("safety_identifier"), str) else None,
    }
    return chat, echo


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _refuse(body: dict) -> None:
    for name in REFUSED_FIELDS:
        value = body.get(name)
        if name == "reasoning" and isinstance(value, dict) and value.get("effort") in (None, "none") \
                and all(v is None for k, v in value.items() if k != "effort"):
            continue  # no reasoning asked for: what the served model does anyway
        if value not in (None, [], {}):
            raise bad(f"'{name}' is not supported by this server: {_WHY_REFUSED[name]}.", name,
                      "unsupported_parameter")
    if body.get("background") not in (None, False):
        raise bad("'background' is not supported by this server: responses are answered while the request waits "
                  "(and not stored).", "background", "unsupported_parameter")
    truncation = body.get("truncation")
    if truncation not in (None, "disabled", "auto"):
        raise bad(f"Invalid value for 'truncation': {short(repr(truncation))}; supported values are 'auto' and "
                  "'disabled'.", "truncation", "invalid_value")


def _messages(body: dict) -> list[dict]:
    """Chat messages: `instructions` as a system message first, then the `input` items."""
    out: list[dict] = []
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise bad("Invalid type for 'instructions': expected a string.", "instructions", "invalid_type")
    if instructions:
        out.append({"role": "system", "content": instructions})
    value = body.get("input")
    if value is None:
        raise bad("Missing required parameter: 'input'.", "input", "missing_required_parameter")
    if isinstance(value, str):
        return out + [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise bad("Invalid type for 'input': expected a string or an array of input items.", "input", "invalid_type")
    if not value and not out:
        raise bad("'input' must contain at least one item.", "input", "empty_array")
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad(f"Invalid type for '{where}': expected an object.", where, "invalid_type")
        kind = item.get("type") or "message"
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise bad(f"Invalid value for '{where}.role': {short(repr(role))}; supported roles are user, system, "
                          "developer and assistant.", f"{where}.role", "invalid_value")
            out.append({"role": role, "content": _text_of(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", where), "type": "function",
                    "function": {"name": _string(item, "name", where), "arguments": _string(item, "arguments", where)}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":  # calls of one turn: one assistant message
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": _string(item, "call_id", where),
                        "content": _text_of(item.get("output"), f"{where}.output")})
        else:
            raise bad(f"Input items of type {short(repr(kind))} are not supported; this server takes messages, "
                      "function_call and function_call_output items.", where, "unsupported_value")
    return out


def _string(item: dict, name: str, where: str) -> str:
    value = item.get(name)
    if value is None:
        raise bad(f"Missing required parameter: '{where}.{name}'.", f"{where}.{name}", "missing_required_parameter")
    if not isinstance(value, str):
        raise bad(f"Invalid type for '{where}.{name}': expected a string.", f"{where}.{name}", "invalid_type")
    return value


def _text_of(content: Any, where: str) -> str:
    """A message's (or a tool output's) text: a string, or text parts; images, files, audio are refused."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(f"Invalid type for '{where}': expected a string or an array of content parts.", where,
                  "invalid_type")
    texts = []
    for j, part in enumerate(content):
        param = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        key = "refusal" if kind == "refusal" else "text"
        if kind in ("input_text", "output_text", "refusal"):
            if not isinstance(part.get(key), str):
                raise bad(f"Invalid '{param}.{key}': expected a string.", f"{param}.{key}", "invalid_type")
            texts.append(part[key])
        elif kind in ("input_image", "input_file", "input_audio"):
            raise bad(f"Content of type {kind!r} is not supported: the served model reads text only.", param,
                      "unsupported_value")
        else:
            raise bad(f"Invalid content part '{param}': expected input_text or output_text parts.", param,
                      "invalid_value")
    return "".join(texts)


def _text(value: Any) -> dict:
    """The `text` config, with its defaults (as the response echoes it)."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise bad("Invalid type for 'text': expected an object.", "text", "invalid_type")
    if value.get("verbosity") is not None:
        raise bad("'text.verbosity' is not supported by this server.", "text.verbosity", "unsupported_parameter")
    fmt = value.get("format")
    if fmt is None:
        fmt = {"type": "text"}
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise bad("Invalid 'text.format': expected {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                  "{\"type\": \"json_schema\", \"name\", \"schema\"}.", "text.format", "invalid_value")
    return {"format": fmt, "verbosity": "medium"}


def _response_format(fmt: dict) -> dict:
    """The Responses API's flat `text.format` as chat's `response_format`."""
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    inner = {k: fmt[k] for k in ("name", "schema", "description", "strict") if fmt.get(k) is not None}
    return {"type": "json_schema", "json_schema": inner}


def _logprobs(body: dict) -> bool:
    include = body.get("include")
    if include is not None:
        if not isinstance(include, list) or not all(isinstance(x, str) for x in include):
            raise bad("Invalid type for 'include': expected an array of strings.", "include", "invalid_type")
        for x in include:
            if x not in INCLUDABLE:
                raise bad(f"Invalid value in 'include': {short(repr(x))}.", "include", "invalid_value")
    return LOGPROBS_INCLUDE in (include or ()) or body.get("top_logprobs") not in (None, 0)


def _tools(value: Any) -> list[dict]:
    """Function tools, as the response echoes them; hosted tools (web search, files, ...) are refused."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad("Invalid type for 'tools': expected an array of tools.", "tools", "invalid_type")
    out = []
    for i, tool in enumerate(value):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise bad(f"Tools of type {short(repr(kind))} are not supported; only function tools are.", f"tools[{i}]",
                      "unsupported_value")
        out.append({"type": "function", "name": tool.get("name"), "description": tool.get("description"),
                    "parameters": tool.get("parameters"), "strict": True})  # the schema is always enforced
    return out


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise bad(f"Invalid 'tool_choice': {short(json.dumps(choice))}; expected \"auto\", \"none\", \"required\" or "
              "{\"type\": \"function\", \"name\": NAME}.", "tool_choice", "invalid_value")


def _max_tool_calls(body: dict, chat: dict, tools: bool) -> None:
    """One answer makes its calls at once: at most 1 is one call (parallel_tool_calls false); a larger
    bound holds only without parallel calls. Without tools it bounds nothing."""
    limit = body.get("max_tool_calls")
    if limit is None or not tools:
        return
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise bad("Invalid value for 'max_tool_calls': expected an integer of at least 1.", "max_tool_calls",
                  "invalid_value")
    if limit == 1:
        chat["parallel_tool_calls"] = False
    elif chat.get("parallel_tool_calls") is not False:
        raise bad("'max_tool_calls' above 1 needs 'parallel_tool_calls': false here (calls made at once cannot be "
                  "counted off).", "max_tool_calls", "unsupported_value")


def renamed(error: ApiError) -> ApiError:
    """An error of the chat checks, naming the Responses API's parameter instead of chat's."""
    param = error.param
    if not param:
        return error
    head, sep, rest = param.partition("[")
    new = param
    if head in _RENAMED:
        new = _RENAMED[head] if head == "messages" else _RENAMED[head] + sep + rest
    elif head == "tools":
        new = param.replace(".function.", ".")
    if new == param:
        return error
    message = error.message.replace(f"'{param}'", f"'{new}'").replace(f"'{head}'", f"'{new}'")
    return ApiError(error.status, message, param=new, code=error.code, type=error.type)


# --------------------------------------------------------------------------- answers


def _id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


class ResponsesAnswer(Answer):
    """A `response` object; streamed, the Responses API's events, each with `type` and `sequence_number`.

    A text answer streams as it comes: response.created, response.in_progress, output_item.added,
    content_part.added, output_text.delta per piece, output_text.done, content_part.done,
    output_item.done, then response.completed (or response.incomplete). An answer constrained to
    the tool-call format is read whole at its end (its JSON means nothing before), then sent as
    function_call items or as one message."""

    media_type = "text/event-stream; charset=utf-8"

    def __init__(self, model: str, echo: dict, *, tools: bool, tokenizer: Any = None):
        self.cid = _id("resp_")
        self.model = model
        self.echo = echo
        self.tools = tools
        self.created = int(time.time())
        self.message_id = _id("msg_")
        self.seq = 0
        # renders logprobs as chat does; a Responses logprob has the same fields
        self.shape = CompletionShape(self.cid, model, True, False, tokenizer=tokenizer)

    # ------------------------------------------------------------------ objects

    def response(self, status: str, output: list[dict], job: Job | None = None, *,
                 error: dict | None = None) -> dict:
        e = self.echo
        return {
            "id": self.cid, "object": "response", "created_at": self.created, "status": status, "background": False,
            "completed_at": int(time.time()) if status == "completed" else None, "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": e["instructions"], "max_output_tokens": e["max_output_tokens"],
            "max_tool_calls": e["max_tool_calls"], "model": self.model, "output": output,
            "parallel_tool_calls": e["parallel_tool_calls"], "previous_response_id": None,
            "prompt_cache_key": e["prompt_cache_key"], "reasoning": {"effort": None, "summary": None},
            "safety_identifier": e["safety_identifier"], "service_tier": "default", "store": False,
            "temperature": e["temperature"], "text": e["text"], "tool_choice": e["tool_choice"], "tools": e["tools"],
            "top_logprobs": e["top_logprobs"], "top_p": e["top_p"], "truncation": e["truncation"],
            "usage": self.usage(job) if job is not None else None, "user": e["user"], "metadata": e["metadata"],
        }

    @staticmethod
    def usage(job: Job) -> dict:
        return {"input_tokens": job.n_prompt,
                "input_tokens_details": {"cached_tokens": job.cached_tokens, "cache_write_tokens": 0},
                "output_tokens": job.n_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": job.n_prompt + job.n_tokens}

    def _logprobs(self, entries: list) -> list:
        rendered = self.shape.logprobs(entries)
        return rendered["content"] if rendered else []

    def _part(self, text: str, logprobs: list) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}

    def _message(self, status: str, content: list[dict]) -> dict:
        return {"id": self.message_id, "type": "message", "status": status, "role": "assistant", "content": content}

    def output(self, job: Job, finish_reason: str) -> tuple[str, list[dict]]:
        """(the response's status, its output items) once the answer ended."""
        status = "incomplete" if finish_reason == "length" else "completed"
        text = job.text
        if self.tools:
            content, calls = interpret(text)
            if calls:
                return "completed", [{"id": _id("fc_"), "type": "function_call", "status": "completed",
                                      "call_id": c["id"], "name": c["function"]["name"],
                                      "arguments": c["function"]["arguments"]} for c in calls]
            text = content or ""
        return status, [self._message(status, [self._part(text, self._logprobs(job.logprobs))])]

    # ------------------------------------------------------------------ the wire

    def whole(self, job: Job, finish_reason: str) -> Response:
        status, output = self.output(job, finish_reason)
        return JSON(self.response(status, output, job))

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, **fields, "sequence_number": self.seq}
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + dumps(data) + b"\n\n"

    def opening(self, job: Job) -> Iterable[bytes]:
        yield self._event("response.created", response=self.response("in_progress", []))
        yield self._event("response.in_progress", response=self.response("in_progress", []))
        if not self.tools:
            yield from self._message_added(0)

    def _message_added(self, index: int) -> Iterable[bytes]:
        yield self._event("response.output_item.added", output_index=index, item=self._message("in_progress", []))
        yield self._event("response.content_part.added", item_id=self.message_id, output_index=index,
                          content_index=0, part=self._part("", []))

    def piece(self, job: Job, text: str, index: int = 0) -> bytes:
        if self.tools:
            return b""
        return self._delta(0, text, self._logprobs(job.unsent_logprobs(0)))

    def _delta(self, index: int, text: str, logprobs: list) -> bytes:
        return self._event("response.output_text.delta", item_id=self.message_id, output_index=index,
                           content_index=0, delta=text, logprobs=logprobs)

    def closing(self, job: Job, finish_reason: str) -> Iterable[bytes]:
        status, output = self.output(job, finish_reason)
        for index, item in enumerate(output):
            if item["type"] == "message":
                part = item["content"][0]
                if self.tools:  # read whole at the end: its text in one delta
                    yield from self._message_added(index)
                    if part["text"]:
                        yield self._delta(index, part["text"], part["logprobs"])
                yield self._event("response.output_text.done", item_id=item["id"], output_index=index,
                                  content_index=0, text=part["text"], logprobs=part["logprobs"])
                yield self._event("response.content_part.done", item_id=item["id"], output_index=index,
                                  content_index=0, part=part)
            else:
                yield self._event("response.output_item.added", output_index=index,
                                  item={**item, "status": "in_progress", "arguments": ""})
                yield self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                                  delta=item["arguments"])
                yield self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                  name=item["name"], arguments=item["arguments"])
            yield self._event("response.output_item.done", output_index=index, item=item)
        yield self._event("response.completed" if status == "completed" else "response.incomplete",
                          response=self.response(status, output, job))

    def failure(self, job: Job, error: ApiError) -> Iterable[bytes]:
        """OpenAI's `error` event, then `response.failed` with the response as it stood."""
        error = renamed(error)
        yield self._event("error", code=error.code, message=error.message, param=error.param)
        partial = [] if self.tools else [self._message("incomplete", [self._part(job.text, [])])]
        yield self._event("response.failed", response=self.response(
            "failed", partial, job,
            error={"code": "server_error" if error.status >= 500 else "invalid_prompt", "message": error.message}))


# --------------------------------------------------------------------------- the route


class ResponsesApi:
    """POST /v1/responses of one gateway, over its engine and metrics."""

    def __init__(self, engine: Engine, metrics: GatewayMetrics, read_body: Callable[[Request], Awaitable[bytes]]):
        self.engine = engine
        self.metrics = metrics
        self.read_body = read_body
        self.ignored = IgnoredFieldsLog(PATH)

    async def create(self, request: Request) -> Response | ASGIApp:
        arrived = time.perf_counter()
        body = parse_json_object(await self.read_body(request))
        engine = self.engine
        chat, echo = chat_body(body)
        try:
            req = parse_completion_request(chat, chat=True, model_name=engine.model_name, context=engine.context,
                                           vocab_size=getattr(engine.tokenizer, "vocab_size", None))
        except ApiError as e:
            raise renamed(e) from None
        known = READ_FIELDS + NO_EFFECT_FIELDS + REFUSED_FIELDS + EXTENSION_FIELDS  # as on chat: ignored, named
        self.ignored.note(sorted(k for k in body if k not in known))
        if (record := record_of(request)) is not None:
            record.begin(req)
        answer = ResponsesAnswer(engine.model_name, echo, tools=req.tools is not None and req.tools.constrained,
                                 tokenizer=engine.tokenizer if req.sampling.top_logprobs is not None else None)
        try:
            return await complete(engine, self.metrics, request, req, arrived, answer)
        except ApiError as e:
            raise renamed(e) from None


def responses_route(gateway: Any, read_body: Callable[[Request, int], Awaitable[bytes]]) -> Route:
    """POST /v1/responses for a gateway (its engine, metrics and body limit)."""
    api = ResponsesApi(gateway.engine, gateway.metrics, lambda request: read_body(request, gateway.max_body_bytes))
    return Route(PATH, api.create, methods=["POST"])
