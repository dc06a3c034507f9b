"""The engine against a reference: a plain HF forward loop on the same tiny checkpoint."""

from __future__ import annotations

import time

import pytest
import torch

from services.textgen.config import TextgenConfig
from services.textgen.loader import load_served_model
from services.textgen.sampling import SamplingSpec
from services.textgen.sequences import (
    CANCELLED,
    EOS,
    LENGTH,
    STOP_SEQUENCE,
    SequenceRequest,
    StopSpec,
    TokenEvent,
)
from services.textgen.wire import generated_text
from shared.errors import InvalidArgument, ResourceExhausted
from tests.fixtures.tiny import FAMILIES, load_hf

PROMPTS = [
    "The murder was committed in the evening",
    "He fell",
    "Alyosha looked at him and said nothing at all for a while",
]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def served(family, tiny_models):
    s = load_served_model(
        TextgenConfig(
            model_dir=tiny_models[family],
            max_batch_size=4,
            max_queue_size=8,
            max_prompts_per_request=8,
            max_context_tokens=128,
            port=0,
            metrics_port=0,
        )
    )
    s.engine.start()
    yield s
    s.engine.stop()


@pytest.fixture(scope="module")
def hf(family, tiny_models):
    return load_hf(tiny_models[family])


def greedy_ref(hf, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            t = int(hf(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(t)
            out.append(t)
    return out


def req(ids, n=12, **kw) -> SequenceRequest:
    sampling = kw.pop("sampling", SamplingSpec(greedy=True))
    return SequenceRequest(
        prompt_ids=tuple(ids),
        sampling=sampling,
        stopping=StopSpec(max_new_tokens=n, ignore_eos=kw.pop("ignore_eos", True), **kw.pop("stop", {})),
        **kw,
    )


def test_greedy_tokens_match_hf(served, hf):
    ids = served.tokenizer.encode(PROMPTS[0])
    r = served.engine.submit([req(ids)])[0].result()
    assert r.finish_reason == LENGTH
    assert r.token_ids == greedy_ref(hf, ids, 12)


def test_prompt_logprobs_match_hf(served, hf):
    ids = served.tokenizer.encode(PROMPTS[2])
    r = served.engine.submit([req(ids, n=0, prompt_logprobs=True, top_logprobs=3)])[0].result()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1], -1).gather(
            -1, torch.tensor(ids[1:])[:, None]
        )[:, 0]
    assert r.token_ids == [] and len(r.prompt_logprobs) == len(ids) - 1
    assert torch.allclose(torch.tensor(r.prompt_logprobs), ref, atol=1e-4)
    assert all(
        len(t.ids) == 3 and t.logprobs[0] >= lp - 1e-6 for t, lp in zip(r.prompt_top, r.prompt_logprobs)
    )


def test_scoring_answers_that_share_a_context_matches_scoring_each_alone(served, hf):
    """Multiple-choice scoring: prompts equal but for the last token share one forward pass."""
    ctx = served.tokenizer.encode(PROMPTS[1])
    answers = [ctx + [t] for t in (5, 17, 40)] + [ctx[:-2] + [9], ctx + [5, 6], ctx[:1]]
    batch = served.engine.submit(
        [req(a, n=0, prompt_logprobs=True, top_logprobs=2) for a in answers] + [req(ctx, n=4)]
    )
    together = [h.result() for h in batch]
    for a, got in zip(answers, together):
        alone = served.engine.submit([req(a, n=0, prompt_logprobs=True, top_logprobs=2)])[0].result()
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([a])).logits[0, :-1], -1).gather(
                -1, torch.tensor(a[1:])[:, None]
            )[:, 0]
        assert len(got.prompt_logprobs) == len(a) - 1 and got.token_ids == []
        assert torch.allclose(
            torch.tensor(got.prompt_logprobs), torch.tensor(alone.prompt_logprobs), atol=1e-5
        )
        assert torch.allclose(torch.tensor(got.prompt_logprobs), ref, atol=1e-4)
        assert [t.ids for t in got.prompt_top] == [t.ids for t in alone.prompt_top]
    assert together[-1].token_ids == greedy_ref(hf, ctx, 4)


def test_continuous_batching_matches_one_at_a_time(served, hf):
    """Different lengths in one batch, plus one sequence joining while the others decode."""
    tok = served.tokenizer
    ids = [tok.encode(p) for p in PROMPTS]
    first = served.engine.submit([req(ids[0], n=30), req(ids[1], n=20)])
    events = first[0].events()
    while not isinstance(next(events), TokenEvent):  # wait until decoding is under way
        pass
    late = served.engine.submit([req(ids[2], n=10)])[0]
    results = [h.result() for h in first[1:]] + [late.result()]
    rest = list(events)
    first_tokens = [e.token_id for e in rest if isinstance(e, TokenEvent)]
    assert len(first_tokens) == 29 and rest[-1].token_ids == greedy_ref(hf, ids[0], 30)
    assert results[0].token_ids == greedy_ref(hf, ids[1], 20)
    assert results[1].token_ids == greedy_ref(hf, ids[2], 10)


def test_seeded_sampling_does_not_depend_on_the_batch(served):
    ids = served.tokenizer.encode(PROMPTS[0])
    spec = SamplingSpec(seed=1234, temperature=0.8, top_p=0.9)
    alone = served.engine.submit([req(ids, n=16, sampling=spec)])[0].result().token_ids
    crowd = served.engine.submit(
        [
            req(ids, n=16, sampling=SamplingSpec(seed=5)),
            req(ids, n=16, sampling=spec),
            req(ids[:3], n=16, sampling=SamplingSpec()),
        ]
    )
    assert [h.result() for h in crowd][1].token_ids == alone


def test_stop_string_ends_the_sequence_and_is_cut_from_the_text(served):
    ids = served.tokenizer.encode(PROMPTS[0])
    free_run = served.engine.submit([req(ids, n=20)])[0].result()
    text = served.tokenizer.decode(free_run.token_ids)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), "pick a stop string that appears mid-way"
    r = served.engine.submit([req(ids, n=20, stop={"stop": (stop,)})])[0].result()
    assert r.finish_reason == STOP_SEQUENCE and r.stop_sequence == stop and len(r.token_ids) < 20
    assert generated_text(r, served.tokenizer, [stop]) == text[: text.find(stop)]


def test_eos_stops_unless_ignored(served):
    eos = served.tokenizer.eos_id
    ids = served.tokenizer.encode(PROMPTS[1])
    # Force EOS by making it the only allowed token: a 1-token vocabulary via top_k on a biased prompt is
    # not possible, so check the rule directly on the engine's stop logic instead.
    s = served.engine
    seq = type("S", (), {})()
    seq.req = req(ids, n=5, ignore_eos=False)
    seq.gen_ids = [eos]
    seq.next_pos = len(ids)
    seq.stop_window = 0
    assert s._stop_reason(seq, eos)[0] == EOS
    seq.req = req(ids, n=5, ignore_eos=True)
    assert s._stop_reason(seq, eos)[0] is None


def test_cancel_frees_the_blocks_at_once(served):
    ids = served.tokenizer.encode(PROMPTS[0])
    h = served.engine.submit([req(ids, n=100)])[0]
    events = h.events()
    next(events)
    h.cancel()
    assert list(events)[-1].finish_reason == CANCELLED
    deadline = time.monotonic() + 5
    while served.engine.load() != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert served.engine.load() == (0, 0)
    served.engine.pool.check()
    assert served.engine.pool.num_free() == served.engine.pool.usable


def test_full_queue_refuses_new_work_and_loses_nothing(served):
    ids = served.tokenizer.encode(PROMPTS[1])
    with pytest.raises(ResourceExhausted, match="queue full"):
        served.engine.submit([req(ids, n=1)] * 9)  # max_queue_size=8, all or none
    assert served.engine.load()[0] == 0
    assert all(h.result().finish_reason == LENGTH for h in served.engine.submit([req(ids, n=1)] * 8))


def test_prompt_plus_tokens_longer_than_context_is_refused_with_megatron_message(served):
    with pytest.raises(
        InvalidArgument, match="^Length of prompt \\+ tokens_to_generate longer than allowed$"
    ):
        served.engine.submit([req([5] * 100, n=29)])
    with pytest.raises(InvalidArgument, match="outside the vocabulary"):
        served.engine.submit([req([10**6], n=1)])


def _engine_with(tiny_models, mode: str, **cfg):
    return _engine_with_dir(tiny_models["llama"], mode, **cfg)


def _engine_with_dir(model_dir, mode: str, **cfg):
    s = load_served_model(
        TextgenConfig(
            model_dir=model_dir,
            max_batch_size=32,
            max_queue_size=64,
            max_prompts_per_request=64,
            max_context_tokens=128,
            batch_invariant=mode,
            port=0,
            metrics_port=0,
            **cfg,
        )
    )
    s.engine.start()
    return s


@pytest.mark.parametrize("mode, family", [("all", "llama"), ("scoring", "llama"), ("all", "mixtral")])
def test_batch_invariant_sequences_get_the_same_bits_alone_and_among_31_others(tiny_models, mode, family):
    """Greedy generation (mode all) and prompt scoring (modes all and scoring) give bitwise the same tokens
    and log-probs at concurrency 1 and 32, in any order; for a mixture of experts too, where how many tokens
    choose each expert changes with the batch."""
    import random

    s = _engine_with_dir(tiny_models[family], mode)
    try:
        tok = s.tokenizer
        target = tok.encode(PROMPTS[2])
        rng = random.Random(7)
        others = [[rng.randrange(5, tok.vocab_size) for _ in range(rng.randrange(3, 40))] for _ in range(31)]
        scoring = req(target, n=0, prompt_logprobs=True, top_logprobs=2)
        seeded = req(target, n=10, logprobs=True, sampling=SamplingSpec(temperature=1.0, top_k=20, seed=11))
        kinds = [scoring, seeded] + ([req(target, n=10, logprobs=True)] if mode == "all" else [])
        for r in kinds:
            alone = s.engine.submit([r])[0].result()
            crowd = [req(o, n=rng.randrange(1, 12)) for o in others]
            for order in range(2):
                batch = crowd[:] if order else crowd[::-1]
                batch.insert(rng.randrange(len(batch) + 1), r)
                results = [h.result() for h in s.engine.submit(batch)]
                mine = results[batch.index(r)]
                assert mine.token_ids == alone.token_ids
                assert mine.logprobs == alone.logprobs and mine.prompt_logprobs == alone.prompt_logprobs
                assert mine.prompt_top == alone.prompt_top
        # prompts to score share one packed pass: each gets the bits it gets alone, whatever it is packed with
        crowd = [req(o, n=0, prompt_logprobs=True, top_logprobs=2) for o in others]
        for order in range(2):
            batch = crowd[:] if order else crowd[::-1]
            batch.insert(rng.randrange(len(batch) + 1), scoring)
            before = s.engine.steps
            results = [h.result() for h in s.engine.submit(batch)]
            assert s.engine.steps - before < len(batch) // 2  # packed: far fewer passes than prompts
            for r, got in zip(batch, results):
                solo = s.engine.submit([r])[0].result()
                assert got.prompt_logprobs == solo.prompt_logprobs and got.prompt_top == solo.prompt_top
    finally:
        s.engine.stop()


def test_invariant_scoring_after_a_prefix_hit_has_the_bits_of_a_whole_pass(tiny_models):
    """Few-shot prompts share a prefix: scored after it is cached (only their own rows computed, in one
    packed pass), each prompt's log-probs equal those of a pass that computes it whole, on an engine
    without a prefix cache; prompts that generate never read those blocks."""
    import random

    rng = random.Random(3)
    shots = [rng.randrange(5, 200) for _ in range(70)]  # a shared prefix of 4 full blocks
    prompts = [shots + [rng.randrange(5, 200) for _ in range(rng.randrange(2, 30))] for _ in range(12)]
    # as the evaluator asks: the continuation after the shots is scored (lm-eval's loglikelihood)
    reqs = [
        req(p, n=0, prompt_logprobs=True, top_logprobs=2, prompt_logprobs_from=len(shots)) for p in prompts
    ]
    cached, whole = (
        _engine_with(tiny_models, "scoring"),
        _engine_with(tiny_models, "scoring", prefix_caching=False),
    )
    try:
        first = cached.engine.submit(reqs[:1])[0].result()
        hits = cached.engine.pool.hits
        got = [h.result() for h in cached.engine.submit(reqs[1:])]
        assert cached.engine.pool.hits - hits >= 11 * 64  # every later prompt read the 4 cached blocks
        ref = [h.result() for h in whole.engine.submit(reqs)]
        assert whole.engine.pool.hits == 0
        for a, b in zip([first, *got], ref):
            assert a.prompt_logprobs == b.prompt_logprobs and a.prompt_top == b.prompt_top
        hits = cached.engine.pool.hits  # a generating prompt has its own chain: the scoring blocks stay apart
        cached.engine.submit([req(prompts[0], n=2)])[0].result()
        assert cached.engine.pool.hits == hits
    finally:
        cached.engine.stop()
        whole.engine.stop()
    off = _engine_with(tiny_models, "off")  # invariance off: the same packed passes, on the common chain
    try:
        first = off.engine.submit(reqs[:1])[0].result()
        got = [first, *(h.result() for h in off.engine.submit(reqs[1:]))]
        assert off.engine.pool.hits >= 11 * 64 and off.engine.steps < len(reqs)
        assert [g.prompt_logprobs for g in got] == [b.prompt_logprobs for b in ref]
    finally:
        off.engine.stop()


def penalised_ref(hf, ids: list[int], n: int, presence: float, frequency: float, bias: dict[int, float]):
    """Greedy decoding of HF logits after OpenAI's penalties and logit_bias, computed here independently."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            x = hf(torch.tensor([ids])).logits[0, -1].float()
            for t in set(out):
                x[t] -= frequency * out.count(t) + presence
            for t, b in bias.items():
                x[t] = float("-inf") if b <= -100 else x[t] + b
            out.append(int(x.argmax()))
            ids.append(out[-1])
    return out


def test_presence_frequency_penalties_and_logit_bias_match_a_reference(served, hf):
    ids = served.tokenizer.encode(PROMPTS[0])
    plain = greedy_ref(hf, ids, 12)
    boost = next((t for t in plain[1:] if t != plain[0]), plain[0] + 1)  # a tiny model may repeat one token
    bias = {plain[0]: -100.0, boost: 3.0}
    sampling = SamplingSpec(
        greedy=True, presence_penalty=0.8, frequency_penalty=1.5, logit_bias=tuple(bias.items())
    )
    r = served.engine.submit([req(ids, sampling=sampling)])[0].result()
    assert r.token_ids == penalised_ref(hf, ids, 12, 0.8, 1.5, bias)
    assert plain[0] not in r.token_ids and r.token_ids != plain


def test_min_tokens_holds_off_eos_and_stop_ids_which_then_end_the_sequence(served):
    tok = served.tokenizer
    ids = tok.encode(PROMPTS[1])
    eos = tok.eos_id
    push_eos = SamplingSpec(greedy=True, logit_bias=((eos, 100.0),))
    r = served.engine.submit([req(ids, n=10, sampling=push_eos, ignore_eos=False, stop={"min_tokens": 4})])[0]
    r = r.result()
    assert r.finish_reason == EOS and len(r.token_ids) == 5 and r.token_ids[-1] == eos
    assert eos not in r.token_ids[:4]
    stop_id = tok.encode(" the")[-1]
    push_stop = SamplingSpec(greedy=True, logit_bias=((stop_id, 100.0),))
    r = served.engine.submit([req(ids, n=10, sampling=push_stop, stop={"stop_token_ids": (stop_id,)})])[0]
    r = r.result()
    assert r.finish_reason == EOS and r.token_ids == [
        stop_id
    ]  # ended by the stop id, which the text leaves out
    assert generated_text(r, tok, []) == ""


def test_n_sequences_share_one_prefill_and_each_samples_with_its_derived_seed(tiny_models):
    """OpenAI's n: the j-th sequence of a prompt samples with seed + j, exactly as a request of its own with
    that seed would (batch-invariant engine, so the comparison is bit for bit), after one shared prefill."""
    from prometheus_client import REGISTRY

    from protos.textgen.v1 import textgen_pb2 as pb
    from services.textgen.wire import sequence_requests

    s = _engine_with(tiny_models, "all")
    try:
        params = pb.GenerationParams(
            sampling=pb.SamplingParams(temperature=1.0, seed=11),
            stopping=pb.StoppingParams(max_new_tokens=8, ignore_eos=True),
            logprobs=True,
            n=3,
        )
        prompt = pb.Prompt(text=PROMPTS[0])
        reqs = sequence_requests([prompt], params, s.tokenizer, max_prompts=8)
        assert [r.sampling.seed for r in reqs] == [11, 12, 13]

        def prefills() -> float:
            labels = {"method": "prefill"}
            return REGISTRY.get_sample_value("megastack_textgen_batch_forward_duration_seconds_count", labels)

        before = prefills()
        together = [h.result() for h in s.engine.submit(reqs)]
        assert prefills() - before == 1  # one prefill for the three
        alone = [s.engine.submit([r])[0].result() for r in reqs]
        assert [r.token_ids for r in together] == [r.token_ids for r in alone]
        assert [r.logprobs for r in together] == [r.logprobs for r in alone]
        assert len({tuple(r.token_ids) for r in together}) > 1  # three samples, not one copied
        with pytest.raises(InvalidArgument) as e:
            sequence_requests([prompt] * 3, params, s.tokenizer, max_prompts=8)
        assert e.value.field == "n"
    finally:
        s.engine.stop()


def test_a_seeded_request_gives_the_same_text_on_another_replica(tiny_models):
    """Two replicas (separately loaded engines: same model, dtype and device type), one busy with 15 other
    sequences: the same seeded request returns the same tokens and log-probs on both."""
    first, second = _engine_with(tiny_models, "scoring"), _engine_with(tiny_models, "scoring")
    try:
        ids = first.tokenizer.encode(PROMPTS[0])
        seeded = req(ids, n=12, logprobs=True, sampling=SamplingSpec(temperature=0.9, top_p=0.9, seed=77))
        a = first.engine.submit([seeded])[0].result()
        crowd = [req([5 + i, 6, 7], n=10) for i in range(15)]
        handles = second.engine.submit([*crowd[:7], seeded, *crowd[7:]])
        b = [h.result() for h in handles][7]
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
    finally:
        first.engine.stop()
        second.engine.stop()


def test_every_eos_id_of_generation_config_ends_a_sequence(tiny_models, tmp_path):
    """Llama 3 Instruct's generation_config.json lists several EOS ids: each ends a sequence as EOS does (and
    min_tokens holds each off), as HF generate() stops on any of them."""
    import json
    import shutil

    model = shutil.copytree(tiny_models["llama"], tmp_path / "llama3ish")
    hf_model = load_hf(model)
    ids = list(range(5, 25))
    plain = greedy_ref(hf_model, ids, 6)
    extra = plain[2]  # an id the model produces on its own, third
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, extra]}))
    s = load_served_model(
        TextgenConfig(model_dir=model, max_batch_size=2, max_context_tokens=64, port=0, metrics_port=0)
    )
    s.engine.start()
    try:
        assert extra in s.engine.tok.ends and 0 in s.engine.tok.ends
        r = s.engine.submit([req(ids, n=6, ignore_eos=False)])[0].result()
        assert r.finish_reason == EOS and r.token_ids == plain[: plain.index(extra) + 1]
        held = s.engine.submit([req(ids, n=6, ignore_eos=False, stop={"min_tokens": 6})])[0].result()
        assert extra not in held.token_ids and len(held.token_ids) == 6
        assert s.engine.submit([req(ids, n=6)])[0].result().token_ids == plain  # ignore_eos: as before
    finally:
        s.engine.stop()


def test_a_sliding_window_model_matches_hf_past_its_window(tiny_tokenizer, tmp_path):
    """Mistral v0.1's sliding window (8 positions here): greedy tokens and prompt log-probs of a 40-token
    prompt equal HF's, which masks keys older than the window; the packed scoring pass honours it too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig

    from tools.tiny import DENSE

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer))
    cfg = MistralConfig(**DENSE, vocab_size=len(tok), sliding_window=8, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(str(tmp_path / "mistral"))
    tok.save_pretrained(str(tmp_path / "mistral"))
    hf_model = load_hf(tmp_path / "mistral")
    ids = [(7 * i) % 200 + 5 for i in range(40)]
    with torch.no_grad():
        full = hf_model(torch.tensor([ids])).logits[0].float()
        no_window = (
            AutoModelForCausalLM.from_pretrained(str(tmp_path / "mistral"), sliding_window=None)(
                torch.tensor([ids])
            )
            .logits[0]
            .float()
        )
    assert (full - no_window).abs().max() > 1e-3  # the window matters for this prompt
    ref_lp = torch.log_softmax(full[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    for mode in ("off", "scoring"):
        s = _engine_with_dir(tmp_path / "mistral", mode)
        try:
            assert s.model.window == 8
            r = s.engine.submit([req(ids, n=8)])[0].result()
            assert r.token_ids == greedy_ref(hf_model, ids, 8)
            scored = s.engine.submit([req(ids, n=0, prompt_logprobs=True)])[0].result()
            assert torch.allclose(torch.tensor(scored.prompt_logprobs), ref_lp, atol=1e-4)
        finally:
            s.engine.stop()
