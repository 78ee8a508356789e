"""OpenAI's Responses API (POST /v1/responses) over real HTTP against the real in-process engine.

The client is the official `openai` package (`client.responses.create`, `.stream`, `.parse`); the
reference is the same gateway's /v1/chat/completions: a greedy response must have chat's text
and chat's token counts. Raw httpx covers the refusals and the wire.
"""

from __future__ import annotations

import json
import typing

import httpx
import openai
import pytest
from openai.types.responses import response_create_params
from pydantic import BaseModel

from p2pllm.gateway.app import create_app
from p2pllm.gateway.responses_api import EXTENSION_FIELDS, NO_EFFECT_FIELDS, READ_FIELDS, REFUSED_FIELDS
from p2pllm.gateway.server import serve_gateway
from p2pllm.runtime.api import TokenEvent
from test_gateway import API_KEY, Served, _error, _wait_idle, demo, stories  # noqa: F401  (fixtures)

STORY = "Once upon a time"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _chat(client: openai.OpenAI, model: str, messages: list[dict], max_tokens: int, **kw):
    return client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0, **kw)


def _post(served: Served, body: dict, **kw) -> httpx.Response:
    with httpx.Client(base_url=served.url, timeout=60, headers=kw.pop("headers", {})) as http:
        return http.post("/v1/responses", json=body)


# --------------------------------------------------------------------------- answers


def test_greedy_response_equals_chat_text_and_usage(stories):
    client = stories.client()
    model = stories.engine.model_name
    res = client.responses.create(model=model, input=STORY, max_output_tokens=24, temperature=0)
    chat = _chat(client, model, [{"role": "user", "content": STORY}], 24)
    assert res.output_text == chat.choices[0].message.content and res.output_text
    assert res.id.startswith("resp_") and res.object == "response" and res.model == model
    assert isinstance(res.created_at, (int, float))
    [item] = res.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    [part] = item.content
    assert part.type == "output_text" and part.text == res.output_text and part.annotations == []
    u = res.usage
    assert (u.input_tokens, u.output_tokens, u.total_tokens) == (
        chat.usage.prompt_tokens, chat.usage.completion_tokens, chat.usage.total_tokens)
    assert u.input_tokens_details.cached_tokens == chat.usage.prompt_tokens_details.cached_tokens
    assert u.output_tokens_details.reasoning_tokens == 0
    assert res.temperature == 0 and res.max_output_tokens == 24 and res.tools == [] and res.error is None


def test_a_conversation_of_items_with_instructions_equals_the_chat_messages(stories):
    client = stories.client()
    model = stories.engine.model_name
    res = client.responses.create(
        model=model, instructions="Tell a story.", max_output_tokens=16, temperature=0,
        input=[{"role": "user", "content": "Tom had a dog."},
               {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
                "content": [{"type": "output_text", "text": "The dog was big.", "annotations": []}]},
               {"role": "developer", "content": "Be kind."},
               {"role": "user", "content": [{"type": "input_text", "text": "What "},
                                            {"type": "input_text", "text": "next?"}]}])
    chat = _chat(client, model, [{"role": "system", "content": "Tell a story."},
                                 {"role": "user", "content": "Tom had a dog."},
                                 {"role": "assistant", "content": "The dog was big."},
                                 {"role": "system", "content": "Be kind."},
                                 {"role": "user", "content": "What next?"}], 16)
    assert res.output_text == chat.choices[0].message.content
    assert res.usage.input_tokens == chat.usage.prompt_tokens
    assert res.instructions == "Tell a story."


def test_max_output_tokens_is_incomplete_and_a_stop_is_completed(stories):
    client = stories.client()
    model = stories.engine.model_name
    cut = client.responses.create(model=model, input=STORY, max_output_tokens=12, temperature=0)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.output[0].status == "incomplete" and cut.usage.output_tokens == 12
    word = cut.output_text.split()[1]  # chat's `stop` extension ends it before that word: "stop", so completed
    done = client.responses.create(model=model, input=STORY, max_output_tokens=12, temperature=0,
                                   extra_body={"stop": [word]})
    assert done.status == "completed" and done.incomplete_details is None and done.output[0].status == "completed"
    assert done.output_text == cut.output_text[:cut.output_text.index(word)]


def test_streamed_events_parse_in_order_and_deltas_make_the_whole_text(stories):
    client = stories.client()
    model = stories.engine.model_name
    whole = client.responses.create(model=model, input=STORY, max_output_tokens=20, temperature=0)
    events = list(client.responses.create(model=model, input=STORY, max_output_tokens=20, temperature=0, stream=True))
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * len(deltas),
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert len({e.response.id for e in events if hasattr(e, "response")}) == 1
    text = "".join(d.delta for d in deltas)
    assert text == whole.output_text == events[-4].text == events[-3].part.text
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    last = events[-1].response
    assert last.status == "incomplete" and last.output_text == text
    assert last.usage.output_tokens == whole.usage.output_tokens and last.usage.input_tokens == whole.usage.input_tokens


def test_the_stream_helper_gives_the_final_response(stories):
    client = stories.client()
    model = stories.engine.model_name
    cut = client.responses.create(model=model, input=STORY, max_output_tokens=12, temperature=0)
    stop = {"stop": [cut.output_text.split()[1]]}
    with client.responses.stream(model=model, input=STORY, max_output_tokens=12, temperature=0,
                                 extra_body=stop) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == "".join(deltas)
    assert final.output_text == client.responses.create(model=model, input=STORY, max_output_tokens=12,
                                                        temperature=0, extra_body=stop).output_text


def test_structured_output_through_text_format(demo):
    class Verdict(BaseModel):
        ok: bool
        grade: typing.Literal["a", "b", "c"]

    client = demo.client(api_key=API_KEY)
    model = demo.engine.model_name
    res = client.responses.parse(model=model, input="Judge it.", text_format=Verdict, max_output_tokens=40,
                                 temperature=0)
    assert res.status == "completed" and isinstance(res.output_parsed, Verdict)
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Judge it."}], max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "Verdict", "strict": True,
                                                                "schema": res.text.format.schema_}})
    assert res.output_text == chat.choices[0].message.content
    anything = client.responses.create(model=model, input="JSON please.", max_output_tokens=40, temperature=0,
                                       text={"format": {"type": "json_object"}})
    if anything.status == "completed":
        assert isinstance(json.loads(anything.output_text), dict)


WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                          "required": ["city"], "additionalProperties": False}}


def test_function_tools_give_function_call_items_as_chat_gives_tool_calls(demo):
    client = demo.client(api_key=API_KEY)
    model = demo.engine.model_name
    question = [{"role": "user", "content": "Weather in Paris?"}]
    chat_tools = [{"type": "function", "function": {k: WEATHER[k] for k in ("name", "description", "parameters")}}]
    one_call = dict(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, temperature=0)
    res = client.responses.create(model=model, input=question, max_output_tokens=200, **one_call)
    chat = client.chat.completions.create(model=model, messages=question, max_tokens=200, temperature=0,
                                          tool_choice="required", parallel_tool_calls=False, tools=chat_tools)
    calls = [o for o in res.output if o.type == "function_call"]
    assert calls and res.status == "completed"
    assert [(c.name, c.arguments) for c in calls] == [(c.function.name, c.function.arguments)
                                                      for c in chat.choices[0].message.tool_calls]
    assert all(c.call_id.startswith("call_") and c.id.startswith("fc_") for c in calls)
    assert "city" in json.loads(calls[0].arguments)

    streamed = list(client.responses.create(model=model, input=question, max_output_tokens=200, stream=True,
                                            **one_call))
    done = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    assert [e.arguments for e in done] == [c.arguments for c in calls]
    assert streamed[-1].type == "response.completed"
    assert [e.sequence_number for e in streamed] == list(range(len(streamed)))

    # the call and its result go back as items, as chat's assistant tool_calls and tool message
    follow = question + [{"type": "function_call", "call_id": "call_1", "name": "get_weather",
                          "arguments": calls[0].arguments},
                         {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 21 C"}]
    again = client.responses.create(model=model, input=follow, tools=[WEATHER], tool_choice="none",
                                    max_output_tokens=10, temperature=0)
    chat_again = client.chat.completions.create(
        model=model, max_tokens=10, temperature=0, tool_choice="none", tools=chat_tools,
        messages=question + [
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": calls[0].arguments}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"}])
    assert again.output_text == chat_again.choices[0].message.content


def test_logprobs_are_chats(stories):
    client = stories.client()
    model = stories.engine.model_name
    res = client.responses.create(model=model, input=STORY, max_output_tokens=6, temperature=0, top_logprobs=2,
                                  include=["message.output_text.logprobs"])
    chat = _chat(client, model, [{"role": "user", "content": STORY}], 6, logprobs=True, top_logprobs=2)
    got = res.output[0].content[0].logprobs
    want = chat.choices[0].logprobs.content
    assert [(g.token, g.logprob, [t.token for t in g.top_logprobs]) for g in got] == [
        (w.token, w.logprob, [t.token for t in w.top_logprobs]) for w in want]
    streamed = client.responses.create(model=model, input=STORY, max_output_tokens=6, temperature=0, top_logprobs=2,
                                       include=["message.output_text.logprobs"], stream=True)
    tokens = [lp.token for e in streamed if e.type == "response.output_text.delta" for lp in e.logprobs]
    assert tokens == [g.token for g in got]


# --------------------------------------------------------------------------- what is refused, what is not


@pytest.mark.parametrize("extra,param,code", [
    ({"previous_response_id": "resp_123"}, "previous_response_id", "unsupported_parameter"),
    ({"conversation": "conv_123"}, "conversation", "unsupported_parameter"),
    ({"reasoning": {"effort": "high"}}, "reasoning", "unsupported_parameter"),
    ({"background": True}, "background", "unsupported_parameter"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt", "unsupported_parameter"),
    ({"moderation": {"model": "omni-moderation-latest"}}, "moderation", "unsupported_parameter"),
    ({"context_management": [{"type": "compaction"}]}, "context_management", "unsupported_parameter"),
    ({"tools": [{"type": "web_search"}]}, "tools[0]", "unsupported_value"),
    ({"tools": [{"type": "function", "name": "no spaces allowed"}]}, "tools[0].name", "invalid_value"),
    ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice", "invalid_value"),
    ({"text": {"verbosity": "low"}}, "text.verbosity", "unsupported_parameter"),
    ({"text": {"format": {"type": "xml"}}}, "text.format", "invalid_value"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "bogus"}}}}, "text.format",
     "invalid_value"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
     "input[0].content[0]", "unsupported_value"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file_1"}]}]},
     "input[0].content[0]", "unsupported_value"),
    ({"input": [{"type": "reasoning", "id": "rs_1", "summary": []}]}, "input[0]", "unsupported_value"),
    ({"input": [{"role": "wizard", "content": "hi"}]}, "input[0].role", "invalid_value"),
    ({"input": []}, "input", "empty_array"),
    ({"input": None}, "input", "missing_required_parameter"),
    ({"input": 7}, "input", "invalid_type"),
    ({"max_output_tokens": 0}, "max_output_tokens", "invalid_value"),
    ({"max_output_tokens": "9"}, "max_output_tokens", "invalid_type"),
    ({"temperature": 3}, "temperature", "invalid_value"),
    ({"include": ["everything"]}, "include", "invalid_value"),
    ({"truncation": "middle"}, "truncation", "invalid_value"),
    ({"model": "gpt-4o"}, "model", "model_not_found"),
])
def test_refused_and_bad_requests_are_400_naming_the_param(stories, extra, param, code):
    body = {"model": stories.engine.model_name, "input": "hi", "max_output_tokens": 4, **extra}
    err = _error(_post(stories, {k: v for k, v in body.items() if v is not None}), 400, code, param)
    assert param.split("[")[0].split(".")[0] in err["message"].lower() or code in ("empty_array", "model_not_found")


def test_refusals_reach_the_openai_client_as_bad_requests(stories):
    client = stories.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=stories.engine.model_name, input="hi", previous_response_id="resp_1")
    assert info.value.param == "previous_response_id" and info.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as info:  # another model: a 400 model_not_found, as chat answers
        client.responses.create(model="gpt-4o", input="hi")
    assert info.value.code == "model_not_found" and info.value.param == "model"
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=stories.engine.model_name, input="tale " * stories.engine.context,
                                max_output_tokens=4)
    assert info.value.code == "context_length_exceeded" and info.value.param == "input"


def test_bookkeeping_fields_are_accepted_without_effect(stories):
    client = stories.client()
    model = stories.engine.model_name
    plain = client.responses.create(model=model, input=STORY, max_output_tokens=8, temperature=0)
    busy = client.responses.create(model=model, input=STORY, max_output_tokens=8, temperature=0, store=True,
                                   metadata={"k": "v"}, user="u-1", reasoning={"effort": "none"},
                                   truncation="auto", include=["reasoning.encrypted_content"], tools=[],
                                   parallel_tool_calls=True, service_tier="auto", prompt_cache_key="k",
                                   safety_identifier="s", text={"format": {"type": "text"}}, background=False,
                                   top_logprobs=0,
                                   extra_body={"min_p": 0.1})  # another server's extension: ignored, as chat does
    assert busy.output_text == plain.output_text
    assert busy.metadata == {"k": "v"} and busy.user == "u-1" and busy.store is False  # nothing is stored


def test_every_request_field_of_the_openai_package_is_classified():
    fields = set(typing.get_type_hints(response_create_params.ResponseCreateParamsBase)) | {"stream"}
    classified = set(READ_FIELDS) | set(NO_EFFECT_FIELDS) | set(REFUSED_FIELDS)
    assert fields - classified == set(), "new Responses API fields: classify them in gateway/responses_api.py"
    assert not set(EXTENSION_FIELDS) & fields


def test_the_api_key_guards_it(demo):
    body = {"input": "hi", "max_output_tokens": 2}
    _error(_post(demo, body), 401, "invalid_api_key")
    assert _post(demo, body, headers=AUTH).status_code == 200


# --------------------------------------------------------------------------- disconnects and failures


def test_client_disconnect_mid_stream_cancels_the_generation(stories):
    body = {"model": stories.engine.model_name, "input": STORY, "max_output_tokens": 1500, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=stories.url, timeout=30) as http:
        with http.stream("POST", "/v1/responses", json=body) as reply:
            assert reply.status_code == 200
            got = [line for line, _ in zip(reply.iter_lines(), range(20)) if line.startswith("data:")]
            assert any("response.output_text.delta" in line for line in got)
            stats = stories.stats()
            assert stats.running + stats.extra.get("active_sequences", 0) >= 1  # it runs (either count, by timing)
    _wait_idle(stories)
    res = stories.client().responses.create(model=stories.engine.model_name, input="Hi", max_output_tokens=3,
                                            temperature=0)
    assert res.usage.output_tokens == 3


def test_client_disconnect_while_waiting_for_a_whole_response_cancels_it(stories):
    body = {"model": stories.engine.model_name, "input": STORY, "max_output_tokens": 1500, "temperature": 0,
            "ignore_eos": True}
    with httpx.Client(base_url=stories.url, timeout=0.3) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/responses", json=body)
    _wait_idle(stories)


class _FailsAfter:
    """The engine, but every request fails after `tokens` tokens (a peer lost beyond recovery)."""

    def __init__(self, engine, tokens: int):
        self.engine, self.tokens = engine, tokens

    def __getattr__(self, name):
        return getattr(self.engine, name)

    async def generate(self, request):
        inner = await self.engine.generate(request)

        async def events():
            try:
                n = 0
                async for event in inner:
                    if n == self.tokens:
                        yield TokenEvent(None, "", "error", "peer lost")
                        return
                    n += 1
                    yield event
            finally:
                close = getattr(inner, "aclose", None)
                if close is not None:
                    await close()

        return events()


def test_a_failure_after_the_first_token_ends_with_an_error_event(stories):
    app = create_app(_FailsAfter(stories.engine, 3))
    server = stories.loop.run(serve_gateway(app, "127.0.0.1", 0))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        body = dict(model=stories.engine.model_name, input=STORY, max_output_tokens=20, temperature=0)
        events = list(client.responses.create(**body, stream=True))
        assert [e.type for e in events[-2:]] == ["error", "response.failed"]
        assert events[-2].code == "engine_error" and "peer lost" in events[-2].message
        failed = events[-1].response
        assert failed.status == "failed" and failed.error.code == "server_error" and failed.usage.output_tokens == 3
        assert failed.output[0].content[0].text == "".join(
            e.delta for e in events if e.type == "response.output_text.delta")
        with pytest.raises(openai.InternalServerError):  # not streamed: a 503, as chat answers
            client.responses.create(**body)
    finally:
        stories.loop.run(server.stop())
    _wait_idle(stories)

