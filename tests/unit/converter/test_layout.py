import pytest
import torch

from llm.checkpoints import layout as L
from shared.errors import InvalidArgument


@pytest.mark.parametrize(
    "name,shape,gated",
    [
        ("decoder.layers.0.self_attention.linear_qkv.weight", (24, 8), False),
        ("decoder.layers.0.self_attention.linear_proj.weight", (8, 12), False),
        ("decoder.layers.0.mlp.linear_fc1.weight", (16, 8), True),
        ("decoder.layers.0.mlp.linear_fc1.bias", (16,), True),
        ("decoder.layers.0.mlp.linear_fc2.weight", (8, 8), True),
        ("embedding.word_embeddings.weight", (10, 8), False),
        ("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", (8,), False),
    ],
)
@pytest.mark.parametrize("tp", [1, 2])
def test_shard_then_merge_is_identity(name, shape, gated, tp):
    t = torch.randn(shape)
    parts = [L.shard(name, t, tp=tp, rank=r, gated=gated) for r in range(tp)]
    assert torch.equal(L.merge(name, parts, gated=gated), t)


def test_swiglu_rank_holds_its_gate_and_up_halves():
    gate, up = torch.arange(8.0).reshape(4, 2), 100 + torch.arange(8.0).reshape(4, 2)
    r1 = L.shard("decoder.layers.0.mlp.linear_fc1.weight", torch.cat([gate, up]), tp=2, rank=1, gated=True)
    assert torch.equal(r1, torch.cat([gate[2:], up[2:]]))


def test_vocab_padding_repeats_the_last_row():
    t = torch.arange(6.0).reshape(3, 2)
    padded = L.pad_vocab(t, 5)
    assert padded.shape == (5, 2) and torch.equal(padded[3], t[2]) and torch.equal(padded[4], t[2])


def test_pipeline_layouts():
    assert L.PipelineLayout.build(6, 2, num_layer_list=[2, 4]).chunks() == [(0, 0, 0, 2), (1, 0, 2, 4)]
    # interleaved: chunk 0 of every stage, then chunk 1
    assert L.PipelineLayout.build(8, 2, layers_per_virtual_stage=2).chunks() == [
        (0, 0, 0, 2),
        (1, 0, 2, 2),
        (0, 1, 4, 2),
        (1, 1, 6, 2),
    ]
    with pytest.raises(InvalidArgument, match="does not divide 6 layers"):
        L.PipelineLayout.build(6, 4)
    with pytest.raises(InvalidArgument, match="sum to 6 layers"):
        L.PipelineLayout.build(6, 2, num_layer_list=[2, 2])


def test_stored_names_are_normalised():
    assert L.from_stored("decoder.layers.3.input_layernorm.weight") == (
        3,
        "self_attention.linear_qkv.layer_norm_weight",
    )
    assert L.from_stored("language_model.encoder.layers.1.mlp.dense_4h_to_h.weight") == (
        1,
        "mlp.linear_fc2.weight",
    )
    assert L.from_stored("decoder.layers.0.mlp.linear_fc1._extra_state") is None
