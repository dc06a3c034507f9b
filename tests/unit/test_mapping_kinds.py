"""Each mapping kind of llm/models/mapping.py inverts exactly, both ways, on odd shapes (GQA with uneven
group sizes, multi-query, biases, Conv1D layouts); a table family drops what its conditions exclude."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llm.models.base import ArchConfig
from llm.models.mapping import (
    TableFamily,
    gated_mlp,
    qkv,
    rename,
    stacked_qkv,
    transpose,
    untied,
)

ARCH = ArchConfig(
    family="t",
    architecture="T",
    vocab_size=37,
    hidden_size=24,
    num_layers=2,
    num_attention_heads=6,
    num_query_groups=2,
    head_dim=4,
    ffn_hidden_size=20,
    max_position_embeddings=16,
    normalization="RMSNorm",
    norm_eps=1e-5,
    activation="swiglu",
    position_embedding="rope",
)
GROUPS = [6, 3, 2, 1]  # MHA, GQA 2 and 3 queries per group, MQA


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def hf_tensors(kind: str, arch: ArchConfig, bias: bool) -> dict[str, torch.Tensor]:
    h, d, nh, ng, f = arch.hidden_size, arch.head_dim, arch.num_attention_heads, arch.num_query_groups, 20
    tail = () if bias else (h,)
    if kind == "rename":
        return {"w": rand(7, 5)}
    if kind == "transpose":
        return {"w": rand(h, 3 * h)}
    if kind == "qkv":
        return {
            "q": rand(nh * d, *tail, seed=1),
            "k": rand(ng * d, *tail, seed=2),
            "v": rand(ng * d, *tail, seed=3),
        }
    if kind == "stacked":
        qkv_out = (nh + 2 * ng) * d
        return {"c": rand(qkv_out, seed=4) if bias else rand(h, qkv_out, seed=4)}
    if kind == "gated":
        return {"g": rand(f, *tail, seed=5), "u": rand(f, *tail, seed=6)}
    raise ValueError(kind)


def mapping(kind: str, bias: bool):
    return {
        "rename": rename("w", "out"),
        "transpose": transpose("w", "out"),
        "qkv": qkv("q", "k", "v", "out"),
        "stacked": stacked_qkv("c", "out", transpose=not bias),
        "gated": gated_mlp("g", "u", "out"),
    }[kind]


CASES = [("rename", False, 6), ("transpose", False, 6)] + [
    (kind, bias, groups)
    for kind in ("qkv", "stacked", "gated")
    for bias in (False, True)
    for groups in GROUPS
]


@pytest.mark.parametrize("kind, bias, groups", CASES)
def test_each_kind_inverts_exactly_both_ways(kind, bias, groups):
    arch = dataclasses.replace(ARCH, num_query_groups=groups)
    m = mapping(kind, bias)
    src = {f"model.layers.1.{k}": v for k, v in hf_tensors(kind, arch, bias).items()}
    mc = m.to_megatron(arch, src.__getitem__, "model.layers.1.", "decoder.layers.1.")
    assert list(mc) == ["decoder.layers.1.out"] and [f"model.layers.1.{n}" for n in m.hf_names()] == list(src)
    back = m.to_hf(arch, mc.__getitem__, "model.layers.1.", "decoder.layers.1.")
    assert list(back) == list(src)
    for name, t in src.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    again = m.to_megatron(arch, back.__getitem__, "model.layers.1.", "decoder.layers.1.")
    assert torch.equal(again["decoder.layers.1.out"], mc["decoder.layers.1.out"])


def test_qkv_interleaves_each_groups_queries_then_its_key_and_value():
    arch = dataclasses.replace(ARCH, num_attention_heads=4, num_query_groups=2, head_dim=1, hidden_size=1)
    q, k, v = (
        torch.tensor([[0.0], [1.0], [2.0], [3.0]]),
        torch.tensor([[10.0], [11.0]]),
        torch.tensor([[20.0], [21.0]]),
    )
    out = qkv("q", "k", "v", "x").to_megatron(arch, {"q": q, "k": k, "v": v}.__getitem__, "", "")["x"]
    assert out[:, 0].tolist() == [
        0.0,
        1.0,
        10.0,
        20.0,
        2.0,
        3.0,
        11.0,
        21.0,
    ]  # megatron-core's linear_qkv order


class Tiny(TableFamily):
    name = "tiny"
    hf_architectures = ("Tiny",)
    hf_layer_prefix = "blocks."
    GLOBALS = (
        rename("emb", "embedding.word_embeddings.weight"),
        rename("head", "output_layer.weight", when=untied),
    )
    LAYER = (rename("norm", "self_attention.linear_qkv.layer_norm_weight"),)


def test_a_table_family_keeps_what_its_conditions_allow():
    fam = Tiny()
    assert fam.hf_names(ARCH, None) == ["emb", "head"]
    tied = dataclasses.replace(ARCH, tie_word_embeddings=True)
    assert fam.hf_names(tied, None) == ["emb"]
    src = {"emb": rand(3), "head": rand(3, seed=1), "blocks.1.norm": rand(2)}
    assert list(fam.to_megatron(tied, None, src.__getitem__)) == ["embedding.word_embeddings.weight"]
    assert list(fam.to_megatron(ARCH, 1, src.__getitem__)) == [
        "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight"
    ]
    assert fam.hf_tensor_names(tied) == ["emb", "blocks.0.norm", "blocks.1.norm"]


def test_experts_apply_their_mappings_once_per_expert_and_invert_exactly():
    """The expert kind: the hub's experts.{j}.w1/w3/w2 <-> SequentialMLP's local_experts.{j}.linear_fc1 =
    [w1; w3] and linear_fc2, for every expert of the architecture and no other."""
    from llm.models.mapping import experts

    arch = dataclasses.replace(ARCH, num_experts=3, moe_topk=2, moe_ffn_hidden_size=5)
    m = experts(
        "moe.experts.{}.", gated_mlp("w1", "w3", "linear_fc1.weight"), rename("w2", "linear_fc2.weight")
    )
    src = {
        f"model.layers.1.moe.experts.{j}.{n}": rand(5, ARCH.hidden_size, seed=10 * j + i)
        for j in range(3)
        for i, n in enumerate(("w1", "w3", "w2"))
    }
    assert sorted(f"model.layers.1.{n}" for n in m.names_for(arch)) == sorted(src)
    mc = m.to_megatron(arch, src.__getitem__, "model.layers.1.", "decoder.layers.1.")
    assert sorted(mc) == sorted(
        f"decoder.layers.1.mlp.experts.local_experts.{j}.linear_fc{k}.weight"
        for j in range(3)
        for k in (1, 2)
    )
    fc1 = mc["decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.weight"]
    assert torch.equal(
        fc1, torch.cat([src["model.layers.1.moe.experts.2.w1"], src["model.layers.1.moe.experts.2.w3"]])
    )
    back = m.to_hf(arch, mc.__getitem__, "model.layers.1.", "decoder.layers.1.")
    assert sorted(back) == sorted(src) and all(torch.equal(back[n], t) for n, t in src.items())
    dense = dataclasses.replace(ARCH, num_experts=0)
    assert not m.when(dense)  # a dense architecture has no expert tensors
