"""Device and dtype resolution. Code never hard-codes a device: it asks here."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from llm import thin_linear

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when available, else CPU) or the named device; ValueError for CUDA without CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return dev


def resolve_dtype(name: str) -> torch.dtype:
    """float32, bfloat16 or float16 by name; ValueError otherwise."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of float32, bfloat16, float16") from None


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bfloat16``."""
    return str(dtype).removeprefix("torch.")


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); CPU for a module that holds neither."""
    for t in module.parameters():
        return t.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def to_device(batch, device: torch.device | str):
    """``batch`` with every tensor in it (dicts, lists and tuples walked) on ``device``; other values as they
    are.

    The one place batches cross to the model's device: the trainer's forward step, converter verify and
    gpu_check call it, so no path feeds CPU tensors to a model on a GPU.
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [to_device(v, device) for v in batch]
    if isinstance(batch, tuple):
        return tuple(to_device(v, device) for v in batch)
    return batch


Linear = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class ThinOrWide:
    """``F.linear`` that sends matmuls of at most ``max_rows`` rows (a decode step; ``thin_linear.MAX_ROWS``
    of the dtype) to the thin-matmul kernel (``llm.thin_linear``) and wider ones (prefill) to ``wide``.
    Both are row-invariant on their own side of the line (``tools/bench/decode_step.py`` measures the
    step both ways)."""

    def __init__(self, lib, wide: Linear, max_rows: int):
        self.lib, self.wide, self.max_rows = lib, wide, max_rows

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if (
            0 < rows <= self.max_rows
            and x.dtype in thin_linear.MAX_ROWS
            and weight.dtype == x.dtype
            and weight.is_contiguous()
            and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous()))
        ):
            return thin_linear.thin_linear(self.lib, x, weight, bias)
        return self.wide(x, weight, bias)


def compiled_library(device: torch.device, dtype: torch.dtype):
    """``llm.thin_linear``'s compiled kernels where they apply (CPU, float32 or bfloat16), else None."""
    return thin_linear.library() if device.type == "cpu" and dtype in thin_linear.MAX_ROWS else None


def _tolerance(dtype: torch.dtype) -> float:
    """rtol = atol of a kernel's check against PyTorch's op: float32 sums in another order, or one more
    bfloat16 rounding."""
    return 1e-5 if dtype == torch.float32 else 2e-2


def _agrees(linear: Linear, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``linear`` computes ``F.linear`` on a few shapes (thin and wide, with and without bias)."""
    g = torch.Generator(device=device).manual_seed(0)
    tol = _tolerance(dtype)
    for rows in (1, 3, 7, 24):
        x, w, b = (torch.randn(s, generator=g, device=device) for s in ((rows, 52), (40, 52), (40,)))
        x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
        for bias in (b, None):
            want = F.linear(x.float(), w.float(), None if bias is None else bias.float())
            if not torch.allclose(linear(x, w, bias).float(), want, rtol=tol, atol=tol):
                return False
    return True


def linear_kernel(device: torch.device, dtype: torch.dtype) -> Linear:
    """The ``F.linear`` to run inference matmuls with on ``device`` in ``dtype``.

    On CPU in float32 and bfloat16: matmuls of a few rows (a decode step) go to the thin-matmul kernel
    (``llm.thin_linear``, compiled for this machine), which streams the weights faster than PyTorch's
    GEMMs on small hosts; wider float32 ones go to oneDNN's linear (``F.linear`` sends float32 to MKL's
    GEMM, about half as fast for these shapes); in bfloat16 the kernel takes every width (where the CPU
    lacks native bfloat16, ``F.linear`` is ~4x slower at all of them). Each choice is checked against
    ``F.linear`` once before it is made; any doubt (a missing op, no compiler, a disagreement) falls back.
    Other devices keep ``F.linear``.
    """
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return F.linear
    wide: Linear = F.linear
    if dtype == torch.float32 and torch.backends.mkldnn.is_available():
        try:
            if _agrees(_onednn_linear, device, dtype):
                wide = _onednn_linear
        except (AttributeError, RuntimeError):  # an op this build lacks, or refuses
            pass
    lib = compiled_library(device, dtype)
    if lib is not None:
        chosen = ThinOrWide(lib, wide, thin_linear.MAX_ROWS[dtype])
        try:
            if _agrees(chosen, device, dtype):
                return chosen
        except (RuntimeError, MemoryError):
            pass
    return wide


RmsNorm = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def _torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rms_norm_kernel(device: torch.device, dtype: torch.dtype) -> RmsNorm:
    """``F.rms_norm`` over the last dimension, ``(x, weight, eps)``: on CPU in float32 and bfloat16 the
    compiled one of ``llm.thin_linear`` (one call where PyTorch runs six ops: ~75 us per decode-step norm
    on a 2-core host), checked against ``F.rms_norm`` once before it is chosen; elsewhere ``F.rms_norm``."""
    lib = compiled_library(device, dtype)
    if lib is None:
        return _torch_rms_norm

    def compiled(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return thin_linear.rms_norm(lib, x, weight, eps)

    g = torch.Generator(device=device).manual_seed(0)
    tol = _tolerance(dtype)
    try:
        for shape in ((1, 52), (5, 3, 77)):
            x, w = (
                torch.randn(shape, generator=g, device=device),
                torch.rand(shape[-1:], generator=g, device=device),
            )
            x, w = x.to(dtype), w.to(dtype)
            if not torch.allclose(
                compiled(x, w, 1e-6).float(), _torch_rms_norm(x, w, 1e-6).float(), rtol=tol, atol=tol
            ):
                return _torch_rms_norm
    except (RuntimeError, MemoryError):
        return _torch_rms_norm
    return compiled


def paged_attention_kernel(device: torch.device, dtype: torch.dtype):
    """The compiled decode attention of ``llm.thin_linear`` (``paged_decode_attention(q, k_cache, v_cache,
    tables, positions, block_size=, window=)``) on CPU in float32 and bfloat16, after a check against
    ``F.scaled_dot_product_attention`` over the gathered context; None elsewhere or on any doubt (the
    engine then gathers the context and calls SDPA)."""
    lib = compiled_library(device, dtype)
    if lib is None:
        return None

    def compiled(q, k_cache, v_cache, tables, positions, *, block_size: int, window: int | None):
        return thin_linear.paged_decode_attention(
            lib, q, k_cache, v_cache, tables, positions, block_size=block_size, window=window
        )

    g = torch.Generator(device=device).manual_seed(0)
    kc, vc = (torch.randn((8, 2, 16), generator=g, device=device).to(dtype) for _ in range(2))
    q = torch.randn((1, 4, 16), generator=g, device=device).to(dtype)
    tables, pos = torch.tensor([[3, 1, 2]], device=device), torch.tensor([5], device=device)
    rows = torch.tensor([6, 7, 2, 3, 4, 5], device=device)  # positions 0..5 through blocks 3, 1, 2 of 2 rows
    want = F.scaled_dot_product_attention(
        q[0].float()[:, None],
        kc[rows].float().transpose(0, 1),
        vc[rows].float().transpose(0, 1),
        enable_gqa=True,
    )[:, 0]
    tol = _tolerance(dtype)
    try:
        got = compiled(q, kc, vc, tables, pos, block_size=2, window=None)[0].float()
    except (RuntimeError, MemoryError, TypeError):
        return None
    return compiled if torch.allclose(got, want, rtol=tol, atol=tol) else None
