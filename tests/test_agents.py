"""Agent clients on the real base (SmolLM2-135M-Instruct, fixture ``real_server``: vLLM's hermes tool-call parser,
auto tool choice, arguments pinned to each tool's schema): tool calling on chat completions and the Responses API,
through the OpenAI SDK, LangChain and the OpenAI Agents SDK, on an expert recipe and on `auto`.

A named function and ``tool_choice: required`` are grammar-constrained, so their arguments must parse and
validate against the tool's JSON schema (streamed too); a tool-result turn is routed on the user's message, so
`auto` keeps the conversation's recipe. bench/compat/tools.py compares the same clients with ``vllm serve``.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
from pydantic import BaseModel, Field

MODELS = ("random-lora", "auto")      # a LoRA-path expert, and the knn router
QUESTION = "What is the weather in Paris?"
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
          "required": ["city", "unit"], "additionalProperties": False}
CHAT_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                              "parameters": SCHEMA}}
RESPONSES_TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city",
                  "parameters": SCHEMA}


class GetWeather(BaseModel):
    """The weather in a city."""

    city: str = Field(max_length=24, description="the city")


@pytest.fixture(scope="module")
def sdk(real_server):
    from openai import OpenAI

    return OpenAI(base_url=real_server.url + "/v1", api_key="unused", max_retries=0)


def _chat(sdk, model: str, messages: list, choice, stream: bool = False):
    return sdk.chat.completions.with_raw_response.create(
        model=model, messages=messages, tools=[CHAT_TOOL], tool_choice=choice, temperature=0, max_tokens=128,
        stream=stream)


@pytest.mark.parametrize("model", MODELS)
def test_openai_sdk_named_and_required_tool_calls_parse_against_the_schema(sdk, model):
    named = {"type": "function", "function": {"name": "get_weather"}}
    messages = [{"role": "user", "content": QUESTION}]
    for choice, finish in ((named, "stop"), ("required", "tool_calls")):
        raw = _chat(sdk, model, messages, choice)
        reply = raw.parse().choices[0]
        assert reply.finish_reason == finish, reply
        (call,) = reply.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA)
        streamed = _chat(sdk, model, messages, choice, stream=True).parse()
        pieces, finishes, names = [], [], []
        for chunk in streamed:
            for c in chunk.choices:
                finishes.append(c.finish_reason)
                for d in c.delta.tool_calls or []:
                    names += [d.function.name] if d.function and d.function.name else []
                    pieces.append((d.function.arguments or "") if d.function else "")
        assert names == ["get_weather"] and [f for f in finishes if f] == [finish]
        assert json.loads("".join(pieces)) == json.loads(call.function.arguments)


@pytest.mark.parametrize("model", MODELS)
def test_a_tool_result_turn_keeps_the_recipe_the_conversation_was_routed_to(sdk, model):
    """The tool's answer goes back as a ``tool`` message; the turn is served (text), on the same recipe."""
    messages = [{"role": "user", "content": QUESTION}]
    first = _chat(sdk, model, messages, "required")
    call = first.parse().choices[0].message.tool_calls[0]
    messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
    second = _chat(sdk, model, messages, "auto")
    reply = second.parse().choices[0]
    assert reply.message.content and not reply.message.tool_calls and reply.finish_reason in ("stop", "length")
    assert second.headers["x-deltaserve-recipe"] == first.headers["x-deltaserve-recipe"]


@pytest.mark.parametrize("model", MODELS)
def test_langchain_bind_tools_and_function_calling_structured_output(real_server, model):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=model, base_url=real_server.url + "/v1", api_key="unused", temperature=0,
                     max_tokens=128)
    (call,) = llm.bind_tools([GetWeather], tool_choice="GetWeather").invoke("Weather in Paris?").tool_calls
    assert call["name"] == "GetWeather" and GetWeather(**call["args"])
    (call,) = llm.bind_tools([GetWeather], tool_choice="any").invoke("Weather in Paris?").tool_calls
    assert GetWeather(**call["args"])
    assert isinstance(llm.with_structured_output(GetWeather, method="function_calling").invoke("Weather in Rome?"),
                      GetWeather)


@pytest.mark.parametrize("model", MODELS)
def test_responses_api_text_named_tool_stream_and_a_tool_result_turn(sdk, model):
    text = sdk.responses.create(model=model, input="What is the capital of France?", max_output_tokens=16,
                                temperature=0)
    assert text.status in ("completed", "incomplete") and text.output_text
    assert model == "auto" or json.loads(text.metadata["deltaserve"])["recipe"] == model
    named = {"type": "function", "name": "get_weather"}
    called = sdk.responses.create(model=model, input=QUESTION, tools=[RESPONSES_TOOL], tool_choice=named,
                                  max_output_tokens=128, temperature=0)
    (call,) = called.output
    assert call.type == "function_call" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), SCHEMA)
    events = list(sdk.responses.create(model=model, input=QUESTION, tools=[RESPONSES_TOOL], tool_choice=named,
                                       max_output_tokens=128, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "response.function_call_arguments.delta" in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    (streamed,) = events[-1].response.output
    assert json.loads(streamed.arguments) == json.loads(call.arguments)
    turn = sdk.responses.create(model=model, tools=[RESPONSES_TOOL], max_output_tokens=24, temperature=0, input=[
        {"role": "user", "content": QUESTION}, call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": "18 degrees and sunny"}])
    assert turn.output_text
    assert json.loads(turn.metadata["deltaserve"])["recipe"] == json.loads(called.metadata["deltaserve"])["recipe"]


@pytest.mark.parametrize("model", MODELS)
def test_openai_agents_sdk_calls_the_tool_and_answers(real_server, model):
    """The Agents SDK's default model (Responses API) and its chat-completions model: the agent calls the tool
    (named tool choice), gets its result back and answers in a second request."""
    from agents import (Agent, ModelSettings, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner,
                        function_tool, set_tracing_disabled)
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    cities: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        cities.append(city)
        return f"18 degrees and sunny in {city}"

    client = AsyncOpenAI(base_url=real_server.url + "/v1", api_key="unused", max_retries=0)
    for kind in (OpenAIResponsesModel, OpenAIChatCompletionsModel):
        cities.clear()
        agent = Agent(name="weather", instructions="You answer questions about the weather.", tools=[get_weather],
                      model=kind(model=model, openai_client=client),
                      model_settings=ModelSettings(tool_choice="get_weather", temperature=0, max_tokens=128))
        result = Runner.run_sync(agent, QUESTION, max_turns=3)
        assert len(cities) == 1 and cities[0], kind
        assert len(result.raw_responses) == 2 and isinstance(result.final_output, str) and result.final_output
