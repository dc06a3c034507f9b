"""The compiled decode step (``services.textgen.fused``, ``decode_step_*`` of ``llm/thin_linear.c``) against
the composed path it replaces, on tiny random models of every family it covers."""

from __future__ import annotations

import pytest
import torch

from llm import thin_linear
from llm.checkpoints import open_checkpoint
from services.textgen import fused as fused_module
from services.textgen.fused import FusedDecode
from services.textgen.modeling import DecoderLM, PagedKVCache, _DecodePart

CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.bfloat16]
pytestmark = pytest.mark.skipif(thin_linear.library() is None, reason="no C compiler or no AVX2 here")


def load(path, dtype) -> DecoderLM:
    r = open_checkpoint(path)
    return DecoderLM(r.arch, r.canonical_tensors(), dtype=dtype, device=CPU, max_len=256)


def composed(m: DecoderLM, tokens, positions, tables, cache) -> torch.Tensor:
    return m._run([_DecodePart(m, tokens, positions, tables, cache)])[0]


def prefilled(m: DecoderLM, lengths: list[int]):
    """A cache holding prompts of ``lengths``, each in blocks of 16 scattered through the pool."""
    B = len(lengths)
    cache = PagedKVCache(m.arch, num_blocks=1 + 4 * B, block_size=16, dtype=m.dtype, device=CPU)
    tables = torch.arange(1, 1 + 4 * B, device=CPU).view(4, B).t().contiguous()  # (B, 4), interleaved
    g = torch.Generator(device=CPU).manual_seed(1)
    T = max(lengths)
    with torch.inference_mode():
        m.prefill(torch.randint(0, 100, (B, T), generator=g, device=CPU), [0] * B, lengths, tables, cache)
    return cache, tables


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_the_compiled_step_computes_the_composed_step(tiny_models, family, dtype, window):
    m = load(tiny_models[family], dtype)
    assert m.fused is not None
    m.window = window
    lengths = [5, 20, 33]
    cache, tables = prefilled(m, lengths)
    g = torch.Generator(device=CPU).manual_seed(2)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.inference_mode():
        for step in range(4):  # positions cross block boundaries (16, 32) and the window
            positions = torch.tensor([n + step for n in lengths], device=CPU)
            tokens = torch.randint(0, 100, (3,), generator=g, device=CPU)
            want = composed(m, tokens, positions, tables, cache)
            rows = cache.rows(tables, positions[:, None]).reshape(-1)
            want_k = [k[rows].clone() for k in cache.k]
            got = m.fused(tokens, positions, tables, cache)
            assert got.dtype == dtype and got.shape == want.shape
            assert rel_err(got, want) < tol, (step, rel_err(got, want))
            for k, wk in zip(cache.k, want_k):  # the keys it wrote are the composed path's
                assert rel_err(k[rows], wk) < tol


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_sequences_result_does_not_depend_on_the_others_in_the_step(tiny_models, dtype):
    m = load(tiny_models["qwen2"], dtype)
    lengths = [3, 17, 9, 30, 1]
    cache, tables = prefilled(m, lengths)
    positions = torch.tensor(lengths, device=CPU)
    tokens = torch.tensor([7, 11, 13, 17, 19], device=CPU)
    with torch.inference_mode():
        together = m.fused(tokens, positions, tables, cache).clone()
        for i in range(5):
            alone = m.fused(tokens[i : i + 1], positions[i : i + 1], tables[i : i + 1], cache)
            assert torch.equal(alone[0], together[i])
        swapped = m.fused(tokens.flip(0), positions.flip(0), tables.flip(0), cache)
        assert torch.equal(swapped.flip(0), together)


def test_decode_takes_the_compiled_step_up_to_its_rows_and_the_composed_one_beyond(tiny_models):
    m = load(tiny_models["llama"], torch.float32)
    wide = thin_linear.vector_isa() == "avx512"  # 16-lane tiles: the compiled step wins to more rows
    assert (
        m.fused.max_rows == (fused_module.MAX_ROWS_AVX512 if wide else fused_module.MAX_ROWS)[torch.float32]
    )
    cache, tables = prefilled(m, [4, 6, 8])
    positions, tokens = torch.tensor([4, 6, 8], device=CPU), torch.tensor([1, 2, 3], device=CPU)
    with torch.inference_mode():
        fused = m.fused(tokens, positions, tables, cache).clone()
        assert torch.equal(m.decode(tokens, positions, tables, cache), fused)
        m.fused.max_rows = 2
        want = composed(m, tokens, positions, tables, cache)
        assert torch.equal(m.decode(tokens, positions, tables, cache), want)


@pytest.mark.parametrize("family", ["gpt2", "mixtral", "qwen3_moe"])
def test_models_it_does_not_cover_keep_the_composed_step(tiny_models, family):
    assert load(tiny_models[family], torch.float32).fused is None


def test_a_compiled_step_that_disagrees_with_the_composed_one_is_not_used(tiny_models, monkeypatch):
    real = FusedDecode.__call__
    monkeypatch.setattr(FusedDecode, "__call__", lambda self, *a: real(self, *a) * 1.01)
    assert load(tiny_models["llama"], torch.float32).fused is None


def test_a_position_past_its_block_table_is_an_error_not_a_stray_read(tiny_models, monkeypatch):
    m = load(tiny_models["llama"], torch.float32)
    cache, tables = prefilled(m, [4])  # 4 blocks of 16: positions 0..63
    # the compiled step's own check, not the cache-row lookup's (which would fail first on 64)
    monkeypatch.setattr(cache, "rows", lambda tables, positions: torch.zeros(1, dtype=torch.long, device=CPU))
    for position in (64, -1):
        with torch.inference_mode(), pytest.raises(RuntimeError, match="past its block table"):
            m.fused(torch.tensor([1], device=CPU), torch.tensor([position], device=CPU), tables, cache)


def test_the_lm_head_of_a_decode_step_is_row_independent_and_scoring_keeps_one_kernel(tiny_models):
    m = load(tiny_models["llama"], torch.float32)
    g = torch.Generator(device=CPU).manual_seed(3)
    hidden = torch.randn(72, m.arch.hidden_size, generator=g, device=CPU)
    with torch.inference_mode():
        rows = m.fused.head_max_rows  # past float32's 12-row thin-matmul line, as wide as the compiled step
        assert rows >= m.fused.max_rows
        together = m.logits(hidden[:rows])
        for i in (0, 13, rows - 1):
            assert torch.equal(m.logits(hidden[i : i + 1])[0], together[i])
        torch.testing.assert_close(together, torch.nn.functional.linear(hidden[:rows], m.out_w))
        wide = m.logits(hidden)  # past the thin head: oneDNN's, the same numbers up to rounding
        torch.testing.assert_close(wide, torch.nn.functional.linear(hidden, m.out_w))
        # scoring's padded head: a row's logits the same with 3, 16 or 72 rows beside it
        scored = m.logits_invariant(hidden)
        assert torch.equal(m.logits_invariant(hidden[:3]), scored[:3])
        assert torch.equal(m.logits_invariant(hidden[:16]), scored[:16])
