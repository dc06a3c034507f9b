"""Next-token selection with Megatron's semantics (megatron/inference/text_generation/sampling.py).

- ``top_k == 1`` (or ``greedy``) is argmax.
- Otherwise logits are divided by the temperature, then top-k (k > 1) *or* top-p (nucleus, keeping the
  first token above the threshold) filtering, then softmax and a multinomial draw.
- ``top_k == 0 and top_p == 0`` is plain temperature sampling, not greedy.
- After each token ``top_p *= top_p_decay`` and is kept ``>= top_p_bound`` (when decay is set).
- Each sequence draws from its own ``torch.Generator``, made on the device of the logits it samples, so
  a request with ``seed >= 0`` is reproducible whatever else is in the batch.

Degenerate values that pass validation are defined here, once, for every dialect (Megatron, OpenAI,
WebSocket, direct gRPC), so that sampling always draws from finite probabilities:

- a temperature below :data:`MIN_TEMPERATURE` is greedy (dividing by 1e-40 overflows float32 to inf);
- a top_p that has decayed to (or below) 0 keeps the single most likely token, it never turns nucleus
  filtering off;
- logits are sampled in float32 whatever the model's dtype (a float16 row divided by a small
  temperature overflows);
- a repetition penalty is applied in float64 and kept >= 1e-300; OpenAI's presence and frequency
  penalties and ``logit_bias`` (-100 bans the token) after it, in float32, greedy decoding included;
- when the probabilities are still not finite (an extreme repetition penalty, inf logits), the draw
  falls back to the argmax of the scaled row, NaN counted as -inf; a row without a single finite or
  +inf value (a broken model) raises :class:`SamplingError`, which fails that sequence only.

Log-probabilities are always those of the model's own distribution (log-softmax of the raw logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.limits import MIN_TEMPERATURE

Tensor = torch.Tensor

__all__ = [
    "MIN_TEMPERATURE",
    "apply_logit_bias",
    "apply_openai_penalties",
    "SamplingError",
    "SamplingSpec",
    "apply_repetition_penalty",
    "make_generator",
    "next_top_p",
    "sample_row",
    "top_k_filter",
    "top_p_filter",
]


class SamplingError(ValueError):
    """The logits of a row leave nothing to choose from (all NaN or -inf)."""


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
    presence_penalty: float = 0.0  # OpenAI's, on generated tokens
    frequency_penalty: float = 0.0  # OpenAI's, on generated tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)

    @property
    def adjusts_logits(self) -> bool:
        """Whether the logits row changes before the choice (then greedy is the argmax of the changed row)."""
        return (
            self.repetition_penalty not in (0.0, 1.0)
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or bool(self.logit_bias)
        )

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.top_k == 1 or self.temperature < MIN_TEMPERATURE


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
    """HF/CTRL repetition penalty on one row: positive logits / penalty, negative * penalty.

    Computed in float64 with the penalty kept >= 1e-300 (a float32 penalty of 1e-300 is 0, and 0/0 is
    NaN); a result past float32's range becomes +-inf, which :func:`sample_row` handles.
    """
    if penalty in (0.0, 1.0) or seen_ids.numel() == 0:
        return logits
    p = max(float(penalty), 1e-300)
    scores = logits.gather(-1, seen_ids).double()
    scores = torch.where(scores < 0, scores * p, scores / p)
    return logits.scatter(-1, seen_ids, scores.to(logits.dtype))


def apply_openai_penalties(logits: Tensor, generated: list[int], presence: float, frequency: float) -> Tensor:
    """OpenAI's presence and frequency penalties on one row [V]: every token generated so far loses
    ``presence`` once and ``frequency`` per occurrence (prompt tokens are not counted)."""
    if not generated or (presence == 0.0 and frequency == 0.0):
        return logits
    ids = torch.tensor(generated, dtype=torch.long, device=logits.device)
    ids = ids[ids < logits.shape[-1]]
    counts = torch.bincount(ids, minlength=logits.shape[-1]).to(torch.float32)  # (V,)
    return logits.float() - frequency * counts - presence * (counts > 0).to(torch.float32)


def apply_logit_bias(logits: Tensor, bias: tuple[tuple[int, float], ...]) -> Tensor:
    """``bias`` (token id, value) added to the row [V]; -100 is a ban (the token gets -inf)."""
    if not bias:
        return logits
    x = logits.float().clone()
    for token, value in bias:
        if token < x.shape[-1]:
            x[token] = float("-inf") if value <= -100.0 else x[token] + value
    return x


def _argmax(x: Tensor) -> int:
    """Index of the largest value, NaN counted as -inf; SamplingError when nothing is left."""
    x = x.masked_fill(torch.isnan(x), float("-inf"))
    best = int(torch.argmax(x))
    if x[best] == float("-inf"):
        raise SamplingError("the model produced no finite logit for this position")
    return best


def sample_row(logits: Tensor, spec: SamplingSpec, top_p: float, generator: torch.Generator | None) -> int:
    """Choose one token from a logits row [V] (already penalised); always an index into that row."""
    x = logits.float()  # (V,)
    if spec.is_greedy:
        return _argmax(x)
    if spec.temperature != 1.0:
        x = x / spec.temperature
    if spec.top_k > 1:
        x = top_k_filter(x, min(spec.top_k, x.shape[-1]))
    elif spec.top_p > 0.0:
        x = top_p_filter(x, max(top_p, 0.0))  # a decayed top_p of 0 keeps the best token
    probs = torch.softmax(x, dim=-1)  # (V,)
    if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0.0:
        return _argmax(x)
    return int(torch.multinomial(probs, 1, generator=generator))


def next_top_p(spec: SamplingSpec, top_p: float) -> float:
    if spec.top_p_decay > 0.0:
        top_p = top_p * spec.top_p_decay
        if spec.top_p_bound > 0.0:
            top_p = max(top_p, spec.top_p_bound)
    return top_p


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` (the device of the logits it will sample): seeded when ``seed >= 0``."""
    g = torch.Generator(device=device)
    if seed >= 0:
        g.manual_seed(seed)
    else:
        g.seed()
    return g
