"""Mixture-of-experts MLPs for the inference model (Mixtral, Qwen2-MoE, Qwen3-MoE).

A token's router probabilities pick its top-k experts (renormalised over the k where the family does);
each chosen expert's SwiGLU runs on the rows routed to it, padded to ``min_rows`` so a token's numbers do not
depend on how many others chose the same expert (the engine's batch invariance), and each row sums its
experts in expert order. Qwen2-MoE adds a shared expert scaled by sigmoid(gate . x).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from llm.models.base import ArchConfig, expert_prefix

Tensor = torch.Tensor
FFN = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x, fc1, fc2) -> the SwiGLU MLP of x


@dataclass
class Experts:
    """Router [E, H], per expert SwiGLU fc1 [2I, H] and fc2 [H, I]; Qwen2-MoE's shared expert and its
    gate [1, H]."""

    router: Tensor
    fc1: list[Tensor]
    fc2: list[Tensor]
    shared_fc1: Tensor | None
    shared_fc2: Tensor | None
    shared_gate: Tensor | None

    @classmethod
    def take(cls, pop: Callable[[str], Tensor | None], num_experts: int) -> Experts:
        """The layer's MoE tensors, removed with ``pop`` (a layer-relative canonical name -> tensor)."""

        def need(name: str) -> Tensor:
            t = pop(name)
            assert t is not None, name  # the loader checked every name of the architecture
            return t

        return cls(
            router=need("mlp.router.weight"),
            fc1=[need(expert_prefix(j) + "linear_fc1.weight") for j in range(num_experts)],
            fc2=[need(expert_prefix(j) + "linear_fc2.weight") for j in range(num_experts)],
            shared_fc1=pop("mlp.shared_experts.linear_fc1.weight"),
            shared_fc2=pop("mlp.shared_experts.linear_fc2.weight"),
            shared_gate=pop("mlp.shared_experts.gate_weight"),
        )

    def tensors(self) -> list[Tensor | None]:
        return [self.router, *self.fc1, *self.fc2, self.shared_fc1, self.shared_fc2, self.shared_gate]


def mixture(x: Tensor, e: Experts, arch: ArchConfig, *, linear, ffn: FFN, min_rows: int) -> Tensor:
    """Tokens x [n, H] through their top-k experts, summed weighted by the router's probabilities."""
    probs = torch.softmax(linear(x, e.router).float(), dim=-1)  # (n, E)
    weights, chosen = torch.topk(probs, arch.moe_topk, dim=-1)  # (n, k)
    if arch.moe_norm_topk:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights.to(x.dtype)
    out = torch.zeros_like(x)
    for j in chosen.unique().tolist():
        rows, slot = (chosen == j).nonzero(as_tuple=True)
        n = rows.shape[0]
        xs = x[rows]
        if n < min_rows:
            xs = torch.cat([xs, xs.new_zeros(min_rows - n, xs.shape[1])])
        out.index_add_(0, rows, ffn(xs, e.fc1[j], e.fc2[j])[:n] * weights[rows, slot, None])
    if e.shared_fc1 is not None and e.shared_fc2 is not None:
        shared = ffn(x, e.shared_fc1, e.shared_fc2)
        if e.shared_gate is not None:
            shared = shared * torch.sigmoid(linear(x, e.shared_gate))
        out = out + shared
    return out
