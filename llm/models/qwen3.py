"""Qwen3 (dense): the Llama layout plus an RMSNorm over each head's queries and keys (q_norm, k_norm) before
RoPE, an explicit head_dim, usually no q/k/v biases."""

from __future__ import annotations

import dataclasses
from operator import attrgetter
from typing import Any

from llm.models.base import ArchConfig
from llm.models.llama import LAYER as LLAMA_LAYER
from llm.models.llama import LlamaFamily
from llm.models.mapping import Mapping, rename

LAYER: tuple[Mapping, ...] = (
    *LLAMA_LAYER,
    rename("self_attn.q_norm.weight", "self_attention.q_layernorm.weight", when=attrgetter("qk_layernorm")),
    rename("self_attn.k_norm.weight", "self_attention.k_layernorm.weight", when=attrgetter("qk_layernorm")),
)


class Qwen3Family(LlamaFamily):
    name = "qwen3"
    hf_architectures = ("Qwen3ForCausalLM",)
    covers = "GQA, q/k RMSNorm, head_dim != hidden / heads"
    LAYER = LAYER

    def arch_from_hf_config(self, cfg: dict[str, Any]) -> ArchConfig:
        return dataclasses.replace(super().arch_from_hf_config(cfg), qk_layernorm=True)

    def hf_config_from_arch(self, arch: ArchConfig) -> dict[str, Any]:
        cfg = super().hf_config_from_arch(arch)
        cfg["model_type"] = "qwen3"
        cfg.pop("mlp_bias", None)
        cfg["use_sliding_window"] = False
        return cfg
