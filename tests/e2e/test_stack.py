"""The stack as `make up` starts it, on the default model, through the gateway; `down` leaves nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests

from tests.helpers.upstream import megatron_cli_exchange, megatron_lm_file
from tools.stack import Stack, StackOptions, _alive, up


@pytest.fixture(scope="module")
def stack(tmp_path_factory, default_model_dir):
    run_dir = tmp_path_factory.mktemp("run")
    s = up(StackOptions(run_dir=run_dir, model_dir=default_model_dir, free_ports=True), log=lambda _: None)
    yield s
    s.down()


def test_default_model_answers_through_the_megatron_cli(stack, tmp_path):
    """Megatron-LM's own CLI, unmodified, from a checkout outside the repository when one is found;
    otherwise the same exchange made by the test."""
    host = stack.endpoint("gateway", "http").removeprefix("http://")
    cli = megatron_lm_file("tools/text_generation_cli.py", tmp_path)
    if cli is not None:
        out = subprocess.run(
            [sys.executable, str(cli), host],
            input="The capital of France is\n8\n",
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert "Megatron Response: \n" in out.stdout, out.stdout + out.stderr
        printed = out.stdout
    else:
        printed = megatron_cli_exchange(f"http://{host}", "The capital of France is", 8)
    # Megatron's defaults are plain sampling, so only the shape is fixed: prompt, then its continuation.
    response = printed.split("Megatron Response: \n", 1)[1].splitlines()[0]
    assert response.startswith("The capital of France is") and len(response) > len("The capital of France is")
    url = stack.endpoint("gateway", "http")
    greedy = requests.put(
        f"{url}/api",
        json={"prompts": ["The capital of France is"], "tokens_to_generate": 8, "top_k": 1},
        timeout=60,
    )
    assert greedy.json()["text"][0].startswith("The capital of France is Paris")


def test_chat_answer_is_sensible(stack):
    url = stack.endpoint("gateway", "http")
    r = requests.post(
        f"{url}/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 20,
            "temperature": 0,
        },
        timeout=120,
    )
    assert "Paris" in r.json()["choices"][0]["message"]["content"]
    lp = requests.put(
        f"{url}/api",
        json={"prompts": ["The capital of France is Paris"], "tokens_to_generate": 0, "logprobs": True},
        timeout=60,
    ).json()
    lb = requests.put(
        f"{url}/api",
        json={"prompts": ["The capital of France is Berlin"], "tokens_to_generate": 0, "logprobs": True},
        timeout=60,
    ).json()
    assert lp["logprobs"][0][-1] > lb["logprobs"][0][-1] + 3  # " Paris" is far likelier than " Berlin"


def test_every_service_serves_metrics(stack):
    served = [p for p in stack.procs if "metrics" in p.endpoints and p.name != "ray"]
    assert {p.name for p in served} >= {"textgen", "converter", "trainer", "gateway"}
    for p in served:
        text = requests.get(p.endpoints["metrics"], timeout=10).text
        assert "megastack_build_info{python=" in text and "megastack_rpc_" in text or p.name == "gateway"


def test_down_leaves_no_process(tmp_path, tiny_models):
    s = up(
        StackOptions(run_dir=tmp_path, model_dir=tiny_models["qwen2"], free_ports=True), log=lambda _: None
    )
    pids = [p.pid for p in s.procs]
    assert all(_alive(p) for p in pids)
    loaded = Stack.load(tmp_path)
    assert loaded is not None and [p.pid for p in loaded.procs] == pids
    loaded.down()
    assert not any(_alive(p) for p in pids)
    assert not (tmp_path / "stack.json").exists() and not list(tmp_path.glob("*.pid"))
