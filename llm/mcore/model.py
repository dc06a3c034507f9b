"""Build a megatron-core ``GPTModel`` from an :class:`ArchConfig`, on the device megatron-core computes on.

The layer spec fits the machine: Transformer Engine's (fused and flash attention, fused norm + linear)
when ``transformer_engine`` imports on a CUDA machine, else megatron-core's local spec with torch norms
that allow sequence parallelism (their weights are tagged ``sequence_parallel`` so
``finalize_model_grads`` all-reduces their gradients over the tensor-parallel group). Both specs store
the same torch_dist keys (the local spec maps its norm names onto TE's).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F

from llm.mcore import TRANSFORMER_IMPLS as IMPLS
from llm.models.base import ArchConfig

logger = logging.getLogger(__name__)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's gelu_new (Megatron's --openai-gelu)."""
    return F.gelu(x, approximate="tanh")


def padded_vocab_size(vocab_size: int, divisible_by: int = 128, tp: int = 1) -> int:
    """Megatron's _vocab_size_with_padding: round up to a multiple of divisible_by * tp."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def transformer_config(
    arch: ArchConfig,
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    params_dtype: torch.dtype = torch.float32,
    **overrides: Any,
):
    """megatron-core's TransformerConfig for ``arch`` at this TP/PP/VPP and dtype (``overrides`` win)."""
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
        qk_layernorm=arch.qk_layernorm,
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
        **moe_config(arch),
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def moe_config(arch: ArchConfig) -> dict[str, Any]:
    """megatron-core's TransformerConfig fields of a mixture of experts (none for a dense model).

    The router: top-k on the logits then a softmax over the chosen k equals HF's softmax, top-k and
    renormalisation (Mixtral, norm_topk_prob); ``moe_router_pre_softmax`` (softmax over all experts, top-k
    weights kept as they are) is HF's norm_topk_prob false (Qwen2-MoE). Tokens are never dropped
    (dropless, as HF computes); the load-balancing loss is megatron-core's aux loss, coefficient 0 unless
    a training spec sets one."""
    if not arch.moe:
        return {}
    return dict(
        num_moe_experts=arch.num_experts,
        moe_router_topk=arch.moe_topk,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_router_pre_softmax=not arch.moe_norm_topk,
        moe_shared_expert_intermediate_size=arch.shared_expert_ffn or None,
        moe_shared_expert_gate=arch.shared_expert_gate,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        moe_aux_loss_coeff=0.0,
    )


def megatron_device() -> torch.device:
    """Where megatron-core computes: the current CUDA device when there is one, else the CPU."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


@functools.cache
def transformer_engine_status() -> tuple[bool, str]:
    """(usable, why): Transformer Engine is used when CUDA is present and ``transformer_engine.pytorch``
    imports."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or a TE build that does not match this torch/CUDA
        return False, f"transformer_engine does not import ({type(e).__name__}: {str(e)[:120]})"
    return True, "transformer_engine imports"


def resolve_impl(impl: str = "auto") -> str:
    """The layer spec a build will use: ``transformer_engine`` or ``local``. ``auto`` picks TE when usable and
    says once (a warning on a CUDA machine) when it falls back to the local spec."""
    if impl not in IMPLS:
        raise ValueError(f"transformer_impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    usable, why = transformer_engine_status()
    if impl == "transformer_engine" and not usable:
        raise ValueError(f"transformer_impl=transformer_engine but {why}")
    if impl == "auto":
        impl = "transformer_engine" if usable else "local"
        if impl == "local":
            _fallback_note(why)
    return impl


@functools.cache
def _fallback_note(why: str) -> None:
    msg = "megatron-core local layer spec (unfused attention, torch norms): %s"
    (logger.warning if torch.cuda.is_available() else logger.info)(msg, why)


class SequenceParallelNorm:
    """megatron-core's local-spec norm (torch LayerNorm / RMSNorm) that also works under sequence parallelism.

    megatron-core's ``WrappedTorchNorm`` refuses ``sequence_parallel``; the norm itself needs nothing
    special (each rank normalises its own tokens over the full hidden size), only its weight gradients
    must be summed over the tensor-parallel group, which ``finalize_model_grads`` does for parameters
    tagged ``sequence_parallel``.
    """

    def __new__(
        cls,
        config,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ):
        if config.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"normalization {config.normalization!r} is not supported (LayerNorm, RMSNorm)")
        norm_cls = torch.nn.LayerNorm if config.normalization == "LayerNorm" else torch.nn.RMSNorm
        norm = norm_cls(
            hidden_size, eps=eps
        )  # float32 like WrappedTorchNorm; Float16Module casts for bf16/fp16
        for p in norm.parameters():
            setattr(p, "sequence_parallel", config.sequence_parallel)  # noqa: B010 - megatron-core reads this tag
        return norm


def layer_spec(arch: ArchConfig, config, *, impl: str = "auto", vp_stage: int | None = None):
    """The decoder block spec for ``impl`` (see :func:`resolve_impl`)."""
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    qk: dict[str, Any] = {"qk_layernorm": True} if arch is not None and arch.qk_layernorm else {}  # Qwen3
    if arch is not None and arch.moe:  # SequentialMLP experts (the grouped GEMM is a GPU-only option)
        from llm.mcore.cpu_compat import moe_without_transformer_engine

        moe_without_transformer_engine()
        qk.update(
            num_experts=arch.num_experts, moe_grouped_gemm=bool(getattr(config, "moe_grouped_gemm", False))
        )
    if resolve_impl(impl) == "transformer_engine":
        te = specs.get_gpt_layer_with_transformer_engine_spec(**qk)
        if arch is not None and arch.moe:  # TE's MoE layer keeps its own pre-MLP norm: store it under the
            # key the local spec (and a dense TE layer's fused norm) uses, so checkpoints cross the specs
            te.submodules.sharded_state_dict_keys_map = {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
        return te
    spec = specs.get_gpt_layer_local_spec(normalization=arch.normalization, **qk)
    norm = ModuleSpec(module=SequenceParallelNorm)
    spec.submodules.input_layernorm = norm
    spec.submodules.pre_mlp_layernorm = norm
    return TransformerBlockSubmodules(
        layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=vp_stage),
        layer_norm=SequenceParallelNorm,
    )


def build_gpt_model(
    arch: ArchConfig,
    config,
    *,
    vocab_size: int,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    max_sequence_length: int | None = None,
    impl: str = "auto",
):
    """A GPTModel on :func:`megatron_device` (every parameter and buffer, torch norms included)."""
    from megatron.core.models.gpt import GPTModel

    scaling = dict(arch.rope_scaling)
    spec = layer_spec(arch, config, impl=impl, vp_stage=vp_stage)
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
    ).to(megatron_device())


def without_absent_extra_state(sharded_state: dict, stored_keys: set[str]) -> dict:
    """``sharded_state`` less the ``_extra_state`` objects the checkpoint does not hold.

    Layers of the two specs carry different ``_extra_state`` objects (TE's attention keeps one, the local
    spec's does not), and a checkpoint written under one spec loads under the other; weights are never
    dropped here, only these per-module metadata objects, which a fresh module fills itself.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    def keep(v) -> bool:
        if isinstance(v, ShardedObject) and v.key.endswith("_extra_state"):
            return any(k == v.key or k.startswith(v.key + "/") for k in stored_keys)
        return True

    def walk(d):
        if isinstance(d, dict):
            return {k: walk(v) for k, v in d.items() if keep(v)}
        if isinstance(d, list):
            return [walk(v) for v in d if keep(v)]
        return d

    return walk(sharded_state)


def load_module_state(module: torch.nn.Module, state: dict) -> None:
    """``load_state_dict`` that tolerates only absent ``_extra_state`` entries (see above)."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.endswith("_extra_state")]
    if bad or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {bad[:3]}, unexpected {list(unexpected)[:3]}")


def load_distributed(sharded_state: dict, iter_dir) -> dict:
    """megatron-core's ``dist_checkpointing.load`` after the safety check of the folder's metadata, asking
    only for the ``_extra_state`` objects the checkpoint holds."""
    from megatron.core import dist_checkpointing

    from llm.checkpoints.safe_pickle import check_dcp_checkpoint

    stored = set(
        check_dcp_checkpoint(iter_dir).state_dict_metadata
    )  # refuses metadata or entries that would run code
    return dist_checkpointing.load(without_absent_extra_state(sharded_state, stored), str(iter_dir))
