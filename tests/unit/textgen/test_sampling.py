import torch

from services.textgen.sampling import (
    SamplingSpec,
    apply_repetition_penalty,
    make_generator,
    next_top_p,
    sample_row,
    top_k_filter,
    top_p_filter,
)


def test_top_k_keeps_exactly_the_k_best():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    out = top_k_filter(logits, 2)
    assert torch.isfinite(out).tolist() == [False, True, False, True, False]


def test_top_p_keeps_the_first_token_above_the_threshold():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    out = top_p_filter(probs.log(), 0.6)
    # cumulative 0.5, 0.8, ...: 0.5 < 0.6 so the second token (crossing the threshold) is kept too
    assert torch.isfinite(out).tolist() == [True, True, False, False]
    assert torch.isfinite(top_p_filter(probs.log(), 0.1)).tolist() == [True, False, False, False]


def test_greedy_and_top_k_1_are_argmax():
    logits = torch.tensor([0.1, 2.0, 1.0])
    assert sample_row(logits, SamplingSpec(greedy=True), 0.0, None) == 1
    assert sample_row(logits, SamplingSpec(top_k=1), 0.0, None) == 1


def test_seeded_sampling_is_reproducible_and_defaults_are_not_greedy():
    logits = torch.zeros(50)
    spec = SamplingSpec(seed=7)
    a = [sample_row(logits, spec, 0.0, g) for g in [make_generator(7)] for _ in range(20)]
    b = [sample_row(logits, spec, 0.0, g) for g in [make_generator(7)] for _ in range(20)]
    assert a == b and len(set(a)) > 5  # top_k=0, top_p=0: plain sampling, not argmax


def test_top_p_decay_with_bound():
    spec = SamplingSpec(top_p=0.9, top_p_decay=0.5, top_p_bound=0.3)
    assert next_top_p(spec, 0.9) == 0.45
    assert next_top_p(spec, 0.45) == 0.3


def test_repetition_penalty_lowers_seen_tokens():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]
