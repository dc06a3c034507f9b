"""Device and dtype resolution. Code never hard-codes a device: it asks here."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

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


def linear_kernel(device: torch.device, dtype: torch.dtype) -> Linear:
    """The ``F.linear`` to run inference matmuls with on ``device`` in ``dtype``.

    On CPU in float32 that is oneDNN's linear (the op PyTorch's CPU compiler emits) where this build has it:
    ``F.linear`` sends float32 to MKL's GEMM, which on a 2-core host runs a decode step's thin matmuls
    (1-16 rows against weights read cold from memory) at half the memory bandwidth oneDNN reaches
    (``tools/bench/textgen.py`` measures the step both ways). Its rows also agree bit for bit from 2 rows
    up. bfloat16 already goes to oneDNN through ``F.linear``; other devices keep ``F.linear``. The op is
    checked against ``F.linear`` once before it is chosen; any doubt falls back to ``F.linear``.
    """
    if device.type != "cpu" or dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return F.linear
    try:
        g = torch.Generator(device=device).manual_seed(0)
        x, w, b = (torch.randn(s, generator=g, device=device) for s in ((3, 2, 24), (40, 24), (40,)))
        if not torch.allclose(_onednn_linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5):
            return F.linear
    except (AttributeError, RuntimeError):  # an op this build lacks, or refuses
        return F.linear
    return _onednn_linear
