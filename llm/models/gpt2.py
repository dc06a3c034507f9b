"""GPT-2 (Megatron's own GPT): learned positions, LayerNorm with bias, biased linears, GELU (tanh).

HF stores GPT-2 linears as ``Conv1D`` ([in, out], ``x @ W + b``); Megatron uses ``[out, in]``, so every
linear weight is transposed on the way.
"""

from __future__ import annotations

from typing import Any

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

# HF per-layer name -> (canonical per-layer name, transpose?)
LAYER_MAP = {
    "ln_1.weight": ("self_attention.linear_qkv.layer_norm_weight", False),
    "ln_1.bias": ("self_attention.linear_qkv.layer_norm_bias", False),
    "attn.c_proj.weight": ("self_attention.linear_proj.weight", True),
    "attn.c_proj.bias": ("self_attention.linear_proj.bias", False),
    "ln_2.weight": ("mlp.linear_fc1.layer_norm_weight", False),
    "ln_2.bias": ("mlp.linear_fc1.layer_norm_bias", False),
    "mlp.c_fc.weight": ("mlp.linear_fc1.weight", True),
    "mlp.c_fc.bias": ("mlp.linear_fc1.bias", False),
    "mlp.c_proj.weight": ("mlp.linear_fc2.weight", True),
    "mlp.c_proj.bias": ("mlp.linear_fc2.bias", False),
}
GLOBAL_MAP = {
    "transformer.wte.weight": "embedding.word_embeddings.weight",
    "transformer.wpe.weight": "embedding.position_embeddings.weight",
    "transformer.ln_f.weight": "decoder.final_layernorm.weight",
    "transformer.ln_f.bias": "decoder.final_layernorm.bias",
}


def _t(x: Tensor) -> Tensor:
    return x.t().contiguous()


class GPT2Family(ModelFamily):
    name = "gpt2"
    hf_architectures = ("GPT2LMHeadModel",)
    hf_layer_prefix = "transformer.h."

    def arch_from_hf_config(self, cfg: dict[str, Any]) -> ArchConfig:
        src = "GPT2LMHeadModel"
        hidden = int(require(cfg, "n_embd", src))
        heads = int(require(cfg, "n_head", src))
        act = cfg.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise ValueError(f"{src}: activation_function {act!r} is not supported (gelu_new only)")
        return ArchConfig(
            family=self.name,
            architecture=src,
            vocab_size=int(require(cfg, "vocab_size", src)),
            hidden_size=hidden,
            num_layers=int(require(cfg, "n_layer", src)),
            num_attention_heads=heads,
            num_query_groups=heads,
            head_dim=hidden // heads,
            ffn_hidden_size=int(cfg.get("n_inner") or 4 * hidden),
            max_position_embeddings=int(cfg.get("n_positions", 1024)),
            normalization="LayerNorm",
            norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
            activation="gelu_tanh",
            position_embedding="learned_absolute",
            qkv_bias=True,
            linear_bias=True,
            tie_word_embeddings=True,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
        )

    def hf_config_from_arch(self, arch: ArchConfig) -> dict[str, Any]:
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": arch.vocab_size,
            "n_embd": arch.hidden_size,
            "n_layer": arch.num_layers,
            "n_head": arch.num_attention_heads,
            "n_inner": arch.ffn_hidden_size,
            "n_positions": arch.max_position_embeddings,
            "layer_norm_epsilon": arch.norm_eps,
            "activation_function": "gelu_new",
            "tie_word_embeddings": True,
            "bos_token_id": arch.bos_token_id,
            "eos_token_id": arch.eos_token_id,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "torch_dtype": "float32",
        }

    def hf_names(self, arch: ArchConfig, layer: int | None) -> list[str]:
        if layer is None:
            return list(GLOBAL_MAP)
        p = f"transformer.h.{layer}."
        return [p + k for k in LAYER_MAP] + [p + "attn.c_attn.weight", p + "attn.c_attn.bias"]

    def to_megatron(self, arch: ArchConfig, layer: int | None, get: GetTensor) -> dict[str, Tensor]:
        if layer is None:
            return {mc: get(hf) for hf, mc in GLOBAL_MAP.items()}
        nh, d = arch.num_attention_heads, arch.head_dim
        hf, mc = f"transformer.h.{layer}.", layer_prefix(layer)
        out = {}
        for src, (dst, transpose) in LAYER_MAP.items():
            t = get(hf + src)
            out[mc + dst] = _t(t) if transpose else t
        q, k, v = torch.chunk(get(hf + "attn.c_attn.weight").t(), 3, dim=0)  # [3H, H]: rows q | k | v
        out[mc + "self_attention.linear_qkv.weight"] = fuse_qkv(q, k, v, num_groups=nh, head_dim=d)
        qb, kb, vb = torch.chunk(get(hf + "attn.c_attn.bias"), 3, dim=0)
        out[mc + "self_attention.linear_qkv.bias"] = fuse_qkv(qb, kb, vb, num_groups=nh, head_dim=d)
        return out

    def to_hf(self, arch: ArchConfig, layer: int | None, get: GetTensor) -> dict[str, Tensor]:
        if layer is None:
            return {hf: get(mc) for hf, mc in GLOBAL_MAP.items()}
        nh, d = arch.num_attention_heads, arch.head_dim
        hf, mc = f"transformer.h.{layer}.", layer_prefix(layer)
        out = {}
        for dst, (src, transpose) in LAYER_MAP.items():
            t = get(mc + src)
            out[hf + dst] = _t(t) if transpose else t
        q, k, v = split_qkv(
            get(mc + "self_attention.linear_qkv.weight"), num_heads=nh, num_groups=nh, head_dim=d
        )
        out[hf + "attn.c_attn.weight"] = torch.cat([q, k, v], dim=0).t().contiguous()
        qb, kb, vb = split_qkv(
            get(mc + "self_attention.linear_qkv.bias"), num_heads=nh, num_groups=nh, head_dim=d
        )
        out[hf + "attn.c_attn.bias"] = torch.cat([qb, kb, vb], dim=0)
        return out
