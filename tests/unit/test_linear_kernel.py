"""llm.devices.linear_kernel: the inference matmul chosen per device and dtype computes F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm.devices import linear_kernel

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


def test_oneDNN_is_chosen_for_cpu_float32_where_the_build_has_it():
    chosen = linear_kernel(CPU, torch.float32)
    if torch.backends.mkldnn.is_available():
        assert chosen is not F.linear
    else:
        assert chosen is F.linear


def test_a_rows_result_does_not_depend_on_the_rows_beside_it_from_two_rows_up():
    # what makes MIN_INVARIANT_ROWS safe for this kernel: row 0 computed among 2..40 rows has the same bits
    lin = linear_kernel(CPU, torch.float32)
    g = torch.Generator(device=CPU).manual_seed(2)
    x = torch.randn((40, 576), generator=g, device=CPU)
    w = torch.randn((960, 576), generator=g, device=CPU)
    full = lin(x, w, None)
    for m in range(16, 40):
        assert torch.equal(lin(x[:m], w, None)[0], full[0]), m


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_other_dtypes_keep_f_linear(dtype):
    assert linear_kernel(CPU, dtype) is F.linear


def test_when_the_kernel_disagrees_with_f_linear_it_is_not_chosen(monkeypatch):
    import llm.devices as devices

    monkeypatch.setattr(devices, "_onednn_linear", lambda x, w, b=None: F.linear(x, w, b) + 1.0)
    assert devices.linear_kernel(CPU, torch.float32) is F.linear


def test_other_devices_keep_f_linear_without_running_anything_there():
    assert linear_kernel(torch.device("cuda"), torch.float32) is F.linear  # decided by the device type alone
