"""Llama 2/3 (GQA, RMSNorm, SwiGLU, RoPE) and the families that share its layout."""

from __future__ import annotations

from operator import attrgetter
from typing import Any, ClassVar

from llm.models.base import ArchConfig, require
from llm.models.mapping import Mapping, TableFamily, gated_mlp, qkv, rename, untied
from shared.errors import InvalidArgument

# The tensors, as tables (llm/models/mapping.py): the globals, and one layer under model.layers.<i>.
GLOBALS: tuple[Mapping, ...] = (
    rename("model.embed_tokens.weight", "embedding.word_embeddings.weight"),
    rename("model.norm.weight", "decoder.final_layernorm.weight"),
    rename("lm_head.weight", "output_layer.weight", when=untied),
)
LAYER: tuple[Mapping, ...] = (
    rename("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
    rename("self_attn.o_proj.weight", "self_attention.linear_proj.weight"),
    rename("post_attention_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),
    rename("mlp.down_proj.weight", "mlp.linear_fc2.weight"),
    qkv(
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attention.linear_qkv.weight",
    ),
    qkv(
        "self_attn.q_proj.bias",
        "self_attn.k_proj.bias",
        "self_attn.v_proj.bias",
        "self_attention.linear_qkv.bias",
        when=attrgetter("qkv_bias"),
    ),
    gated_mlp("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.linear_fc1.weight"),
    # attention_bias + mlp_bias (megatron-core's add_bias_linear: the output projection and the MLP together)
    rename("self_attn.o_proj.bias", "self_attention.linear_proj.bias", when=attrgetter("linear_bias")),
    gated_mlp(
        "mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.linear_fc1.bias", when=attrgetter("linear_bias")
    ),
    rename("mlp.down_proj.bias", "mlp.linear_fc2.bias", when=attrgetter("linear_bias")),
)


def _rope(cfg: dict[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...]]:
    # transformers 5 keeps both in rope_parameters; 4.x had rope_theta + rope_scaling.
    params = dict(cfg.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = dict(cfg.get("rope_scaling") or params)
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = {}
    return theta, tuple(sorted(scaling.items()))


class LlamaFamily(TableFamily):
    name = "llama"
    hf_architectures: ClassVar[tuple[str, ...]] = ("LlamaForCausalLM", "MistralForCausalLM")
    covers = "GQA, RoPE (llama3 scaling), attention_bias + mlp_bias, Mistral's sliding window"
    hf_layer_prefix = "model.layers."
    GLOBALS = GLOBALS
    LAYER = LAYER
    qkv_bias = False  # q/k/v biases whatever the config says (Qwen2)
    o_proj_bias = True  # HF's attention_bias puts a bias on o_proj too (Llama, Qwen3; not Qwen2)

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
            linear_bias=self._linear_bias(cfg, src),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            sliding_window=self._sliding_window(cfg, src),
        )

    def _linear_bias(self, cfg: dict[str, Any], src: str) -> bool:
        """Biases on o_proj and the MLP: megatron-core has one switch for both (add_bias_linear), so HF's
        attention_bias (o_proj) and mlp_bias must agree; otherwise the model is refused by name."""
        mlp = bool(cfg.get("mlp_bias", False))
        proj = bool(cfg.get("attention_bias", False)) and self.o_proj_bias
        if proj != mlp:
            raise InvalidArgument(
                f"{src}: attention_bias={proj} and mlp_bias={mlp} differ; megatron-core has one switch for "
                "the output projection's and the MLP's biases (add_bias_linear), so they must agree",
                field="mlp_bias",
            )
        return mlp

    def _sliding_window(self, cfg: dict[str, Any], src: str) -> int | None:
        """Mistral's ``sliding_window`` (null in v0.2 and later); Qwen's only with ``use_sliding_window``."""
        window = cfg.get("sliding_window")
        if "use_sliding_window" in cfg:  # Qwen: the window on the layers from max_window_layers on only
            if cfg["use_sliding_window"]:
                raise InvalidArgument(
                    f"{src}: use_sliding_window (sliding-window attention on "
                    "some layers) is not supported; serve or convert it with use_sliding_window false",
                    field="use_sliding_window",
                )
            return None
        return int(window) if window else None

    def hf_config_from_arch(self, arch: ArchConfig) -> dict[str, Any]:
        rope = {"rope_theta": arch.rope_theta, "rope_type": "default", **dict(arch.rope_scaling)}
        mistral = arch.architecture == "MistralForCausalLM"
        return {
            "architectures": [arch.architecture],
            "model_type": "mistral" if mistral else "llama",
            **({"sliding_window": arch.sliding_window} if mistral else {}),
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
