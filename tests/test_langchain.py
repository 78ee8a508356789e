"""LangChain's ChatOpenAI against the gateway: structured output (json_schema and function
calling) and bound tools, the way agent frameworks call it."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from test_tools import SMOLLM2, smol  # noqa: F401  (fixture)

langchain_openai = pytest.importorskip("langchain_openai", reason="langchain-openai is in the test extra")


class Country(BaseModel):
    name: str
    capital: str


def _llm(served):
    return langchain_openai.ChatOpenAI(base_url=served.url + "/v1", api_key="unused", model=SMOLLM2, temperature=0,
                                       max_tokens=60, max_retries=0)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output(smol, method):
    answer = _llm(smol).with_structured_output(Country, method=method).invoke("France as JSON with its capital.")
    assert answer == Country(name="France", capital="Paris")


def test_bind_tools_gives_tool_calls_with_valid_arguments(smol):
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return "sunny"

    message = _llm(smol).bind_tools([get_weather], tool_choice="get_weather", parallel_tool_calls=False).invoke(
        "What is the weather in Paris?")
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("get_weather", {"city": "Paris"})]
