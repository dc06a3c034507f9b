"""Failure containment: a fault in any stage of one sequence's work ends that sequence only.

Each test runs 4 greedy sequences together with one poisoned sequence whose work raises at one stage
(forward in prefill or decode, sampling, log-probs, detokenization for stop strings); the 4 must finish
with exactly the tokens they get without the poisoned one, the poisoned one must end in an error
naming its request id, and every slot must be free afterwards.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

import services.textgen.choosing as choosing
from services.textgen.config import TextgenConfig
from services.textgen.loader import load_served_model
from services.textgen.sampling import SamplingSpec
from services.textgen.sequences import ERROR, LENGTH, SequenceRequest, StopSpec
from services.textgen.watchdog import Watchdog
from shared.logging import REQUEST_ID

PROMPTS = ["The murder was committed", "He fell", "Alyosha looked at him", "one two three four five six"]
POISON_LEN = 40  # longer than any other prompt + generation: its forward passes are recognisable
SEED = 4242


@pytest.fixture(scope="module")
def served(tiny_models):
    s = load_served_model(
        TextgenConfig(
            model_dir=tiny_models["llama"],
            max_batch_size=8,
            max_queue_size=16,
            max_prompts_per_request=8,
            max_context_tokens=128,
            port=0,
            metrics_port=0,
        )
    )
    s.engine.start()
    yield s
    s.engine.stop()


def greedy(ids, n=10) -> SequenceRequest:
    return SequenceRequest(
        prompt_ids=tuple(ids),
        sampling=SamplingSpec(greedy=True),
        stopping=StopSpec(max_new_tokens=n, ignore_eos=True),
    )


@pytest.fixture(scope="module")
def others(served):
    reqs = [greedy(served.tokenizer.encode(p)) for p in PROMPTS]
    assert all(len(r.prompt_ids) + 12 < POISON_LEN for r in reqs)
    baseline = [h.result() for h in served.engine.submit(reqs)]
    assert all(r.finish_reason == LENGTH and len(r.token_ids) == 10 for r in baseline)
    return reqs, [r.token_ids for r in baseline]


def poison_request(**kw) -> SequenceRequest:
    stopping = kw.pop("stopping", StopSpec(max_new_tokens=10, ignore_eos=True))
    return SequenceRequest(
        prompt_ids=tuple(range(3, 3 + POISON_LEN)),
        sampling=kw.pop("sampling", SamplingSpec(greedy=True)),
        stopping=stopping,
        **kw,
    )


def run_with(served, others, poison: SequenceRequest, *, poison_first: bool = False):
    reqs, expected = others
    token = REQUEST_ID.set("poisoned-req-1")
    try:
        bad = served.engine.submit([poison])[0] if poison_first else None
    finally:
        REQUEST_ID.reset(token)
    good = served.engine.submit(reqs)
    if bad is None:
        token = REQUEST_ID.set("poisoned-req-1")
        try:
            bad = served.engine.submit([poison])[0]
        finally:
            REQUEST_ID.reset(token)
    results = [h.result() for h in good]
    failed = bad.result()
    assert [r.token_ids for r in results] == expected
    assert all(r.finish_reason == LENGTH and r.error is None for r in results)
    assert failed.finish_reason == ERROR and "request_id=poisoned-req-1" in failed.error, failed
    deadline = time.monotonic() + 5
    while served.engine.load() != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert served.engine.load() == (0, 0)
    served.engine.pool.check()
    assert served.engine.pool.num_free() == served.engine.pool.usable  # every block back
    # and the engine goes on serving
    assert [h.result().token_ids for h in served.engine.submit(reqs[:1])] == expected[:1]
    return failed


def test_fault_in_decode_forward_fails_only_that_sequence(served, others, monkeypatch):
    real = served.model.decode

    def decode(tokens, positions, tables, cache):
        if int(positions.max()) >= POISON_LEN:
            raise RuntimeError("injected decode fault")
        return real(tokens, positions, tables, cache)

    monkeypatch.setattr(served.model, "decode", decode)
    failed = run_with(served, others, poison_request())
    assert "decode" in failed.error and len(failed.token_ids) == 1  # its first token came from the prefill


@pytest.mark.parametrize("poison_first", [False, True])
def test_fault_in_prefill_forward_fails_only_that_sequence(served, others, monkeypatch, poison_first):
    real = served.model.prefill

    def prefill(tokens, starts, lengths, tables, cache):
        if max(a + n for a, n in zip(starts, lengths)) >= POISON_LEN:  # (its prefix may be cached)
            raise RuntimeError("injected prefill fault")
        return real(tokens, starts, lengths, tables, cache)

    monkeypatch.setattr(served.model, "prefill", prefill)
    failed = run_with(served, others, poison_request(), poison_first=poison_first)
    assert "prefill" in failed.error and failed.token_ids == []


def test_fault_in_sampling_fails_only_that_sequence(served, others, monkeypatch):
    real = choosing.sample_row

    def sample_row(logits, spec, top_p, generator):
        if spec.seed == SEED:
            raise ValueError("injected sampling fault")
        return real(logits, spec, top_p, generator)

    monkeypatch.setattr(choosing, "sample_row", sample_row)
    failed = run_with(served, others, poison_request(sampling=SamplingSpec(seed=SEED, temperature=0.7)))
    assert "sampling" in failed.error


def test_fault_in_logprobs_fails_only_that_sequence(served, others, monkeypatch):
    real = choosing.token_logprobs

    def token_logprobs(row, token, k):
        if k == 3:
            raise IndexError("injected logprobs fault")
        return real(row, token, k)

    monkeypatch.setattr(choosing, "token_logprobs", token_logprobs)
    run_with(served, others, poison_request(logprobs=True, top_logprobs=3))


def test_fault_in_detokenization_for_stop_strings_fails_only_that_sequence(served, others, monkeypatch):
    def decode(ids):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected detokenize fault")

    monkeypatch.setattr(served.engine, "tok", dataclasses.replace(served.engine.tok, decode=decode))
    run_with(
        served, others, poison_request(stopping=StopSpec(max_new_tokens=10, ignore_eos=True, stop=("zzz",)))
    )


def test_degenerate_temperature_is_greedy_and_wedges_nothing(served, others):
    reqs, expected = others
    tiny = [
        SequenceRequest(
            prompt_ids=reqs[0].prompt_ids,
            sampling=SamplingSpec(temperature=t),
            stopping=StopSpec(max_new_tokens=10, ignore_eos=True),
        )
        for t in (1e-40, 1e-300, 5e-324)
    ]
    handles = served.engine.submit(tiny + reqs)
    results = [h.result() for h in handles]
    assert all(r.finish_reason == LENGTH for r in results)
    assert [r.token_ids for r in results[:3]] == [expected[0]] * 3  # below MIN_TEMPERATURE: greedy
    assert [r.token_ids for r in results[3:]] == expected


def test_watchdog_reports_a_wedged_forward_within_its_timeout(tiny_models):
    s = load_served_model(
        TextgenConfig(
            model_dir=tiny_models["llama"],
            max_batch_size=2,
            max_queue_size=4,
            max_prompts_per_request=2,
            max_context_tokens=64,
            port=0,
            metrics_port=0,
        )
    )
    s.engine.start()
    states: list[tuple[float, bool]] = []
    dog = Watchdog(s, lambda ok: states.append((time.monotonic(), ok)), timeout_s=1.0)
    dog.start()
    release, blocked = threading.Event(), threading.Event()
    real = s.model.decode

    def decode(*a, **kw):
        if not release.is_set():
            blocked.set()
            release.wait(30)
        return real(*a, **kw)

    try:
        time.sleep(1.5)
        assert states == [], "an idle engine is healthy however long it waits"
        s.model.decode = decode
        h = s.engine.submit([greedy([5, 6, 7], n=4)])[0]
        assert blocked.wait(10)
        wedged_at = time.monotonic()
        deadline = wedged_at + 5
        while not states and time.monotonic() < deadline:
            time.sleep(0.02)
        assert states and states[0][1] is False
        assert states[0][0] - wedged_at <= dog.timeout_s + 1.0, states[0][0] - wedged_at
        release.set()
        assert h.result().finish_reason == LENGTH
        deadline = time.monotonic() + 5
        while len(states) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert states[-1][1] is True  # progress again: back to SERVING
    finally:
        release.set()
        dog.stop()
        s.engine.stop()


def test_a_loop_that_turns_without_progress_is_reported(tiny_models):
    """Every step fails before any sequence advances (the old failure mode): health must notice."""
    s = load_served_model(
        TextgenConfig(
            model_dir=tiny_models["llama"],
            max_batch_size=2,
            max_queue_size=4,
            max_prompts_per_request=2,
            max_context_tokens=64,
            port=0,
            metrics_port=0,
        )
    )
    s.engine.start()
    states: list[bool] = []
    dog = Watchdog(s, states.append, timeout_s=0.5)
    dog.start()
    try:
        with s.engine._cv:  # a sequence that is waiting for ever: admitted never (no free block)
            taken = s.engine.pool.allocate(s.engine.pool.num_free())
        h = s.engine.submit([greedy([5, 6, 7], n=2)])[0]
        deadline = time.monotonic() + 3
        while not states and time.monotonic() < deadline:
            time.sleep(0.02)
        assert states == [False]
        with s.engine._cv:
            s.engine.pool.release(taken)
            s.engine._cv.notify_all()
        assert h.result().finish_reason == LENGTH
    finally:
        dog.stop()
        s.engine.stop()
