"""The OpenAI routes driven by the official ``openai`` Python package, as applications reach them: every
answer must parse into the SDK's own types, and a bad parameter is the SDK's BadRequestError naming it."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def client(gateway):
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_completion_types_usage_and_logprobs(client):
    r = client.completions.create(
        model="llama", prompt="He fell to the", max_tokens=6, temperature=0, logprobs=2
    )
    assert isinstance(r, openai.types.Completion) and r.object == "text_completion"
    c = r.choices[0]
    assert c.index == 0 and c.finish_reason in ("length", "stop") and isinstance(c.text, str)
    assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == r.usage.completion_tokens
    assert all(len(top) <= 2 for top in c.logprobs.top_logprobs)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_penalties_and_logit_bias_change_the_greedy_text_as_asked(client, gateway):
    import requests

    base = dict(model="llama", prompt="The murder was", max_tokens=8, temperature=0)
    plain = client.completions.create(**base, logprobs=0)
    # a generated token whose text tokenizes back to itself alone: ban its id
    pieces = plain.choices[0].logprobs.tokens
    ids = [
        requests.post(f"{gateway.url}/tokenize", json={"prompt": p}, timeout=10).json()["tokens"]
        for p in pieces
    ]
    k = next(i for i, x in enumerate(ids) if len(x) == 1)
    piece = pieces[k]
    banned = client.completions.create(**base, logit_bias={str(ids[k][0]): -100}, logprobs=0)
    assert banned.choices[0].logprobs.tokens[:k] == plain.choices[0].logprobs.tokens[:k]
    assert banned.choices[0].logprobs.tokens[k] != piece
    penalised = client.completions.create(**base, presence_penalty=2.0, frequency_penalty=2.0)
    again = client.completions.create(**base, presence_penalty=2.0, frequency_penalty=2.0)
    assert penalised.choices[0].text == again.choices[0].text  # greedy with penalties is deterministic
    assert isinstance(penalised, openai.types.Completion)


def test_vllm_extras_min_tokens_and_stop_token_ids(client):
    r = client.completions.create(
        model="llama",
        prompt="x",
        max_tokens=12,
        temperature=0,
        extra_body={"min_tokens": 5, "ignore_eos": False},
    )
    assert r.usage.completion_tokens >= 5
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="llama", prompt="x", max_tokens=4, extra_body={"min_tokens": 9})
    assert e.value.body["param"] == "min_tokens"


def test_chat_with_logprobs_and_a_stream_with_usage(client):
    msgs = [{"role": "user", "content": "Say something."}]
    r = client.chat.completions.create(
        model="llama", messages=msgs, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    assert isinstance(r, openai.types.chat.ChatCompletion) and r.choices[0].message.role == "assistant"
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 for t in r.choices[0].logprobs.content)
    chunks = list(
        client.chat.completions.create(
            model="llama",
            messages=msgs,
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(isinstance(c, openai.types.chat.ChatCompletionChunk) for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (
        text == r.choices[0].message.content
        and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    )


@pytest.mark.parametrize(
    "kw,param",
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"not-an-id": 1}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"extra_body": {"stop_token_ids": [-1]}}, "stop_token_ids"),
        ({"n": 17}, "n"),
        ({"n": 0}, "n"),
        ({"n": 3, "best_of": 2}, "best_of"),
        ({"best_of": 2, "stream": True}, "best_of"),
    ],
)
def test_bad_parameters_are_the_sdks_bad_request_naming_the_field(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="llama", prompt="x", max_tokens=2, **kw)
    assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body


def test_n_choices_are_seeded_reproducible_and_count_the_prompt_once(client):
    kw = dict(
        model="llama",
        prompt="Once upon a time",
        max_tokens=6,
        temperature=1.0,
        seed=5,
        n=3,
        extra_body={"ignore_eos": True},
    )
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    one = client.completions.create(**{**kw, "n": 1})
    assert [c.index for c in a.choices] == [0, 1, 2] and [c.text for c in a.choices] == [
        c.text for c in b.choices
    ]
    assert len({c.text for c in a.choices}) > 1  # three samples
    assert a.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert a.usage.completion_tokens == 3 * 6
    chunks = list(
        client.chat.completions.create(
            model="llama",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=4,
            temperature=1.0,
            seed=5,
            n=2,
            extra_body={"ignore_eos": True},
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    by_index: dict[int, list] = {0: [], 1: []}
    for c in chunks:
        for ch in c.choices:
            by_index[ch.index].append(ch)
    for index, parts in by_index.items():
        assert parts[0].delta.role == "assistant" and parts[-1].finish_reason is not None, index
    assert chunks[-1].usage.completion_tokens == 8


def test_best_of_returns_the_candidates_with_the_highest_cumulative_logprob(client):
    kw = dict(
        model="llama",
        prompt="He fell",
        max_tokens=5,
        temperature=1.0,
        seed=9,
        extra_body={"ignore_eos": True},
    )
    # the candidates best_of=4 draws are the n=4 choices of the same seed (choice j samples with seed + j)
    four = client.completions.create(**kw, n=4, logprobs=0)
    best = client.completions.create(**kw, n=2, best_of=4, logprobs=0)
    ranked = sorted(four.choices, key=lambda c: -sum(c.logprobs.token_logprobs))
    assert [c.text for c in best.choices] == [c.text for c in ranked[:2]]
    assert [c.index for c in best.choices] == [0, 1]
    assert best.usage.completion_tokens == 4 * 5  # every candidate's tokens count
    assert best.usage.prompt_tokens == four.usage.prompt_tokens


def test_tools_on_completions_are_refused_not_ignored(client):
    tools = [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    ]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="llama", prompt="hi", max_tokens=4, extra_body={"tools": tools})
    assert "tools" in str(e.value.body)
