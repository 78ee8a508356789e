"""OpenAI tool calling on any model: `tools`, `tool_choice`, `parallel_tool_calls`, tool results.

The model's own chat template renders the tools and the conversation's calls and results where it
knows how (Llama 3.x, Qwen2.5, Mistral ... templates take `tools`); a template that does not is
given them in a system message. Either way the answer is constrained (model/grammar.py) to one
JSON object, llama.cpp's "generic" tool format: `{"tool_calls": [{"name", "arguments"}]}` with
each function's own parameter schema, or `{"response": "text"}` when `tool_choice` is "auto".
It is then returned as OpenAI's `tool_calls` (finish_reason "tool_calls") or as plain content.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

from ..model.grammar import OPENAI_NAME
from .schema import bad, short

MAX_TOOLS = 128


@dataclass(frozen=True)
class ToolPlan:
    """A request's checked tools and what it allows: "auto", "required", "none" or one function's name."""

    tools: tuple[dict, ...]  # OpenAI's {"type": "function", "function": {"name", "description", "parameters"}}
    choice: str
    parallel: bool

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    @property
    def constrained(self) -> bool:
        return self.choice != "none"


def parse_tools(body: dict) -> ToolPlan | None:
    """The request's tools, or None when it has none (tool_choice "none" without tools is fine)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not isinstance(body.get("parallel_tool_calls", True), bool):  # checked with or without tools, as OpenAI does
        raise bad("Invalid type for 'parallel_tool_calls': expected a boolean.", "parallel_tool_calls", "invalid_type")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise bad("'tool_choice' needs 'tools'.", "tool_choice", "invalid_value")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise bad(f"Invalid 'tools': expected a list of at most {MAX_TOOLS} function tools.", "tools", "invalid_type")
    checked, seen = [], set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type") != "function":
            raise bad(f"Invalid 'tools[{i}]': expected {{\"type\": \"function\", \"function\": {{...}}}}.",
                      f"tools[{i}]", "invalid_value")
        name = fn.get("name")
        if not isinstance(name, str) or not OPENAI_NAME.fullmatch(name) or name in seen:
            raise bad(f"Invalid 'tools[{i}].function.name': {short(repr(name))} (1-64 of a-z, A-Z, 0-9, _ and -; "
                      "unique).", f"tools[{i}].function.name", "invalid_value")
        seen.add(name)
        params = fn.get("parameters")
        if params is None:  # OpenAI: "omitting parameters defines a function with an empty parameter list"
            # ({"properties": {}} alone let the model invent any arguments)
            params = {"type": "object", "properties": {}, "additionalProperties": False}
        if not isinstance(params, dict):
            raise bad(f"Invalid 'tools[{i}].function.parameters': expected a JSON schema object.",
                      f"tools[{i}].function.parameters", "invalid_type")
        description = fn.get("description", "")
        if not isinstance(description, str):
            raise bad(f"Invalid 'tools[{i}].function.description': expected a string.",
                      f"tools[{i}].function.description", "invalid_type")
        checked.append({"type": "function", "function": {"name": name, "description": description,
                                                         "parameters": params}})
    return ToolPlan(tuple(checked), _choice(choice, seen), body.get("parallel_tool_calls", True))


def _choice(choice: Any, names: set[str]) -> str:
    if choice is None:
        return "auto"
    if choice in ("auto", "none", "required"):
        return choice
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if name not in names:
        raise bad(f"Invalid 'tool_choice': {short(json.dumps(choice))}; expected \"auto\", \"none\", \"required\" or "
                  "{\"type\": \"function\", \"function\": {\"name\": NAME}} naming one of the tools.", "tool_choice",
                  "invalid_value")
    return name


# --------------------------------------------------------------------------- the prompt


def render_inputs(messages: list[dict], plan: ToolPlan | None, template: str | None) -> tuple[list[dict], dict]:
    """(messages, template variables) for the chat template: the model's own rendering of tools,
    calls and results where its template has one, else plain turns and a system message."""
    if plan is None:
        return messages, {}
    native = template is not None and "tools" in template
    out = []
    for m in messages:
        if native:
            out.append(_native(m))
        elif m.get("tool_calls"):  # an earlier call, as the JSON the model is asked to write
            calls = [{"name": c["function"]["name"], "arguments": _arguments(c)} for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": json.dumps({"tool_calls": calls})})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"Result of tool call {m.get('tool_call_id', '')}: {m['content']}"})
        else:
            out.append({k: v for k, v in m.items() if k in ("role", "content")})
    if not plan.constrained:  # tool_choice "none": earlier calls and results stay, no new call is asked for
        return out, ({"tools": list(plan.tools)} if native else {})
    instructions = _instructions(plan, with_tools=not native)
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + instructions}
    else:
        out.insert(0, {"role": "system", "content": instructions})
    return out, ({"tools": list(plan.tools)} if native else {})


def _native(m: dict) -> dict:
    """A message as Hugging Face templates expect it: call arguments as objects, not JSON text, and
    call ids as 9 letters and digits (Mistral's templates refuse any other; others ignore ids)."""
    if m.get("tool_calls"):
        calls = [{"id": template_call_id(c.get("id", "")), "type": "function",
                  "function": {"name": c["function"]["name"], "arguments": _arguments(c)}} for c in m["tool_calls"]]
        return {**m, "content": m.get("content") or "", "tool_calls": calls}
    if m["role"] == "tool":
        return {**m, "tool_call_id": template_call_id(m.get("tool_call_id", ""))}
    return m


def template_call_id(call_id: str) -> str:
    """A client's call id as 9 letters and digits, the same for the call and for its result."""
    digest = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return "".join(alphabet[(digest // 62 ** i) % 62] for i in range(9))


def _arguments(call: dict) -> Any:
    try:
        return json.loads(call["function"].get("arguments") or "{}")
    except ValueError:
        return call["function"].get("arguments")


def _instructions(plan: ToolPlan, with_tools: bool) -> str:
    lines = []
    if with_tools:
        lines.append("You can call these tools (JSON schemas of their arguments):")
        lines += [json.dumps(t["function"]) for t in plan.tools]
    if plan.choice == "auto":
        lines.append('Reply with one JSON object: {"tool_calls": [{"name": ..., "arguments": {...}}]} to call tools, '
                     'or {"response": "..."} to answer directly.')
    else:
        lines.append('Reply with one JSON object: {"tool_calls": [{"name": ..., "arguments": {...}}]}.')
    return "\n".join(lines)


# --------------------------------------------------------------------------- the answer


def reply_schema(plan: ToolPlan) -> dict:
    """The JSON schema every answer is constrained to."""
    allowed = [t for t in plan.tools if plan.choice in ("auto", "required") or t["function"]["name"] == plan.choice]
    call = {"anyOf": [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                        "arguments": t["function"]["parameters"]},
                       "required": ["name", "arguments"], "additionalProperties": False} for t in allowed]}
    calls = {"type": "array", "items": call, "minItems": 1}
    if not plan.parallel or plan.choice not in ("auto", "required"):
        calls["maxItems"] = 1
    with_calls = {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"],
                  "additionalProperties": False}
    if plan.choice != "auto":
        return with_calls
    answer = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"],
              "additionalProperties": False}
    return {"anyOf": [with_calls, answer]}


def interpret(text: str) -> tuple[str | None, list[dict] | None]:
    """(content, tool_calls) of a finished constrained answer. One cut short by max_tokens: a
    direct answer's text so far, anything else as it is."""
    try:
        data = json.loads(text)
    except ValueError:
        try:
            data = json.loads(text + '"}')  # {"response": "... cut mid-string
        except ValueError:
            return text, None
        return (data["response"], None) if isinstance(data, dict) and isinstance(data.get("response"), str) \
            else (text, None)
    if isinstance(data, dict) and isinstance(data.get("tool_calls"), list):
        calls = [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                  "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                 for c in data["tool_calls"]]
        return None, calls
    if isinstance(data, dict) and isinstance(data.get("response"), str):
        return data["response"], None
    return text, None
