import pytest
import torch

from services.textgen.sampling import (
    SamplingSpec,
    apply_logit_bias,
    apply_openai_penalties,
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


# -- degenerate values that pass validation: sampling never raises, never leaves the vocabulary -------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from services.textgen.sampling import MIN_TEMPERATURE, SamplingError  # noqa: E402

# subnormals are listed by hand: hypothesis refuses to draw them where the FPU flushes them to zero
EXTREME = [1e-300, 5e-324, 1e-45, 1e-40, 1e-38, 1e-6, 1e-5, 1.0, 100.0]
temperatures = st.floats(min_value=1e-300, max_value=100.0, allow_subnormal=False) | st.sampled_from(EXTREME)
penalties = st.floats(min_value=1e-300, max_value=100.0, allow_subnormal=False) | st.sampled_from(EXTREME)
fractions = st.floats(min_value=0.0, max_value=1.0, allow_subnormal=False) | st.sampled_from(
    [0.0, 5e-324, 1e-45, 1e-300, 1.0]
)
logit_values = st.floats(min_value=-1e30, max_value=1e30, allow_subnormal=False) | st.sampled_from(
    [float("-inf"), 0.0, 1e30, -1e30]
)


@st.composite
def cases(draw):
    V = draw(st.integers(1, 64))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    row = torch.tensor(draw(st.lists(logit_values, min_size=V, max_size=V)), dtype=torch.float32).to(dtype)
    if not bool(torch.isfinite(row).any()):
        row[draw(st.integers(0, V - 1))] = 0.0  # a real model's row has at least one finite logit
    top_p = draw(fractions)
    top_k = 0 if top_p > 0 else draw(st.integers(0, 2**31 - 1) | st.sampled_from([0, 1, 2, V, V + 1]))
    spec = SamplingSpec(
        temperature=draw(temperatures),
        top_k=top_k,
        top_p=top_p,
        top_p_decay=draw(fractions),
        top_p_bound=min(draw(fractions), top_p),
        seed=draw(st.integers(-1, 2**63 - 1)),
        repetition_penalty=draw(penalties),
    )
    return row, spec, draw(st.integers(1, 4))


@settings(max_examples=600, deadline=None, database=None)
@given(cases())
def test_sampling_never_raises_and_stays_in_the_vocabulary(case):
    row, spec, steps = case
    V = row.shape[-1]
    gen = None if spec.is_greedy else make_generator(spec.seed)
    top_p = spec.top_p
    seen = torch.arange(min(V, 3))
    for _ in range(steps):
        x = apply_repetition_penalty(row.float(), seen, spec.repetition_penalty)
        t = sample_row(x, spec, top_p, gen)
        assert 0 <= t < V
        assert x[t] != float("-inf") or bool(torch.isinf(x).all())
        top_p = next_top_p(spec, top_p)


def test_temperature_below_the_epsilon_is_greedy():
    logits = torch.tensor([0.1, 2.0, 1.9])
    for t in (1e-40, 5e-324, MIN_TEMPERATURE / 2):
        spec = SamplingSpec(temperature=t, seed=1)
        assert spec.is_greedy and sample_row(logits, spec, 0.0, None) == 1
    assert not SamplingSpec(temperature=MIN_TEMPERATURE).is_greedy


def test_top_p_decayed_to_zero_keeps_the_best_token():
    spec = SamplingSpec(top_p=0.5, top_p_decay=1e-300, seed=3)
    top_p = next_top_p(spec, next_top_p(spec, 0.5))
    assert top_p == 0.0
    logits = torch.tensor([0.0, 0.1, 3.0, 0.2])
    assert {sample_row(logits, spec, top_p, make_generator(i)) for i in range(20)} == {2}


def test_a_row_without_a_finite_logit_is_a_sampling_error():
    with pytest.raises(SamplingError):
        sample_row(torch.full((5,), float("nan")), SamplingSpec(greedy=True), 0.0, None)
    with pytest.raises(SamplingError):
        sample_row(torch.full((5,), float("-inf")), SamplingSpec(seed=1), 0.0, make_generator(1))


def test_openai_penalties_count_generated_tokens_only():
    row = torch.zeros(6)
    out = apply_openai_penalties(row, [2, 2, 5], presence=0.5, frequency=0.25)
    # token 2: 2 occurrences -> -0.5 - 0.5; token 5: one -> -0.25 - 0.5; never-generated tokens untouched
    assert out.tolist() == [0.0, 0.0, -1.0, 0.0, 0.0, -0.75]
    assert apply_openai_penalties(row, [], 2.0, 2.0) is row
    assert apply_openai_penalties(row, [1], -1.0, 0.0)[1] == 1.0  # negative values encourage


def test_logit_bias_adds_and_minus_100_bans():
    row = torch.tensor([1.0, 2.0, 3.0])
    out = apply_logit_bias(row, ((0, 5.0), (2, -100.0), (9, 50.0)))  # an id past the row is ignored
    assert out[0] == 6.0 and out[1] == 2.0 and out[2] == float("-inf")
    assert sample_row(out, SamplingSpec(greedy=True), 0.0, None) == 0
    assert row.tolist() == [1.0, 2.0, 3.0]  # the caller's row is not changed
