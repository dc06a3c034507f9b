"""Next-token selection with Megatron's semantics (megatron/inference/text_generation/sampling.py).

- ``top_k == 1`` (or ``greedy``) is argmax.
- Otherwise logits are divided by the temperature, then top-k (k > 1) *or* top-p (nucleus, keeping the
  first token above the threshold) filtering, then softmax and a multinomial draw.
- ``top_k == 0 and top_p == 0`` is plain temperature sampling, not greedy.
- After each token ``top_p *= top_p_decay`` and is kept ``>= top_p_bound`` (when decay is set).
- Each sequence draws from its own ``torch.Generator``, so a request with ``seed >= 0`` is
  reproducible whatever else is in the batch.

Log-probabilities are always those of the model's own distribution (log-softmax of the raw logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class SamplingSpec:
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    top_p_decay: float = 0.0
    top_p_bound: float = 0.0
    seed: int = -1
    repetition_penalty: float = 1.0

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.top_k == 1


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    kth = torch.topk(logits, k, dim=-1).values[..., -1, None]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative > p
    # Shift right so the first token above the threshold is kept (at least one always survives).
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    remove = remove.scatter(-1, sorted_idx, remove)
    return logits.masked_fill(remove, float("-inf"))


def apply_repetition_penalty(logits: Tensor, seen_ids: Tensor, penalty: float) -> Tensor:
    """HF/CTRL repetition penalty on one row: positive logits / penalty, negative * penalty."""
    if penalty in (0.0, 1.0) or seen_ids.numel() == 0:
        return logits
    scores = logits.gather(-1, seen_ids)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(-1, seen_ids, scores)


def sample_row(logits: Tensor, spec: SamplingSpec, top_p: float, generator: torch.Generator | None) -> int:
    """Choose one token from a float32 logits row [V] (already penalised)."""
    if spec.is_greedy:
        return int(torch.argmax(logits))
    x = logits
    if spec.temperature != 1.0:
        x = x / spec.temperature
    if spec.top_k > 1:
        x = top_k_filter(x, min(spec.top_k, x.shape[-1]))
    elif top_p > 0.0:
        x = top_p_filter(x, top_p)
    probs = torch.softmax(x, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def next_top_p(spec: SamplingSpec, top_p: float) -> float:
    if spec.top_p_decay > 0.0:
        top_p = top_p * spec.top_p_decay
        if spec.top_p_bound > 0.0:
            top_p = max(top_p, spec.top_p_bound)
    return top_p


def make_generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    if seed >= 0:
        g.manual_seed(seed)
    else:
        g.seed()
    return g
