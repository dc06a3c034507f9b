"""Thin matmuls on CPU: ``thin_linear.c`` compiled once per machine and called through ctypes.

A decode step multiplies a few rows by every weight of the model, so its speed is the memory bandwidth the
matmul reaches; on small CPU hosts PyTorch's GEMMs (MKL, oneDNN) reach a fraction of it for such shapes
(``tools/bench/decode_step.py`` measures them side by side). The C kernel streams each weight row once per
call on PyTorch's own OpenMP threads. It is built with the machine's C compiler (``cc``, or ``$CC``) into
``.cache/kernels/`` under a name that hashes the source, the flags, the compiler and the CPU's features
(another CPU never loads it), written atomically; without a compiler or AVX2 it is simply not used.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

from shared.paths import CACHE_DIR

SOURCE = Path(__file__).with_name("thin_linear.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")
# Rows up to which the kernel is used, per dtype (measured on this project's 2-core Zen 3 VM, one
# 3072x576 weight): in float32 it beats oneDNN's linear up to 12 rows (207 vs 348 us at 4, 425 vs 592 at 12)
# and loses from 16 (727 vs 732, 16.7 vs 12.3 ms at 512), so wider float32 matmuls (prefill) go to
# oneDNN; in bfloat16 it is ~4x faster than F.linear at every width on a CPU without native bfloat16
# (327 vs 1138 us at 4 rows, 23 vs 100 ms at 512), so it takes them all. A row's result never depends
# on the other rows, so float32's line must stay under MIN_INVARIANT_ROWS of the textgen engine.
MAX_ROWS = {torch.float32: 12, torch.bfloat16: 1 << 30}


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build(out: Path, cc: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], check=True, capture_output=True, timeout=120)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None where it cannot be built or this CPU lacks AVX2."""
    cc = _compiler()
    if cc is None:
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.blake2b(
            SOURCE.read_bytes() + repr((FLAGS, version, _cpu_features())).encode(), digest_size=10
        ).hexdigest()
        for folder in (
            CACHE_DIR / "kernels",
            Path(tempfile.gettempdir()) / f"megastack-kernels-{os.getuid()}",
        ):
            path = folder / f"thin_linear-{key}.so"
            try:
                if not path.exists():
                    _build(path, cc)
                break
            except OSError:
                continue
        else:
            return None
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError):
        return None
    if lib.thin_linear_isa() < 2:
        return None
    ptr, i = ctypes.c_void_p, ctypes.c_int
    lib.thin_linear_f32.argtypes = [ptr, ptr, ptr, ptr, i, i, i]
    lib.thin_linear_f32.restype = None
    lib.thin_linear_bf16.argtypes = [ptr, ptr, ptr, ptr, i, i, i]
    lib.thin_linear_bf16.restype = i
    lib.thin_rms_norm_f32.argtypes = [ptr, ptr, ptr, i, i, ctypes.c_float]
    lib.thin_rms_norm_f32.restype = None
    lib.thin_rms_norm_bf16.argtypes = [ptr, ptr, ptr, i, i, ctypes.c_float]
    lib.thin_rms_norm_bf16.restype = i
    for fn in (lib.paged_decode_attention_f32, lib.paged_decode_attention_bf16):
        fn.argtypes = [ptr, ptr, ptr, ptr, i, ptr, i, i, i, i, i, i, ctypes.c_float, ptr]
        fn.restype = i
    for fn in (lib.decode_step_f32, lib.decode_step_bf16):
        fn.argtypes = [
            ptr,
            ptr,
            ptr,
            ptr,
            ptr,
            ptr,
            i,
            ptr,
            ptr,
            ptr,
            ptr,
            *[i] * 9,
            ctypes.c_float,
            ctypes.c_float,
        ]
        fn.restype = i
    return lib


def vector_isa(lib: ctypes.CDLL | None = None) -> str | None:
    """The vector instructions the compiled kernels (``lib``, by default this machine's ``library()``) were
    built for: ``avx512`` (16-lane tiles), ``avx2`` (8-lane), or None where there are no kernels. A
    summation order: results differ between the two in the last bits."""
    lib = lib or library()
    return None if lib is None else {3: "avx512", 2: "avx2"}.get(lib.thin_linear_isa())


def thin_linear(
    lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for x [..., K] on CPU in float32 or bfloat16 (weight [N, K] and bias
    contiguous, of x's dtype). A row's result is the same bits whatever the other rows are."""
    if x.dtype not in MAX_ROWS:
        raise TypeError(f"thin_linear takes float32 or bfloat16, not {x.dtype}")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    M, K = x2.shape
    N = weight.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    fn = lib.thin_linear_f32 if x.dtype == torch.float32 else lib.thin_linear_bf16
    if fn(x2.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(), M, N, K):
        raise MemoryError("thin_linear: no memory for a float32 copy of the rows")
    return y.view(*shape[:-1], N)


def rms_norm(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.rms_norm(x, (H,), weight, eps)`` for x [..., H] on CPU in float32 or bfloat16 (weight [H] of x's
    dtype): one call instead of PyTorch's six ops, which is most of a decode step's norm time."""
    if x.dtype not in MAX_ROWS:
        raise TypeError(f"rms_norm takes float32 or bfloat16, not {x.dtype}")
    x2 = x.contiguous()
    H = x.shape[-1]
    y = torch.empty_like(x2)
    fn = lib.thin_rms_norm_f32 if x.dtype == torch.float32 else lib.thin_rms_norm_bf16
    if fn(x2.data_ptr(), weight.contiguous().data_ptr(), y.data_ptr(), x2.numel() // H, H, eps):
        raise MemoryError("rms_norm: no memory for a float32 copy of a row")
    return y


def paged_decode_attention(
    lib: ctypes.CDLL,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    positions: torch.Tensor,
    *,
    block_size: int,
    window: int | None,
) -> torch.Tensor:
    """One decode step's attention read in place through the block tables: q [B, h, d] (the query at
    ``positions`` [B]), caches [rows, g, d], tables [B, nb] (int64); each query sees the keys at positions
    0..its own (the last ``window`` of them with a sliding window). Returns [B, h, d] in q's dtype; softmax
    and sums in float32. A sequence's result depends on its own query and context only."""
    if q.dtype not in MAX_ROWS or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"paged_decode_attention takes float32 or bfloat16, not {q.dtype}")
    q = q.contiguous()
    B, h, d = q.shape
    g = k_cache.shape[1]
    tables = tables.to(torch.int64).contiguous()
    positions = positions.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    fn = lib.paged_decode_attention_f32 if q.dtype == torch.float32 else lib.paged_decode_attention_bf16
    rc = fn(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        tables.data_ptr(),
        tables.shape[1],
        positions.data_ptr(),
        B,
        h,
        g,
        d,
        block_size,
        window or 0,
        d**-0.5,
        out.data_ptr(),
    )
    if rc:
        raise RuntimeError("paged_decode_attention: a position past its block table, or no memory for scores")
    return out


# the tensors decode_step reads per layer, in its order, named as a textgen layer's weights (None for an
# absent bias or norm)
STEP_LAYER_FIELDS = (
    "ln1_w",
    "qkv_w",
    "qkv_b",
    "q_norm",
    "k_norm",
    "proj_w",
    "proj_b",
    "ln2_w",
    "fc1_w",
    "fc1_b",
    "fc2_w",
    "fc2_b",
)


def pointers(tensors: list[torch.Tensor | None]) -> torch.Tensor:
    """The addresses of ``tensors`` (0 for None) as an int64 tensor, for :func:`decode_step`; each tensor
    must be contiguous and outlive every call that reads it."""
    for t in tensors:
        if t is not None and not t.is_contiguous():
            raise ValueError("decode_step reads contiguous tensors only")
    return torch.tensor([0 if t is None else t.data_ptr() for t in tensors], dtype=torch.int64, device="cpu")


def decode_step(
    lib: ctypes.CDLL,
    x: torch.Tensor,
    layers: torch.Tensor,
    k_caches: torch.Tensor,
    v_caches: torch.Tensor,
    final_w: torch.Tensor,
    tables: torch.Tensor,
    positions: torch.Tensor,
    rows: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    *,
    heads: int,
    groups: int,
    head_dim: int,
    ffn: int,
    block_size: int,
    window: int | None,
    eps: float,
) -> torch.Tensor:
    """A whole decode step of a dense RMSNorm / rotary / gated-SiLU decoder in one call (``decode_step_*`` of
    ``thin_linear.c``): x [B, H] (the embeddings, float32 or bfloat16) is overwritten with the final-normed
    hidden states and returned. ``layers`` [L, 12] holds the addresses of each layer's tensors in
    ``STEP_LAYER_FIELDS`` order (:func:`pointers`), ``k_caches`` / ``v_caches`` [L] those of the paged caches
    [rows, groups, head_dim]; ``tables`` [B, nb], ``positions`` [B] and ``rows`` [B] (the cache row each
    sequence writes) are int64, ``cos`` / ``sin`` [B, head_dim] the rotary rows of the positions (None
    without rotary embeddings). Each sequence's result depends on its own inputs only."""
    if x.dtype not in MAX_ROWS or not x.is_contiguous() or x.dim() != 2:
        raise TypeError(f"decode_step takes a contiguous [B, H] float32 or bfloat16 tensor, not {x.dtype}")
    B, H = x.shape
    tables = tables.to(torch.int64).contiguous()
    positions = positions.to(torch.int64).contiguous()
    rows = rows.to(torch.int64).contiguous()
    if cos is not None and sin is not None:
        cos, sin = cos.reshape(B, head_dim).contiguous(), sin.reshape(B, head_dim).contiguous()
    fn = lib.decode_step_f32 if x.dtype == torch.float32 else lib.decode_step_bf16
    rc = fn(
        x.data_ptr(),
        layers.data_ptr(),
        k_caches.data_ptr(),
        v_caches.data_ptr(),
        final_w.data_ptr(),
        tables.data_ptr(),
        tables.shape[1],
        positions.data_ptr(),
        rows.data_ptr(),
        None if cos is None else cos.data_ptr(),
        None if sin is None else sin.data_ptr(),
        layers.shape[0],
        B,
        H,
        heads,
        groups,
        head_dim,
        ffn,
        block_size,
        window or 0,
        eps,
        head_dim**-0.5,
    )
    if rc:
        raise RuntimeError("decode_step: a position past its block table, or no memory for the activations")
    return x
