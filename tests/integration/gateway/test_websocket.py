"""WebSocket streaming (PAI-EAS protocol) through a real gateway + textgen, with the EAS-style client."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests
import websocket

from tests.fixtures.servers import start_gateway
from tools.eas_ws_client import stream

KEY = "eas-token-123"


@pytest.fixture(scope="module")
def gateway(textgen):
    gw = start_gateway((textgen.address,), api_keys=(KEY,))
    yield gw
    gw.stop()


def ws_url(gw) -> str:
    return gw.url.replace("http://", "ws://") + "/ws"


def greedy(gw, prompt: str, n: int) -> str:
    r = requests.post(
        f"{gw.url}/v1/completions",
        json={"prompt": prompt, "max_tokens": n, "temperature": 0},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    return r.json()["choices"][0]["text"]


def test_the_eas_client_streams_several_prompts_on_one_connection(gateway):
    prompts = ["the cat sat on", "one two three", "hello there"]
    pieces: dict[int, list[str]] = {0: [], 1: [], 2: []}
    ends = []
    for i, piece in stream(ws_url(gateway), prompts, KEY, max_new_tokens=8, temperature=0):
        if piece is None:
            ends.append(i)
        else:
            pieces[i].append(piece)
    assert ends == [0, 1, 2]
    for i, p in enumerate(prompts):
        assert len(pieces[i]) > 1  # streamed, not one blob
        assert "".join(pieces[i]) == greedy(gateway, p, 8)


def test_bearer_and_raw_tokens_work_and_a_missing_one_is_refused(gateway):
    for header in ({"Authorization": KEY}, {"Authorization": f"Bearer {KEY}"}):
        ws = websocket.create_connection(ws_url(gateway), header=header, timeout=30)
        ws.send(json.dumps({"prompt": "hi", "max_new_tokens": 2}))
        msgs = []
        while not msgs or not msgs[-1]["is_end"]:
            msgs.append(json.loads(ws.recv()))
        assert msgs[-1]["usage"]["completion_tokens"] == 2 and msgs[-1]["finish_reason"] == "length"
        ws.close()
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        websocket.create_connection(ws_url(gateway), header={"Authorization": "wrong"}, timeout=30)
    assert e.value.status_code == 401


@pytest.mark.parametrize(
    "message,field",
    [
        ("not json", "message"),
        ('["a list"]', "message"),
        ('{"prompt": ""}', "prompt"),
        ('{"prompt": 5}', "prompt"),
        ('{"prompt": "x", "max_new_tokens": 0}', "max_new_tokens"),
        ('{"prompt": "x", "temperature": -1}', "temperature"),
        ('{"prompt": "x", "frobnicate": 1}', "frobnicate"),
        ('{"prompt": "x", "max_tokens": 2, "max_new_tokens": 3}', "max_tokens"),
        ('{"prompt": "x", "top_p": 2}', "top_p"),
        ('{"prompt": "x", "stop": [1]}', "stop"),
    ],
)
def test_garbage_gets_a_clear_error_and_the_connection_keeps_serving(gateway, message, field):
    ws = websocket.create_connection(ws_url(gateway), header={"Authorization": KEY}, timeout=30)
    ws.send(message)
    err = json.loads(ws.recv())
    assert (
        err["is_end"] is True
        and err["field"] == field
        and err["error"]["param"] == field
        and err["error"]["code"] == 400
        and err["error"]["message"]
    )
    ws.send(json.dumps({"prompt": "still here", "max_new_tokens": 3}))
    msgs = [json.loads(ws.recv())]
    while not msgs[-1]["is_end"]:
        msgs.append(json.loads(ws.recv()))
    assert "error" not in msgs[-1]
    ws.close()


def test_a_client_that_leaves_mid_stream_frees_its_slot(gateway, textgen):
    ws = websocket.create_connection(ws_url(gateway), header={"Authorization": KEY}, timeout=30)
    ws.send(json.dumps({"prompt": "count", "max_new_tokens": 100}))
    json.loads(ws.recv())  # generation is under way
    ws.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and textgen.served.engine.load() != (0, 0):
        time.sleep(0.05)
    assert textgen.served.engine.load() == (0, 0)
    # the gateway still serves, over HTTP and WebSocket, many clients at once
    results = []

    def client(k):
        results.append(
            "".join(
                p
                for _, p in stream(ws_url(gateway), [f"prompt {k}"], KEY, max_new_tokens=4, temperature=0)
                if p
            )
        )

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 6 and all(results)
