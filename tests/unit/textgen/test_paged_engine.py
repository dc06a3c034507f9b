"""The engine over the paged KV cache, with real forward passes on tiny models: prefix caching, preemption
under memory pressure, blocks given back, concurrency bounded by blocks and not slots."""

from __future__ import annotations

import random
import time

import pytest
import torch

from llm.checkpoints import open_checkpoint
from services.textgen import metrics as M
from services.textgen.config import TextgenConfig
from services.textgen.loader import kv_cache_blocks, load_served_model
from services.textgen.sampling import SamplingSpec
from services.textgen.sequences import CANCELLED, LENGTH, SequenceRequest, StopSpec
from tests.fixtures.tiny import load_hf, make_tiny_hf


def greedy(ids, n=12, **kw) -> SequenceRequest:
    return SequenceRequest(
        prompt_ids=tuple(ids),
        sampling=SamplingSpec(greedy=True),
        stopping=StopSpec(max_new_tokens=n, ignore_eos=True),
        **kw,
    )


def serve(model_dir, **over):
    cfg = dict(
        model_dir=model_dir,
        max_queue_size=1024,
        max_prompts_per_request=1024,
        max_context_tokens=128,
        port=0,
        metrics_port=0,
    )
    cfg.update(over)
    s = load_served_model(TextgenConfig(**cfg))
    s.engine.start()
    return s


def wait_idle(engine, timeout=10.0):
    deadline = time.monotonic() + timeout
    while engine.load() != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.load() == (0, 0)


@pytest.fixture(scope="module")
def long_llama(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama with a 2048-token context (the shared fixtures stop at 256)."""
    return make_tiny_hf(
        "llama", tmp_path_factory.mktemp("long") / "llama", tiny_tokenizer, max_position_embeddings=2048
    )


def test_a_1000_token_shared_prefix_is_prefilled_once_and_changes_no_output(long_llama):
    rng = random.Random(0)
    prefix = [rng.randrange(3, 500) for _ in range(1000)]
    a, b = prefix + [11, 12, 13], prefix + [21, 22]
    cached = serve(long_llama, max_context_tokens=1100)
    plain = serve(long_llama, max_context_tokens=1100, prefix_caching=False)
    try:
        computed, hits = M.PREFILL_COMPUTED_TOKENS, M.PREFIX_CACHE_HITS.ours
        first = cached.engine.submit([greedy(a, logprobs=True)])[0].result()
        before = (computed._value.get(), hits._value.get())
        second = cached.engine.submit([greedy(b, logprobs=True)])[0].result()
        after = (computed._value.get(), hits._value.get())
        # 62 full blocks of 16 (992 tokens) came from the cache: only the last 10 tokens were computed
        assert after[1] - before[1] == 992
        assert after[0] - before[0] == len(b) - 992
        ref = [h.result() for h in plain.engine.submit([greedy(a, logprobs=True), greedy(b, logprobs=True)])]
        assert first.token_ids == ref[0].token_ids and second.token_ids == ref[1].token_ids
        assert second.logprobs == pytest.approx(ref[1].logprobs, abs=1e-4)
        # and both against HF
        hf = load_hf(long_llama)
        with torch.no_grad():
            ids = list(b)
            for t in second.token_ids:
                assert int(hf(torch.tensor([ids])).logits[0, -1].argmax()) == t
                ids.append(t)
    finally:
        cached.engine.stop()
        plain.engine.stop()


def test_preemption_under_a_few_blocks_loses_and_duplicates_no_token(tiny_models):
    """200 requests through 8 blocks of 16 tokens (4 sequences' worth): the running ones are preempted
    and recomputed again and again, and every output equals the output of a pool big enough for all."""
    rng = random.Random(1)
    reqs = [
        greedy([rng.randrange(3, 500) for _ in range(rng.randint(2, 20))], n=rng.randint(1, 24))
        for _ in range(200)
    ]
    roomy = serve(tiny_models["llama"], max_batch_size=256)
    tight = serve(tiny_models["llama"], max_batch_size=256, kv_cache_blocks=9, max_context_tokens=64)
    try:
        ref = [h.result() for h in roomy.engine.submit(reqs)]
        before = M.PREEMPTIONS.ours._value.get()
        got = [h.result() for h in tight.engine.submit(reqs)]
        assert M.PREEMPTIONS.ours._value.get() - before > 0  # the pool did run dry
        assert [r.token_ids for r in got] == [r.token_ids for r in ref]
        assert all(r.finish_reason == LENGTH for r in got)
        wait_idle(tight.engine)
        tight.engine.pool.check()
        assert tight.engine.pool.num_free() == tight.engine.pool.usable
    finally:
        roomy.engine.stop()
        tight.engine.stop()


def test_1000_cancelled_streams_give_back_every_block(tiny_models):
    s = serve(tiny_models["gpt2"], max_batch_size=64)
    try:
        for round_ in range(10):
            handles = s.engine.submit([greedy([5 + round_, 6, 7, 8 + i % 50], n=60) for i in range(100)])
            for i, h in enumerate(handles):
                if i % 2:
                    next(h.events())  # some are cancelled mid-stream, the others while they wait or start
                h.cancel()
            assert all(h.result().finish_reason in (CANCELLED, LENGTH) for h in handles)
        wait_idle(s.engine)
        s.engine.pool.check()
        assert s.engine.pool.num_free() == s.engine.pool.usable
    finally:
        s.engine.stop()


def test_128_sequences_run_together_bounded_by_blocks_not_slots(tiny_models):
    s = serve(tiny_models["qwen2"], max_batch_size=256)
    try:
        reqs = [greedy([3 + i % 400, 4, 5 + i % 7], n=40) for i in range(128)]
        results = [h.result() for h in s.engine.submit(reqs)]
        assert all(len(r.token_ids) == 40 for r in results)
        assert s.engine.peak_running == 128
    finally:
        s.engine.stop()


def test_the_default_budget_holds_128_sequences_of_300_tokens_of_the_default_model(default_model_dir):
    arch = open_checkpoint(default_model_dir).arch
    cfg = TextgenConfig(model_dir=default_model_dir, port=0, metrics_port=0)
    n, _ = kv_cache_blocks(cfg, arch, cfg.max_context_tokens, torch.float32, torch.device("cpu"))
    assert (n - 1) * cfg.block_size >= 128 * 300


def test_a_long_prompt_is_prefilled_in_chunks_that_carry_the_decode_steps_with_the_same_tokens(long_llama):
    """While 4 streams decode, a 600-token prompt is prefilled 64 tokens per step, each chunk in one forward
    pass with the streams' decode step; its tokens equal those of the same prompt prefilled whole on an idle
    engine, and the streams' tokens equal theirs without the long prompt."""
    rng = random.Random(5)
    long = [rng.randrange(3, 500) for _ in range(600)]
    streams_reqs = [greedy([7 + i, 8, 9], n=40) for i in range(4)]
    chunked = serve(long_llama, max_context_tokens=700, prefill_chunk_tokens=64, prefix_caching=False)
    try:
        alone = chunked.engine.submit([greedy(long, n=8)])[0].result().token_ids  # idle: prefilled whole
        streams_alone = [h.result().token_ids for h in chunked.engine.submit(streams_reqs)]
        calls: list[tuple[str, int]] = []
        model = chunked.model
        real = model.prefill, model.decode, model.step

        def prefill(tokens, starts, lengths, tables, cache):
            calls.append(("prefill", max(a + n for a, n in zip(starts, lengths))))
            return real[0](tokens, starts, lengths, tables, cache)

        def decode(tokens, positions, tables, cache):
            calls.append(("decode", len(tokens)))
            return real[1](tokens, positions, tables, cache)

        def step(dec, pre, cache):
            calls.append(("step", max(a + n for a, n in zip(pre[1], pre[2]))))
            return real[2](dec, pre, cache)

        model.prefill, model.decode, model.step = prefill, decode, step
        try:
            streams = chunked.engine.submit(streams_reqs)
            assert next(streams[0].events()).token_id >= 0  # the streams are decoding
            got = chunked.engine.submit([greedy(long, n=8)])[0].result().token_ids
            streams_got = [h.result().token_ids for h in streams]
        finally:
            model.prefill, model.decode, model.step = real
        assert got == alone and streams_got == streams_alone
        chunks = [(kind, end) for kind, end in calls if kind != "decode" and end > 3]
        assert [end for _, end in chunks] == [64 * i for i in range(1, 10)] + [600]  # 10 chunks of <= 64
        assert all(kind == "step" for kind, _ in chunks)  # each carried the streams' decode step
    finally:
        chunked.engine.stop()


def test_when_the_shared_prefill_and_decode_pass_fails_both_run_apart_and_lose_nothing(tiny_models):
    s = serve(tiny_models["llama"], max_batch_size=64, prefill_chunk_tokens=4)
    try:
        reqs = [greedy([3 + i, 40 + i, 5, 6, 7, 8, 9, 10, 11][: 3 + i % 6], n=16) for i in range(12)]
        ref = [h.result().token_ids for h in s.engine.submit(reqs)]  # reference: the same engine, same way
        calls = []

        def step(*a, **kw):
            calls.append(1)
            raise RuntimeError("injected fault in the shared pass")

        real, s.model.step = s.model.step, step
        try:
            first = s.engine.submit(reqs[:1])
            next(first[0].events())
            rest = s.engine.submit(reqs[1:])  # their prefill meets the first one's decode steps
            got = [h.result().token_ids for h in first + rest]
        finally:
            s.model.step = real
        assert calls and got == ref
    finally:
        s.engine.stop()


def test_a_mostly_cached_prompt_is_prefilled_in_one_group_with_fresh_ones(tiny_models, caplog):
    # three prompts cached (32 of their 40 tokens: rows from position 32), three fresh (rows from 0): the
    # group pads every row to 40 positions, and a cached row's padding lies past its block table; it must
    # not be looked up there (it failed the group's prefill, which then ran each sequence alone)
    g = random.Random(5)
    prompts = [[g.randrange(3, 200) for _ in range(40)] for _ in range(6)]
    s = serve(tiny_models["llama"], max_batch_size=16)
    try:
        alone = [s.engine.submit([greedy(p)])[0].result().token_ids for p in prompts[:3]]
        wait_idle(s.engine)
        hits = M.PREFIX_CACHE_HITS.ours._value.get()
        with caplog.at_level("WARNING", logger="services.textgen.containment"):
            got = [h.result().token_ids for h in s.engine.submit([greedy(p) for p in prompts])]
        assert not [r for r in caplog.records if "running each alone" in r.getMessage()]
        assert M.PREFIX_CACHE_HITS.ours._value.get() - hits == 3 * 32
        alone += [s.engine.submit([greedy(p)])[0].result().token_ids for p in prompts[3:]]
        assert got == alone
    finally:
        s.engine.stop()
