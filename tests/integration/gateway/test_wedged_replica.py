"""A replica whose engine stops making progress is reported by its health within watchdog_s, the gateway
routes around it (requests keep succeeding on the other replica, /ready stays 200), and it is used
again once it makes progress."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc as pb_grpc
from shared.grpc.channel import make_channel
from tests.fixtures.servers import start_gateway, start_textgen

WATCHDOG_S = 1.0


@pytest.fixture()
def replicas(tiny_models):
    a = start_textgen(tiny_models["llama"], watchdog=True, watchdog_s=WATCHDOG_S)
    b = start_textgen(tiny_models["llama"], watchdog=True, watchdog_s=WATCHDOG_S)
    gw = start_gateway((a.address, b.address))
    yield a, b, gw
    gw.stop()
    a.stop()
    b.stop()


def replica_states(gw) -> dict[str, str]:
    return requests.get(f"{gw.url}/health", timeout=10).json()["replicas"]


def wait(pred, timeout_s: float, what: str) -> float:
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout_s, what
        time.sleep(0.05)
    return time.monotonic() - t0


def test_a_wedged_replica_is_routed_around_and_comes_back(replicas):
    a, b, gw = replicas
    release, blocked = threading.Event(), threading.Event()
    real = a.served.model.decode

    def decode(*args, **kw):
        if not release.is_set():
            blocked.set()
            release.wait(60)
        return real(*args, **kw)

    a.served.model.decode = decode
    with make_channel(a.address) as ch:  # a request straight to replica a wedges its engine
        stub = pb_grpc.TextGenServiceStub(ch)
        params = pb.GenerationParams(
            sampling=pb.SamplingParams(greedy=True),
            stopping=pb.StoppingParams(max_new_tokens=4, ignore_eos=True),
        )
        future = stub.Generate.future(
            pb.GenerateRequest(prompts=[pb.Prompt(text="stuck")], params=params), timeout=120
        )
        assert blocked.wait(10)
        wedged_at = time.monotonic()
        wait(
            lambda: replica_states(gw)[a.address] == "down", WATCHDOG_S + 5, "the gateway sees replica a down"
        )
        # watchdog (<= watchdog_s + its poll) plus one gateway health interval
        assert time.monotonic() - wedged_at <= WATCHDOG_S + 1.0 + gw.pool.health_interval_s + 0.5
        steps_b = b.served.engine.steps
        for i in range(8):
            r = requests.put(
                f"{gw.url}/api", json={"prompts": [f"p{i}"], "tokens_to_generate": 2, "top_k": 1}, timeout=30
            )
            assert r.status_code == 200, r.text
        assert b.served.engine.steps > steps_b
        assert requests.get(f"{gw.url}/ready", timeout=30).status_code == 200
        release.set()
        assert len(future.result(timeout=60).completions[0].token_ids) == 4
    wait(lambda: replica_states(gw)[a.address] == "up", 10, "replica a is used again once it makes progress")
