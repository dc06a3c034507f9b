"""Structured output on a real (tiny, random) model: whatever the model would rather say, the text parses
and validates against the schema, matches the regex, or is one of the choices."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from protos.textgen.v1 import textgen_pb2 as pb
from services.textgen.config import TextgenConfig
from services.textgen.guided import Constraints, token_bytes
from services.textgen.loader import load_served_model
from services.textgen.sampling import SamplingSpec
from services.textgen.sequences import EOS, SequenceRequest, StopSpec
from shared.errors import InvalidArgument

S = {"type": "string", "maxLength": 6}
SCHEMAS = [
    {"type": "boolean"},
    {"type": "null"},
    {"type": "string", "maxLength": 5},
    {"type": "string", "enum": ["red", "green", "blue"]},
    {"const": "fixed"},
    {"type": "integer", "maxDigits": 3},
    {"type": "string", "pattern": "^[a-z]{2,4}$"},
    {"type": "string", "format": "date"},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3},
    {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 4},
    {"type": "object", "properties": {"name": S}, "required": ["name"]},
    {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maxDigits": 2}},
        "required": ["ok", "n"],
    },
    {
        "type": "object",
        "properties": {"tag": {"enum": ["x", "y"]}, "note": S},
        "required": ["tag"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"id": {"type": "integer", "maxDigits": 4}, "name": S},
                "required": ["id", "name"],
            }
        },
        "required": ["user"],
    },
    {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {"type": "object", "properties": {"k": S}, "required": ["k"]},
                "maxItems": 2,
            }
        },
        "required": ["items"],
    },
    {"anyOf": [{"type": "boolean"}, {"type": "null"}, {"type": "string", "maxLength": 3}]},
    {
        "type": "object",
        "properties": {"v": {"anyOf": [{"type": "integer", "maxDigits": 2}, {"type": "null"}]}},
        "required": ["v"],
    },
    {
        "$defs": {"pt": {"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"]}},
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}},
        "required": ["a", "b"],
    },
    {"type": "array", "prefixItems": [{"type": "boolean"}, {"type": "null"}], "minItems": 2, "maxItems": 2},
    {
        "type": "object",
        "properties": {"when": {"type": "string", "format": "date"}, "level": {"enum": [1, 2, 3]}},
        "required": ["when", "level"],
    },
]


@pytest.fixture(scope="module")
def served(tiny_models):
    s = load_served_model(
        TextgenConfig(
            model_dir=tiny_models["llama"], max_batch_size=32, max_context_tokens=256, port=0, metrics_port=0
        )
    )
    s.engine.start()
    yield s
    s.engine.stop()


@pytest.fixture(scope="module")
def constraints(served):
    return Constraints(served.tokenizer, served.model.out_w.shape[0])


def run(served, index, sampling, n=160):
    ids = served.tokenizer.encode("The answer is")
    req = SequenceRequest(
        prompt_ids=tuple(ids), sampling=sampling, stopping=StopSpec(max_new_tokens=n), guide_index=index
    )
    r = served.engine.submit([req])[0].result()
    assert r.finish_reason == EOS, r  # the constraint completed, then only EOS was allowed
    return served.tokenizer.decode(r.token_ids[:-1])


def test_token_bytes_rebuild_the_text_of_every_token(served):
    mapping, eos = token_bytes(served.tokenizer)
    tok = served.tokenizer
    assert eos == tok.eos_id and all(eos not in ids for ids in mapping.values())
    for raw, ids in list(mapping.items())[:300]:
        assert tok.decode(ids[:1]).encode() == raw or b"\xef\xbf\xbd" in tok.decode(ids[:1]).encode()


@pytest.mark.parametrize("i", range(len(SCHEMAS)))
def test_every_output_parses_and_validates(served, constraints, i):
    schema = SCHEMAS[i]
    index = constraints.index(pb.Guided(json_schema=json.dumps(schema)))
    for sampling in (SamplingSpec(greedy=True), SamplingSpec(temperature=1.0, seed=i)):
        text = run(served, index, sampling)
        jsonschema.validate(json.loads(text), schema)


def test_regex_and_choices(served, constraints):
    # (json_object lets strings run unbounded, which a random model does: tested with SmolLM2 through the
    # OpenAI SDK in tests/integration/gateway/test_structured_output.py)
    rx = r"[A-Z][a-z]{1,5}-[0-9]{2}"
    assert re.fullmatch(rx, run(served, constraints.index(pb.Guided(regex=rx)), SamplingSpec(greedy=True)))
    choices = ["positive", "negative", "neutral"]
    index = constraints.index(pb.Guided(choice=pb.Choices(values=choices)))
    for seed in range(3):
        assert run(served, index, SamplingSpec(temperature=1.0, seed=seed)) in choices


def test_a_schema_is_compiled_once_then_served_from_the_cache(constraints):
    g = pb.Guided(json_schema=json.dumps({"type": "string", "maxLength": 9}))
    before = constraints.compiled
    first = constraints.index(g)
    assert constraints.index(g) is first and constraints.compiled == before + 1


@pytest.mark.parametrize(
    "guided, field, words",
    [
        (pb.Guided(json_schema='{"$ref": "#/nowhere/x"}'), "response_format", "cannot be used"),
        (pb.Guided(json_schema='{"type": "integer", "minimum": 0}'), "response_format", "'minimum'"),
        (pb.Guided(json_schema="{not json"), "response_format", "cannot be used"),
        (
            pb.Guided(json_schema='{"type": "array", "items": [{"type": "null"}]}'),
            "response_format",
            "cannot be used",
        ),
        (pb.Guided(regex="([a-z"), "guided_regex", "not a valid regular expression"),
        (pb.Guided(choice=pb.Choices(values=[])), "guided_choice", "non-empty"),
    ],
)
def test_constraints_that_cannot_be_enforced_are_refused_naming_the_field(constraints, guided, field, words):
    with pytest.raises(InvalidArgument) as e:
        constraints.index(guided)
    assert e.value.field == field and words in e.value.message


def test_the_one_token_check_and_the_whole_mask_agree_with_the_guides_own_list(served, constraints):
    """``GuideState.allows`` (the engine's check of a greedy pick) and ``allowed`` (the mask) both read the
    bits outlines-core writes; they must name the tokens its own list of allowed ids names, state by state."""
    from services.textgen.guided import GuideState

    index = constraints.index(pb.Guided(regex=r"[A-Z][a-z]{1,3}-[0-9]"))
    vocab = served.model.out_w.shape[0]
    state = GuideState(index, vocab)
    for _ in range(4):
        want = set(state.guide.get_tokens())
        mask = state.allowed(torch.device("cpu"))
        assert mask.dtype == torch.bool and mask.shape == (vocab,)
        assert set(mask.nonzero().flatten().tolist()) == want
        assert {t for t in range(vocab) if state.allows(t)} == want
        assert not state.allows(-1) and not state.allows(vocab)
        state.advance(min(want))
