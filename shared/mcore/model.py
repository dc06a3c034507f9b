"""Build a megatron-core ``GPTModel`` (local spec: runs on CPU and GPU) from an :class:`ArchConfig`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from shared.models.base import ArchConfig


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's gelu_new (Megatron's --openai-gelu)."""
    return F.gelu(x, approximate="tanh")


def padded_vocab_size(vocab_size: int, divisible_by: int = 128, tp: int = 1) -> int:
    """Megatron's _vocab_size_with_padding: round up to a multiple of divisible_by * tp."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def transformer_config(arch: ArchConfig, *, tp: int = 1, pp: int = 1, vpp: int | None = None,
                       params_dtype: torch.dtype = torch.float32, **overrides: Any):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization=arch.normalization,
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=arch.gated,
        activation_func=F.silu if arch.gated else gelu_tanh,
        add_bias_linear=arch.linear_bias,
        add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        batch_p2p_comm=False,  # interleaved PP=2 on gloo computes wrong losses with batched p2p
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def build_gpt_model(arch: ArchConfig, config, *, vocab_size: int, pre_process: bool = True, post_process: bool = True,
                    vp_stage: int | None = None, max_sequence_length: int | None = None):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    scaling = dict(arch.rope_scaling)
    spec = get_gpt_layer_local_spec(normalization=arch.normalization)
    kwargs: dict[str, Any] = {}
    if scaling.get("rope_type") == "llama3":
        kwargs.update(rope_scaling=True, rope_scaling_factor=float(scaling.get("factor", 8.0)))
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length or arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type=arch.position_embedding,
        rotary_base=int(arch.rope_theta) if arch.rope_theta == int(arch.rope_theta) else arch.rope_theta,
        vp_stage=vp_stage,
        **kwargs,
    )
