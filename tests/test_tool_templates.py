"""Tools, calls and results rendered by models' own chat templates (Llama 3.1, Qwen2.5, Mistral Nemo,
from llama.cpp's models/templates, MIT; SmolLM2's from its GGUF): our sandboxed renderer gives
transformers' text for the same conversation, and the tools, the call and its result are in it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import shared_model
from p2pllm.gateway.tools import parse_tools, render_inputs
from p2pllm.model.tokenizer import load_tokenizer, render_chat_template

TEMPLATES = Path(__file__).with_name("data") / "chat_templates"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CONVERSATION = [  # as an OpenAI client sends it
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_8f3a9c1d2e4b5a6f7c8d9e0a", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_8f3a9c1d2e4b5a6f7c8d9e0a", "content": "sunny, 21 C"},
]  # ... and the model answers next, with the result in view


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    """Any transformers tokenizer: the template is passed in, its own is not used."""
    transformers = pytest.importorskip("transformers")
    from p2pllm.model.demo import make_demo_model

    folder = make_demo_model(tmp_path_factory.mktemp("hf") / "tiny", "hf", "tiny")
    return transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("name", ["meta-llama-Llama-3.1-8B-Instruct", "Qwen-Qwen2.5-7B-Instruct",
                                  "mistralai-Mistral-Nemo-Instruct-2407"])
def test_native_tool_templates_render_like_transformers(hf_tok, name):
    template = (TEMPLATES / f"{name}.jinja").read_text()
    plan = parse_tools({"tools": [WEATHER], "tool_choice": "auto"})
    messages, extra = render_inputs(CONVERSATION, plan, template)
    assert extra == {"tools": [WEATHER]}
    ours = render_chat_template(template, messages, True, bos_token="<s>", eos_token="</s>", **extra)
    theirs = hf_tok.apply_chat_template(messages, tools=extra["tools"], chat_template=template, tokenize=False,
                                        add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    assert ours == theirs
    for needle in ("get_weather", "The current weather in a city", "Paris", "sunny, 21 C", "Weather in Paris?"):
        assert needle in ours, (needle, ours)
    call = next(m for m in messages if m.get("tool_calls"))["tool_calls"][0]
    result = next(m for m in messages if m["role"] == "tool")
    assert call["function"]["arguments"] == {"city": "Paris"}  # objects, as HF templates expect
    assert call["id"] == result["tool_call_id"] and len(call["id"]) == 9 and call["id"].isalnum()


def test_a_template_without_tools_gets_them_in_a_system_message():
    tok = load_tokenizer(shared_model("SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert "tools" not in tok.chat_template
    messages, extra = render_inputs(CONVERSATION, parse_tools({"tools": [WEATHER]}), tok.chat_template)
    text = tok.apply_chat_template(messages, **extra)
    assert extra == {} and messages[0]["content"].startswith("You are terse.")
    assert json.dumps(WEATHER["function"]) in text and '{"tool_calls": [{"name": "get_weather"' in text
    assert "Result of tool call call_8f3a9c1d2e4b5a6f7c8d9e0a: sunny, 21 C" in text
    assert text.count("<|im_start|>") == len(messages) + 1  # every turn, and the assistant's to come
