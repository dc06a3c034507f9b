"""The inference model: a Megatron-layout decoder (GPT-2, Llama, Qwen2) over a paged KV cache.

Weights arrive in the Megatron canonical layout (``llm.models``), whatever the checkpoint format,
so one implementation serves HF and Megatron checkpoints alike. The KV cache is one pool of fixed-size
blocks; a sequence's keys and values live in the blocks of its block table, so sequences join and leave
the running batch between decode steps (continuous batching) without moving any cache, and full blocks
can be shared between sequences (prefix caching, OpenAI's n).

Shape legend: N prompts in a prefill group, T padded prompt length, B sequences in a decode step,
h query heads, g KV heads (query groups), d head dim, H hidden, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llm.devices import compiled_library, linear_kernel, paged_attention_kernel, rms_norm_kernel
from llm.models.base import ArchConfig, megatron_names, split_qkv
from services.textgen.experts import Experts, mixture
from services.textgen.fused import FusedDecode, covers

Tensor = torch.Tensor
# A matmul's rows do not depend on how many other rows it holds once it holds this many (CPU GEMM kernels pick
# another path for a handful of rows; measured on this project's CPU: MKL's float32 GEMM differs at 1-3, 5-7
# and 9-11 rows and agrees from 12, oneDNN's linear agrees from 2); batch-invariant passes pad to it (see
# DecoderLM.prefill_packed).
MIN_INVARIANT_ROWS = 16
ROPE_SCALING = ("default", "linear", "llama3")


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
    fc1_w: Tensor | None  # the dense MLP (None in a mixture of experts)
    fc1_b: Tensor | None
    fc2_w: Tensor | None
    fc2_b: Tensor | None
    q_norm: Tensor | None = None  # RMSNorm weights [d] over each head's queries / keys (Qwen3)
    k_norm: Tensor | None = None
    moe: Experts | None = None


class PagedKVCache:
    """Per layer, keys and values of ``num_blocks`` blocks of ``block_size`` positions, stored flat as
    [num_blocks * block_size, g, d]: position p of a sequence with block table ``t`` is row
    ``t[p // block_size] * block_size + p % block_size`` (the bookkeeping is ``blocks.BlockPool``)."""

    @staticmethod
    def bytes_per_block(arch: ArchConfig, *, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype, device="cpu").element_size()
        return 2 * arch.num_layers * block_size * arch.num_query_groups * arch.head_dim * elem

    def __init__(
        self,
        arch: ArchConfig,
        *,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        shape = (num_blocks * block_size, arch.num_query_groups, arch.head_dim)
        # zeros, not empty: block 0 (the null block padded reads point at) must hold finite values, since a
        # masked position gets weight 0 and 0 * NaN garbage would still be NaN.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(arch.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(arch.num_layers)]
        self.num_blocks = num_blocks
        self.block_size = block_size

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def copy_block(self, src: int, dst: int) -> None:
        """Block ``src`` into block ``dst``, every layer (a sequence that shares another's prefill)."""
        bs = self.block_size
        for k, v in zip(self.k, self.v):
            k[dst * bs : (dst + 1) * bs] = k[src * bs : (src + 1) * bs]
            v[dst * bs : (dst + 1) * bs] = v[src * bs : (src + 1) * bs]

    def rows(self, tables: Tensor, positions: Tensor) -> Tensor:
        """Cache rows of ``positions`` [..] for block tables ``tables`` [B, nb] (positions [B, ..])."""
        bs = self.block_size
        return tables.gather(1, (positions // bs).reshape(tables.shape[0], -1)).reshape(
            positions.shape
        ) * bs + (positions % bs)


def _gather(cache: Tensor, rows: Tensor) -> Tensor:
    """Cache rows [B, S] of a flat cache [N, g, d] as keys or values [B, g, S, d] (a strided view of one
    copy: ``index_select`` is ~10x faster on CPU than advanced indexing with a 2-D index)."""
    B, S = rows.shape
    return cache.index_select(0, rows.reshape(-1)).view(B, S, *cache.shape[1:]).transpose(1, 2)


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
        self.linear = linear_kernel(device, dtype)  # F.linear, or the faster equivalent on this device
        self.rms_norm = rms_norm_kernel(device, dtype)  # likewise F.rms_norm
        # a decode step's attention read in place through the block tables where compiled, else gather + SDPA
        self.paged_attention = paged_attention_kernel(device, dtype)
        w = {name: t.to(device=device, dtype=dtype) for name, t in tensors}
        needed = [n for g in [None, *range(arch.num_layers)] for n in megatron_names(arch, g)]
        missing = [n for n in needed if n not in w and n != "output_layer.weight"]  # tied when absent
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
        # a key is seen from positions < its own + window (Mistral's sliding window; HF's mask), or always
        self.window = arch.sliding_window if arch.sliding_window and arch.sliding_window < max_len else None
        self.fused = self._fused_decode()  # a decode step in one compiled call, where it covers the model

    def _fused_decode(self) -> FusedDecode | None:
        """The compiled decode step (``services.textgen.fused``) where it covers this model on this device,
        after a two-sequence decode step computed both ways agrees; None otherwise (the composed path)."""
        lib = compiled_library(self.device, self.dtype)
        if lib is None or not covers(self.arch):
            return None
        fused = FusedDecode(lib, self)
        dev = self.device
        tokens, positions = torch.tensor([0, 1], device=dev), torch.tensor([0, 19], device=dev)
        tables = torch.tensor([[1, 0], [2, 3]], device=dev)  # the second sequence crosses into a 2nd block
        with torch.inference_mode():
            cache = PagedKVCache(self.arch, num_blocks=4, block_size=16, dtype=self.dtype, device=dev)
            want = self._run([_DecodePart(self, tokens, positions, tables, cache)])[0].float()
            try:
                got = fused(tokens, positions, tables, cache).float()
            except (RuntimeError, MemoryError, TypeError, ValueError):
                return None
        tol = 1e-3 if self.dtype == torch.float32 else 5e-2
        return fused if torch.allclose(got, want, rtol=tol, atol=tol) else None

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
            q_norm=pop("self_attention.q_layernorm.weight"),
            k_norm=pop("self_attention.k_layernorm.weight"),
            moe=Experts.take(pop, a.num_experts) if a.moe else None,
        )

    # -- building blocks -------------------------------------------------------------------------
    def _norm(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.arch.normalization == "RMSNorm":
            return self.rms_norm(x, weight, self.arch.norm_eps)
        return F.layer_norm(x, (x.shape[-1],), weight, bias, self.arch.norm_eps)

    def qk_norm(self, i: int, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Layer ``i``'s RMSNorm over each head's queries and keys ([..., d]), where the model has one."""
        lw = self.layers[i]
        if lw.q_norm is None:
            return q, k
        eps = self.arch.norm_eps
        return F.rms_norm(q, (q.shape[-1],), lw.q_norm, eps), F.rms_norm(k, (k.shape[-1],), lw.k_norm, eps)

    def visible(self, key_pos: Tensor, query_pos: Tensor) -> Tensor:
        """Which keys a query sees (broadcast shapes): the causal ones, within the sliding window if any."""
        seen = key_pos <= query_pos
        return seen if self.window is None else seen & (key_pos > query_pos - self.window)

    def _mlp(self, x: Tensor, lw: LayerWeights) -> Tensor:
        if lw.moe is not None:
            ffn = lambda h, fc1, fc2: self._ffn(h, fc1, None, fc2, None)  # noqa: E731
            return mixture(x, lw.moe, self.arch, linear=self.linear, ffn=ffn, min_rows=MIN_INVARIANT_ROWS)
        return self._ffn(x, lw.fc1_w, lw.fc1_b, lw.fc2_w, lw.fc2_b)

    def _ffn(self, x: Tensor, fc1: Tensor, b1: Tensor | None, fc2: Tensor, b2: Tensor | None) -> Tensor:
        h = self.linear(x, fc1, b1)
        if self.arch.gated:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.linear(h, fc2, b2)

    def _embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        x = F.embedding(tokens, self.word_emb)
        if self.pos_emb is not None:
            x = x + F.embedding(positions, self.pos_emb)
        return x

    def logits(self, hidden: Tensor) -> Tensor:
        """Final-normed hidden [..., H] -> float32 logits [..., V]. Up to ``fused.head_max_rows`` rows go to
        the thin matmul kernel (float32's lm head: 8.7 vs 12.9 ms at 16 rows, 15.6 vs 18.2 at 32 on this
        project's CPU; see services/textgen/fused.py), more to :attr:`linear`."""
        if self.fused is not None and 0 < hidden.numel() // hidden.shape[-1] <= self.fused.head_max_rows:
            return self.fused.head(hidden).float()
        return self.linear(hidden, self.out_w).float()

    # -- forward passes --------------------------------------------------------------------------
    def prefill(
        self, tokens: Tensor, starts: list[int], lengths: list[int], tables: Tensor, cache: PagedKVCache
    ) -> Tensor:
        """Prompt tokens [N, T], right-padded: row i holds ``lengths[i]`` tokens for positions
        ``starts[i]..`` (the positions before are already in its blocks: a cached prefix or earlier
        chunks). Writes their keys and values through the block tables [N, nb]; returns the final hidden
        states [N, T, H].

        With nothing before them the attention runs on the fresh keys under a causal mask (right padding is
        harmless: real tokens never attend to later ones); otherwise it reads each row's whole context
        through its block table, masked to its own positions.
        """
        part = _PrefillPart(self, tokens, starts, lengths, tables, cache)
        return self._run([part])[0]

    def prefill_packed(
        self, prompts: list[list[int]], starts: list[int], tables: Tensor, cache: PagedKVCache
    ) -> list[Tensor]:
        """Prompts back to back without padding, positions ``starts[i]..`` of each (those before are in its
        blocks: a prefix-cache hit); hidden [len(p) - start, H] per prompt.

        Batch-invariant: a prompt's numbers are the same whatever else is in the pass and whatever came from
        the cache. Attention runs per prompt over its whole context, and every matmul holds at least
        ``MIN_INVARIANT_ROWS`` rows (padding rows write no keys), where a row's result no longer depends on
        the others. Prompts that must reproduce (the evaluator's scoring) thus share passes and prefixes.
        """
        part = _PackedPart(self, prompts, starts, tables, cache)
        return list(self._run([part])[0][: part.real].split(part.lengths))

    def logits_invariant(self, hidden: Tensor) -> Tensor:
        """:meth:`logits` of ``hidden`` [n, H], the matmul padded to ``MIN_INVARIANT_ROWS`` rows: a row's
        logits do not depend on how many rows came with it."""
        n = hidden.shape[0]
        if n < MIN_INVARIANT_ROWS:
            hidden = torch.cat([hidden, hidden.new_zeros(MIN_INVARIANT_ROWS - n, hidden.shape[1])])
        return self.linear(hidden, self.out_w).float()[:n]  # never the decode head: one kernel for all n

    def decode(self, tokens: Tensor, positions: Tensor, tables: Tensor, cache: PagedKVCache) -> Tensor:
        """One step: tokens/positions [B], block tables [B, nb] (padded with the null block, wide enough
        for every position); returns final hidden [B, H]. Keys and values are read through the tables."""
        if self.fused is not None and tokens.shape[0] <= self.fused.max_rows:
            return self.fused(tokens, positions, tables, cache)
        return self._run([_DecodePart(self, tokens, positions, tables, cache)])[0]

    def step(
        self,
        decode: tuple[Tensor, Tensor, Tensor],
        prefill: tuple[Tensor, list[int], list[int], Tensor],
        cache: PagedKVCache,
    ) -> tuple[Tensor, Tensor]:
        """A decode step and a prefill in one forward pass: ``decode`` is (tokens, positions, tables) as
        for :meth:`decode`, ``prefill`` (tokens, starts, lengths, tables) as for :meth:`prefill`. Every
        token goes through the same matmuls (the weights are read once for both); attention is per part.
        Returns (decode hidden [B, H], prefill hidden [N, T, H])."""
        d = _DecodePart(self, *decode, cache)
        p = _PrefillPart(self, *prefill, cache)
        out = self._run([d, p])
        return out[0], out[1]

    def _run(self, parts: list[_Part]) -> list[Tensor]:
        """The layers over the tokens of every part, flattened [n, H]; attention part by part."""
        x = torch.cat([part.x for part in parts]) if len(parts) > 1 else parts[0].x
        sizes = [part.n for part in parts]
        for i, lw in enumerate(self.layers):
            qkv = self.linear(self._norm(x, lw.ln1_w, lw.ln1_b), lw.qkv_w, lw.qkv_b)  # (n, q + 2kv)
            if len(parts) == 1:
                o = parts[0].attend(i, qkv)
            else:
                o = torch.cat([part.attend(i, q) for part, q in zip(parts, qkv.split(sizes))])
            x = x + self.linear(o, lw.proj_w, lw.proj_b)
            x = x + self._mlp(self._norm(x, lw.ln2_w, lw.ln2_b), lw)
        x = self._norm(x, self.final_w, self.final_b)
        outs = x.split(sizes) if len(parts) > 1 else [x]
        return [part.shape_out(o) for part, o in zip(parts, outs)]

    def num_parameters(self) -> int:
        seen: set[int] = set()
        total = 0
        tensors = [self.word_emb, self.pos_emb, self.out_w, self.final_w, self.final_b]
        for lw in self.layers:
            tensors += [t for t in vars(lw).values() if isinstance(t, Tensor)]
            if lw.moe is not None:
                tensors += lw.moe.tensors()
        for t in tensors:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total += t.numel()
        return total


class _Part:
    """One kind of work in a forward pass: its tokens' embeddings [n, H] (``x``), its attention over the
    cache (``attend``: qkv [n, q + 2kv] -> [n, q], writing its keys and values), its output's shape."""

    n: int
    x: Tensor

    def attend(self, i: int, qkv: Tensor) -> Tensor:
        raise NotImplementedError

    def shape_out(self, hidden: Tensor) -> Tensor:
        return hidden


class _DecodePart(_Part):
    def __init__(self, m: DecoderLM, tokens: Tensor, positions: Tensor, tables: Tensor, cache: PagedKVCache):
        self.m, self.cache = m, cache
        B = self.n = tokens.shape[0]
        self.x = m._embed(tokens, positions)  # (B, H)
        self.write = cache.rows(tables, positions[:, None]).reshape(B)  # (B,)
        self.tables, self.positions = tables, positions
        self.cos = self.sin = None
        if m.rope is not None:
            self.cos, self.sin = m.rope.cos[positions][:, None, :], m.rope.sin[positions][:, None, :]
        if m.paged_attention is not None:
            return  # the kernel reads the context through the tables itself
        span = int(positions.max()) + 1
        ctx_pos = torch.arange(span, device=m.device)  # (span,)
        self.ctx = cache.rows(tables, ctx_pos.expand(B, span).contiguous())  # (B, span)
        self.mask = None
        if B > 1 or m.window is not None:
            inside = m.visible(ctx_pos[None, :], positions[:, None])  # (B, span)
            self.ctx = torch.where(inside, self.ctx, 0)
            self.mask = inside[:, None, None, :]

    def attend(self, i: int, qkv: Tensor) -> Tensor:
        m, a, B = self.m, self.m.arch, self.n
        g, d, h = a.num_query_groups, a.head_dim, a.num_attention_heads
        v = qkv[:, m.q_size + m.kv_size :].view(B, g, d)
        if m.layers[i].q_norm is None and self.cos is not None:  # queries and keys rotated in one go
            qk = m.rope.rotate(qkv[:, : m.q_size + m.kv_size].view(B, h + g, d), self.cos, self.sin)
            q, k = qk[:, :h], qk[:, h:]
        else:
            q = qkv[:, : m.q_size].view(B, h, d)
            k = qkv[:, m.q_size : m.q_size + m.kv_size].view(B, g, d)
            q, k = m.qk_norm(i, q, k)
            if self.cos is not None:
                q, k = m.rope.rotate(q, self.cos, self.sin), m.rope.rotate(k, self.cos, self.sin)
        ck, cv = self.cache.k[i], self.cache.v[i]
        ck.index_copy_(0, self.write, k)
        cv.index_copy_(0, self.write, v)
        if m.paged_attention is not None:
            o = m.paged_attention(
                q, ck, cv, self.tables, self.positions, block_size=self.cache.block_size, window=m.window
            )
            return o.reshape(B, m.q_size)
        keys, values = _gather(ck, self.ctx), _gather(cv, self.ctx)  # (B, g, span, d)
        o = F.scaled_dot_product_attention(
            q[:, :, None, :], keys, values, attn_mask=self.mask, enable_gqa=m.gqa
        )
        return o.reshape(B, m.q_size)


class _PrefillPart(_Part):
    def __init__(
        self,
        m: DecoderLM,
        tokens: Tensor,
        starts: list[int],
        lengths: list[int],
        tables: Tensor,
        cache: PagedKVCache,
    ):
        self.m, self.cache = m, cache
        dev = m.device
        N, T = self.shape = tokens.shape
        self.n = N * T
        start = torch.tensor(starts, dtype=torch.long, device=dev)  # (N,)
        length = torch.tensor(lengths, dtype=torch.long, device=dev)  # (N,)
        steps = torch.arange(T, device=dev)  # (T,)
        # a row's padding takes its last real position: past it lies no block of its table (a row whose
        # prompt is mostly cached starts late, and the group's longest row sets T)
        last = (length - 1).clamp(min=0)  # (N,)
        positions = (start[:, None] + torch.minimum(steps[None, :], last[:, None])).clamp_(max=m.max_len - 1)
        valid = (steps[None, :] < length[:, None]).reshape(-1)  # (N*T,)
        self.sel = valid.nonzero().squeeze(1)
        self.write = cache.rows(tables, positions).reshape(-1)[self.sel]  # (n,) rows of the real tokens
        self.fresh = not any(starts) and m.window is None
        if not self.fresh:
            S = max(a + n for a, n in zip(starts, lengths))
            ctx_pos = torch.arange(S, device=dev)  # (S,)
            ends = start + length  # (N,)
            ctx = cache.rows(tables, ctx_pos.expand(N, S).contiguous())  # (N, S)
            self.ctx = torch.where(ctx_pos[None, :] < ends[:, None], ctx, 0)  # the null block past each end
            allowed = m.visible(ctx_pos[None, None, :], positions[:, :, None]) & (
                ctx_pos[None, None, :] < ends[:, None, None]
            )  # (N, T, S)
            self.mask = allowed[:, None]  # (N, 1, T, S)
        self.x = m._embed(tokens, positions).reshape(N * T, -1)  # (N*T, H)
        self.cos = self.sin = None
        if m.rope is not None:
            self.cos, self.sin = (
                m.rope.cos[positions][:, None],
                m.rope.sin[positions][:, None],
            )  # (N, 1, T, d)

    def attend(self, i: int, qkv: Tensor) -> Tensor:
        m, a = self.m, self.m.arch
        N, T = self.shape
        g, d = a.num_query_groups, a.head_dim
        qkv = qkv.view(N, T, -1)
        q = qkv[..., : m.q_size].view(N, T, a.num_attention_heads, d).transpose(1, 2)
        k = qkv[..., m.q_size : m.q_size + m.kv_size].view(N, T, g, d).transpose(1, 2)
        v = qkv[..., m.q_size + m.kv_size :].view(N, T, g, d).transpose(1, 2)
        q, k = m.qk_norm(i, q, k)
        if self.cos is not None:
            q, k = m.rope.rotate(q, self.cos, self.sin), m.rope.rotate(k, self.cos, self.sin)
        ck, cv = self.cache.k[i], self.cache.v[i]
        ck[self.write] = k.transpose(1, 2).reshape(N * T, g, d)[self.sel]
        cv[self.write] = v.transpose(1, 2).reshape(N * T, g, d)[self.sel]
        if self.fresh:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=m.gqa)
        else:
            keys, values = _gather(ck, self.ctx), _gather(cv, self.ctx)  # (N, g, S, d)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask, enable_gqa=m.gqa)
        return o.transpose(1, 2).reshape(N * T, m.q_size)

    def shape_out(self, hidden: Tensor) -> Tensor:
        return hidden.view(*self.shape, -1)


class _PackedPart(_Part):
    """The rows still to compute of whole prompts, back to back [n, H] (``real`` rows, then padding up to
    ``MIN_INVARIANT_ROWS``). Each prompt attends over its own context only, read from the cache (a cached
    prefix and this pass's rows alike), with every matmul padded to ``MIN_INVARIANT_ROWS`` rows: row p's
    numbers depend on the prompt's tokens up to p and its length, not on how many rows this pass holds, so
    a prompt scored after a prefix-cache hit gets the bits of one computed whole."""

    def __init__(
        self, m: DecoderLM, prompts: list[list[int]], starts: list[int], tables: Tensor, cache: PagedKVCache
    ):
        self.m, self.cache = m, cache
        dev = m.device
        self.totals = [len(p) for p in prompts]
        self.lengths = [len(p) - a for p, a in zip(prompts, starts)]
        self.real = sum(self.lengths)
        pad = max(0, MIN_INVARIANT_ROWS - self.real)
        self.n = self.real + pad
        tokens = [t for p, a in zip(prompts, starts) for t in p[a:]] + [0] * pad
        spans = [torch.arange(a, n, device=dev) for a, n in zip(starts, self.totals)]  # positions per prompt
        positions = torch.cat([*spans, torch.zeros(pad, dtype=torch.long, device=dev)]).clamp_(
            max=m.max_len - 1
        )  # (n,)
        self.x = m._embed(torch.tensor(tokens, dtype=torch.long, device=dev), positions)  # (n, H)
        self.ctx = [
            cache.rows(tables[j : j + 1], torch.arange(n, device=dev)[None]).reshape(n)
            for j, n in enumerate(self.totals)
        ]  # each prompt's whole context, (total,)
        self.write = [c[a:] for c, a in zip(self.ctx, starts)]  # the rows this pass writes, (length,)
        self.allowed = [
            m.visible(torch.arange(n, device=dev)[None, :], sp[:, None]) for sp, n in zip(spans, self.totals)
        ]  # (length, total)
        self.cos = self.sin = None
        if m.rope is not None:
            self.cos, self.sin = m.rope.cos[positions][None], m.rope.sin[positions][None]  # (1, n, d)

    def attend(self, i: int, qkv: Tensor) -> Tensor:
        m, a = self.m, self.m.arch
        g, d, h = a.num_query_groups, a.head_dim, a.num_attention_heads
        ck, cv = self.cache.k[i], self.cache.v[i]
        outs, at = [], 0
        for r, write, ctx, allowed in zip(self.lengths, self.write, self.ctx, self.allowed):
            x = qkv[at : at + r]  # (r, q + 2kv)
            q = x[:, : m.q_size].view(r, h, d).transpose(0, 1)  # (h, r, d)
            k = x[:, m.q_size : m.q_size + m.kv_size].view(r, g, d).transpose(0, 1)  # (g, r, d)
            v = x[:, m.q_size + m.kv_size :].view(r, g, d)  # (r, g, d)
            q, k = m.qk_norm(i, q, k)
            if self.cos is not None:
                cos, sin = self.cos[:, at : at + r], self.sin[:, at : at + r]
                q, k = m.rope.rotate(q, cos, sin), m.rope.rotate(k, cos, sin)
            ck[write] = k.transpose(0, 1)
            cv[write] = v
            keys = ck.index_select(0, ctx).transpose(0, 1)  # (g, total, d)
            values = cv.index_select(0, ctx).transpose(0, 1)  # (g, total, d)
            outs.append(_invariant_attention(q, keys, values, allowed).transpose(0, 1).reshape(r, m.q_size))
            at += r
        if self.n > self.real:
            outs.append(qkv.new_zeros(self.n - self.real, m.q_size))
        return torch.cat(outs)


def _invariant_attention(q: Tensor, keys: Tensor, values: Tensor, allowed: Tensor) -> Tensor:
    """Attention of queries q [h, r, d] over keys/values [g, S, d] (query heads grouped per key head),
    ``allowed`` [r, S]; returns [h, r, d]. Both matmuls hold at least ``MIN_INVARIANT_ROWS`` query rows (zero
    rows added), so a query's result does not depend on how many others came with it."""
    h, r, d = q.shape
    g, S, _ = keys.shape
    R = max(r, MIN_INVARIANT_ROWS)
    qp = torch.cat([q, q.new_zeros(h, R - r, d)], 1) if R > r else q  # (h, R, d)
    scores = torch.bmm(qp.reshape(g, (h // g) * R, d), keys.transpose(1, 2))  # (g, h/g*R, S)
    scores = scores.view(h, R, S)[:, :r] * (1.0 / math.sqrt(d))
    w = torch.softmax(scores.float().masked_fill(~allowed, float("-inf")), dim=-1).to(q.dtype)  # (h, r, S)
    wp = torch.cat([w, w.new_zeros(h, R - r, S)], 1) if R > r else w  # (h, R, S)
    out = torch.bmm(wp.reshape(g, (h // g) * R, S), values)  # (g, h/g*R, d)
    return out.view(h, R, d)[:, :r]
