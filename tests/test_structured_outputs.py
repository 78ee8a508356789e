"""response_format: answers constrained token by token to a JSON schema (llguidance), through the
official openai client's structured-output helper, over a real gateway and model."""

from __future__ import annotations

import json

import httpx
import pytest
from pydantic import BaseModel

from conftest import shared_model
from p2pllm.model.grammar import grammar_for_response_format
from p2pllm.model.sampling import SamplingParams
from p2pllm.runtime.local import LocalPipeline
from test_gateway import _error
from test_tools import SMOLLM2, smol  # noqa: F401  (the SmolLM2 gateway fixture)
MOOD = {"type": "object", "properties": {"mood": {"enum": ["happy", "sad", "sleepy"]}, "age": {"type": "integer"}},
        "required": ["mood", "age"], "additionalProperties": False}


class Country(BaseModel):
    name: str
    capital: str


def test_the_openai_structured_output_helper_gets_a_parsed_answer(smol):
    client = smol.client()
    reply = client.chat.completions.parse(model=SMOLLM2, response_format=Country, max_tokens=60, temperature=0,
                                          messages=[{"role": "user", "content": "France as JSON with its capital."}])
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and choice.message.parsed == Country(name="France", capital="Paris")


@pytest.mark.parametrize("stream", [False, True])
def test_every_answer_follows_the_schema_whatever_the_prompt(smol, stream):
    client = smol.client()
    rf = {"type": "json_schema", "json_schema": {"name": "mood", "schema": MOOD, "strict": True}}
    for prompt in ("Write a poem about the sea.", "How are you today?", "List three prime numbers."):
        kw = dict(model=SMOLLM2, messages=[{"role": "user", "content": prompt}], response_format=rf, max_tokens=40,
                  temperature=0.8, seed=7)
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                           if c.choices)
        else:
            text = client.chat.completions.create(**kw).choices[0].message.content
        answer = json.loads(text)  # always parses ...
        assert set(answer) == {"mood", "age"} and answer["mood"] in MOOD["properties"]["mood"]["enum"]
        assert isinstance(answer["age"], int)  # ... and validates


def test_json_object_mode_and_plain_text_mode(smol):
    client = smol.client()
    ask = [{"role": "user", "content": "Reply with a JSON object with one key, ok, set to true."}]
    text = client.chat.completions.create(model=SMOLLM2, messages=ask, response_format={"type": "json_object"},
                                          max_tokens=30, temperature=0).choices[0].message.content
    assert text.lstrip().startswith("{")
    plain = client.chat.completions.create(model=SMOLLM2, messages=ask, response_format={"type": "text"},
                                           max_tokens=30, temperature=0).choices[0].message.content
    assert plain == client.chat.completions.create(model=SMOLLM2, messages=ask, max_tokens=30,
                                                   temperature=0).choices[0].message.content


@pytest.mark.parametrize("rf", [
    {"type": "xml"},
    {"type": "json_schema"},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": "not a schema"}},
    {"type": "json_schema", "json_schema": {"name": "my schema!", "schema": {"type": "object"}}},  # OpenAI's name rule
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"$ref": "#/$defs/missing"}}}}},
    "json",
])
def test_a_response_format_that_cannot_be_used_is_a_400_naming_it(smol, rf):
    with httpx.Client(base_url=smol.url, timeout=30) as http:
        reply = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                         "response_format": rf, "max_tokens": 4})
    _error(reply, 400, param="response_format")


def test_a_schema_no_finite_json_meets_is_a_400_not_a_stop_that_does_not_parse(smol):
    """An object that requires itself passes llguidance's checks and dead-ends after `{"`: the masked
    argmax then chose token 0 (end of text) and the answer was `{"` with finish_reason "stop"."""
    endless = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}
    rf = {"type": "json_schema", "json_schema": {"name": "endless", "schema": endless}}
    body = {"messages": [{"role": "user", "content": "hi"}], "response_format": rf, "max_tokens": 40}
    with httpx.Client(base_url=smol.url, timeout=60) as http:
        error = _error(http.post("/v1/chat/completions", json=body), 400, code="invalid_value",
                       param="response_format")
        assert "allows no next token" in error["message"]
        good = http.post("/v1/chat/completions", json={**body, "response_format": {"type": "json_object"}})
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"].lstrip().startswith("{")


def test_the_same_constrained_answer_from_one_stage_and_three():
    path = shared_model(SMOLLM2)
    sampling = SamplingParams(grammar=grammar_for_response_format(
        {"type": "json_schema", "json_schema": {"name": "mood", "schema": MOOD}}))
    answers = []
    for cuts in ([], [10, 20]):
        pipe = LocalPipeline(str(path), cuts)
        prompt = pipe.tokenizer.encode_chat([{"role": "user", "content": "How old is a happy cat?"}])
        answers.append(pipe.generate(prompt, max_tokens=40, sampling=sampling).text)
    assert answers[0] == answers[1] and json.loads(answers[0])["mood"] in MOOD["properties"]["mood"]["enum"]
