"""Structured output through the official OpenAI SDK on SmolLM2-Instruct: response_format json_object and
json_schema on chat and completions, vLLM's guided_choice / guided_regex, and refusals naming the field."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tests.fixtures.servers import start_gateway, start_textgen

openai = pytest.importorskip("openai")

CAT = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "maxDigits": 2},
        "indoor": {"type": "boolean"},
        "colors": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "age", "indoor"],
}


@pytest.fixture(scope="module")
def client(default_model_dir):
    tg = start_textgen(default_model_dir, max_context_tokens=512)
    gw = start_gateway((tg.address,))
    yield openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0, timeout=120)
    gw.stop()
    tg.stop()


def ask(client, **kw):
    messages = [{"role": "user", "content": "Describe a cat called Tom as JSON."}]
    return client.chat.completions.create(
        model="smollm2-135m-instruct", messages=messages, max_tokens=120, **kw
    )


def test_chat_json_schema_and_json_object_parse_and_validate(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "cat", "schema": CAT}}
    for kw in (dict(temperature=0), dict(temperature=0.8, seed=5)):
        r = ask(client, response_format=fmt, **kw)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), CAT)
    r = ask(client, response_format={"type": "json_object"}, temperature=0)
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_completions_choice_and_regex_through_vllm_extras(client):
    base = dict(model="smollm2-135m-instruct", prompt="The weather today is", max_tokens=20, temperature=0)
    r = client.completions.create(**base, extra_body={"guided_choice": ["sunny", "rainy", "cloudy"]})
    assert r.choices[0].text in ("sunny", "rainy", "cloudy")
    r = client.completions.create(
        **{**base, "temperature": 1.0}, n=3, seed=2, extra_body={"guided_regex": "[0-9]{2} degrees"}
    )
    assert len(r.choices) == 3 and all(re.fullmatch("[0-9]{2} degrees", c.text) for c in r.choices)
    r = client.completions.create(**base, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert r.choices[0].text in ("yes", "no")


@pytest.mark.parametrize(
    "extra, field",
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 3}},
                }
            },
            "response_format",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"$ref": "#/nope"}},
                }
            },
            "response_format",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"guided_regex": "([a-"}, "guided_regex"),
        ({"guided_json": {"type": "integer", "minimum": 3}}, "guided_json"),
        ({"guided_choice": "sunny"}, "guided_choice"),
        ({"guided_choice": ["a"], "guided_regex": "b"}, "guided_regex"),
    ],
)
def test_constraints_that_cannot_be_enforced_are_400s_naming_the_field(client, extra, field):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smollm2-135m-instruct", prompt="x", max_tokens=4, extra_body=extra)
    assert e.value.status_code == 400 and field in str(e.value.body), e.value.body


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 20}},
            "required": ["zone"],
        },
    },
}


def chat(client, content="What is the weather in Paris?", **kw):
    return client.chat.completions.create(
        model="smollm2-135m-instruct", messages=[{"role": "user", "content": content}], max_tokens=80, **kw
    )


def test_forced_tool_calls_always_parse_with_ids_and_finish_reason(client):
    params = WEATHER["function"]["parameters"]
    r = chat(client, tools=[WEATHER, TIME], tool_choice="required", temperature=0)
    (choice,) = r.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name in ("get_weather", "get_time")
    r = chat(
        client, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}}
    )
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), params)


def test_a_forced_call_streams_as_one_tool_calls_delta(client):
    stream = chat(
        client,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        stream=True,
        temperature=0,
    )
    chunks = list(stream)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals[-1].choices[0].finish_reason == "tool_calls"
    (call,) = finals[-1].choices[0].delta.tool_calls
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments), dict)


def test_auto_and_none_and_a_tool_result_turn(client):
    auto = chat(client, tools=[WEATHER], temperature=0)  # tool_choice auto: a call or an answer
    c = auto.choices[0]
    assert (c.finish_reason == "tool_calls" and c.message.tool_calls) or (
        c.finish_reason in ("stop", "length") and isinstance(c.message.content, str)
    )
    none = chat(client, tools=[WEATHER], tool_choice="none", temperature=0)
    assert none.choices[0].message.tool_calls is None and isinstance(none.choices[0].message.content, str)
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
    }
    r = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        ],
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=20,
        temperature=0,
    )
    assert isinstance(r.choices[0].message.content, str)


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "integer", "minimum": 1}},
                    }
                ],
                "tool_choice": "required",
            },
            "tools",
        ),
    ],
)
def test_bad_tools_are_400s_naming_the_field(client, kw, field):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, **kw)
    assert field in str(e.value.body), e.value.body
