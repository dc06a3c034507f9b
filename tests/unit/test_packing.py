"""The pieces that keep the samples of a neat pack apart: positions, the block-diagonal mask, RoPE that
follows."""

import numpy as np
import pytest
import torch

from llm.mcore.packing import (
    block_causal_mask,
    follow_positions,
    has_isolated_samples,
    segment_positions,
    set_positions,
)

pytestmark = pytest.mark.unit


def test_positions_restart_per_sample_and_run_on_through_padding():
    segs = np.array([1, 1, 1, 2, 2, 3, 3, 3, 3, 0, 0])
    assert segment_positions(segs).tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3, 4, 5]
    assert segment_positions(np.array([1, 1, 1, 1, 0])).tolist() == [
        0,
        1,
        2,
        3,
        4,
    ]  # plain packing: one sequence


def test_the_mask_is_causal_within_a_sample_and_closed_between_samples():
    segs = torch.tensor([[1, 1, 2, 2, 2, 0]])
    allowed = ~block_causal_mask(segs)[0, 0]
    expect = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expect)
    assert has_isolated_samples(segs) and not has_isolated_samples(torch.tensor([[1, 1, 1, 0]]))


def test_rope_takes_the_positions_of_the_batch():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from llm.mcore import cpu_compat

    cpu_compat.apply()  # megatron-core's RoPE asks for the current CUDA device; on CPU that is the CPU
    holder = torch.nn.Module()
    holder.rotary_pos_emb = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=True)
    table = holder.rotary_pos_emb(16)  # [16, 1, 1, 8]: positions 0..15
    follow_positions(holder)
    assert torch.equal(holder.rotary_pos_emb(16), table)  # no positions set: megatron-core's own table
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    set_positions(holder, pos)
    got = holder.rotary_pos_emb(6)
    assert got.shape == (6, 2, 1, 8)
    for b in range(2):
        for t in range(6):
            assert torch.equal(got[t, b, 0], table[int(pos[b, t]), 0, 0])
    set_positions(holder, None)
    assert torch.equal(holder.rotary_pos_emb(6), table[:6])
