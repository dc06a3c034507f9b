"""Architecture description and the HF <-> Megatron adapter contract.

Every tensor megastack moves between formats passes through the *Megatron canonical layout*: the
global (unsharded, unpadded) megatron-core GPT names with a global layer index, as torch_dist stores
them, e.g. ``decoder.layers.3.self_attention.linear_qkv.weight``. A family adapter maps HF tensors to
that layout and back; checkpoint writers only shard, pad and rename it; the textgen engine runs it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from shared.errors import InvalidArgument

Tensor = torch.Tensor
GetTensor = Callable[[str], Tensor]


@dataclass(frozen=True, kw_only=True)
class ArchConfig:
    """A decoder-only transformer, independent of any checkpoint naming."""

    family: str  # registry key: llama | qwen2 | qwen3 | gpt2 | mixtral | qwen2_moe | qwen3_moe
    architecture: str  # HF architectures[0]
    vocab_size: int  # real (unpadded) vocabulary
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int  # KV heads (== num_attention_heads without GQA)
    head_dim: int
    ffn_hidden_size: int
    max_position_embeddings: int
    normalization: str  # RMSNorm | LayerNorm
    norm_eps: float
    activation: str  # swiglu | gelu_tanh
    position_embedding: str  # rope | learned_absolute
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # HF rope_scaling as sorted items (hashable)
    sliding_window: int | None = None  # attention sees the last N positions only (Mistral v0.1); None = all
    qkv_bias: bool = False
    qk_layernorm: bool = False  # RMSNorm over each head's queries and keys before RoPE (Qwen3)
    linear_bias: bool = False  # biases on linear_proj and the MLP (GPT-2)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # Mixture of experts (every layer's MLP; 0 experts = dense): a router picks moe_topk experts per token,
    # their SwiGLU MLPs of moe_ffn_hidden_size are summed weighted by the router's softmax probabilities,
    # renormalised over the chosen ones when moe_norm_topk (Mixtral, Qwen3-MoE), as they come otherwise
    # (Qwen2-MoE); Qwen2-MoE adds a shared expert of shared_expert_ffn scaled by sigmoid(gate . x).
    num_experts: int = 0
    moe_topk: int = 0
    moe_ffn_hidden_size: int = 0
    moe_norm_topk: bool = True
    shared_expert_ffn: int = 0
    shared_expert_gate: bool = False

    @property
    def moe(self) -> bool:
        """Whether the MLPs are mixtures of experts."""
        return self.num_experts > 0

    @property
    def gated(self) -> bool:
        """Whether the MLP is gated (SwiGLU)."""
        return self.activation == "swiglu"

    @property
    def queries_per_group(self) -> int:
        """Attention heads per key/value group."""
        return self.num_attention_heads // self.num_query_groups

    @property
    def qkv_out_features(self) -> int:
        """Output features of the fused QKV projection."""
        return (self.num_attention_heads + 2 * self.num_query_groups) * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (rope_scaling as a mapping)."""
        d = dataclasses.asdict(self)
        d["rope_scaling"] = dict(self.rope_scaling)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArchConfig:
        """The inverse of :meth:`to_dict`; unknown keys are ignored."""
        d = dict(d)
        d["rope_scaling"] = tuple(sorted((d.get("rope_scaling") or {}).items()))
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def num_parameters(self) -> int:
        """Parameters of the model (a tied embedding counted once)."""
        h, L, f = self.hidden_size, self.num_layers, self.ffn_hidden_size
        norm = h * (2 if self.normalization == "LayerNorm" else 1)
        if self.moe:  # router, experts, shared expert (+ its gate); no MLP biases
            mlp = self.num_experts * (h + 3 * self.moe_ffn_hidden_size * h) + 3 * self.shared_expert_ffn * h
            mlp += h if self.shared_expert_gate else 0
        else:
            mlp = (2 if self.gated else 1) * f * h + f * h
            mlp += (2 if self.gated else 1) * f + h if self.linear_bias else 0
        per_layer = (
            2 * norm
            + h * self.qkv_out_features
            + (self.qkv_out_features if self.qkv_bias else 0)
            + (2 * self.head_dim if self.qk_layernorm else 0)
            + self.num_attention_heads * self.head_dim * h
            + (h if self.linear_bias else 0)
            + mlp
        )
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        pos = self.max_position_embeddings * h if self.position_embedding == "learned_absolute" else 0
        return emb + pos + L * per_layer + norm


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, *, num_groups: int, head_dim: int) -> Tensor:
    """HF q/k/v (weights [n*d, H] or biases [n*d]) -> Megatron linear_qkv, interleaved per query group."""
    tail = q.shape[1:]
    qpg = q.shape[0] // head_dim // num_groups
    return torch.cat(
        [
            q.reshape(num_groups, qpg * head_dim, *tail),
            k.reshape(num_groups, head_dim, *tail),
            v.reshape(num_groups, head_dim, *tail),
        ],
        dim=1,
    ).reshape(-1, *tail)


def split_qkv(
    qkv: Tensor, *, num_heads: int, num_groups: int, head_dim: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`fuse_qkv`."""
    tail = qkv.shape[1:]
    qpg = num_heads // num_groups
    grouped = qkv.reshape(num_groups, (qpg + 2) * head_dim, *tail)
    q, k, v = torch.split(grouped, [qpg * head_dim, head_dim, head_dim], dim=1)
    return (
        q.reshape(num_heads * head_dim, *tail).contiguous(),
        k.reshape(num_groups * head_dim, *tail).contiguous(),
        v.reshape(num_groups * head_dim, *tail).contiguous(),
    )


def layer_prefix(i: int) -> str:
    """Megatron's name prefix of layer ``i``."""
    return f"decoder.layers.{i}."


class ModelFamily:
    """HF <-> Megatron canonical mapping for one model family. Subclasses live one per file.

    A family maps one *group* at a time: the globals (embeddings, final norm, head) or one layer, so
    conversions stream with one layer in memory and any tensor can be produced on demand (see
    :class:`MappedView`).
    """

    name: ClassVar[str]
    hf_architectures: ClassVar[tuple[str, ...]]
    hf_layer_prefix: ClassVar[str]  # e.g. "model.layers." (the layer index follows)
    covers: ClassVar[str] = ""  # what the family's mapping covers, in words (convert --list-families)
    moe: ClassVar[bool] = False  # a mixture-of-experts family (expert parallelism applies)

    def arch_from_hf_config(self, cfg: dict[str, Any]) -> ArchConfig:
        """The ArchConfig an HF config.json describes (400 naming a missing key)."""
        raise NotImplementedError

    def hf_config_from_arch(self, arch: ArchConfig) -> dict[str, Any]:
        """The HF config.json for ``arch``."""
        raise NotImplementedError

    def hf_names(self, arch: ArchConfig, layer: int | None) -> list[str]:
        """HF tensor names of one layer, or of the globals when ``layer`` is None."""
        raise NotImplementedError

    def to_megatron(self, arch: ArchConfig, layer: int | None, get: GetTensor) -> dict[str, Tensor]:
        """Canonical tensors of one layer (or the globals) from an HF-name getter."""
        raise NotImplementedError

    def to_hf(self, arch: ArchConfig, layer: int | None, get: GetTensor) -> dict[str, Tensor]:
        """HF tensors of one layer (or the globals) from a canonical-name getter."""
        raise NotImplementedError

    # -- derived -----------------------------------------------------------------------------------
    def hf_tensor_names(self, arch: ArchConfig) -> list[str]:
        """Every HF tensor name of ``arch``."""
        names = self.hf_names(arch, None)
        for i in range(arch.num_layers):
            names += self.hf_names(arch, i)
        return names

    def hf_to_megatron(self, arch: ArchConfig, get: GetTensor) -> Iterator[tuple[str, Tensor]]:
        """Every canonical tensor: the globals, then layer by layer."""
        for group in [None, *range(arch.num_layers)]:
            yield from self.to_megatron(arch, group, get).items()

    def megatron_to_hf(self, arch: ArchConfig, get: GetTensor) -> Iterator[tuple[str, Tensor]]:
        """(HF name, tensor) for all of ``arch``, reading canonical tensors through ``get``, group by
        group."""
        for group in [None, *range(arch.num_layers)]:
            yield from self.to_hf(arch, group, get).items()

    def hf_layer_of(self, name: str) -> int | None:
        """The layer index in an HF tensor name, or None for a global tensor."""
        return _layer_index(name, self.hf_layer_prefix)

    def megatron_tensor_names(self, arch: ArchConfig) -> list[str]:
        """Every canonical name :meth:`hf_to_megatron` yields."""
        return megatron_names(arch, None) + [
            n for i in range(arch.num_layers) for n in megatron_names(arch, i)
        ]


def _layer_index(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix):
        return None
    head = name[len(prefix) :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def megatron_layer_of(name: str) -> int | None:
    """The layer index in a Megatron tensor name, or None for a global tensor."""
    return _layer_index(name, "decoder.layers.")


def megatron_names(arch: ArchConfig, layer: int | None) -> list[str]:
    """Canonical names of one layer, or of the globals when ``layer`` is None."""
    norm_bias = arch.normalization == "LayerNorm"
    if layer is None:
        names = ["embedding.word_embeddings.weight"]
        if arch.position_embedding == "learned_absolute":
            names.append("embedding.position_embeddings.weight")
        names.append("decoder.final_layernorm.weight")
        if norm_bias:
            names.append("decoder.final_layernorm.bias")
        if not arch.tie_word_embeddings:
            names.append("output_layer.weight")
        return names
    p = layer_prefix(layer)
    names = [p + "self_attention.linear_qkv.layer_norm_weight"]
    if norm_bias:
        names.append(p + "self_attention.linear_qkv.layer_norm_bias")
    names.append(p + "self_attention.linear_qkv.weight")
    if arch.qkv_bias:
        names.append(p + "self_attention.linear_qkv.bias")
    if arch.qk_layernorm:
        names += [p + "self_attention.q_layernorm.weight", p + "self_attention.k_layernorm.weight"]
    names.append(p + "self_attention.linear_proj.weight")
    if arch.linear_bias:
        names.append(p + "self_attention.linear_proj.bias")
    names.append(p + "mlp.linear_fc1.layer_norm_weight")
    if norm_bias:
        names.append(p + "mlp.linear_fc1.layer_norm_bias")
    if arch.moe:
        return names + moe_names(arch, p)
    names.append(p + "mlp.linear_fc1.weight")
    if arch.linear_bias:
        names.append(p + "mlp.linear_fc1.bias")
    names.append(p + "mlp.linear_fc2.weight")
    if arch.linear_bias:
        names.append(p + "mlp.linear_fc2.bias")
    return names


def expert_prefix(j: int) -> str:
    """Megatron's name prefix of expert ``j`` inside a layer (megatron-core's ``SequentialMLP``)."""
    return f"mlp.experts.local_experts.{j}."


def moe_names(arch: ArchConfig, p: str) -> list[str]:
    """Canonical names of a mixture-of-experts MLP under layer prefix ``p`` (the pre-MLP norm excluded)."""
    names = [p + "mlp.router.weight"]
    for j in range(arch.num_experts):
        names += [p + expert_prefix(j) + "linear_fc1.weight", p + expert_prefix(j) + "linear_fc2.weight"]
    if arch.shared_expert_ffn:
        names += [p + "mlp.shared_experts.linear_fc1.weight", p + "mlp.shared_experts.linear_fc2.weight"]
    if arch.shared_expert_gate:
        names.append(p + "mlp.shared_experts.gate_weight")
    return names


class MappedView:
    """Random access to one naming scheme over a getter in the other, one group cached at a time.

    ``MappedView(family, arch, get_hf, to="megatron").get("decoder.layers.3.mlp.linear_fc1.weight")``
    maps layer 3 once and serves all its canonical tensors from the cache.
    """

    def __init__(self, family: ModelFamily, arch: ArchConfig, get: GetTensor, *, to: str) -> None:
        if to not in ("megatron", "hf"):
            raise ValueError(to)
        self.family, self.arch, self.source, self.to = family, arch, get, to
        self._group: object = object()
        self._cache: dict[str, Tensor] = {}

    def group_of(self, name: str) -> int | None:
        """The group (layer, or None for globals) of a name in the target naming."""
        return megatron_layer_of(name) if self.to == "megatron" else self.family.hf_layer_of(name)

    def get(self, name: str) -> Tensor:
        """One tensor in the target naming, its group mapped once and cached."""
        group = self.group_of(name)
        if group != self._group:
            self._cache = {}  # drop the previous group first: one group in memory
            mapper = self.family.to_megatron if self.to == "megatron" else self.family.to_hf
            self._cache = mapper(self.arch, group, self.source)
            self._group = group
        try:
            return self._cache[name]
        except KeyError:
            raise KeyError(f"{name} is not a tensor of {self.arch.architecture}") from None


def require(cfg: dict[str, Any], key: str, source: str) -> Any:
    """``cfg[key]``, or 400 naming ``key`` and the file it is missing from."""
    if key not in cfg or cfg[key] is None:
        raise InvalidArgument(f"{source}: config is missing '{key}'", field=key)
    return cfg[key]
