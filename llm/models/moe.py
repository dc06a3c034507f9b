"""Mixture-of-experts families: Mixtral, Qwen2-MoE and Qwen3-MoE.

Each is its dense family's attention with every layer's MLP replaced by a router and experts (the hub's
one-module-per-expert layout on the HF side, megatron-core's ``SequentialMLP`` on the Megatron side), plus
Qwen2-MoE's shared expert and its sigmoid gate. The pre-MLP norm keeps the dense canonical name
(``mlp.linear_fc1.layer_norm_weight``), which is also the key megatron-core's local spec stores a MoE
layer's ``pre_mlp_layernorm`` under in torch_dist.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from llm.models.base import ArchConfig, require
from llm.models.llama import LAYER as LLAMA_LAYER
from llm.models.llama import LlamaFamily
from llm.models.mapping import Mapping, experts, gated_mlp, rename
from llm.models.qwen2 import Qwen2Family
from llm.models.qwen3 import LAYER as QWEN3_LAYER
from llm.models.qwen3 import Qwen3Family
from shared.errors import InvalidArgument

DENSE_MLP = {"mlp.linear_fc1.weight", "mlp.linear_fc1.bias", "mlp.linear_fc2.weight", "mlp.linear_fc2.bias"}


def attention_part(layer: tuple[Mapping, ...]) -> tuple[Mapping, ...]:
    """A dense layer's table without its MLP (the norms and attention stay)."""
    return tuple(m for m in layer if not DENSE_MLP.intersection(m.mc_names()))


def swiglu_expert(gate: str, up: str, down: str) -> tuple[Mapping, ...]:
    """One expert's SwiGLU MLP: HF gate/up/down <-> linear_fc1 = [gate; up], linear_fc2."""
    return (gated_mlp(gate, up, "linear_fc1.weight"), rename(down, "linear_fc2.weight"))


MIXTRAL_LAYER: tuple[Mapping, ...] = (
    *attention_part(LLAMA_LAYER),
    rename("block_sparse_moe.gate.weight", "mlp.router.weight"),
    experts("block_sparse_moe.experts.{}.", *swiglu_expert("w1.weight", "w3.weight", "w2.weight")),
)
QWEN_EXPERTS: tuple[Mapping, ...] = (
    rename("mlp.gate.weight", "mlp.router.weight"),
    experts("mlp.experts.{}.", *swiglu_expert("gate_proj.weight", "up_proj.weight", "down_proj.weight")),
)
QWEN3_MOE_LAYER: tuple[Mapping, ...] = (*attention_part(QWEN3_LAYER), *QWEN_EXPERTS)
QWEN2_MOE_LAYER: tuple[Mapping, ...] = (
    *attention_part(LLAMA_LAYER),
    *QWEN_EXPERTS,
    gated_mlp(
        "mlp.shared_expert.gate_proj.weight",
        "mlp.shared_expert.up_proj.weight",
        "mlp.shared_experts.linear_fc1.weight",
    ),
    rename("mlp.shared_expert.down_proj.weight", "mlp.shared_experts.linear_fc2.weight"),
    rename("mlp.shared_expert_gate.weight", "mlp.shared_experts.gate_weight"),
)


def _every_layer_sparse(cfg: dict[str, Any], src: str) -> None:
    """Qwen's MoE configs can make some layers dense; megastack's MoE families need every layer sparse."""
    if cfg.get("mlp_only_layers"):
        raise InvalidArgument(
            f"{src}: mlp_only_layers {cfg['mlp_only_layers']} (dense MLPs on some layers) is not supported; "
            "every layer must be a mixture of experts",
            field="mlp_only_layers",
        )
    if int(cfg.get("decoder_sparse_step", 1)) != 1:
        raise InvalidArgument(
            f"{src}: decoder_sparse_step {cfg['decoder_sparse_step']} (experts on every n-th layer only) "
            "is not supported; it must be 1",
            field="decoder_sparse_step",
        )


def _num_experts(cfg: dict[str, Any], src: str) -> int:
    # Qwen's configs say num_experts; transformers 5 saves them (and Mixtral's) as num_local_experts
    n = cfg.get("num_experts") or cfg.get("num_local_experts")
    if not n:
        raise InvalidArgument(f"{src}: config is missing 'num_experts'", field="num_experts")
    return int(n)


def _moe_config(arch: ArchConfig) -> dict[str, Any]:
    return {
        "num_experts": arch.num_experts,
        "num_local_experts": arch.num_experts,
        "num_experts_per_tok": arch.moe_topk,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
    }


class MixtralFamily(LlamaFamily):
    moe = True
    name = "mixtral"
    hf_architectures = ("MixtralForCausalLM",)
    covers = "GQA, top-k router (renormalised), SwiGLU experts, sliding window"
    LAYER = MIXTRAL_LAYER

    def arch_from_hf_config(self, cfg: dict[str, Any]) -> ArchConfig:
        src = cfg.get("architectures", [self.hf_architectures[0]])[0]
        arch = super().arch_from_hf_config(cfg)
        return dataclasses.replace(
            arch,
            num_experts=_num_experts(cfg, src),
            moe_topk=int(require(cfg, "num_experts_per_tok", src)),
            moe_ffn_hidden_size=arch.ffn_hidden_size,
            moe_norm_topk=True,
        )

    def hf_config_from_arch(self, arch: ArchConfig) -> dict[str, Any]:
        cfg = super().hf_config_from_arch(arch)
        cfg.pop("attention_bias", None)
        cfg.pop("mlp_bias", None)
        cfg.update(
            {k: v for k, v in _moe_config(arch).items() if k != "num_experts"},
            model_type="mixtral",
            sliding_window=arch.sliding_window,
            router_jitter_noise=0.0,
            intermediate_size=arch.moe_ffn_hidden_size,
        )
        return cfg


def _qwen_moe_arch(arch: ArchConfig, cfg: dict[str, Any], src: str) -> ArchConfig:
    """Qwen's MoE keys (Qwen2-MoE and Qwen3-MoE) on top of the dense family's ArchConfig."""
    _every_layer_sparse(cfg, src)
    shared = int(cfg.get("shared_expert_intermediate_size") or 0)
    return dataclasses.replace(
        arch,
        num_experts=_num_experts(cfg, src),
        moe_topk=int(require(cfg, "num_experts_per_tok", src)),
        moe_ffn_hidden_size=int(require(cfg, "moe_intermediate_size", src)),
        moe_norm_topk=bool(cfg.get("norm_topk_prob", False)),
        shared_expert_ffn=shared,
        shared_expert_gate=shared > 0,  # Qwen2-MoE's shared expert always has its sigmoid gate
    )


def _qwen_moe_config(cfg: dict[str, Any], arch: ArchConfig, model_type: str) -> dict[str, Any]:
    """The dense family's HF config with Qwen's MoE keys."""
    cfg.update(
        _moe_config(arch),
        model_type=model_type,
        moe_intermediate_size=arch.moe_ffn_hidden_size,
        norm_topk_prob=arch.moe_norm_topk,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )
    if arch.shared_expert_ffn:
        cfg["shared_expert_intermediate_size"] = arch.shared_expert_ffn
    return cfg


class Qwen3MoeFamily(Qwen3Family):
    moe = True
    name = "qwen3_moe"
    hf_architectures = ("Qwen3MoeForCausalLM",)
    covers = "GQA, q/k RMSNorm, top-k router (norm_topk_prob), SwiGLU experts"
    LAYER = QWEN3_MOE_LAYER

    def arch_from_hf_config(self, cfg: dict[str, Any]) -> ArchConfig:
        src = cfg.get("architectures", [self.hf_architectures[0]])[0]
        return _qwen_moe_arch(super().arch_from_hf_config(cfg), cfg, src)

    def hf_config_from_arch(self, arch: ArchConfig) -> dict[str, Any]:
        return _qwen_moe_config(super().hf_config_from_arch(arch), arch, "qwen3_moe")


class Qwen2MoeFamily(Qwen2Family):
    moe = True
    name = "qwen2_moe"
    hf_architectures = ("Qwen2MoeForCausalLM",)
    covers = "GQA, q/k/v biases, top-k router, SwiGLU experts, gated shared expert"
    LAYER = QWEN2_MOE_LAYER

    def arch_from_hf_config(self, cfg: dict[str, Any]) -> ArchConfig:
        src = cfg.get("architectures", [self.hf_architectures[0]])[0]
        arch = _qwen_moe_arch(super().arch_from_hf_config(cfg), cfg, src)
        if not arch.shared_expert_ffn:
            raise InvalidArgument(
                f"{src}: config is missing 'shared_expert_intermediate_size'",
                field="shared_expert_intermediate_size",
            )
        return arch

    def hf_config_from_arch(self, arch: ArchConfig) -> dict[str, Any]:
        return _qwen_moe_config(super().hf_config_from_arch(arch), arch, "qwen2_moe")
