"""What a training job reports about its own speed: model FLOPs, the peak it is measured against, per-rank
times.

MFU (model FLOPs utilisation) = the model FLOPs a step needs (6 N per token plus attention, forward and
backward; recomputed activations do not count, as MFU goes) / step time / the job's peak. The peak is the sum
over ranks of ``resources.peak_tflops_per_worker`` when given (a GPU's datasheet figure for its precision),
else of what each rank measured on its own device at start: the best of a few square matrix products in the
job's precision. A measured peak is what this device reaches in a plain GEMM, so MFU against it reads higher
than against a datasheet figure.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


def flops_per_token(arch, seq_length: int) -> float:
    """Model FLOPs (forward + backward) per token: 6 N plus the attention score/value products."""
    n = arch.num_parameters() - (
        arch.max_position_embeddings * arch.hidden_size
        if arch.position_embedding == "learned_absolute"
        else 0
    )
    attention = 12 * arch.num_layers * seq_length * arch.num_attention_heads * arch.head_dim
    return 6.0 * n + attention


def measure_peak_tflops(
    dtype: torch.dtype, device: torch.device, *, size: int = 0, repeats: int = 5
) -> float:
    """This rank's GEMM TFLOP/s in ``dtype`` on ``device`` (best of ``repeats`` products of two size x
    size)."""
    n = size or (8192 if device.type == "cuda" else 512)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.matmul(a, b)  # warm-up (kernel selection, thread pool)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / max(best, 1e-9) / 1e12


def job_peak_tflops(given_per_worker: float, dtype: torch.dtype, device: torch.device) -> float:
    """The whole job's peak: every rank's (given or measured) summed over the world. A collective: all ranks
    call it."""
    mine = given_per_worker or measure_peak_tflops(dtype, device)
    total = torch.tensor([mine], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total.item())


def rank_step_times(seconds: float, device: torch.device) -> list[float]:
    """Every rank's last step time, in rank order (a collective: all ranks call it at the same steps)."""
    mine = torch.tensor([seconds], dtype=torch.float64, device=device)
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [float(t.item()) for t in out]
