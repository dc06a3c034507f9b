"""A decode step in one compiled call (``llm.thin_linear.decode_step``) for the dense models it covers.

On a small CPU host a decode step of a ~100M-parameter model spends a third of its time outside the weight
reads: ~15 PyTorch ops and five kernel calls per layer, each with its dispatch and OpenMP fork. The compiled
step runs every layer in one call and one OpenMP region. ``DecoderLM`` uses it for decode steps of at most
``MAX_ROWS`` sequences, after checking it against the composed path on the model itself. Its numbers are
the composed path's up to the rounding of a few products; a batch-invariant sequence decodes alone, so always
through the same path.
"""

from __future__ import annotations

import torch

from llm import thin_linear
from llm.models.base import ArchConfig

Tensor = torch.Tensor
# Decode steps of up to this many sequences take the compiled step (measured on this project's 2-core Zen 3
# VM, SmolLM2-135M, a whole step with the lm head: float32 63.6 vs 86.0 ms at 16 sequences, 105 vs 120 at 32,
# 208 vs 207 at 64; bfloat16 109 vs 125 at 32, 213 vs 250 at 64); wider ones take the composed path, whose
# float32 matmuls are oneDNN's from 13 rows.
MAX_ROWS = {torch.float32: 32, torch.bfloat16: 1 << 30}
# With AVX-512's 16-lane tiles (llm.thin_linear.vector_isa) the compiled float32 step wins further (this
# project's 2-core AVX-512 VM, the same step, medians of 3 interleaved rounds: 59 vs 64 ms at 40 sequences,
# 63 vs 81 at 48, 78 vs 90 at 56, 88 vs 87 at 64).
MAX_ROWS_AVX512 = {torch.float32: 64, torch.bfloat16: 1 << 30}
# The lm head (vocabulary-wide, 576 inputs for SmolLM2) of up to this many rows goes to the thin kernel, more
# to oneDNN (float32, SmolLM2-135M's head on the same VM: 22.2 vs 36.5 ms at 32 rows, 39-43 vs 51-63 at 64,
# 64.0 vs 57.8 at 96, 92 vs 89 at 128; bfloat16's thin head is 3-6x oneDNN's at 32 to 256 rows).
HEAD_MAX_ROWS = {torch.float32: 64, torch.bfloat16: 1 << 30}


def covers(arch: ArchConfig) -> bool:
    """Whether the compiled step computes this architecture: RMSNorm, a gated SiLU MLP, rotary embeddings
    (or none), no mixture of experts, even head dim."""
    return (
        arch.normalization == "RMSNorm"
        and arch.gated
        and arch.position_embedding == "rope"
        and not arch.moe
        and arch.head_dim % 2 == 0
        and arch.num_attention_heads % arch.num_query_groups == 0
    )


class FusedDecode:
    """``DecoderLM.decode`` in one call: the layers' tensor addresses gathered once (the weights never move),
    the caches' addresses once per cache."""

    def __init__(self, lib, m):
        self.lib, self.m = lib, m
        self.max_rows = (MAX_ROWS_AVX512 if thin_linear.vector_isa(lib) == "avx512" else MAX_ROWS)[m.dtype]
        self.head_max_rows = HEAD_MAX_ROWS[m.dtype]
        for lw in m.layers:
            if lw.moe is not None or lw.fc1_w is None:
                raise ValueError("the compiled decode step covers dense layers only")
        self.layers = torch.stack(
            [thin_linear.pointers([getattr(lw, f) for f in thin_linear.STEP_LAYER_FIELDS]) for lw in m.layers]
        )  # (L, 12)
        self.final_w = m.final_w.contiguous()
        self.out_w = m.out_w.contiguous()
        self._caches: dict[int, tuple[object, Tensor, Tensor]] = {}

    def head(self, hidden: Tensor) -> Tensor:
        """The lm head of a decode step's final hidden states [..., H] with the thin matmul kernel (row
        results independent of the other rows), in the model's dtype."""
        return thin_linear.thin_linear(self.lib, hidden, self.out_w)

    def _addresses(self, cache) -> tuple[Tensor, Tensor]:
        hit = self._caches.get(id(cache))
        if hit is None or hit[0] is not cache:
            hit = (cache, thin_linear.pointers(cache.k), thin_linear.pointers(cache.v))
            self._caches = {id(cache): hit}  # one cache per engine: keep the latest only
        return hit[1], hit[2]

    def __call__(self, tokens: Tensor, positions: Tensor, tables: Tensor, cache) -> Tensor:
        """Final hidden [B, H] of one decode step, as ``DecoderLM.decode``."""
        m, a = self.m, self.m.arch
        x = m._embed(tokens, positions).contiguous()  # (B, H), overwritten with the final hidden states
        cos = sin = None
        if m.rope is not None:
            cos, sin = m.rope.cos[positions], m.rope.sin[positions]  # (B, d)
        k_ptrs, v_ptrs = self._addresses(cache)
        return thin_linear.decode_step(
            self.lib,
            x,
            self.layers,
            k_ptrs,
            v_ptrs,
            self.final_w,
            tables,
            positions,
            cache.rows(tables, positions[:, None]).reshape(-1),
            cos,
            sin,
            heads=a.num_attention_heads,
            groups=a.num_query_groups,
            head_dim=a.head_dim,
            ffn=a.ffn_hidden_size,
            block_size=cache.block_size,
            window=m.window,
            eps=a.norm_eps,
        )
