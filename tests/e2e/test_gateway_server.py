"""The gateway as deployments run it (`python -m services.gateway`: gunicorn, one process, many threads)
against a real textgen: metrics that equal the client's counts, slow clients dropped without starving
others, idle WebSockets kept, and a SIGTERM that lets a running stream finish."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
import requests
import websocket

from shared.net import free_port
from shared.paths import REPO_ROOT
from tests.fixtures.servers import start_textgen

READ_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def slow_textgen(tiny_models):
    """A textgen whose decode steps can be slowed down, so a stream is reliably in flight."""
    tg = start_textgen(tiny_models["llama"], max_batch_size=8)
    slow = threading.Event()
    real = tg.served.model.decode

    def decode(*a, **kw):
        if slow.is_set():
            time.sleep(0.03)
        return real(*a, **kw)

    tg.served.model.decode = decode
    tg.slow = slow
    yield tg
    tg.stop()


def start_gateway(textgen_addr: str, **env: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith("MEGASTACK_")}
    full.update(
        {
            "MEGASTACK_GATEWAY_PORT": str(port),
            "MEGASTACK_GATEWAY_TEXTGEN_ADDRS": textgen_addr,
            "MEGASTACK_GATEWAY_READ_TIMEOUT_S": str(READ_TIMEOUT_S),
            "MEGASTACK_GATEWAY_THREADS": "8",
            "MEGASTACK_GATEWAY_CONVERTER_ADDR": "",
            "MEGASTACK_GATEWAY_TRAINER_ADDR": "",
            "MEGASTACK_GATEWAY_EVALUATOR_ADDR": "",
            **env,
        }
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.gateway"],
        env=full,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if requests.get(f"{url}/ready", timeout=5).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("gateway did not become ready:\n" + proc.stdout.read())


def stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


@pytest.fixture(scope="module")
def gateway(slow_textgen):
    proc, url = start_gateway(slow_textgen.address)
    yield url
    out = stop(proc)
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("megastack_gateway_http_requests_total{"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_metrics_count_what_the_clients_sent(gateway):
    before = metrics(gateway)
    bodies = [
        ({"prompts": ["the cat"], "tokens_to_generate": 3, "top_k": 1}, 200),
        ({"prompts": ["the cat"], "tokens_to_generate": -1}, 400),
        ({"prompts": "nope"}, 400),
    ]

    def one(i: int) -> int:
        body, _ = bodies[i % 3]
        return requests.put(f"{gateway}/api", json=body, timeout=60).status_code

    with cf.ThreadPoolExecutor(16) as pool:
        codes = Counter(pool.map(one, range(200)))
    assert codes == Counter({200: 67, 400: 133}), codes
    after = metrics(gateway)
    for status, n in codes.items():
        key = f'megastack_gateway_http_requests_total{{method="PUT",route="/api",status="{status}"}}'
        assert after.get(key, 0) - before.get(key, 0) == n, (key, after.get(key), before.get(key))


def test_slow_clients_are_dropped_and_do_not_starve_others(gateway):
    host, port = gateway.removeprefix("http://").split(":")
    slow = []
    for _ in range(12):  # more than the 8 threads
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(b"PUT /api HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n")  # a head that never ends
        slow.append(s)
    t0 = time.monotonic()
    r = requests.put(f"{gateway}/api", json={"prompts": ["hi"], "tokens_to_generate": 2}, timeout=30)
    assert r.status_code == 200
    assert time.monotonic() - t0 < READ_TIMEOUT_S + 5
    for s in slow:
        assert s.recv(100) == b""  # closed by the server
        s.close()
    assert time.monotonic() - t0 < READ_TIMEOUT_S + 8


@pytest.mark.parametrize("path", ["/ws", "/api/predict/demo-service"])
def test_an_idle_websocket_outlives_the_read_timeout(gateway, path):
    conn = websocket.create_connection(gateway.replace("http://", "ws://") + path, timeout=30)
    try:
        time.sleep(READ_TIMEOUT_S + 1.0)
        conn.send(json.dumps({"prompt": "hello", "max_new_tokens": 3, "temperature": 0}))
        msgs = [json.loads(conn.recv())]
        while not msgs[-1]["is_end"]:
            msgs.append(json.loads(conn.recv()))
        assert msgs[-1]["usage"]["completion_tokens"] == 3, msgs
    finally:
        conn.close()


def test_sigterm_lets_a_running_stream_finish(slow_textgen):
    proc, url = start_gateway(slow_textgen.address, MEGASTACK_GATEWAY_GRACEFUL_TIMEOUT_S="30")
    slow_textgen.slow.set()
    try:
        with requests.post(
            f"{url}/v1/completions",
            json={
                "prompt": "once upon a time",
                "max_tokens": 60,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
            },
            stream=True,
            timeout=60,
        ) as r:
            lines = r.iter_lines(decode_unicode=True)
            first = next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            sent_at = time.monotonic()
            rest = [line for line in lines if line.startswith("data: ")]
        chunks = [json.loads(x[6:]) for x in [first, *rest] if x != "data: [DONE]"]
        assert rest[-1] == "data: [DONE]"
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert time.monotonic() - sent_at > 0.5, "the stream was still running when SIGTERM came"
        proc.wait(timeout=30)
        assert proc.returncode == 0
    finally:
        slow_textgen.slow.clear()
        out = stop(proc)
    assert "Traceback" not in out, out[-3000:]


@pytest.mark.parametrize(
    "method,path", [("POST", "/api"), ("GET", "/v1/models"), ("POST", "/nope"), ("PUT", "/tokenize")]
)
def test_a_large_body_the_route_did_not_read_keeps_the_connection_usable(gateway, method, path):
    """A 1 MB body answered before it was read (405, 404, ...): the next request on the same kept-alive
    connection is answered (gunicorn alone would close it after announcing keep-alive)."""
    with requests.Session() as s:
        r = s.request(
            method,
            gateway + path,
            data=json.dumps({"prompts": ["x" * 2**20]}),
            headers={"Content-Type": "application/json"},
            timeout=60,
        )
        assert r.status_code < 500 and r.headers.get("Connection") != "close"
        for _ in range(3):
            assert (
                s.put(
                    f"{gateway}/api", json={"prompts": ["hi"], "tokens_to_generate": 1}, timeout=60
                ).status_code
                == 200
            )
