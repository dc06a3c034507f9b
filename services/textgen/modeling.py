"""The inference model: a Megatron-layout decoder (GPT-2, Llama, Qwen2) with a slot-based KV cache.

Weights arrive in the Megatron canonical layout (``llm.models``), whatever the checkpoint format,
so one implementation serves HF and Megatron checkpoints alike. The KV cache is preallocated per
*slot*; a sequence keeps its slot from prefill to finish, so sequences can join and leave the running
batch between decode steps (continuous batching) without moving any cache.

Shape legend: N prompts in a prefill group, T padded prompt length, B sequences in a decode step,
h query heads, g KV heads (query groups), d head dim, H hidden, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llm.models.base import ArchConfig, split_qkv

Tensor = torch.Tensor
ROPE_SCALING = ("default", "linear", "llama3")
LAYER_TENSORS = (
    "self_attention.linear_qkv.layer_norm_weight",
    "self_attention.linear_qkv.weight",
    "self_attention.linear_proj.weight",
    "mlp.linear_fc1.layer_norm_weight",
    "mlp.linear_fc1.weight",
    "mlp.linear_fc2.weight",
)


class UnsupportedModel(ValueError):
    """The checkpoint cannot be served by this engine (a setting or tensor it does not know, or lacks)."""


@dataclass
class LayerWeights:
    ln1_w: Tensor
    ln1_b: Tensor | None
    qkv_w: Tensor  # rows ordered [all q heads | all k heads | all v heads]
    qkv_b: Tensor | None
    proj_w: Tensor
    proj_b: Tensor | None
    ln2_w: Tensor
    ln2_b: Tensor | None
    fc1_w: Tensor
    fc1_b: Tensor | None
    fc2_w: Tensor
    fc2_b: Tensor | None


class KVCache:
    """Per layer, keys and values for ``num_slots`` sequences of up to ``max_len`` tokens: [slots, g, L,
    d]."""

    @staticmethod
    def bytes_needed(arch: ArchConfig, *, num_slots: int, max_len: int, dtype: torch.dtype) -> int:
        per_layer = (
            num_slots
            * arch.num_query_groups
            * max_len
            * arch.head_dim
            * torch.empty((), dtype=dtype, device="cpu").element_size()
        )
        return 2 * arch.num_layers * per_layer

    def __init__(
        self, arch: ArchConfig, *, num_slots: int, max_len: int, dtype: torch.dtype, device: torch.device
    ):
        shape = (num_slots, arch.num_query_groups, max_len, arch.head_dim)
        # zeros, not empty: masked positions get weight 0, and 0 * NaN garbage would still be NaN.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(arch.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(arch.num_layers)]
        self.num_slots = num_slots
        self.max_len = max_len

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Positions ``[0, length)`` of slot ``src`` into slot ``dst``, every layer (a shared prefill)."""
        for k, v in zip(self.k, self.v):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]


def _inv_freq(arch: ArchConfig, device: torch.device) -> Tensor:
    d = arch.head_dim
    inv = 1.0 / (arch.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d))
    scaling = dict(arch.rope_scaling)
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        low_wl, high_wl = old_ctx / low, old_ctx / high
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        mid = (1 - smooth) * inv / factor + smooth * inv
        inv = torch.where((wavelen <= low_wl) & (wavelen >= high_wl), mid, scaled)
    elif kind not in (None, "default"):
        raise UnsupportedModel(
            f"rope_scaling type {kind!r} in the model's config is not supported by the textgen engine "
            f"(supported: {', '.join(ROPE_SCALING)})"
        )
    return inv


class Rope:
    """Rotary embedding tables (HF/Megatron rotate-half convention)."""

    def __init__(self, arch: ArchConfig, max_len: int, dtype: torch.dtype, device: torch.device):
        t = torch.arange(max_len, dtype=torch.float64, device=device)
        freqs = torch.outer(t, _inv_freq(arch, device))
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = emb.cos().to(dtype)
        self.sin = emb.sin().to(dtype)
        self.half = arch.head_dim // 2

    def rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x1, x2 = x[..., : self.half], x[..., self.half :]
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class DecoderLM:
    """Forward passes for prefill (a padded group of prompts) and decode (one token per sequence)."""

    def __init__(
        self,
        arch: ArchConfig,
        tensors: Iterable[tuple[str, Tensor]],
        *,
        dtype: torch.dtype,
        device: torch.device,
        max_len: int,
    ):
        self.arch = arch
        self.dtype = dtype
        self.device = device
        self.max_len = max_len
        w = {name: t.to(device=device, dtype=dtype) for name, t in tensors}
        missing = [
            n for n in ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight") if n not in w
        ]
        missing += [
            f"decoder.layers.{i}.{n}"
            for i in range(arch.num_layers)
            for n in LAYER_TENSORS
            if f"decoder.layers.{i}.{n}" not in w
        ]
        if missing:
            raise UnsupportedModel(
                f"the checkpoint lacks {len(missing)} tensor(s) {arch.architecture} needs, e.g. "
                f"{missing[0]!r}"
            )
        self.word_emb = w.pop("embedding.word_embeddings.weight")
        self.pos_emb = w.pop("embedding.position_embeddings.weight", None)
        self.out_w = w.pop("output_layer.weight", None)
        if self.out_w is None:
            self.out_w = self.word_emb
        self.final_w = w.pop("decoder.final_layernorm.weight")
        self.final_b = w.pop("decoder.final_layernorm.bias", None)
        self.layers = [self._layer(w, i) for i in range(arch.num_layers)]
        if w:
            raise UnsupportedModel(
                f"the checkpoint has {len(w)} tensor(s) the {arch.architecture} layout does not use, "
                f"e.g. {sorted(w)[0]!r}"
            )
        self.rope = Rope(arch, max_len, dtype, device) if arch.position_embedding == "rope" else None
        self.q_size = arch.num_attention_heads * arch.head_dim
        self.kv_size = arch.num_query_groups * arch.head_dim
        self.gqa = arch.num_query_groups != arch.num_attention_heads

    def _layer(self, w: dict[str, Tensor], i: int) -> LayerWeights:
        a, p = self.arch, f"decoder.layers.{i}."

        def pop(name: str) -> Tensor | None:
            return w.pop(p + name, None)

        def reorder(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            q, k, v = split_qkv(
                t, num_heads=a.num_attention_heads, num_groups=a.num_query_groups, head_dim=a.head_dim
            )
            return torch.cat([q, k, v], dim=0).contiguous()

        return LayerWeights(
            ln1_w=pop("self_attention.linear_qkv.layer_norm_weight"),
            ln1_b=pop("self_attention.linear_qkv.layer_norm_bias"),
            qkv_w=reorder(pop("self_attention.linear_qkv.weight")),
            qkv_b=reorder(pop("self_attention.linear_qkv.bias")),
            proj_w=pop("self_attention.linear_proj.weight"),
            proj_b=pop("self_attention.linear_proj.bias"),
            ln2_w=pop("mlp.linear_fc1.layer_norm_weight"),
            ln2_b=pop("mlp.linear_fc1.layer_norm_bias"),
            fc1_w=pop("mlp.linear_fc1.weight"),
            fc1_b=pop("mlp.linear_fc1.bias"),
            fc2_w=pop("mlp.linear_fc2.weight"),
            fc2_b=pop("mlp.linear_fc2.bias"),
        )

    # -- building blocks -------------------------------------------------------------------------
    def _norm(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.arch.normalization == "RMSNorm":
            return F.rms_norm(x, (x.shape[-1],), weight, self.arch.norm_eps)
        return F.layer_norm(x, (x.shape[-1],), weight, bias, self.arch.norm_eps)

    def _mlp(self, x: Tensor, lw: LayerWeights) -> Tensor:
        h = F.linear(x, lw.fc1_w, lw.fc1_b)
        if self.arch.gated:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return F.linear(h, lw.fc2_w, lw.fc2_b)

    def _embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        x = F.embedding(tokens, self.word_emb)
        if self.pos_emb is not None:
            x = x + F.embedding(positions, self.pos_emb)
        return x

    def logits(self, hidden: Tensor) -> Tensor:
        """Final-normed hidden [..., H] -> float32 logits [..., V]."""
        return F.linear(hidden, self.out_w).float()

    # -- forward passes --------------------------------------------------------------------------
    def prefill(self, tokens: Tensor, slots: Tensor, cache: KVCache) -> Tensor:
        """tokens [N, T] right-padded; writes cache[slots, :, :T]; returns final hidden [N, T, H].

        Right padding is harmless under a causal mask: real tokens never attend to later (pad) ones,
        and decode overwrites pad positions before they can be attended to.
        """
        a = self.arch
        N, T = tokens.shape
        positions = torch.arange(T, device=self.device)
        x = self._embed(tokens, positions)
        cos = sin = None
        if self.rope is not None:
            cos, sin = self.rope.cos[:T], self.rope.sin[:T]
        for i, lw in enumerate(self.layers):
            h = self._norm(x, lw.ln1_w, lw.ln1_b)
            qkv = F.linear(h, lw.qkv_w, lw.qkv_b)
            q = qkv[..., : self.q_size].view(N, T, a.num_attention_heads, a.head_dim).transpose(1, 2)
            k = (
                qkv[..., self.q_size : self.q_size + self.kv_size]
                .view(N, T, a.num_query_groups, a.head_dim)
                .transpose(1, 2)
            )
            v = (
                qkv[..., self.q_size + self.kv_size :]
                .view(N, T, a.num_query_groups, a.head_dim)
                .transpose(1, 2)
            )
            if cos is not None:
                q, k = self.rope.rotate(q, cos, sin), self.rope.rotate(k, cos, sin)
            cache.k[i][slots, :, :T] = k
            cache.v[i][slots, :, :T] = v
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.gqa)
            x = x + F.linear(o.transpose(1, 2).reshape(N, T, self.q_size), lw.proj_w, lw.proj_b)
            x = x + self._mlp(self._norm(x, lw.ln2_w, lw.ln2_b), lw)
        return self._norm(x, self.final_w, self.final_b)

    def decode(
        self, tokens: Tensor, positions: Tensor, slots: Tensor, cache: KVCache, *, contiguous: bool
    ) -> Tensor:
        """One step: tokens/positions/slots [B]; returns final hidden [B, H].

        ``contiguous`` means slots == arange(B): the cache is then read through a view, not a gather.
        """
        a = self.arch
        B = tokens.shape[0]
        span = int(positions.max()) + 1
        x = self._embed(tokens, positions)
        mask = None
        if B > 1:
            mask = (torch.arange(span, device=self.device)[None, :] <= positions[:, None])[:, None, None, :]
        cos = sin = None
        if self.rope is not None:
            cos, sin = self.rope.cos[positions][:, None, :], self.rope.sin[positions][:, None, :]
        for i, lw in enumerate(self.layers):
            h = self._norm(x, lw.ln1_w, lw.ln1_b)
            qkv = F.linear(h, lw.qkv_w, lw.qkv_b)
            q = qkv[:, : self.q_size].view(B, a.num_attention_heads, a.head_dim)
            k = qkv[:, self.q_size : self.q_size + self.kv_size].view(B, a.num_query_groups, a.head_dim)
            v = qkv[:, self.q_size + self.kv_size :].view(B, a.num_query_groups, a.head_dim)
            if cos is not None:
                q, k = self.rope.rotate(q, cos, sin), self.rope.rotate(k, cos, sin)
            ck, cv = cache.k[i], cache.v[i]
            ck[slots, :, positions] = k
            cv[slots, :, positions] = v
            if contiguous:
                keys, values = ck[:B, :, :span], cv[:B, :, :span]
            else:
                keys, values = ck[slots, :, :span], cv[slots, :, :span]
            o = F.scaled_dot_product_attention(
                q[:, :, None, :], keys, values, attn_mask=mask, enable_gqa=self.gqa
            )
            x = x + F.linear(o.reshape(B, self.q_size), lw.proj_w, lw.proj_b)
            x = x + self._mlp(self._norm(x, lw.ln2_w, lw.ln2_b), lw)
        return self._norm(x, self.final_w, self.final_b)

    def num_parameters(self) -> int:
        seen: set[int] = set()
        total = 0
        tensors = [self.word_emb, self.pos_emb, self.out_w, self.final_w, self.final_b]
        for lw in self.layers:
            tensors += list(vars(lw).values())
        for t in tensors:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total += t.numel()
        return total
