"""Mapping kinds between HF tensors and the Megatron canonical layout; a family is a table of them.

Each kind implements both directions once (``to_megatron`` / ``to_hf``) over names relative to a group's
prefixes (a layer's ``model.layers.3.`` / ``decoder.layers.3.``, or "" for the globals), and says which
names it reads and writes. ``when`` makes a mapping conditional on the architecture (biases, tied
embeddings). :class:`TableFamily` turns two tables (globals, one layer) into the adapter contract of
:class:`llm.models.base.ModelFamily`; a family file then holds its tables, its config mapping and the few
overrides it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from llm.models.base import (
    ArchConfig,
    GetTensor,
    ModelFamily,
    Tensor,
    expert_prefix,
    fuse_qkv,
    layer_prefix,
    split_qkv,
)

When = Callable[[ArchConfig], bool]


def always(arch: ArchConfig) -> bool:
    return True


@dataclass(frozen=True)
class Mapping:
    """One or more HF tensors <-> one canonical tensor."""

    when: When

    def hf_names(self) -> list[str]:
        raise NotImplementedError

    def mc_names(self) -> list[str]:
        raise NotImplementedError

    def names_for(self, arch: ArchConfig) -> list[str]:
        """The HF names this mapping reads for ``arch`` (relative to the group's prefix)."""
        return self.hf_names()

    def to_megatron(self, arch: ArchConfig, get: GetTensor, hf: str, mc: str) -> dict[str, Tensor]:
        """Canonical tensors (names with prefix ``mc``) from HF ones read with prefix ``hf``."""
        raise NotImplementedError

    def to_hf(self, arch: ArchConfig, get: GetTensor, hf: str, mc: str) -> dict[str, Tensor]:
        """HF tensors (prefix ``hf``) from canonical ones read with prefix ``mc``."""
        raise NotImplementedError


@dataclass(frozen=True)
class Rename(Mapping):
    """The same tensor under another name."""

    hf: str
    mc: str

    def hf_names(self) -> list[str]:
        return [self.hf]

    def mc_names(self) -> list[str]:
        return [self.mc]

    def to_megatron(self, arch, get, hf, mc):
        return {mc + self.mc: get(hf + self.hf)}

    def to_hf(self, arch, get, hf, mc):
        return {hf + self.hf: get(mc + self.mc)}


@dataclass(frozen=True)
class Transpose(Rename):
    """A 2-D weight stored [in, out] on the HF side (GPT-2's Conv1D), [out, in] in Megatron."""

    def to_megatron(self, arch, get, hf, mc):
        return {mc + self.mc: get(hf + self.hf).t().contiguous()}

    def to_hf(self, arch, get, hf, mc):
        return {hf + self.hf: get(mc + self.mc).t().contiguous()}


@dataclass(frozen=True)
class QKV(Mapping):
    """Separate HF q, k, v projections (weights or biases) <-> Megatron's ``linear_qkv``, interleaved per
    query group (GQA: each group's queries, then its key and value)."""

    q: str
    k: str
    v: str
    mc: str

    def hf_names(self) -> list[str]:
        return [self.q, self.k, self.v]

    def mc_names(self) -> list[str]:
        return [self.mc]

    def to_megatron(self, arch, get, hf, mc):
        q, k, v = (get(hf + n) for n in (self.q, self.k, self.v))
        return {mc + self.mc: fuse_qkv(q, k, v, num_groups=arch.num_query_groups, head_dim=arch.head_dim)}

    def to_hf(self, arch, get, hf, mc):
        parts = split_qkv(
            get(mc + self.mc),
            num_heads=arch.num_attention_heads,
            num_groups=arch.num_query_groups,
            head_dim=arch.head_dim,
        )
        return {hf + n: t for n, t in zip((self.q, self.k, self.v), parts)}


@dataclass(frozen=True)
class StackedQKV(Mapping):
    """One HF tensor holding q | k | v one after another (GPT-2's ``c_attn``: a Conv1D weight [H, 3H] when
    ``transpose``, or its bias [3H]) <-> Megatron's per-group interleaved ``linear_qkv``."""

    hf: str
    mc: str
    transpose: bool = False

    def hf_names(self) -> list[str]:
        return [self.hf]

    def mc_names(self) -> list[str]:
        return [self.mc]

    def to_megatron(self, arch, get, hf, mc):
        t = get(hf + self.hf)
        q, k, v = torch.split(
            t.t() if self.transpose else t,
            [arch.num_attention_heads * arch.head_dim, *(2 * [arch.num_query_groups * arch.head_dim])],
            dim=0,
        )
        return {mc + self.mc: fuse_qkv(q, k, v, num_groups=arch.num_query_groups, head_dim=arch.head_dim)}

    def to_hf(self, arch, get, hf, mc):
        q, k, v = split_qkv(
            get(mc + self.mc),
            num_heads=arch.num_attention_heads,
            num_groups=arch.num_query_groups,
            head_dim=arch.head_dim,
        )
        t = torch.cat([q, k, v], dim=0)
        return {hf + self.hf: t.t().contiguous() if self.transpose else t}


@dataclass(frozen=True)
class GatedMLP(Mapping):
    """HF gate and up projections <-> Megatron's ``linear_fc1`` = [gate; up] (SwiGLU)."""

    gate: str
    up: str
    mc: str

    def hf_names(self) -> list[str]:
        return [self.gate, self.up]

    def mc_names(self) -> list[str]:
        return [self.mc]

    def to_megatron(self, arch, get, hf, mc):
        return {mc + self.mc: torch.cat([get(hf + self.gate), get(hf + self.up)], dim=0)}

    def to_hf(self, arch, get, hf, mc):
        gate, up = torch.chunk(get(mc + self.mc), 2, dim=0)
        return {hf + self.gate: gate.contiguous(), hf + self.up: up.contiguous()}


@dataclass(frozen=True)
class Experts(Mapping):
    """Every expert of a mixture-of-experts layer: the ``inner`` mappings applied once per expert ``j``,
    under ``hf.format(j)`` on the HF side (the hub's one-module-per-expert layout, e.g.
    ``block_sparse_moe.experts.{}.``) and ``expert_prefix(j)`` on the Megatron side (``SequentialMLP``)."""

    hf: str
    inner: tuple[Mapping, ...]

    def _pairs(self, arch: ArchConfig) -> list[tuple[str, str]]:
        return [(self.hf.format(j), expert_prefix(j)) for j in range(arch.num_experts)]

    def hf_names(self) -> list[str]:
        raise TypeError("an Experts mapping's names depend on the architecture: use names_for")

    def mc_names(self) -> list[str]:
        return ["mlp.experts"]

    def names_for(self, arch: ArchConfig) -> list[str]:
        """The HF names (relative to the layer) of every expert of ``arch``."""
        return [h + n for h, _ in self._pairs(arch) for m in self.inner for n in m.hf_names()]

    def to_megatron(self, arch, get, hf, mc):
        return {
            k: v
            for h, e in self._pairs(arch)
            for m in self.inner
            for k, v in m.to_megatron(arch, get, hf + h, mc + e).items()
        }

    def to_hf(self, arch, get, hf, mc):
        return {
            k: v
            for h, e in self._pairs(arch)
            for m in self.inner
            for k, v in m.to_hf(arch, get, hf + h, mc + e).items()
        }


def experts(hf: str, *inner: Mapping) -> Experts:
    return Experts(moe, hf, inner)


def rename(hf: str, mc: str, when: When = always) -> Rename:
    return Rename(when, hf, mc)


def transpose(hf: str, mc: str, when: When = always) -> Transpose:
    return Transpose(when, hf, mc)


def qkv(q: str, k: str, v: str, mc: str, when: When = always) -> QKV:
    return QKV(when, q, k, v, mc)


def stacked_qkv(hf: str, mc: str, *, transpose: bool = False, when: When = always) -> StackedQKV:
    return StackedQKV(when, hf, mc, transpose)


def gated_mlp(gate: str, up: str, mc: str, when: When = always) -> GatedMLP:
    return GatedMLP(when, gate, up, mc)


def moe(arch: ArchConfig) -> bool:
    """A mixture-of-experts MLP (the router, the experts, a shared expert)."""
    return arch.moe


def untied(arch: ArchConfig) -> bool:
    """A separate output layer (``lm_head`` / ``output_layer``): dropped when tied to the embedding."""
    return not arch.tie_word_embeddings


class TableFamily(ModelFamily):
    """A family whose tensors are two tables of mappings: ``GLOBALS`` and ``LAYER`` (one layer, names
    relative to ``hf_layer_prefix``<i>. and ``decoder.layers.<i>.``)."""

    GLOBALS: ClassVar[tuple[Mapping, ...]]
    LAYER: ClassVar[tuple[Mapping, ...]]

    def _table(self, arch: ArchConfig, layer: int | None) -> tuple[list[Mapping], str, str]:
        if layer is None:
            return [m for m in self.GLOBALS if m.when(arch)], "", ""
        return [m for m in self.LAYER if m.when(arch)], f"{self.hf_layer_prefix}{layer}.", layer_prefix(layer)

    def hf_names(self, arch: ArchConfig, layer: int | None) -> list[str]:
        table, hf, _ = self._table(arch, layer)
        return [hf + n for m in table for n in m.names_for(arch)]

    def to_megatron(self, arch: ArchConfig, layer: int | None, get: GetTensor) -> dict[str, Tensor]:
        table, hf, mc = self._table(arch, layer)
        return {k: v for m in table for k, v in m.to_megatron(arch, get, hf, mc).items()}

    def to_hf(self, arch: ArchConfig, layer: int | None, get: GetTensor) -> dict[str, Tensor]:
        table, hf, mc = self._table(arch, layer)
        return {k: v for m in table for k, v in m.to_hf(arch, get, hf, mc).items()}
