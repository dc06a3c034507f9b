"""textgen over real gRPC: health, reflection, status codes, request ids, metrics, stream cancel."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc as pb_grpc
from shared.grpc.channel import check_health, make_channel


@pytest.fixture(scope="module")
def stub(textgen):
    with make_channel(textgen.address) as ch:
        yield pb_grpc.TextGenServiceStub(ch), ch


def params(n=8, **kw):
    return pb.GenerationParams(
        sampling=pb.SamplingParams(greedy=True),
        stopping=pb.StoppingParams(max_new_tokens=n, ignore_eos=True),
        **kw,
    )


def test_health_and_reflection(stub, textgen):
    _, ch = stub
    assert check_health(ch) and check_health(ch, "megastack.textgen.v1.TextGenService")
    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
    resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"megastack.textgen.v1.TextGenService", "grpc.health.v1.Health"} <= names


def test_generate_several_prompts(stub):
    s, _ = stub
    resp = s.Generate(
        pb.GenerateRequest(
            prompts=[pb.Prompt(text="He fell"), pb.Prompt(tokens=pb.TokenIds(ids=[5, 6, 7]))],
            params=params(6, echo=True),
        )
    )
    assert [c.index for c in resp.completions] == [0, 1]
    assert all(len(c.token_ids) == 6 and c.finish_reason == pb.FINISH_REASON_LENGTH for c in resp.completions)
    assert resp.completions[0].full_text.startswith("He fell") and resp.completions[1].prompt_token_ids == [
        5,
        6,
        7,
    ]


def test_bad_input_is_invalid_argument_with_message_and_request_id(stub):
    s, _ = stub
    with pytest.raises(grpc.RpcError) as e:
        s.Generate.with_call(
            pb.GenerateRequest(prompts=[], params=params()), metadata=(("x-request-id", "rid-123"),)
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details() == "prompts is empty"
    assert ("x-request-id", "rid-123") in tuple(e.value.trailing_metadata())
    before = REGISTRY.get_sample_value(
        "megastack_rpc_requests_total",
        {"service": "textgen", "method": "Generate", "code": "INVALID_ARGUMENT"},
    )
    with pytest.raises(grpc.RpcError) as e:
        s.Generate(
            pb.GenerateRequest(
                prompts=[pb.Prompt(text="x")],
                params=pb.GenerationParams(
                    sampling=pb.SamplingParams(top_k=5, top_p=0.5),
                    stopping=pb.StoppingParams(max_new_tokens=1),
                ),
            )
        )
    assert e.value.details() == "top_k and top_p are exclusive: set one of them"
    after = REGISTRY.get_sample_value(
        "megastack_rpc_requests_total",
        {"service": "textgen", "method": "Generate", "code": "INVALID_ARGUMENT"},
    )
    assert after == before + 1


def test_stream_yields_tokens_then_the_completion(stub):
    s, _ = stub
    msgs = list(
        s.GenerateStream(
            pb.GenerateStreamRequest(prompts=[pb.Prompt(text="The murder")], params=params(10, logprobs=True))
        )
    )
    assert len(msgs) == 11 and msgs[-1].finished and not any(m.finished for m in msgs[:-1])
    final = msgs[-1].completion
    assert [m.tokens[0].id for m in msgs[:-1]] == list(final.token_ids)
    assert "".join(m.text for m in msgs) == final.text
    assert [round(m.tokens[0].logprob, 5) for m in msgs[:-1]] == [round(x, 5) for x in final.logprobs]


def test_cancelling_a_stream_frees_its_slot(stub, textgen):
    s, _ = stub
    call = s.GenerateStream(pb.GenerateStreamRequest(prompts=[pb.Prompt(text="x")], params=params(120)))
    next(call)
    call.cancel()
    deadline = time.monotonic() + 5
    while textgen.served.engine.load() != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert textgen.served.engine.load() == (0, 0)
    load = s.GetLoad(pb.GetLoadRequest())
    assert load.num_running == 0 and load.max_batch_size == 4


def test_tokenize_detokenize_and_info(stub):
    s, _ = stub
    ids = s.Tokenize(pb.TokenizeRequest(text="Hello world")).ids
    assert s.Detokenize(pb.DetokenizeRequest(ids=ids)).text == "Hello world"
    info = s.GetModelInfo(pb.GetModelInfoRequest())
    assert info.family == "llama" and info.max_context_tokens == 128 and info.has_chat_template
    with pytest.raises(grpc.RpcError) as e:
        s.Detokenize(pb.DetokenizeRequest(ids=[10**7]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_tokenize_many_texts_in_one_call(stub):
    s, _ = stub
    texts = ["Hello world", "", "one two three", "Hello world"]
    got = [list(e.ids) for e in s.Tokenize(pb.TokenizeRequest(texts=texts)).encoded]
    assert got == [list(s.Tokenize(pb.TokenizeRequest(text=t)).ids) for t in texts]


def test_prompt_logprobs_from_returns_the_tail_only(stub):
    s, _ = stub
    ids = list(s.Tokenize(pb.TokenizeRequest(text="the cat sat on the mat and then")).ids)
    prompt = [pb.Prompt(tokens=pb.TokenIds(ids=ids))]

    def score(first):
        p = params(0, prompt_logprobs=True, top_logprobs=2, prompt_logprobs_from=first)
        return s.Generate(pb.GenerateRequest(prompts=prompt, params=p)).completions[0]

    full = score(0)
    assert len(full.prompt_logprobs) == len(ids) - 1
    assert list(score(1).prompt_logprobs) == pytest.approx(list(full.prompt_logprobs), abs=1e-5)
    tail = score(5)
    assert list(tail.prompt_logprobs) == pytest.approx(list(full.prompt_logprobs)[4:], abs=1e-5)
    assert [list(t.token_ids) for t in tail.prompt_top_logprobs] == [
        list(t.token_ids) for t in full.prompt_top_logprobs
    ][4:]
    with pytest.raises(grpc.RpcError) as e:
        score(-1)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt_logprobs_from" in e.value.details()
