"""Qwen2 / Qwen2.5: the Llama layout plus biases on q/k/v, usually tied embeddings."""

from __future__ import annotations

from typing import Any

from llm.models.base import ArchConfig
from llm.models.llama import LlamaFamily


class Qwen2Family(LlamaFamily):
    name = "qwen2"
    hf_architectures = ("Qwen2ForCausalLM",)
    covers = "GQA, q/k/v biases, tied embeddings"
    qkv_bias = True
    o_proj_bias = False

    def hf_config_from_arch(self, arch: ArchConfig) -> dict[str, Any]:
        cfg = super().hf_config_from_arch(arch)
        cfg["model_type"] = "qwen2"
        cfg.pop("attention_bias", None)
        cfg.pop("mlp_bias", None)
        cfg.pop("head_dim", None)
        cfg["use_sliding_window"] = False
        return cfg
