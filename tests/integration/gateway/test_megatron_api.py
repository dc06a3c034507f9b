"""PUT /api: Megatron's fields, defaults, validation order and exact messages, never an error with 200."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import requests

from tests.helpers.upstream import megatron_cli_exchange, megatron_lm_file

CASES = [
    ({}, "prompts argument required"),
    ({"prompts": ["a"], "max_len": 3}, "max_len is no longer used.  Replace with tokens_to_generate"),
    ({"prompts": ["a"], "sentences": ["a"]}, "sentences is no longer used.  Replace with prompts"),
    ({"prompts": ["a"], "beam_width": 2}, "Beam search is no longer supported."),
    ({"prompts": "a"}, "prompts is not a list of strings"),
    ({"prompts": [1, 2]}, "prompts is not a list of strings"),
    ({"prompts": []}, "prompts is empty"),
    ({"prompts": ["a"] * 129}, "Maximum number of prompts is 128"),
    ({"prompts": ["a"], "tokens_to_generate": 5.0}, "tokens_to_generate must be an integer greater than 0"),
    ({"prompts": ["a"], "tokens_to_generate": "5"}, "tokens_to_generate must be an integer greater than 0"),
    (
        {"prompts": ["a"], "tokens_to_generate": -1},
        "tokens_to_generate must be an integer greater than or equal to 0",
    ),
    ({"prompts": ["a"], "logprobs": "yes"}, "logprobs must be a boolean value"),
    ({"prompts": ["a"], "tokens_to_generate": 0}, "tokens_to_generate=0 implies logprobs should be True"),
    (
        {"prompts": ["a"], "temperature": 0},
        "temperature must be a positive number less than or equal to 100.0",
    ),
    (
        {"prompts": ["a"], "temperature": 101},
        "temperature must be a positive number less than or equal to 100.0",
    ),
    (
        {"prompts": ["a"], "temperature": True},
        "temperature must be a positive number less than or equal to 100.0",
    ),
    (
        {"prompts": ["a"], "top_k": 1.0},
        "top_k must be an integer equal to or greater than 0 and less than or equal to 1000",
    ),
    (
        {"prompts": ["a"], "top_k": 1001},
        "top_k must be equal to or greater than 0 and less than or equal to 1000",
    ),
    ({"prompts": ["a"], "top_p": 1}, "top_p must be a positive float less than or equal to 1.0"),
    ({"prompts": ["a"], "top_p": 0.5, "top_k": 5}, "cannot set both top-k and top-p samplings."),
    ({"prompts": ["a"], "top_p": 1.5}, "top_p must be less than or equal to 1.0"),
    ({"prompts": ["a"], "top_p_decay": 1}, "top_p_decay must be a positive float less than or equal to 1.0"),
    ({"prompts": ["a"], "top_p_decay": 0.5}, "top_p_decay cannot be set without top_p"),
    ({"prompts": ["a"], "top_p": 0.5, "top_p_decay": 1.5}, "top_p_decay must be less than or equal to 1.0"),
    (
        {"prompts": ["a"], "top_p_bound": 1},
        "top_p_bound must be a positive float less than or equal to top_p",
    ),
    ({"prompts": ["a"], "top_p_bound": 0.1}, "top_p_bound cannot be set without top_p"),
    (
        {"prompts": ["a"], "top_p": 0.5, "top_p_bound": 0.6},
        "top_p_bound must be greater than 0 and less than top_p",
    ),
    ({"prompts": ["a"], "add_BOS": 1}, "add_BOS must be a boolean value"),
    ({"prompts": [""]}, "Empty prompts require add_BOS=true"),
    ({"prompts": ["a"], "stop_on_double_eol": 0}, "stop_on_double_eol must be a boolean value"),
    ({"prompts": ["a"], "stop_on_eol": "no"}, "stop_on_eol must be a boolean value"),
    (
        {"prompts": ["a"], "prevent_newline_after_colon": None},
        "prevent_newline_after_colon must be a boolean value",
    ),
    ({"prompts": ["a"], "random_seed": "1"}, "random_seed must be integer"),
    ({"prompts": ["a"], "random_seed": -5}, "random_seed must be a positive integer"),
    ({"prompts": ["a"], "no_log": "x"}, "no_log must be a boolean value"),
    ({"prompts": ["a"], "stop_token": "x"}, "stop_token must be an integer"),
    ({"prompts": ["a"], "length_penalty": 1}, "length_penalty must be a float"),
    (
        {"prompts": ["a"], "repetition_penalty": 0},
        "repetition_penalty must be a positive number less than or equal to 100.0",
    ),
    (
        {"prompts": ["a"], "repetition_penalty": 1e300},
        "repetition_penalty must be a positive number less than or equal to 100.0",
    ),
    (
        {"prompts": ["a " * 200], "tokens_to_generate": 10},
        "Length of prompt + tokens_to_generate longer than allowed",
    ),
]


def put(url: str, body, **kw) -> requests.Response:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return requests.put(
        f"{url}/api", data=data, headers={"Content-Type": "application/json"}, timeout=60, **kw
    )


@pytest.mark.parametrize("body,message", CASES, ids=[c[1][:40] for c in CASES])
def test_validation_message_and_status(gateway, body, message):
    r = put(gateway.url, body)
    assert r.status_code == 400, r.text
    doc = r.json()
    assert doc["message"] == message  # what Megatron's CLI prints
    assert doc["error"]["message"] == message and r.headers["X-Request-Id"]


def test_success_shape_matches_megatron(gateway):
    r = put(
        gateway.url,
        {
            "prompts": ["He fell to the lowest", "The murder"],
            "tokens_to_generate": 5,
            "logprobs": True,
            "top_k": 1,
        },
    )
    assert r.status_code == 200
    doc = r.json()
    assert set(doc) == {"text", "segments", "logprobs", "tokens"}
    for text, segs, lps, toks, prompt in zip(
        doc["text"], doc["segments"], doc["logprobs"], doc["tokens"], ["He fell to the lowest", "The murder"]
    ):
        assert text.startswith(prompt)  # prompt + generation, as Megatron returns it
        assert len(segs) == len(toks) and len(lps) == len(segs) - 1
        assert "".join(segs) == text


def test_defaults_and_zero_tokens_scores_the_prompt(gateway):
    doc = put(
        gateway.url, {"prompts": ["He fell to the lowest"], "tokens_to_generate": 0, "logprobs": True}
    ).json()
    assert doc["text"] == ["He fell to the lowest"] and len(doc["logprobs"][0]) == len(doc["segments"][0]) - 1
    plain = put(
        gateway.url, {"prompts": ["abc"]}
    ).json()  # defaults: 64 tokens of plain sampling, no logprobs
    assert plain["logprobs"] is None and len(plain["tokens"][0]) > len(
        put(gateway.url, {"prompts": ["abc"], "tokens_to_generate": 0, "logprobs": True}).json()["tokens"][0]
    )


def test_seeded_requests_are_reproducible(gateway):
    body = {"prompts": ["The murder"], "tokens_to_generate": 12, "random_seed": 42, "temperature": 0.9}
    assert put(gateway.url, body).json()["text"] == put(gateway.url, body).json()["text"]


def test_128_prompts_are_served(gateway):
    r = put(
        gateway.url, {"prompts": [f"prompt {i}" for i in range(128)], "tokens_to_generate": 2, "top_k": 1}
    )
    assert r.status_code == 200 and len(r.json()["text"]) == 128


@pytest.mark.parametrize(
    "raw,fragment",
    [
        ("not json", "not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        ("[1, 2]", "must be a JSON object"),
        ("", "body is empty"),
    ],
)
def test_non_json_bodies_are_400(gateway, raw, fragment):
    r = put(gateway.url, raw)
    assert r.status_code == 400 and fragment in r.json()["message"]


def test_other_methods_and_paths_are_json_errors(gateway):
    r = requests.get(f"{gateway.url}/api", timeout=10)
    assert r.status_code == 405 and r.json()["message"] == "The method is not allowed for the requested URL."
    r = requests.get(f"{gateway.url}/nope", timeout=10)
    assert r.status_code == 404 and "not found" in r.json()["message"]


def test_huge_body_is_413(gateway):
    r = put(gateway.url, json.dumps({"prompts": ["x" * (17 * 1024 * 1024)]}))
    assert r.status_code == 413 and r.json()["message"] == "request body is too large"


def test_megatron_cli_contract(gateway):
    assert megatron_cli_exchange(gateway.url, "He fell to the lowest", 4).startswith(
        "Megatron Response: \nHe fell to the lowest"
    )
    assert megatron_cli_exchange(gateway.url, "", 3) == "Error 400: Empty prompts require add_BOS=true"
    assert (
        megatron_cli_exchange(gateway.url, "The murder", -1)
        == "Error 400: tokens_to_generate must be an integer greater than or equal to 0"
    )
    assert (
        megatron_cli_exchange(gateway.url, "The murder", 5.0)
        == "Error 400: tokens_to_generate must be an integer greater than 0"
    )


def test_megatron_lm_cli_unmodified(gateway, tmp_path):
    """Megatron-LM's own CLI, run by path from a checkout outside the repository."""
    cli = megatron_lm_file("tools/text_generation_cli.py", tmp_path)
    if cli is None:
        pytest.skip(
            "no Megatron-LM checkout (set MEGASTACK_MEGATRON_LM); test_megatron_cli_contract covers its "
            "exchange"
        )
    host = gateway.url.removeprefix("http://")
    stdin = (
        "He fell to the lowest\n4\n\n3\nThe murder\n-1\n"  # its loop ends with EOFError at the end of input
    )
    out = subprocess.run(
        [sys.executable, str(cli), host], input=stdin, capture_output=True, text=True, timeout=120
    )
    assert "Megatron Response: \nHe fell to the lowest" in out.stdout, out.stdout + out.stderr
    assert "Error 400: Empty prompts require add_BOS=true" in out.stdout
    assert "Error 400: tokens_to_generate must be an integer greater than or equal to 0" in out.stdout
    assert out.stderr.rstrip().endswith("EOFError: EOF when reading a line"), out.stderr[-500:]
