"""Packed SFT samples kept apart: per-sample positions, a block-diagonal causal mask, and RoPE that follows
them.

A pack is one row of ``seq_length`` tokens holding several samples. Its ``segments`` row says which sample
each token belongs to, as ModelLink writes ``{prefix}_packed_attention_mask_document``: with ``--neat-pack``
the 1-based index of the sample in the pack, with plain ``--pack`` 1 for every real token (ModelLink then
trains the pack as one sequence), 0 for padding. As ModelLink's fine-tuning does, a token attends to the
earlier tokens of its own segment only, and positions restart at 0 where a new sample starts, so each sample
of a neat pack computes exactly what it computes alone.

megatron-core's GPTModel computes RoPE for positions ``0..s-1`` whatever ``position_ids`` it is given (only
learned absolute embeddings read them); :func:`follow_positions` makes a model's rotary embedding read the
positions of the micro-batch set by :func:`set_positions` instead, one angle table per token.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def segment_positions(segments: np.ndarray) -> np.ndarray:
    """Positions that restart at 0 where a new sample starts; padding (segment 0) runs on from the sample
    before."""
    s = len(segments)
    idx = np.arange(s)
    starts = np.ones(s, dtype=bool)
    starts[1:] = (segments[1:] != segments[:-1]) & (segments[1:] != 0)
    return idx - np.maximum.accumulate(np.where(starts, idx, 0))


def has_isolated_samples(segments: torch.Tensor) -> bool:
    """True when some row holds more than one sample (a neat pack): only then is an explicit mask needed."""
    return bool(segments.numel()) and int(segments.max()) > 1


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] bool, True where a query may NOT attend a key (megatron-core's convention): a later key,
    or one of another segment."""
    s = segments.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]
    return ~(same & causal)[:, None]


def _gpt(model: torch.nn.Module) -> torch.nn.Module:
    inner: Any = model
    while hasattr(inner, "module"):  # DDP, Float16Module
        inner = inner.module
    return inner


def follow_positions(model: torch.nn.Module) -> None:
    """Let ``model``'s RoPE (if it has one) take per-token positions from :func:`set_positions`."""
    rope = getattr(_gpt(model), "rotary_pos_emb", None)
    if rope is None or getattr(rope, "megastack_follows_positions", False):
        return
    table_for = rope.forward  # megatron-core's: angles of positions 0..n-1, [n, 1, 1, dim]
    rope.megastack_positions = None

    def forward(max_seq_len: int, *args, **kwargs):
        positions = rope.megastack_positions
        if positions is None:
            return table_for(max_seq_len, *args, **kwargs)
        table = table_for(int(positions.max()) + 1, *args, **kwargs)
        return table[positions.t()].squeeze(
            2
        )  # [s, b, 1, dim]: broadcasts over heads like the [s, 1, 1, dim] table

    rope.forward = forward
    rope.megastack_follows_positions = True


def set_positions(model: torch.nn.Module, positions: torch.Tensor | None) -> None:
    """Positions ([b, s]) for the next forward of ``model``, or None for 0..s-1."""
    rope = getattr(_gpt(model), "rotary_pos_emb", None)
    if rope is not None:
        rope.megastack_positions = positions
