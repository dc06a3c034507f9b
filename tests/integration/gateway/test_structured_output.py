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
        ({"guided_choice": "sunny"}, "guided_choice"),
        ({"guided_choice": ["a"], "guided_regex": "b"}, "guided_regex"),
    ],
)
def test_constraints_that_cannot_be_enforced_are_400s_naming_the_field(client, extra, field):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smollm2-135m-instruct", prompt="x", max_tokens=4, extra_body=extra)
    assert e.value.status_code == 400 and field in str(e.value.body), e.value.body
