"""llm.devices.linear_kernel: the inference matmul chosen per device and dtype computes F.linear; the
thin-matmul kernel (llm.thin_linear) it sends decode steps to computes F.linear, row by row."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm import thin_linear
from llm.devices import ThinOrWide, linear_kernel

CPU = torch.device("cpu")


@pytest.mark.parametrize("shape", [(1, 96), (7, 96), (2, 5, 96), (0, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_the_cpu_float32_kernel_computes_f_linear(shape, bias):
    g = torch.Generator(device=CPU).manual_seed(1)
    x = torch.randn(shape, generator=g, device=CPU)
    w = torch.randn((130, 96), generator=g, device=CPU)
    b = torch.randn((130,), generator=g, device=CPU) if bias else None
    y = linear_kernel(CPU, torch.float32)(x, w, b)
    assert y.shape == (*shape[:-1], 130)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_oneDNN_and_the_thin_kernel_are_chosen_for_cpu_float32_where_they_can_be():
    chosen = linear_kernel(CPU, torch.float32)
    wide = chosen.wide if isinstance(chosen, ThinOrWide) else chosen
    assert (wide is not F.linear) == torch.backends.mkldnn.is_available()
    assert isinstance(chosen, ThinOrWide) == (thin_linear.library() is not None)


def test_this_machine_builds_the_thin_kernel():
    # make test runs where setup installed a C compiler; every x86 host this project targets has AVX2
    assert thin_linear.library() is not None


def test_the_kernels_use_the_widest_vectors_this_cpu_has():
    # built with -march=native: 16-lane tiles where the CPU has AVX-512 F, BW and VL, else AVX2's 8 lanes
    flags = set(thin_linear._cpu_features().split())
    want = "avx512" if {"avx512f", "avx512bw", "avx512vl"} <= flags else "avx2"
    assert thin_linear.vector_isa() == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 16, 33])
@pytest.mark.parametrize("n,k", [(130, 96), (4, 8), (7, 13), (49, 577)])
def test_the_thin_kernel_computes_f_linear(dtype, rows, n, k):
    lib = thin_linear.library()
    g = torch.Generator(device=CPU).manual_seed(rows * 1000 + n + k)
    x, w, b = (torch.randn(s, generator=g, device=CPU).to(dtype) for s in ((rows, k), (n, k), (n,)))
    for bias in (b, None):
        want = F.linear(x.float(), w.float(), None if bias is None else bias.float())
        got = thin_linear.thin_linear(lib, x, w, bias)
        assert got.dtype == dtype and got.shape == (rows, n)
        tol = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16: one rounding of the float32 sum
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * k**0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_thin_kernels_rows_do_not_depend_on_the_rows_beside_them(dtype):
    lib = thin_linear.library()
    g = torch.Generator(device=CPU).manual_seed(3)
    x = torch.randn((20, 577), generator=g, device=CPU).to(dtype)
    w = torch.randn((962, 577), generator=g, device=CPU).to(dtype)
    alone = [thin_linear.thin_linear(lib, x[i : i + 1], w) for i in range(20)]
    for m in range(1, 21):
        full = thin_linear.thin_linear(lib, x[:m], w)
        for i in range(m):
            assert torch.equal(full[i], alone[i][0]), (m, i)


def test_a_thin_kernel_that_disagrees_is_not_chosen(monkeypatch):
    monkeypatch.setattr(thin_linear, "thin_linear", lambda lib, x, w, b=None: F.linear(x, w, b) + 1.0)
    chosen = linear_kernel(CPU, torch.float32)
    assert not isinstance(chosen, ThinOrWide)


def test_without_a_compiler_there_is_no_thin_kernel(monkeypatch):
    monkeypatch.setattr(thin_linear, "_compiler", lambda: None)
    thin_linear.library.cache_clear()
    try:
        assert thin_linear.library() is None
        assert not isinstance(linear_kernel(CPU, torch.float32), ThinOrWide)
    finally:
        thin_linear.library.cache_clear()


def test_wide_matmuls_and_other_layouts_go_to_the_wide_kernel():
    calls = []
    wide = lambda x, w, b=None: calls.append(x.shape) or F.linear(x, w, b)  # noqa: E731
    lin = ThinOrWide(thin_linear.library(), wide, max_rows=8)
    w = torch.randn((16, 32), device=CPU)
    lin(torch.randn((8, 32), device=CPU), w)
    assert calls == []
    lin(torch.randn((9, 32), device=CPU), w)
    lin(torch.randn((2, 32), device=CPU), w.t().contiguous().t())  # a transposed view
    lin(torch.randn((2, 32), device=CPU).double(), w.double())  # a dtype the kernel does not take
    assert calls == [(9, 32), (2, 32), (2, 32)]


def test_float32s_line_keeps_the_engines_invariant_passes_on_one_kernel():
    # passes padded to MIN_INVARIANT_ROWS rows must never straddle the thin/wide line
    from services.textgen.modeling import MIN_INVARIANT_ROWS

    assert thin_linear.MAX_ROWS[torch.float32] < MIN_INVARIANT_ROWS


def test_a_rows_result_does_not_depend_on_the_rows_beside_it_from_two_rows_up():
    # what makes MIN_INVARIANT_ROWS safe for this kernel: row 0 computed among 2..40 rows has the same bits
    lin = linear_kernel(CPU, torch.float32)
    g = torch.Generator(device=CPU).manual_seed(2)
    x = torch.randn((40, 576), generator=g, device=CPU)
    w = torch.randn((960, 576), generator=g, device=CPU)
    full = lin(x, w, None)
    for m in range(16, 40):
        assert torch.equal(lin(x[:m], w, None)[0], full[0]), m


def test_float16_keeps_f_linear():
    assert linear_kernel(CPU, torch.float16) is F.linear


def test_when_the_kernel_disagrees_with_f_linear_it_is_not_chosen(monkeypatch):
    import llm.devices as devices

    monkeypatch.setattr(devices, "_onednn_linear", lambda x, w, b=None: F.linear(x, w, b) + 1.0)
    chosen = devices.linear_kernel(CPU, torch.float32)
    assert (chosen.wide if isinstance(chosen, ThinOrWide) else chosen) is F.linear


def test_other_devices_keep_f_linear_without_running_anything_there():
    assert linear_kernel(torch.device("cuda"), torch.float32) is F.linear  # decided by the device type alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 5])
def test_paged_decode_attention_reads_the_blocks_like_sdpa_over_a_gathered_context(dtype, window):
    lib = thin_linear.library()
    g = torch.Generator(device=CPU).manual_seed(4)
    B, h, kv, d, bs, nb = 3, 6, 2, 40, 4, 5
    k_cache = torch.randn((32 * bs, kv, d), generator=g, device=CPU).to(dtype)
    v_cache = torch.randn((32 * bs, kv, d), generator=g, device=CPU).to(dtype)
    tables = torch.stack([torch.randperm(31, generator=g, device=CPU)[:nb] + 1 for _ in range(B)])
    positions = torch.tensor([0, 7, 19], device=CPU)
    q = torch.randn((B, h, d), generator=g, device=CPU).to(dtype)
    got = thin_linear.paged_decode_attention(
        lib, q, k_cache, v_cache, tables, positions, block_size=bs, window=window
    )
    for b in range(B):
        p = torch.arange(int(positions[b]) + 1, device=CPU)
        if window:
            p = p[p > positions[b] - window]
        rows = tables[b, p // bs] * bs + p % bs
        keys, values = k_cache[rows].float().transpose(0, 1), v_cache[rows].float().transpose(0, 1)
        want = F.scaled_dot_product_attention(q[b].float()[:, None], keys, values, enable_gqa=True)[:, 0]
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got[b].float(), want, rtol=tol, atol=tol)


def test_a_position_past_its_block_table_is_an_error_not_a_stray_read():
    lib = thin_linear.library()
    cache = torch.zeros((16, 1, 8), device=CPU)
    q = torch.zeros((1, 2, 8), device=CPU)
    with pytest.raises(RuntimeError, match="past its block table"):
        thin_linear.paged_decode_attention(
            lib,
            q,
            cache,
            cache,
            torch.tensor([[1]], device=CPU),
            torch.tensor([4], device=CPU),
            block_size=4,
            window=None,
        )
