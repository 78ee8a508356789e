"""Tool calling through the official openai client on a real model: the call, its arguments valid
against the function's schema, the result sent back, streaming, and the refusals."""

from __future__ import annotations

import json

import httpx
import pytest

from test_gateway import Served, _error

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]


@pytest.fixture(scope="module")
def smol(smol_cluster):
    """A live 2-peer cluster on SmolLM2, reached through the gateway of the peer that forwards."""
    return smol_cluster


@pytest.fixture(scope="module")
def smol_here(loop):
    """SmolLM2 in this process, behind a gateway on a free port (no cluster to start)."""
    from conftest import shared_model
    from p2pllm.gateway.app import create_app
    from p2pllm.gateway.server import serve_gateway
    from p2pllm.runtime.local import build_local_engine

    engine = loop.run(build_local_engine(str(shared_model(SMOLLM2))))
    server = loop.run(serve_gateway(create_app(engine), "127.0.0.1", 0))
    yield Served(loop, engine, server)
    loop.run(server.stop())
    loop.run(engine.stop())


def _valid(call, tool: dict) -> dict:
    args = json.loads(call.function.arguments)
    schema = tool["function"]["parameters"]
    assert call.function.name == tool["function"]["name"] and set(args) == set(schema["required"])
    return args


def test_a_full_tool_call_round_trip_with_the_openai_client(smol):
    client = smol.client()
    first = client.chat.completions.create(model=SMOLLM2, messages=ASK, tools=[WEATHER, ADD], max_tokens=80,
                                           temperature=0, tool_choice={"type": "function",
                                                                       "function": {"name": "get_weather"}})
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    args = _valid(call, WEATHER)
    assert args["unit"] in ("celsius", "fahrenheit") and call.id.startswith("call_")
    follow = [*ASK, choice.message.model_dump(exclude_none=True),
              {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "sunny", "temp": 21})}]
    final = client.chat.completions.create(model=SMOLLM2, messages=follow, tools=[WEATHER, ADD], tool_choice="none",
                                           max_tokens=40, temperature=0)
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_every_answer_is_a_valid_call_or_text(smol, choice):
    client = smol.client()
    for prompt in ("Add 2 and 3.", "Hello, who are you?", "Is it raining in Rome?"):
        reply = client.chat.completions.create(model=SMOLLM2, messages=[{"role": "user", "content": prompt}],
                                               tools=[WEATHER, ADD], tool_choice=choice, max_tokens=120, temperature=0)
        message, finish = reply.choices[0].message, reply.choices[0].finish_reason
        if finish == "length" and choice == "required":
            continue  # cut short by max_tokens before the JSON closed: no call to check
        if message.tool_calls:
            assert finish == "tool_calls"
            for call in message.tool_calls:
                _valid(call, {"get_weather": WEATHER, "add": ADD}[call.function.name])
        else:
            assert choice == "auto" and finish in ("stop", "length") and isinstance(message.content, str)
            assert not message.content.startswith('{"response"')  # the text itself, not the format around it


def test_parallel_tool_calls_false_makes_at_most_one_call(smol):
    reply = smol.client().chat.completions.create(
        model=SMOLLM2, messages=ASK, tools=[WEATHER, ADD], tool_choice="required", parallel_tool_calls=False,
        max_tokens=80, temperature=0)
    assert len(reply.choices[0].message.tool_calls) == 1


def test_tool_calls_stream_as_openai_streams_them(smol):
    chunks = list(smol.client().chat.completions.create(
        model=SMOLLM2, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=80, temperature=0,
        stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [tc.index for tc in calls] == [0] and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments)["city"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_a_function_without_parameters_is_called_with_no_arguments(smol_here):
    """OpenAI: omitting `parameters` defines a function with an empty parameter list. The schema
    put in its place allowed any object, and the model filled the arguments with made-up keys."""
    client = smol_here.client()
    ping = {"type": "function", "function": {"name": "ping", "description": "Check that the server is up"}}
    for tools in ([ping], [{"type": "function", "function": {**ping["function"], "parameters": None}}]):
        reply = client.chat.completions.create(model=SMOLLM2, messages=[{"role": "user", "content": "Ping it."}],
                                               tools=tools, tool_choice="required", parallel_tool_calls=False,
                                               max_tokens=60, temperature=0)
        (call,) = reply.choices[0].message.tool_calls
        assert call.function.name == "ping" and json.loads(call.function.arguments) == {}
    made = client.responses.create(model=SMOLLM2, input="Ping it.", tools=[{"type": "function", "name": "ping"}],
                                   tool_choice="required", parallel_tool_calls=False, max_output_tokens=60,
                                   temperature=0)
    assert [(o.type, json.loads(o.arguments)) for o in made.output] == [("function_call", {})]


@pytest.mark.parametrize("body, param", [
    ({"tools": "get_weather"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),  # checked without tools too
    ({"messages": [{"role": "tool", "content": "21 C"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": 1}]}]}, "messages[0].tool_calls"),
])
def test_bad_tool_requests_are_400_naming_the_field(smol, body, param):
    with httpx.Client(base_url=smol.url, timeout=30) as http:
        _error(http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, **body}), 400, param=param)
        _error(http.post("/v1/completions", json={"prompt": "x", "tools": [WEATHER]}), 400, param="tools")
