"""Llama 2/3 (GQA, RMSNorm, SwiGLU, RoPE) and the families that share its layout."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from llm.models.base import (
    ArchConfig,
    GetTensor,
    ModelFamily,
    Tensor,
    fuse_qkv,
    layer_prefix,
    require,
    split_qkv,
)

# HF per-layer name -> canonical per-layer name, for the tensors that are copied as they are.
LAYER_MAP = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "post_attention_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}
GLOBAL_MAP = {
    "model.embed_tokens.weight": "embedding.word_embeddings.weight",
    "model.norm.weight": "decoder.final_layernorm.weight",
    "lm_head.weight": "output_layer.weight",
}


def _rope(cfg: dict[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...]]:
    # transformers 5 keeps both in rope_parameters; 4.x had rope_theta + rope_scaling.
    params = dict(cfg.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = dict(cfg.get("rope_scaling") or params)
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = {}
    return theta, tuple(sorted(scaling.items()))


class LlamaFamily(ModelFamily):
    name = "llama"
    hf_architectures: ClassVar[tuple[str, ...]] = ("LlamaForCausalLM", "MistralForCausalLM")
    hf_layer_prefix = "model.layers."
    qkv_bias = False

    def arch_from_hf_config(self, cfg: dict[str, Any]) -> ArchConfig:
        src = cfg.get("architectures", [self.hf_architectures[0]])[0]
        heads = int(require(cfg, "num_attention_heads", src))
        hidden = int(require(cfg, "hidden_size", src))
        theta, scaling = _rope(cfg)
        eos = cfg.get("eos_token_id")
        return ArchConfig(
            family=self.name,
            architecture=src,
            vocab_size=int(require(cfg, "vocab_size", src)),
            hidden_size=hidden,
            num_layers=int(require(cfg, "num_hidden_layers", src)),
            num_attention_heads=heads,
            num_query_groups=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            ffn_hidden_size=int(require(cfg, "intermediate_size", src)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            normalization="RMSNorm",
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            activation="swiglu",
            position_embedding="rope",
            rope_theta=theta,
            rope_scaling=scaling,
            qkv_bias=bool(cfg.get("attention_bias", self.qkv_bias)) or self.qkv_bias,
            linear_bias=bool(cfg.get("mlp_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )

    def hf_config_from_arch(self, arch: ArchConfig) -> dict[str, Any]:
        rope = {"rope_theta": arch.rope_theta, "rope_type": "default", **dict(arch.rope_scaling)}
        return {
            "architectures": [arch.architecture],
            "model_type": "llama",
            "vocab_size": arch.vocab_size,
            "hidden_size": arch.hidden_size,
            "intermediate_size": arch.ffn_hidden_size,
            "num_hidden_layers": arch.num_layers,
            "num_attention_heads": arch.num_attention_heads,
            "num_key_value_heads": arch.num_query_groups,
            "head_dim": arch.head_dim,
            "max_position_embeddings": arch.max_position_embeddings,
            "rms_norm_eps": arch.norm_eps,
            "rope_parameters": rope,
            "hidden_act": "silu",
            "attention_bias": arch.qkv_bias,
            "mlp_bias": arch.linear_bias,
            "tie_word_embeddings": arch.tie_word_embeddings,
            "bos_token_id": arch.bos_token_id,
            "eos_token_id": arch.eos_token_id,
            "torch_dtype": "float32",
        }

    def hf_names(self, arch: ArchConfig, layer: int | None) -> list[str]:
        if layer is None:
            return ["model.embed_tokens.weight", "model.norm.weight"] + (
                [] if arch.tie_word_embeddings else ["lm_head.weight"]
            )
        p = f"model.layers.{layer}."
        names = [p + k for k in LAYER_MAP] + [p + f"self_attn.{x}_proj.weight" for x in "qkv"]
        if arch.qkv_bias:
            names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        return names + [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]

    def to_megatron(self, arch: ArchConfig, layer: int | None, get: GetTensor) -> dict[str, Tensor]:
        if layer is None:
            return {
                mc: get(hf)
                for hf, mc in GLOBAL_MAP.items()
                if hf != "lm_head.weight" or not arch.tie_word_embeddings
            }
        ng, d = arch.num_query_groups, arch.head_dim
        hf, mc = f"model.layers.{layer}.", layer_prefix(layer)
        out = {mc + dst: get(hf + src) for src, dst in LAYER_MAP.items()}
        q, k, v = (get(hf + f"self_attn.{x}_proj.weight") for x in "qkv")
        out[mc + "self_attention.linear_qkv.weight"] = fuse_qkv(q, k, v, num_groups=ng, head_dim=d)
        if arch.qkv_bias:
            qb, kb, vb = (get(hf + f"self_attn.{x}_proj.bias") for x in "qkv")
            out[mc + "self_attention.linear_qkv.bias"] = fuse_qkv(qb, kb, vb, num_groups=ng, head_dim=d)
        out[mc + "mlp.linear_fc1.weight"] = torch.cat(
            [get(hf + "mlp.gate_proj.weight"), get(hf + "mlp.up_proj.weight")], dim=0
        )
        return out

    def to_hf(self, arch: ArchConfig, layer: int | None, get: GetTensor) -> dict[str, Tensor]:
        if layer is None:
            return {
                hf: get(mc)
                for hf, mc in GLOBAL_MAP.items()
                if hf != "lm_head.weight" or not arch.tie_word_embeddings
            }
        nh, ng, d = arch.num_attention_heads, arch.num_query_groups, arch.head_dim
        hf, mc = f"model.layers.{layer}.", layer_prefix(layer)
        out = {hf + dst: get(mc + src) for dst, src in LAYER_MAP.items()}
        q, k, v = split_qkv(
            get(mc + "self_attention.linear_qkv.weight"), num_heads=nh, num_groups=ng, head_dim=d
        )
        out.update(
            {
                hf + "self_attn.q_proj.weight": q,
                hf + "self_attn.k_proj.weight": k,
                hf + "self_attn.v_proj.weight": v,
            }
        )
        if arch.qkv_bias:
            qb, kb, vb = split_qkv(
                get(mc + "self_attention.linear_qkv.bias"), num_heads=nh, num_groups=ng, head_dim=d
            )
            out.update(
                {
                    hf + "self_attn.q_proj.bias": qb,
                    hf + "self_attn.k_proj.bias": kb,
                    hf + "self_attn.v_proj.bias": vb,
                }
            )
        gate, up = torch.chunk(get(mc + "mlp.linear_fc1.weight"), 2, dim=0)
        out[hf + "mlp.gate_proj.weight"] = gate.contiguous()
        out[hf + "mlp.up_proj.weight"] = up.contiguous()
        return out
