"""OpenAI-style routes, streaming, disconnects, back-pressure and auth through a real gateway."""

from __future__ import annotations

import concurrent.futures as cf
import json
import socket
import time

import pytest
import requests

from tests.fixtures.servers import start_gateway, start_textgen


def post(url, path, body, **kw):
    return requests.post(f"{url}{path}", json=body, timeout=60, **kw)


def sse_events(resp):
    out = []
    for line in resp.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            out.append(line[6:])
    return out


def test_completion_echo_logprobs_as_lm_eval_reads_them(gateway):
    ids = post(
        gateway.url, "/tokenize", {"prompt": "He fell to the lowest", "add_special_tokens": False}
    ).json()["tokens"]
    r = post(
        gateway.url,
        "/v1/completions",
        {
            "model": "llama",
            "prompt": [ids],
            "max_tokens": 1,
            "logprobs": 1,
            "echo": True,
            "temperature": 0,
            "seed": 1234,
        },
    )
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
    assert lp["top_logprobs"][0] is None and all(len(t) >= 1 for t in lp["top_logprobs"][1:])
    # the one generated token under greedy decoding is the top-1 alternative at its position
    assert lp["token_logprobs"][-1] == pytest.approx(max(lp["top_logprobs"][-1].values()))
    # scoring with max_tokens=0 gives the same prompt log-probabilities
    r0 = post(
        gateway.url, "/v1/completions", {"prompt": [ids], "max_tokens": 0, "logprobs": 1, "echo": True}
    ).json()
    assert r0["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(lp["token_logprobs"][:-1])


def test_streamed_text_equals_the_unary_text(gateway):
    body = {"prompt": "The murder was", "max_tokens": 12, "temperature": 0, "stop": ["zzz"]}
    unary = post(gateway.url, "/v1/completions", body).json()["choices"][0]["text"]
    with requests.post(
        f"{gateway.url}/v1/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
        stream=True,
        timeout=60,
    ) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == unary
    assert chunks[-1]["usage"]["completion_tokens"] == 12


def test_chat_completion_and_stream(gateway):
    body = {"messages": [{"role": "user", "content": "Who is Alyosha?"}], "max_tokens": 8, "temperature": 0}
    r = post(gateway.url, "/v1/chat/completions", body).json()
    assert r["object"] == "chat.completion" and r["choices"][0]["message"]["role"] == "assistant"
    with requests.post(
        f"{gateway.url}/v1/chat/completions", json={**body, "stream": True}, stream=True, timeout=60
    ) as s:
        chunks = [json.loads(e) for e in sse_events(s)[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert (
        "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        == r["choices"][0]["message"]["content"]
    )


@pytest.mark.parametrize(
    "body,status,field",
    [
        ({"prompt": "x", "model": "gpt-9"}, 404, "model"),
        ({"prompt": "x", "n": 17}, 400, "n"),
        ({"prompt": "x", "best_of": 0}, 400, "best_of"),
        ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ({"prompt": [1, "a"]}, 400, "prompt"),
        ({"prompt": "x", "stop": [1]}, 400, "stop"),
        ({"prompt": "x", "logprobs": 50}, 400, "logprobs"),
        ({"max_tokens": 3}, 400, "prompt"),
    ],
)
def test_bad_completion_requests_name_the_field(gateway, body, status, field):
    r = post(gateway.url, "/v1/completions", body)
    assert r.status_code == status and r.json()["error"]["param"] == field


def test_models_and_tokenizer_routes(gateway):
    assert (
        post(
            gateway.url,
            "/detokenize",
            {"tokens": post(gateway.url, "/tokenize", {"prompt": "Hello world"}).json()["tokens"]},
        ).json()["prompt"]
        == "Hello world"
    )
    info = requests.get(f"{gateway.url}/tokenizer_info", timeout=10).json()
    assert info["eos_token"] == "<|endoftext|>" and "chat_template" in info
    models = requests.get(f"{gateway.url}/v1/models", timeout=10).json()
    assert models["data"][0]["id"] == "llama"


def test_client_disconnect_mid_stream_frees_the_slot(gateway, textgen):
    host, port = gateway.url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "x", "max_tokens": 120, "stream": True, "ignore_eos": True}).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        seen = b""
        while b"data:" not in seen:  # headers and the chunk size can arrive before the first event
            chunk = sock.recv(4096)
            assert chunk, "connection closed before the first event"
            seen += chunk
    deadline = time.monotonic() + 10
    while textgen.served.engine.load() != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert textgen.served.engine.load() == (0, 0)
    assert requests.get(f"{gateway.url}/ready", timeout=30).status_code == 200  # still serving


def test_health_and_ready(gateway):
    assert requests.get(f"{gateway.url}/health", timeout=10).json()["status"] == "ok"
    r = requests.get(f"{gateway.url}/ready", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ready"


@pytest.fixture(scope="module")
def small_stack(tiny_models):
    tg = start_textgen(tiny_models["gpt2"], max_batch_size=1, max_queue_size=2, max_prompts_per_request=2)
    gw = start_gateway((tg.address,), api_keys=("k1", "k2"))
    yield tg, gw
    gw.stop()
    tg.stop()


def test_429_only_when_the_queue_is_full(small_stack):
    tg, gw = small_stack
    headers = {"Authorization": "Bearer k1"}
    body = {"prompts": ["x"], "tokens_to_generate": 100, "top_k": 1}

    def call(_):
        return requests.put(f"{gw.url}/api", json=body, headers=headers, timeout=120)

    with cf.ThreadPoolExecutor(12) as ex:
        results = list(ex.map(call, range(12)))
    codes = [r.status_code for r in results]
    assert set(codes) <= {200, 429} and codes.count(200) >= 3 and 429 in codes
    for r in results:
        if r.status_code == 429:
            assert r.headers["Retry-After"] == "1" and "queue full" in r.json()["message"]
        else:
            assert len(r.json()["tokens"][0]) > 1
    assert call(0).status_code == 200  # capacity is back once the queue drains


def test_api_keys(small_stack):
    _, gw = small_stack
    r = requests.put(f"{gw.url}/api", json={"prompts": ["x"], "tokens_to_generate": 1}, timeout=30)
    assert r.status_code == 401 and r.json()["field"] == "Authorization"
    assert (
        requests.put(
            f"{gw.url}/api",
            json={"prompts": ["x"], "tokens_to_generate": 1},
            headers={"Authorization": "Bearer nope"},
            timeout=30,
        ).status_code
        == 401
    )
    assert (
        requests.put(
            f"{gw.url}/api",
            json={"prompts": ["x"], "tokens_to_generate": 1},
            headers={"Authorization": "Bearer k2"},
            timeout=30,
        ).status_code
        == 200
    )
    assert requests.get(f"{gw.url}/health", timeout=10).status_code == 200
