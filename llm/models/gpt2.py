"""GPT-2 (Megatron's own GPT): learned positions, LayerNorm with bias, biased linears, GELU (tanh).

HF stores GPT-2 linears as ``Conv1D`` ([in, out], ``x @ W + b``); Megatron uses ``[out, in]``, so every
linear weight is transposed on the way.
"""

from __future__ import annotations

from typing import Any

from llm.models.base import ArchConfig, require
from llm.models.mapping import Mapping, TableFamily, rename, stacked_qkv, transpose

# The tensors, as tables (llm/models/mapping.py): the globals, and one layer under transformer.h.<i>.
GLOBALS: tuple[Mapping, ...] = (
    rename("transformer.wte.weight", "embedding.word_embeddings.weight"),
    rename("transformer.wpe.weight", "embedding.position_embeddings.weight"),
    rename("transformer.ln_f.weight", "decoder.final_layernorm.weight"),
    rename("transformer.ln_f.bias", "decoder.final_layernorm.bias"),
)
LAYER: tuple[Mapping, ...] = (
    rename("ln_1.weight", "self_attention.linear_qkv.layer_norm_weight"),
    rename("ln_1.bias", "self_attention.linear_qkv.layer_norm_bias"),
    transpose("attn.c_proj.weight", "self_attention.linear_proj.weight"),
    rename("attn.c_proj.bias", "self_attention.linear_proj.bias"),
    rename("ln_2.weight", "mlp.linear_fc1.layer_norm_weight"),
    rename("ln_2.bias", "mlp.linear_fc1.layer_norm_bias"),
    transpose("mlp.c_fc.weight", "mlp.linear_fc1.weight"),
    rename("mlp.c_fc.bias", "mlp.linear_fc1.bias"),
    transpose("mlp.c_proj.weight", "mlp.linear_fc2.weight"),
    rename("mlp.c_proj.bias", "mlp.linear_fc2.bias"),
    stacked_qkv("attn.c_attn.weight", "self_attention.linear_qkv.weight", transpose=True),
    stacked_qkv("attn.c_attn.bias", "self_attention.linear_qkv.bias"),
)


class GPT2Family(TableFamily):
    name = "gpt2"
    hf_architectures = ("GPT2LMHeadModel",)
    covers = "MHA, Conv1D weights, learned positions, biases, LayerNorm"
    hf_layer_prefix = "transformer.h."
    GLOBALS = GLOBALS
    LAYER = LAYER

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
