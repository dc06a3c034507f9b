"""How Megatron splits the canonical tensors over tensor- and pipeline-parallel ranks.

TP (megatron-core GPT): column-parallel tensors split on dim 0 (word embeddings and the output layer
are vocab-parallel; linear_qkv splits whole query groups; SwiGLU linear_fc1 gives rank r
``[gate_r; up_r]``); row-parallel tensors split on dim 1; the rest (norms, row-parallel biases,
position embeddings) is replicated. PP: consecutive layer blocks per stage (``--num-layer-list`` for
uneven ones); with a virtual pipeline, Megatron's interleaved order (chunk v of every stage, then v+1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from llm.models.base import ArchConfig, expert_prefix
from shared.errors import InvalidArgument

COLUMN, ROW, REPLICATED = "column", "row", "replicated"
_COLUMN = (
    "word_embeddings.weight",
    "output_layer.weight",
    "linear_qkv.weight",
    "linear_qkv.bias",
    "linear_fc1.weight",
    "linear_fc1.bias",
)
_ROW = ("linear_proj.weight", "linear_fc2.weight")
VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")


_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")


def expert_of(sub: str) -> tuple[int, str] | None:
    """(expert index, rest) of a layer sub-name inside an expert, e.g. ``mlp.experts.local_experts.3.
    linear_fc1.weight`` -> (3, ``linear_fc1.weight``); None for any other tensor."""
    m = _LOCAL_EXPERT.match(sub)
    return (int(m.group(1)), m.group(2)) if m else None


def check_ep(arch: ArchConfig, ep: int) -> None:
    """Refuses (400) an expert-parallel size that is not 1 for a dense model or does not divide the
    experts."""
    if ep < 1:
        raise InvalidArgument(
            f"expert parallel size must be >= 1, got {ep}", field="target_expert_parallel_size"
        )
    if ep > 1 and not arch.moe:
        raise InvalidArgument(
            f"EP={ep} needs a mixture-of-experts model; {arch.architecture} is dense",
            field="target_expert_parallel_size",
        )
    if arch.moe and arch.num_experts % ep:
        raise InvalidArgument(
            f"EP={ep} does not divide the {arch.num_experts} experts of {arch.architecture}",
            field="target_expert_parallel_size",
        )


def dist_key(name: str) -> tuple[str, tuple[int, ...]]:
    """A canonical name's torch_dist key and its leading stacked offsets, as megatron-core's
    ``sharded_state_dict`` stores it: a layer tensor stacked over layers (``decoder.layers.<sub>``, offset
    (layer,)), an expert's stacked over layers and experts (``SequentialMLP``'s
    ``decoder.layers.mlp.experts.experts.<sub>``, offsets (layer, expert)); a global tensor as it is."""
    if not name.startswith("decoder.layers."):
        return name, ()
    layer, sub = name[len("decoder.layers.") :].split(".", 1)
    expert = expert_of(sub)
    if expert is not None:
        return "decoder.layers.mlp.experts.experts." + expert[1], (int(layer), expert[0])
    return "decoder.layers." + sub, (int(layer),)


def tp_rule(name: str) -> str:
    """How a canonical tensor splits over TP ranks: column, row, vocabulary or replicated."""
    if name.endswith("layer_norm_weight") or name.endswith("layer_norm_bias"):
        return REPLICATED
    if name.endswith(_COLUMN):
        return COLUMN
    if name.endswith(_ROW):
        return ROW
    return REPLICATED


def _gated_fc1(name: str, gated: bool) -> bool:
    return gated and name.endswith(("linear_fc1.weight", "linear_fc1.bias"))


def shard(name: str, t: torch.Tensor, *, tp: int, rank: int, gated: bool) -> torch.Tensor:
    """Rank ``rank``'s part of full tensor ``t`` under TP size ``tp``."""
    if tp == 1:
        return t
    rule = tp_rule(name)
    if rule == REPLICATED:
        return t
    if _gated_fc1(name, gated):
        gate, up = t.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)
    return t.chunk(tp, dim=0 if rule == COLUMN else 1)[rank].contiguous()


def merge(name: str, parts: list[torch.Tensor], *, gated: bool) -> torch.Tensor:
    """Inverse of :func:`shard`."""
    if len(parts) == 1 or tp_rule(name) == REPLICATED:
        return parts[0]
    if _gated_fc1(name, gated):
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=0 if tp_rule(name) == COLUMN else 1)


def pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    """Megatron's saver pads by repeating the last row."""
    extra = padded - t.shape[0]
    if extra <= 0:
        return t
    return torch.cat([t, t[-1:].expand(extra, *t.shape[1:])], dim=0)


def check_tp(arch: ArchConfig, tp: int) -> None:
    """Refuses (400) a TP size that does not divide the heads, query groups or FFN size of ``arch``."""
    if tp < 1:
        raise InvalidArgument(
            f"tensor parallel size must be >= 1, got {tp}", field="target_tensor_parallel_size"
        )
    sizes = [
        ("attention heads", arch.num_attention_heads),
        ("query groups", arch.num_query_groups),
        ("ffn hidden size", arch.moe_ffn_hidden_size if arch.moe else arch.ffn_hidden_size),
    ]
    if arch.shared_expert_ffn:
        sizes.append(("shared expert's ffn hidden size", arch.shared_expert_ffn))
    for what, n in sizes:
        if n % tp:
            raise InvalidArgument(
                f"TP={tp} does not divide the {n} {what} of {arch.architecture}",
                field="target_tensor_parallel_size",
            )


@dataclass(frozen=True)
class PipelineLayout:
    """Layers per (stage, virtual chunk): ``counts[stage][chunk]``."""

    counts: tuple[tuple[int, ...], ...]

    @property
    def pp(self) -> int:
        """Pipeline stages."""
        return len(self.counts)

    @property
    def vpp(self) -> int:
        """Model chunks per stage (virtual pipeline)."""
        return len(self.counts[0])

    @property
    def num_layers(self) -> int:
        """Layers over all stages and chunks."""
        return sum(sum(c) for c in self.counts)

    @classmethod
    def build(
        cls,
        num_layers: int,
        pp: int = 1,
        *,
        num_layer_list: list[int] | None = None,
        layers_per_virtual_stage: int = 0,
    ) -> PipelineLayout:
        """The layout of ``num_layers`` over ``pp`` stages: even, Megatron's ``--num-layer-list``, or virtual
        chunks of ``layers_per_virtual_stage``; 400 naming the field when it cannot be built."""
        if pp < 1:
            raise InvalidArgument(
                f"pipeline parallel size must be >= 1, got {pp}", field="target_pipeline_parallel_size"
            )
        if num_layer_list:
            if layers_per_virtual_stage:
                raise InvalidArgument(
                    "--num-layer-list cannot be combined with a virtual pipeline", field="num_layer_list"
                )
            if len(num_layer_list) != pp:
                raise InvalidArgument(
                    f"--num-layer-list has {len(num_layer_list)} entries for PP={pp}", field="num_layer_list"
                )
            if sum(num_layer_list) != num_layers or min(num_layer_list) < 1:
                raise InvalidArgument(
                    f"--num-layer-list {num_layer_list} must be positive and sum to {num_layers} layers",
                    field="num_layer_list",
                )
            return cls(tuple((n,) for n in num_layer_list))
        if num_layers % pp:
            raise InvalidArgument(
                f"PP={pp} does not divide {num_layers} layers (use --num-layer-list)",
                field="target_pipeline_parallel_size",
            )
        per_stage = num_layers // pp
        if layers_per_virtual_stage:
            if pp < 2 or per_stage % layers_per_virtual_stage:
                raise InvalidArgument(
                    f"a virtual pipeline needs PP >= 2 and {layers_per_virtual_stage} to divide "
                    f"{per_stage} layers per stage",
                    field="num_layers_per_virtual_pipeline_stage",
                )
            vpp = per_stage // layers_per_virtual_stage
            return cls(tuple((layers_per_virtual_stage,) * vpp for _ in range(pp)))
        return cls(tuple((per_stage,) for _ in range(pp)))

    def chunks(self) -> list[tuple[int, int, int, int]]:
        """(stage, chunk, first global layer, layer count) in global layer order (Megatron interleaving)."""
        out, first = [], 0
        for v in range(self.vpp):
            for p in range(self.pp):
                n = self.counts[p][v]
                out.append((p, v, first, n))
                first += n
        return out

    def locate(self, layer: int) -> tuple[int, int, int]:
        """(stage, chunk, local index) of a global layer."""
        for p, v, first, n in self.chunks():
            if first <= layer < first + n:
                return p, v, layer - first
        raise IndexError(layer)


# Canonical (TE-style) per-layer names <-> megatron-core local spec names (what legacy files hold).
LOCAL_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
# Names found in older Megatron (non-mcore "legacy" GPT) checkpoints, per layer and global.
OLD_LAYER_NAMES = {
    "input_norm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_norm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "self_attention.query_key_value.weight": "self_attention.linear_qkv.weight",
    "self_attention.query_key_value.bias": "self_attention.linear_qkv.bias",
    "self_attention.dense.weight": "self_attention.linear_proj.weight",
    "self_attention.dense.bias": "self_attention.linear_proj.bias",
    "post_attention_norm.weight": "mlp.linear_fc1.layer_norm_weight",
    "post_attention_norm.bias": "mlp.linear_fc1.layer_norm_bias",
    "mlp.dense_h_to_4h.weight": "mlp.linear_fc1.weight",
    "mlp.dense_h_to_4h.bias": "mlp.linear_fc1.bias",
    "mlp.dense_4h_to_h.weight": "mlp.linear_fc2.weight",
    "mlp.dense_4h_to_h.bias": "mlp.linear_fc2.bias",
}
OLD_GLOBAL_NAMES = {
    "language_model.embedding.word_embeddings.weight": "embedding.word_embeddings.weight",
    "language_model.embedding.position_embeddings.weight": "embedding.position_embeddings.weight",
    "language_model.encoder.final_norm.weight": "decoder.final_layernorm.weight",
    "language_model.encoder.final_norm.bias": "decoder.final_layernorm.bias",
    "language_model.output_layer.weight": "output_layer.weight",
}
LINEAR_MODULES = (
    "self_attention.linear_qkv",
    "self_attention.linear_proj",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)


def linear_modules(arch: ArchConfig, num_experts: int | None = None) -> list[str]:
    """A layer's linear modules (each carries an ``_extra_state`` in megatron-core's state dict); with
    ``num_experts``, those of a rank holding that many experts (an EP rank numbers its own from 0)."""
    if not arch.moe:
        return list(LINEAR_MODULES)
    n = arch.num_experts if num_experts is None else num_experts
    experts = [f"{expert_prefix(j)}linear_fc{k}" for j in range(n) for k in (1, 2)]
    shared = (
        ["mlp.shared_experts.linear_fc1", "mlp.shared_experts.linear_fc2"] if arch.shared_expert_ffn else []
    )
    return [*LINEAR_MODULES[:2], *experts, *shared]


def to_local(sub: str) -> str:
    """A layer tensor's name in megatron-core's local spec (TE fuses norms into the linear layers)."""
    return LOCAL_NAMES.get(sub, sub)


def from_stored(name: str) -> tuple[int | None, str] | None:
    """(local layer index or None, canonical sub-name) of a name found in a legacy file; None to skip."""
    if name.endswith("_extra_state"):
        return None
    if name in OLD_GLOBAL_NAMES:
        return None, OLD_GLOBAL_NAMES[name]
    for prefix, table in (("decoder.layers.", None), ("language_model.encoder.layers.", OLD_LAYER_NAMES)):
        if name.startswith(prefix):
            idx, sub = name[len(prefix) :].split(".", 1)
            if table is not None:
                sub = table.get(sub, sub)
            inverse = {v: k for k, v in LOCAL_NAMES.items()}
            return int(idx), inverse.get(sub, sub)
    return None, name
