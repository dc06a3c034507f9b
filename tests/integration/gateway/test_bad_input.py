"""Each case of the serving-trust report, through a real gateway and textgen: what it returns now.

- ``temperature: 1e-40`` (and other degenerate sampling values) is greedy decoding; the replica keeps serving
  a stream already running and requests sent afterwards.
- Integers past the proto field (2**35, 2**64, 2**70, -2**70) are 400s naming the field on every route.
- The same bodies on ``/ws`` get the error message on the open socket, which then serves the next prompt.
- A non-ASCII, control-character or overlong ``X-Request-Id`` is replaced by a generated id, never a 500.
- ``/api/predict/<service_name>`` serves the WebSocket protocol (PAI-EAS URL form).
"""

from __future__ import annotations

import concurrent.futures as cf
import json

import grpc
import pytest
import requests
import websocket

from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc as pb_grpc
from shared.grpc.channel import make_channel

BIG = [2**35, 2**64, 2**70, -(2**70)]


def put_api(url: str, body: dict, **kw) -> requests.Response:
    return requests.put(f"{url}/api", json=body, timeout=120, **kw)


def assert_400(r: requests.Response, field: str) -> None:
    assert r.status_code == 400, (r.status_code, r.text[:300])
    body = r.json()
    assert body["field"] == field and body["error"]["param"] == field and body["message"], body


def test_tiny_temperature_is_greedy_and_never_wedges_the_replica(gateway):
    url = gateway.url
    greedy = put_api(url, {"prompts": ["hi there"], "tokens_to_generate": 8, "top_k": 1}).json()["text"][0]

    def stream() -> str:
        with requests.post(
            f"{url}/v1/completions",
            json={
                "prompt": "a long story",
                "max_tokens": 48,
                "temperature": 0,
                "stream": True,
                "ignore_eos": True,
            },
            stream=True,
            timeout=60,
        ) as r:
            assert r.status_code == 200
            return "".join(line for line in r.iter_lines(decode_unicode=True) if line)

    with cf.ThreadPoolExecutor(8) as pool:
        running = pool.submit(stream)
        degenerate = [
            pool.submit(put_api, url, {"prompts": ["hi there"], "tokens_to_generate": 8, "temperature": t})
            for t in (1e-40, 1e-300, 5e-324, 1e-6)
        ]
        openai = [
            pool.submit(
                requests.post,
                f"{url}/v1/completions",
                json={"prompt": "hi there", "max_tokens": 8, "temperature": t},
                timeout=60,
            )
            for t in (1e-40, 1e-300)
        ]
        chat = pool.submit(
            requests.post,
            f"{url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 1e-40},
            timeout=60,
        )
        top_p = pool.submit(put_api, url, {"prompts": ["hi there"], "tokens_to_generate": 8, "top_p": 1e-300})
        for f in degenerate + [top_p]:
            r = f.result(timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["text"][0] == greedy
        assert all(f.result(timeout=60).status_code == 200 for f in openai + [chat])
        assert "[DONE]" in running.result(timeout=60)
    assert put_api(url, {"prompts": ["after"], "tokens_to_generate": 4}).status_code == 200
    assert requests.get(f"{url}/ready", timeout=30).status_code == 200


def test_tiny_temperature_over_direct_grpc(textgen):
    with make_channel(textgen.address) as ch:
        stub = pb_grpc.TextGenServiceStub(ch)
        params = pb.GenerationParams(
            sampling=pb.SamplingParams(temperature=1e-40),
            stopping=pb.StoppingParams(max_new_tokens=6, ignore_eos=True),
        )
        resp = stub.Generate(pb.GenerateRequest(prompts=[pb.Prompt(text="hi")], params=params), timeout=60)
        assert len(resp.completions[0].token_ids) == 6


@pytest.mark.parametrize("value", BIG)
@pytest.mark.parametrize(
    "method,path,body,field",
    [
        ("POST", "/v1/completions", lambda v: {"prompt": "a", "max_tokens": v}, "max_tokens"),
        ("POST", "/v1/completions", lambda v: {"prompt": [v]}, "prompt"),
        ("POST", "/v1/completions", lambda v: {"prompt": [[1, 2], [v]]}, "prompt"),
        ("POST", "/v1/completions", lambda v: {"prompt": "a", "top_k": v}, "top_k"),
        ("POST", "/v1/completions", lambda v: {"prompt": "a", "seed": v}, "seed"),
        ("POST", "/v1/completions", lambda v: {"prompt": "a", "logprobs": v}, "logprobs"),
        (
            "POST",
            "/v1/chat/completions",
            lambda v: {"messages": [{"role": "user", "content": "a"}], "max_tokens": v},
            "max_tokens",
        ),
        (
            "POST",
            "/v1/chat/completions",
            lambda v: {"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": v},
            "max_completion_tokens",
        ),
        (
            "POST",
            "/v1/chat/completions",
            lambda v: {"messages": [{"role": "user", "content": "a"}], "max_tokens": 4, "seed": v},
            "seed",
        ),
        ("PUT", "/api", lambda v: {"prompts": ["a"], "tokens_to_generate": v}, "tokens_to_generate"),
        ("PUT", "/api", lambda v: {"prompts": ["a"], "random_seed": v}, "random_seed"),
        ("PUT", "/api", lambda v: {"prompts": ["a"], "top_k": v}, "top_k"),
        ("POST", "/detokenize", lambda v: {"tokens": [1, v]}, "tokens"),
    ],
)
def test_integers_past_the_wire_are_400_naming_the_field(gateway, method, path, body, field, value):
    r = requests.request(method, gateway.url + path, json=body(value), timeout=60)
    if field in ("seed", "random_seed") and value == 2**35:
        assert r.status_code == 200, r.text  # seeds travel as int64: 2**35 is a valid seed
        return
    assert_400(r, field)


@pytest.mark.parametrize(
    "body,field",
    [
        ({"prompt": "a", "temperature": 1e300}, "temperature"),
        ({"prompt": "a", "top_p": -1e-300}, "top_p"),
        ({"prompt": "a", "repetition_penalty": 1e300}, "repetition_penalty"),
    ],
)
def test_floats_out_of_range_are_400(gateway, body, field):
    assert_400(requests.post(f"{gateway.url}/v1/completions", json=body, timeout=60), field)


def test_non_finite_json_numbers_are_400(gateway):
    for route, doc in (
        ("/v1/completions", '{"prompt": "a", "temperature": NaN}'),
        ("/v1/completions", '{"prompt": "a", "top_p": Infinity}'),
    ):
        r = requests.post(
            gateway.url + route, data=doc, headers={"Content-Type": "application/json"}, timeout=60
        )
        assert r.status_code == 400, r.text


def test_deeply_nested_json_is_400(gateway):
    r = requests.post(f"{gateway.url}/v1/completions", data="[" * 100_000 + "]" * 100_000, timeout=60)
    assert r.status_code == 400 and "nested" in r.json()["message"]


@pytest.mark.parametrize("rid", ["caf\u00e9-1", "a\x01b", "x" * 129, "tab\there"])
def test_unprintable_request_ids_are_replaced(gateway, rid):
    raw = rid.encode("latin-1")
    r = requests.put(
        f"{gateway.url}/api",
        json={"prompts": ["a"], "tokens_to_generate": 2},
        headers={"X-Request-Id": raw},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.headers["X-Request-Id"] != rid and 0 < len(r.headers["X-Request-Id"]) <= 128


def test_a_printable_request_id_is_kept(gateway):
    r = requests.put(
        f"{gateway.url}/api",
        json={"prompts": ["a"], "tokens_to_generate": 2},
        headers={"X-Request-Id": "my id-42"},
        timeout=60,
    )
    assert r.status_code == 200 and r.headers["X-Request-Id"] == "my id-42"


def _ws(url: str, path: str) -> websocket.WebSocket:
    return websocket.create_connection(url.replace("http://", "ws://") + path, timeout=60)


@pytest.mark.parametrize("path", ["/ws", "/api/predict/my-llm-service"])
def test_ws_bad_messages_are_answered_on_the_open_socket(gateway, path):
    conn = _ws(gateway.url, path)
    try:
        bad = [{"prompt": "a", "max_new_tokens": v} for v in BIG] + [
            {"prompt": "a", "seed": 2**64},
            {"prompt": "a", "top_k": 2**35},
            {"prompt": "a", "temperature": 1e300},
        ]
        for doc in bad:
            conn.send(json.dumps(doc))
            reply = json.loads(conn.recv())
            assert reply["is_end"] is True and reply["error"]["code"] == 400 and reply["field"] in doc, reply
        conn.send("[" * 100_000 + "]" * 100_000)
        reply = json.loads(conn.recv())
        assert reply["error"]["code"] == 400 and "nested" in reply["error"]["message"]
        conn.send(json.dumps({"prompt": "still here", "max_new_tokens": 3, "temperature": 1e-40}))
        msgs = []
        while not msgs or not msgs[-1]["is_end"]:
            msgs.append(json.loads(conn.recv()))
        assert "error" not in msgs[-1] and msgs[-1]["usage"]["completion_tokens"] == 3, msgs
    finally:
        conn.close()


def test_grpc_internal_names_the_request_id(gateway, textgen, monkeypatch):
    """A genuine engine fault is the one 500: INTERNAL with the request id, and the replica goes on."""
    import services.textgen.choosing as choosing

    real = choosing.sample_row

    def sample_row(logits, spec, top_p, generator):
        if spec.seed == 777:
            raise RuntimeError("injected")
        return real(logits, spec, top_p, generator)

    monkeypatch.setattr(choosing, "sample_row", sample_row)
    r = put_api(
        gateway.url,
        {"prompts": ["a"], "tokens_to_generate": 3, "random_seed": 777},
        headers={"X-Request-Id": "fault-1"},
    )
    assert r.status_code == 500 and "request_id=fault-1" in r.json()["message"], r.text
    with make_channel(textgen.address) as ch:
        stub = pb_grpc.TextGenServiceStub(ch)
        params = pb.GenerationParams(
            sampling=pb.SamplingParams(seed=777), stopping=pb.StoppingParams(max_new_tokens=3)
        )
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(
                pb.GenerateRequest(prompts=[pb.Prompt(text="a")], params=params),
                timeout=60,
                metadata=(("x-request-id", "fault-2"),),
            )
        assert e.value.code() == grpc.StatusCode.INTERNAL and "request_id=fault-2" in e.value.details()
    assert put_api(gateway.url, {"prompts": ["a"], "tokens_to_generate": 3}).status_code == 200


def test_textgen_validation_errors_name_their_field_through_the_gateway(gateway):
    r = put_api(gateway.url, {"prompts": ["a"], "tokens_to_generate": 100000})
    assert (
        r.status_code == 400
        and r.json()["message"] == "Length of prompt + tokens_to_generate longer than allowed"
    )
    assert r.json()["field"] == "tokens_to_generate"
    assert_400(requests.post(f"{gateway.url}/v1/completions", json={"prompt": [10**6]}, timeout=60), "prompt")
    assert_400(requests.post(f"{gateway.url}/detokenize", json={"tokens": [10**6]}, timeout=60), "tokens")


@pytest.mark.parametrize(
    "path,body,field",
    [
        ("/v1/jobs/training", {"spec": {"parallel": {"tensor_parallel": 2**70}}}, "tensor_parallel"),
        ("/v1/jobs/training", {"spec": {"parallel": {"pipeline_parallel": -(2**40)}}}, "pipeline_parallel"),
        (
            "/v1/jobs/conversions",
            {"spec": {"target_tensor_parallel_size": 2**35}},
            "target_tensor_parallel_size",
        ),
        ("/v1/jobs/conversions", {"spec": {"num_layer_list": [1, 2**64]}}, "num_layer_list"),
    ],
)
def test_job_bodies_with_integers_past_the_wire_are_400(gateway, path, body, field):
    r = requests.post(gateway.url + path, json=body, timeout=60)
    assert_400(r, field)
    assert r.json()["message"].startswith("bad ") and "out of range" in r.json()["message"]
