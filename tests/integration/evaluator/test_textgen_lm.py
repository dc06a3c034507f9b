"""TextgenLM's three request types against transformers on the same tiny checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
from lm_eval.api.instance import Instance

from services.evaluator.lm import TextgenLM


def _inst(kind, args, i=0):
    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


@pytest.fixture(scope="module")
def hf_model(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_models["llama"]
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32
    ).eval(), AutoTokenizer.from_pretrained(path)


def _hf_loglik(model, ids: list[int], ctxlen: int) -> tuple[float, bool]:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    cont = ids[ctxlen:]
    rows = logp[ctxlen - 1 : len(ids) - 1]
    total = float(rows[torch.arange(len(cont)), torch.tensor(cont)].sum())
    return total, bool((rows.argmax(-1) == torch.tensor(cont)).all())


def test_loglikelihood_matches_transformers(textgen, hf_model):
    model, tok = hf_model
    lm = TextgenLM(textgen.address, batch_size=3)
    pairs = [
        ("The cat sat on", " the mat"),
        ("one two three", " four"),
        ("hello", " world and more words"),
        ("a", " b"),
    ]
    got = lm.loglikelihood([_inst("loglikelihood", p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        c, w = lm._encode_pair(ctx, cont)
        want_lp, want_greedy = _hf_loglik(model, c + w, len(c))
        assert lp == pytest.approx(want_lp, abs=1e-3), (ctx, cont)
        assert greedy == want_greedy
    assert lm._done == lm._total == len(pairs)


def test_loglikelihood_rolling_is_the_whole_text_scored(textgen, hf_model):
    model, tok = hf_model
    lm = TextgenLM(textgen.address, batch_size=2)
    text = "the quick brown fox jumps over the lazy dog " * 3
    (got,) = lm.loglikelihood_rolling([_inst("loglikelihood_rolling", (text,))], disable_tqdm=True)
    ids = [lm.prefix_token_id, *lm.tok_encode(text)]
    want, _ = _hf_loglik(model, ids, 1)
    assert got == pytest.approx(want, abs=1e-3) and math.isfinite(got) and got < 0


def test_generate_until_stops_and_matches_greedy_transformers(textgen, hf_model):
    model, tok = hf_model
    lm = TextgenLM(textgen.address, batch_size=2)
    prompts = ["one two", "the cat", "hello there"]
    reqs = [
        _inst("generate_until", (p, {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}), i)
        for i, p in enumerate(prompts)
    ]
    got = lm.generate_until(reqs)
    for p, text in zip(prompts, got):
        ids = lm.tok_encode(p)
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=6,
                do_sample=False,
                eos_token_id=lm.eot_token_id,
                pad_token_id=0,
            )
        want = lm.tok_decode(out[0, len(ids) :].tolist())
        assert text == want.split("\n\n")[0]
    full = got[0]
    assert len(full) >= 4, full
    marker = full[len(full) // 2 :][:3]
    (cut,) = lm.generate_until([_inst("generate_until", ("one two", {"until": [marker], "max_gen_toks": 6}))])
    assert cut == full[: full.find(marker)]
